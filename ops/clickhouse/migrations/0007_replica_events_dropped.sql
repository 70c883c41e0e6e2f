-- replica-status.v1 carries the events each replica lost (generations, its own status),
-- by reason, cumulative since the replica started. The `replica_dropping_events` alert
-- reads the increase over `replica_drop_window_s` (services/dashboard/alerts.py).
ALTER TABLE replica_status ADD COLUMN IF NOT EXISTS events_dropped Map(LowCardinality(String), UInt64) AFTER requests_total;
