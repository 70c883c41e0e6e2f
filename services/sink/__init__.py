"""The ClickHouse sink: every topic into its table, idempotently, offsets after inserts."""
