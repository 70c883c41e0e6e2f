"""Named ClickHouse queries, shared by the dashboard page, the alert loop and Grafana.

A panel query may contain `{time_filter}`, rendered per consumer: for the page
`<col> >= now() - toIntervalSecond({window_s:UInt32})` (a server-side parameter), for
Grafana `$__timeFilter(<col>)`. Rollups are read with GROUP BY and sum()/-Merge
because their merges are eventual.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NamedQuery:
    """One query: its name, title, SQL template, and the time column `{time_filter}` uses."""

    name: str
    title: str
    sql: str
    time_column: str | None = None
    unit: str = ""

    def for_page(self) -> str:
        """The SQL with the time filter as a `{window_s:UInt32}` query parameter."""
        if self.time_column is None:
            return self.sql
        return self.sql.replace("{time_filter}", f"{self.time_column} >= now() - toIntervalSecond({{window_s:UInt32}})")

    def for_grafana(self) -> str:
        """The SQL with Grafana's `$__timeFilter` macro (grafana-clickhouse-datasource)."""
        if self.time_column is None:
            return self.sql
        return self.sql.replace("{time_filter}", f"$__timeFilter({self.time_column})")


_Z2 = "3.8416"  # 1.96 squared: the 95 % Wilson interval

PANELS: tuple[NamedQuery, ...] = (
    NamedQuery(
        "reward_by_version",
        "Mean reward by policy version",
        """SELECT minute, concat('v', toString(policy_version)) AS version,
    sum(reward_sum) / sum(samples) AS reward_mean, sum(samples) AS n_samples
FROM reward_1m WHERE {time_filter}
GROUP BY minute, policy_version ORDER BY minute, policy_version""",
        "minute",
        "reward",
    ),
    NamedQuery(
        "accept_rate_by_version",
        "Accept rate by version (95 % Wilson interval)",
        f"""SELECT policy_version, a, n, a / n AS accept_rate,
    (a / n + {_Z2} / (2 * n) - 1.96 * sqrt(a / n * (1 - a / n) / n + {_Z2} / (4 * n * n))) / (1 + {_Z2} / n) AS lo,
    (a / n + {_Z2} / (2 * n) + 1.96 * sqrt(a / n * (1 - a / n) / n + {_Z2} / (4 * n * n))) / (1 + {_Z2} / n) AS hi
FROM (SELECT policy_version, toFloat64(sum(accepts)) AS a, toFloat64(sum(accepts) + sum(rejects)) AS n
      FROM reward_1m WHERE {{time_filter}} GROUP BY policy_version)
WHERE n > 0 ORDER BY policy_version""",
        "minute",
        "accept rate",
    ),
    NamedQuery(
        "rollout_arms",
        "Canary rollout: success rate per arm of the latest rollout (95 % Wilson interval)",
        """SELECT version, successes, n, rate, rate_low, rate_high, arm, model, decision, log_lr, log_promote_threshold,
    requests, error_rate, latency_p95_ms
FROM rollout_arms
WHERE (model, event_time) IN (SELECT model, max(event_time) FROM rollout_arms GROUP BY model)
ORDER BY model, version""",
        None,
        "success rate",
    ),
    NamedQuery(
        "feedback_mix",
        "Feedback events per minute by kind",
        """SELECT minute, kind, sum(events) AS events
FROM feedback_1m WHERE {time_filter}
GROUP BY minute, kind ORDER BY minute, kind""",
        "minute",
        "events/min",
    ),
    NamedQuery(
        "throughput",
        "Samples and generations per second",
        """SELECT minute, sum(samples) / 60 AS samples_per_s, sum(generations) / 60 AS generations_per_s
FROM (SELECT minute, samples, toUInt64(0) AS generations FROM reward_1m WHERE {time_filter}
      UNION ALL
      SELECT minute, toUInt64(0) AS samples, generations FROM generations_1m WHERE {time_filter})
GROUP BY minute ORDER BY minute""",
        "minute",
        "events/s",
    ),
    NamedQuery(
        "latency",
        "Generation latency p50 / p95 / p99 (ms)",
        """SELECT minute, q[1] AS p50, q[2] AS p95, q[3] AS p99, requests
FROM (SELECT minute, quantilesMerge(0.5, 0.95, 0.99)(latency_q) AS q, sum(requests) AS requests
      FROM latency_1m WHERE {time_filter} GROUP BY minute)
ORDER BY minute""",
        "minute",
        "ms",
    ),
    NamedQuery(
        "replica_versions",
        "Version served by each replica",
        """SELECT r.model AS model, r.replica_id AS replica_id, r.version AS version, r.state AS state,
    toUnixTimestamp64Milli(r.seen_at) / 1000 AS seen_at_s, u.target_version AS target_version
FROM (SELECT model, replica_id, argMax(version, event_time) AS version, argMax(state, event_time) AS state,
             max(event_time) AS seen_at
      FROM replica_latest GROUP BY model, replica_id) AS r
LEFT JOIN (SELECT model, argMax(version, event_time) AS target_version
           FROM model_updates FINAL GROUP BY model) AS u ON r.model = u.model
ORDER BY model, replica_id""",
        None,
        "version",
    ),
    NamedQuery(
        "events_lost",
        "Events lost per minute by replica",
        # Replicas report cumulative counts; a minute's loss is the rise of its largest
        # count over the previous minute's (a restart's reset counts as no loss).
        """SELECT minute, replica_id, lost FROM (
    SELECT minute, replica_id,
        greatest(total - lagInFrame(total, 1, total) OVER (PARTITION BY model, replica_id ORDER BY minute
                                                         ROWS BETWEEN 1 PRECEDING AND CURRENT ROW), 0) AS lost
    FROM (SELECT toStartOfMinute(event_time) AS minute, model, replica_id,
              max(arraySum(mapValues(events_dropped))) AS total
          FROM replica_status WHERE {time_filter} GROUP BY minute, model, replica_id))
WHERE lost > 0 ORDER BY minute, replica_id""",
        "event_time",
        "events/min",
    ),
    NamedQuery(
        "dead_letters",
        "Dead letters per minute by reason",
        """SELECT minute, concat(source_topic, ': ', reason) AS reason, sum(letters) AS letters
FROM dead_letters_1m WHERE {time_filter}
GROUP BY minute, reason ORDER BY minute, reason""",
        "minute",
        "letters/min",
    ),
    NamedQuery(
        "consumer_lag",
        "Consumer lag (messages) by group",
        """SELECT ts, consumer_group, sum(lag) AS lag
FROM consumer_lag WHERE {time_filter}
GROUP BY ts, consumer_group ORDER BY ts, consumer_group""",
        "ts",
        "messages",
    ),
    NamedQuery(
        "completion_by_version",
        "Completion length and distinctness by version",
        """SELECT policy_version, n, tok_sum / n AS mean_tokens, q[1] AS p50_tokens, q[2] AS p95_tokens, tok_max,
    n_empty / n AS empty_frac, n_truncated / n AS truncated_frac, least(n_distinct / n, 1) AS distinct_frac
FROM (SELECT policy_version, sum(generations) AS n, sum(tokens_sum) AS tok_sum, max(tokens_max) AS tok_max,
             sum(empty) AS n_empty, sum(truncated) AS n_truncated, uniqMerge(distinct_completions) AS n_distinct,
             quantilesMerge(0.5, 0.95)(tokens_q) AS q
      FROM generations_1m WHERE {time_filter} GROUP BY policy_version)
WHERE n > 0 ORDER BY policy_version""",
        "minute",
        "tokens",
    ),
    NamedQuery(
        "trainer_gate",
        "Trainer gate figures by published version",
        """SELECT version, metric, argMax(value, event_time) AS value
FROM trainer_metrics
WHERE metric IN ('kl_parent', 'heldout_reward', 'reward_estimate', 'distinct_frac', 'empty_frac', 'length_ratio')
GROUP BY version, metric ORDER BY version, metric""",
        None,
    ),
)

BY_NAME: dict[str, NamedQuery] = {q.name: q for q in PANELS}

# Inputs of the alert rules (alerts.py); page parameters: window seconds and `now`.
ALERT_VERSION_REWARDS = """SELECT s.model, s.policy_version, s.n, s.total, s.total_sq, u.parent_version
FROM (SELECT model, policy_version, sum(samples) AS n, sum(reward_sum) AS total, sum(reward_sq_sum) AS total_sq
      FROM reward_1m GROUP BY model, policy_version) AS s
LEFT JOIN (SELECT model, version, any(parent_version) AS parent_version
           FROM model_updates FINAL WHERE rollback = 0 GROUP BY model, version) AS u
  ON s.model = u.model AND s.policy_version = u.version
ORDER BY s.model, s.policy_version"""

ALERT_KL = """SELECT model, version, argMax(value, event_time) AS kl
FROM trainer_metrics WHERE metric = 'kl_parent' AND rollback = 0
GROUP BY model, version ORDER BY model, version"""

ALERT_DEAD_LETTERS = """SELECT
    sumIf(letters, minute >= now() - toIntervalSecond({recent_s:UInt32})) AS recent,
    sumIf(letters, minute < now() - toIntervalSecond({recent_s:UInt32})) AS baseline
FROM dead_letters_1m
WHERE minute >= now() - toIntervalSecond({recent_s:UInt32} + {baseline_s:UInt32})"""

ALERT_LATEST_UPDATES = """SELECT model, argMax(version, event_time) AS version,
    toUnixTimestamp64Milli(max(event_time)) / 1000 AS published_at_s
FROM model_updates FINAL GROUP BY model ORDER BY model"""

ALERT_REPLICAS = """SELECT model, replica_id, argMax(version, event_time) AS version,
    argMax(state, event_time) AS state,
    toUnixTimestamp64Milli(max(event_time)) / 1000 AS seen_at_s
FROM replica_latest GROUP BY model, replica_id ORDER BY model, replica_id"""

ALERT_REPLICA_DROPS = """SELECT model, replica_id, argMin(events_dropped, event_time) AS first,
    argMax(events_dropped, event_time) AS last
FROM replica_status
WHERE event_time >= now() - toIntervalSecond({window_s:UInt32})
GROUP BY model, replica_id HAVING last != first ORDER BY model, replica_id"""

RECENT_ALERTS = """SELECT toUnixTimestamp64Milli(ts) / 1000 AS ts, rule, key, status, severity, message, value,
    threshold
FROM alerts ORDER BY ts DESC LIMIT {limit:UInt32}"""

# Tenant views: the page as one tenant's API key sees it (server.py). The rollups above
# carry no tenant_id, so these read the raw tables (FINAL: exact counts) filtered by
# `tenant_id = {tenant:String}`, with the same output columns as the panel they replace.
# Panels about shared infrastructure (replicas, consumer lag, trainer gate, rollouts)
# hold no tenant's data and are shown to operators only.
_TENANT = "tenant_id = {tenant:String}"

TENANT_PANELS: tuple[NamedQuery, ...] = (
    NamedQuery(
        "reward_by_version",
        "Mean reward by policy version",
        f"""SELECT toStartOfMinute(event_time) AS minute, concat('v', toString(policy_version)) AS version,
    avg(reward) AS reward_mean, count() AS n_samples
FROM samples FINAL WHERE {_TENANT} AND {{time_filter}}
GROUP BY minute, policy_version ORDER BY minute, policy_version""",
        "event_time",
        "reward",
    ),
    NamedQuery(
        "accept_rate_by_version",
        "Accept rate by version (95 % Wilson interval)",
        f"""SELECT policy_version, a, n, a / n AS accept_rate,
    (a / n + {_Z2} / (2 * n) - 1.96 * sqrt(a / n * (1 - a / n) / n + {_Z2} / (4 * n * n))) / (1 + {_Z2} / n) AS lo,
    (a / n + {_Z2} / (2 * n) + 1.96 * sqrt(a / n * (1 - a / n) / n + {_Z2} / (4 * n * n))) / (1 + {_Z2} / n) AS hi
FROM (SELECT policy_version, toFloat64(countIf(mapContains(reward_components, 'accept'))) AS a,
             toFloat64(countIf(mapContains(reward_components, 'accept')
                               OR mapContains(reward_components, 'reject'))) AS n
      FROM samples FINAL WHERE {_TENANT} AND {{time_filter}} GROUP BY policy_version)
WHERE n > 0 ORDER BY policy_version""",
        "event_time",
        "accept rate",
    ),
    NamedQuery(
        "feedback_mix",
        "Feedback events per minute by kind",
        f"""SELECT toStartOfMinute(event_time) AS minute, kind, count() AS events
FROM feedback FINAL WHERE {_TENANT} AND {{time_filter}}
GROUP BY minute, kind ORDER BY minute, kind""",
        "event_time",
        "events/min",
    ),
    NamedQuery(
        "throughput",
        "Samples and generations per second",
        f"""SELECT minute, sum(samples) / 60 AS samples_per_s, sum(generations) / 60 AS generations_per_s
FROM (SELECT toStartOfMinute(event_time) AS minute, toUInt64(1) AS samples, toUInt64(0) AS generations
      FROM samples FINAL WHERE {_TENANT} AND {{time_filter}}
      UNION ALL
      SELECT toStartOfMinute(event_time) AS minute, toUInt64(0) AS samples, toUInt64(1) AS generations
      FROM generations FINAL WHERE {_TENANT} AND {{time_filter}})
GROUP BY minute ORDER BY minute""",
        "event_time",
        "events/s",
    ),
    NamedQuery(
        "latency",
        "Generation latency p50 / p95 / p99 (ms)",
        f"""SELECT minute, q[1] AS p50, q[2] AS p95, q[3] AS p99, requests
FROM (SELECT toStartOfMinute(event_time) AS minute, quantiles(0.5, 0.95, 0.99)(assumeNotNull(latency_ms)) AS q,
             count() AS requests
      FROM generations FINAL WHERE {_TENANT} AND latency_ms IS NOT NULL AND {{time_filter}} GROUP BY minute)
ORDER BY minute""",
        "event_time",
        "ms",
    ),
    NamedQuery(
        "dead_letters",
        "Dead letters per minute by reason",
        f"""SELECT toStartOfMinute(event_time) AS minute,
    concat(source_topic, ': ',
           leftUTF8(if(ifNull(error_field, '') != '', assumeNotNull(error_field), splitByChar('\\n', reason)[1]), 80))
        AS reason,
    count() AS letters
FROM dead_letters FINAL WHERE {_TENANT} AND {{time_filter}}
GROUP BY minute, reason ORDER BY minute, reason""",
        "event_time",
        "letters/min",
    ),
    NamedQuery(
        "completion_by_version",
        "Completion length and distinctness by version",
        f"""SELECT policy_version, n, tok_sum / n AS mean_tokens, q[1] AS p50_tokens, q[2] AS p95_tokens, tok_max,
    n_empty / n AS empty_frac, n_truncated / n AS truncated_frac, least(n_distinct / n, 1) AS distinct_frac
FROM (SELECT policy_version, count() AS n, sum(completion_tokens) AS tok_sum, max(completion_tokens) AS tok_max,
             countIf(completion_tokens = 0 OR empty(trimBoth(completion))) AS n_empty,
             countIf(finish_reason = 'length' OR (max_tokens > 0 AND completion_tokens >= max_tokens)) AS n_truncated,
             uniq(cityHash64(completion)) AS n_distinct, quantiles(0.5, 0.95)(completion_tokens) AS q
      FROM generations FINAL WHERE {_TENANT} AND {{time_filter}} GROUP BY policy_version)
WHERE n > 0 ORDER BY policy_version""",
        "event_time",
        "tokens",
    ),
)
"""The panels a tenant's key sees, each filtered by `tenant_id = {tenant:String}`."""

TENANT_BY_NAME: dict[str, NamedQuery] = {q.name: q for q in TENANT_PANELS}
OPERATOR_ONLY = frozenset(BY_NAME) - frozenset(TENANT_BY_NAME)
"""Panels about shared infrastructure, never shown to a tenant's key."""
