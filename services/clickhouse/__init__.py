"""ClickHouse access shared by every process: clients from URLs and versioned migrations."""
