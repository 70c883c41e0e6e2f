"""`rlfeed up`: the embedded stack (broker, topics, ClickHouse, sink) in one process."""
