-- Rollups the dashboard and Grafana read: per-minute aggregates filled by materialized
-- views as the sink inserts, plus the consumer_lag and alerts tables the stack fills.
--
-- Each rollup is a target table (SummingMergeTree / AggregatingMergeTree / Replacing)
-- and a `*_mv` view that writes into it (`TO`), so a view can be dropped and rebuilt
-- without losing data. Views see every insert, so a batch the sink redelivers after a
-- crash is counted twice here (the raw tables collapse it; the rollups do not): rollups
-- are for trends and alerts, `FINAL` on the raw tables for exact counts.
-- Always read a rollup with GROUP BY and sum()/ *Merge(): merges are eventual.

CREATE TABLE IF NOT EXISTS reward_1m (
    minute DateTime,
    model LowCardinality(String),
    policy_version UInt32,
    samples UInt64,
    reward_sum Float64,
    reward_sq_sum Float64,
    accepts UInt64,
    rejects UInt64,
    thumbs_up UInt64,
    thumbs_down UInt64,
    completion_chars_sum UInt64
) ENGINE = SummingMergeTree
ORDER BY (model, policy_version, minute)
TTL minute + INTERVAL 180 DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS reward_1m_mv TO reward_1m AS
SELECT
    toStartOfMinute(event_time) AS minute,
    model,
    policy_version,
    toUInt64(count()) AS samples,
    sum(reward) AS reward_sum,
    sum(reward * reward) AS reward_sq_sum,
    toUInt64(countIf(mapContains(reward_components, 'accept'))) AS accepts,
    toUInt64(countIf(mapContains(reward_components, 'reject'))) AS rejects,
    toUInt64(countIf(reward_components['thumb'] > 0)) AS thumbs_up,
    toUInt64(countIf(reward_components['thumb'] < 0)) AS thumbs_down,
    toUInt64(sum(completion_chars)) AS completion_chars_sum
FROM samples
GROUP BY minute, model, policy_version;

CREATE TABLE IF NOT EXISTS feedback_1m (
    minute DateTime,
    kind LowCardinality(String),
    events UInt64
) ENGINE = SummingMergeTree
ORDER BY (kind, minute)
TTL minute + INTERVAL 90 DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS feedback_1m_mv TO feedback_1m AS
SELECT toStartOfMinute(event_time) AS minute, kind, toUInt64(count()) AS events
FROM feedback
GROUP BY minute, kind;

CREATE TABLE IF NOT EXISTS generations_1m (
    minute DateTime,
    model LowCardinality(String),
    policy_version UInt32,
    generations SimpleAggregateFunction(sum, UInt64),
    empty SimpleAggregateFunction(sum, UInt64),
    truncated SimpleAggregateFunction(sum, UInt64),
    tokens_sum SimpleAggregateFunction(sum, UInt64),
    tokens_max SimpleAggregateFunction(max, UInt32),
    chars_sum SimpleAggregateFunction(sum, UInt64),
    distinct_completions AggregateFunction(uniq, UInt64),
    tokens_q AggregateFunction(quantiles(0.5, 0.95), UInt32)
) ENGINE = AggregatingMergeTree
ORDER BY (model, policy_version, minute)
TTL minute + INTERVAL 90 DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS generations_1m_mv TO generations_1m AS
SELECT
    toStartOfMinute(event_time) AS minute,
    model,
    policy_version,
    toUInt64(count()) AS generations,
    toUInt64(countIf(completion_tokens = 0 OR empty(trimBoth(completion)))) AS empty,
    toUInt64(countIf(finish_reason = 'length' OR (max_tokens > 0 AND completion_tokens >= max_tokens))) AS truncated,
    toUInt64(sum(completion_tokens)) AS tokens_sum,
    max(completion_tokens) AS tokens_max,
    toUInt64(sum(lengthUTF8(completion))) AS chars_sum,
    uniqState(cityHash64(completion)) AS distinct_completions,
    quantilesState(0.5, 0.95)(completion_tokens) AS tokens_q
FROM generations
GROUP BY minute, model, policy_version;

CREATE TABLE IF NOT EXISTS latency_1m (
    minute DateTime,
    model LowCardinality(String),
    requests SimpleAggregateFunction(sum, UInt64),
    latency_q AggregateFunction(quantiles(0.5, 0.95, 0.99), Float64)
) ENGINE = AggregatingMergeTree
ORDER BY (model, minute)
TTL minute + INTERVAL 90 DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS latency_1m_mv TO latency_1m AS
SELECT
    toStartOfMinute(event_time) AS minute,
    model,
    toUInt64(count()) AS requests,
    quantilesState(0.5, 0.95, 0.99)(assumeNotNull(latency_ms)) AS latency_q
FROM generations
WHERE latency_ms IS NOT NULL
GROUP BY minute, model;

CREATE TABLE IF NOT EXISTS dead_letters_1m (
    minute DateTime,
    source_topic LowCardinality(String),
    rejected_by LowCardinality(String),
    reason String,
    letters UInt64
) ENGINE = SummingMergeTree
ORDER BY (source_topic, rejected_by, reason, minute)
TTL minute + INTERVAL 30 DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS dead_letters_1m_mv TO dead_letters_1m AS
SELECT
    toStartOfMinute(event_time) AS minute,
    source_topic,
    rejected_by,
    leftUTF8(if(ifNull(error_field, '') != '', assumeNotNull(error_field), splitByChar('\n', reason)[1]), 80) AS reason,
    toUInt64(count()) AS letters
FROM dead_letters
GROUP BY minute, source_topic, rejected_by, reason;

CREATE TABLE IF NOT EXISTS replica_latest (
    model LowCardinality(String),
    replica_id String,
    version UInt32,
    state LowCardinality(String),
    engine LowCardinality(String),
    requests_total UInt64,
    event_time DateTime64(3)
) ENGINE = ReplacingMergeTree(event_time)
ORDER BY (model, replica_id)
TTL toDateTime(event_time) + INTERVAL 30 DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS replica_latest_mv TO replica_latest AS
SELECT model, replica_id, version, state, engine, requests_total, event_time
FROM replica_status;

CREATE TABLE IF NOT EXISTS trainer_metrics (
    event_time DateTime64(3),
    model LowCardinality(String),
    version UInt32,
    parent_version Nullable(UInt32),
    rollback UInt8,
    metric LowCardinality(String),
    value Float64
) ENGINE = ReplacingMergeTree
ORDER BY (model, version, metric, event_time)
TTL toDateTime(event_time) + INTERVAL 365 DAY;

CREATE MATERIALIZED VIEW IF NOT EXISTS trainer_metrics_mv TO trainer_metrics AS
SELECT event_time, model, version, parent_version, rollback, m.1 AS metric, m.2 AS value
FROM model_updates
ARRAY JOIN CAST(eval_metrics, 'Array(Tuple(String, Float64))') AS m;

CREATE TABLE IF NOT EXISTS consumer_lag (
    ts DateTime64(3),
    consumer_group LowCardinality(String),
    topic LowCardinality(String),
    partition Int32,
    committed Int64,
    high_watermark Int64,
    lag Int64
) ENGINE = MergeTree
ORDER BY (consumer_group, topic, partition, ts)
TTL toDateTime(ts) + INTERVAL 7 DAY;

CREATE TABLE IF NOT EXISTS alerts (
    ts DateTime64(3),
    rule LowCardinality(String),
    key String,
    status LowCardinality(String),
    severity LowCardinality(String),
    message String,
    value Float64,
    threshold Float64,
    details String
) ENGINE = MergeTree
ORDER BY (rule, key, ts)
TTL toDateTime(ts) + INTERVAL 90 DAY;
