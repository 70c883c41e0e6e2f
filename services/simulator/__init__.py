"""Simulated users: they call the replicas through the OpenAI API and give feedback
according to a hidden preference that nothing else in the loop knows."""
