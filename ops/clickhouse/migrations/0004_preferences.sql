-- preferences.v1: what users preferred, mined by the streams worker (services/preferences/mining.py).
-- The reward model's held-out figures (heldout_auroc, heldout_brier, heldout_ece, ...) need no
-- table of their own: they ride in model_updates.eval_metrics of model 'rewardmodel-minilm'.

CREATE TABLE IF NOT EXISTS preferences (
    event_id String,
    event_time DateTime64(3),
    tenant_id LowCardinality(String),
    generation_id String,
    kind LowCardinality(String),
    model LowCardinality(String),
    prompt String,
    chosen Nullable(String),
    rejected Nullable(String),
    chosen_generation_id Nullable(String),
    rejected_generation_id Nullable(String),
    margin Float64,
    feedback_count UInt16,
    user_id String,
    ingested_at DateTime64(3) DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, event_id)
PARTITION BY toYYYYMM(event_time)
TTL toDateTime(event_time) + INTERVAL 180 DAY;
