-- One table per topic. ReplacingMergeTree keyed on event_id: a redelivered event
-- (same event_id, same fields) collapses into one row; read with FINAL for exact counts.
-- Token id arrays stay on Kafka; ClickHouse keeps text, counts and figures.

CREATE TABLE IF NOT EXISTS generations (
    event_id String,
    event_time DateTime64(3),
    tenant_id LowCardinality(String),
    generation_id String,
    model LowCardinality(String),
    policy_version UInt32,
    prompt String,
    completion String,
    prompt_tokens UInt32,
    completion_tokens UInt32,
    completion_logprob_sum Float64,
    temperature Float32,
    top_p Float32,
    max_tokens UInt32,
    finish_reason LowCardinality(String),
    user_id String,
    session_id Nullable(String),
    replica_id LowCardinality(Nullable(String)),
    latency_ms Nullable(Float64),
    ingested_at DateTime64(3) DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, event_id)
PARTITION BY toYYYYMM(event_time)
TTL toDateTime(event_time) + INTERVAL 90 DAY;

CREATE TABLE IF NOT EXISTS feedback (
    event_id String,
    event_time DateTime64(3),
    tenant_id LowCardinality(String),
    generation_id String,
    kind LowCardinality(String),
    value Nullable(Float64),
    edited_text Nullable(String),
    final UInt8,
    user_id String,
    session_id Nullable(String),
    ingested_at DateTime64(3) DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, event_id)
PARTITION BY toYYYYMM(event_time)
TTL toDateTime(event_time) + INTERVAL 90 DAY;

CREATE TABLE IF NOT EXISTS samples (
    event_id String,
    event_time DateTime64(3),
    tenant_id LowCardinality(String),
    generation_id String,
    model LowCardinality(String),
    policy_version UInt32,
    reward Float64,
    reward_components Map(LowCardinality(String), Float64),
    settle_reason LowCardinality(String),
    corrects_event_id Nullable(String),
    feedback_count UInt16,
    completion_tokens UInt32,
    completion_chars UInt32,
    user_id String,
    generated_at DateTime64(3),
    ingested_at DateTime64(3) DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
ORDER BY (tenant_id, event_id)
PARTITION BY toYYYYMM(event_time)
TTL toDateTime(event_time) + INTERVAL 180 DAY;

CREATE TABLE IF NOT EXISTS model_updates (
    event_id String,
    event_time DateTime64(3),
    tenant_id LowCardinality(String),
    model LowCardinality(String),
    version UInt32,
    parent_version Nullable(UInt32),
    artifact_kind LowCardinality(String),
    artifact_url String,
    base_version Nullable(UInt32),
    sha256 String,
    size_bytes UInt64,
    eval_metrics Map(LowCardinality(String), Float64),
    rollback UInt8,
    ingested_at DateTime64(3) DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
ORDER BY (model, event_id);

CREATE TABLE IF NOT EXISTS replica_status (
    event_id String,
    event_time DateTime64(3),
    tenant_id LowCardinality(String),
    replica_id String,
    model LowCardinality(String),
    version UInt32,
    state LowCardinality(String),
    engine LowCardinality(String),
    url Nullable(String),
    error Nullable(String),
    requests_total UInt64,
    ingested_at DateTime64(3) DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
ORDER BY (replica_id, event_id)
TTL toDateTime(event_time) + INTERVAL 30 DAY;

CREATE TABLE IF NOT EXISTS dead_letters (
    event_id String,
    event_time DateTime64(3),
    tenant_id LowCardinality(String),
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    key_b64 Nullable(String),
    original_b64 String,
    error_field Nullable(String),
    reason String,
    rejected_by LowCardinality(String),
    ingested_at DateTime64(3) DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
ORDER BY (source_topic, event_id)
TTL toDateTime(event_time) + INTERVAL 30 DAY;

CREATE TABLE IF NOT EXISTS rollouts (
    event_id String,
    event_time DateTime64(3),
    tenant_id LowCardinality(String),
    model LowCardinality(String),
    stable_version UInt32,
    candidate_version Nullable(UInt32),
    candidate_traffic Float64,
    decision LowCardinality(String),
    reason String,
    arms Map(LowCardinality(String), Float64),
    ingested_at DateTime64(3) DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
ORDER BY (model, event_id);
