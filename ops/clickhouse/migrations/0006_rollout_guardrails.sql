-- Canary rollouts' guardrail figures per arm: the replicas' requests and failures on the
-- arm's version since the rollout started, the error rate, and the request latency p95
-- (ms, a histogram estimate: services/rollout/latency.py). Same rows as 0003's view plus
-- those columns; the figures live in rollouts.arms, so still no new table column.
CREATE OR REPLACE VIEW rollout_arms AS
SELECT
    event_time,
    model,
    decision,
    reason,
    stable_version,
    candidate_version,
    candidate_traffic,
    arm,
    toUInt32(arms[concat(arm, '.version')]) AS version,
    toUInt64(arms[concat(arm, '.n')]) AS n,
    toUInt64(arms[concat(arm, '.successes')]) AS successes,
    arms[concat(arm, '.rate')] AS rate,
    arms[concat(arm, '.rate_low')] AS rate_low,
    arms[concat(arm, '.rate_high')] AS rate_high,
    arms[concat(arm, '.mean_tokens')] AS mean_tokens,
    toUInt64(arms[concat(arm, '.dead_letters')]) AS dead_letters,
    arms['stat.log_lr'] AS log_lr,
    arms['stat.log_promote_threshold'] AS log_promote_threshold,
    arms['stat.diff'] AS diff,
    arms['stat.diff_low'] AS diff_low,
    arms['stat.diff_high'] AS diff_high,
    toUInt64(arms[concat(arm, '.requests')]) AS requests,
    toUInt64(arms[concat(arm, '.failures')]) AS failures,
    arms[concat(arm, '.error_rate')] AS error_rate,
    toUInt64(arms[concat(arm, '.latency_n')]) AS latency_n,
    arms[concat(arm, '.latency_p95_ms')] AS latency_p95_ms
FROM rollouts
ARRAY JOIN ['stable', 'candidate'] AS arm
WHERE mapContains(arms, concat(arm, '.version'));
