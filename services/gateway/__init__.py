"""The ingest gateway (`rlfeed gateway`): product apps POST feedback and generations over
HTTP; the gateway authenticates them per tenant, validates, deduplicates and writes them to
Kafka with acks=all. See README.md in this directory."""
