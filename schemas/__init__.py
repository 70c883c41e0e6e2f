"""rlfeed's contracts: event models, the topic registry and the JSON codec."""
