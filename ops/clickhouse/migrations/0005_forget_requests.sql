-- forget-requests.v1: the audit trail of `rlfeed forget USER_ID` (one row per forgotten
-- tenant and user; event_id is derived from both, so a repeated request replaces its row).
-- The user's own rows are deleted from every table with a user_id column; this one keeps
-- the pseudonymous id on purpose, as the record that it was forgotten.

CREATE TABLE IF NOT EXISTS forget_requests (
    event_id String,
    event_time DateTime64(3),
    tenant_id LowCardinality(String),
    user_id String,
    requested_by String,
    ingested_at DateTime64(3) DEFAULT now64(3)
) ENGINE = ReplacingMergeTree(event_time)
ORDER BY (tenant_id, event_id);
