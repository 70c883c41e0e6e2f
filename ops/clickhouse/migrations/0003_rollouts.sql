-- Canary rollouts: one row per rollout event and arm, with the arm's version, counts,
-- success rate and 95% Wilson interval, and the decision's mSPRT figures
-- (log likelihood ratio, the rate difference and its always-valid confidence sequence).
-- The figures live in rollouts.arms (keys documented in services/rollout/arms.py), so
-- this is a view: no new columns, nothing for the sink to change.
CREATE VIEW IF NOT EXISTS rollout_arms AS
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
    arms['stat.diff_high'] AS diff_high
FROM rollouts
ARRAY JOIN ['stable', 'candidate'] AS arm
WHERE mapContains(arms, concat(arm, '.version'));
