"""Kafka client helpers shared by every process: URLs, topic admin, the embedded broker."""
