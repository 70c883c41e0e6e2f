"""Canary rollout decision on synthetic Bernoulli feedback: prints ONE JSON object.

For each setting, `--sims` simulated rollouts feed a stream of samples (arm by the
candidate traffic share, success by the arm's known accept rate) to the decision of
`streams/rollout.py` (the mSPRT and its rules, evaluated after EVERY sample, vectorised
over simulations with the module's own `msprt`), and record the first decision and when.
A few simulations per setting also run through the scalar `decide` one sample at a time,
and must reach the same decision at the same sample (`scalar_agreement`).

Baseline in the same run: a naive z-test at one-sided 5% (z >= 1.645 promotes, <= -1.645
rolls back) peeked after every sample, same warm-up and budget.

`--demo` measures the policy `rlfeed demo` runs instead (DemoSettings: half the users on
the candidate, a budget of 100 samples, and `promote_if_not_worse` when it is spent), at
the demo's accept rates (stable 0.3): there an equal candidate is promoted about half the
time by design, so the figures to read are the worse settings' promote rates, the better
one's, and the events to a decision.

`--traffic`, `--max-samples` and `--min-per-arm` override the policy's (to compare demo
settings); `--samples-per-s` converts events to seconds at that sample rate (default for
`--demo`: the demo's ~0.8 samples/s) next to the trainer's publish interval in samples
(`--demo`: publish_every_steps x trainer_batch_size / (1 - 1/heldout_every)).

Run: `.venv/bin/python bench/rollout.py [--demo] [--traffic F --max-samples N ...]` (< 60 s
on one slow core).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson

# bench/streams.py would shadow the streams package when run as `python bench/rollout.py`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.rollout.arms import ArmCounts
from streams.rollout import RolloutPolicy, decide, msprt, policy_from_settings
from streams.settings import StreamsSettings

PROMOTE, ROLLBACK, NONE = 1, -1, 0
DEMO_SAMPLES_PER_S = 0.8
"""Samples per second the real-model demo settles (two replicas, 24 simulated users): its
budget of 200 samples took about 4 minutes."""
Z_ONE_SIDED_5PCT = 1.6448536269514722


def simulate(
    p_stable: float, p_cand: float, policy: RolloutPolicy, sims: int, rng: np.random.Generator, naive: bool = False
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """(decision per sim, samples to decision, the raw streams) for `sims` rollouts of at most max_samples."""
    n = policy.max_samples
    to_cand = rng.random((sims, n)) < policy.candidate_traffic_frac
    success = rng.random((sims, n)) < np.where(to_cand, p_cand, p_stable)
    n_c = np.cumsum(to_cand, axis=1)
    n_s = np.arange(1, n + 1)[None, :] - n_c
    k_c = np.cumsum(success & to_cand, axis=1)
    k_s = np.cumsum(success & ~to_cand, axis=1)
    theta, log_lr, var = msprt(n_s, k_s, n_c, k_c, policy.mixture_tau)
    warm = np.minimum(n_s, n_c) >= policy.min_samples_per_arm
    if naive:
        z = theta / np.sqrt(var)
        promote = warm & (z >= Z_ONE_SIDED_5PCT)
        rollback = warm & (z <= -Z_ONE_SIDED_5PCT)
    else:
        promote = warm & (theta > 0) & (log_lr >= np.log(1 / policy.promote_alpha))
        rollback = warm & (theta < 0) & (log_lr >= np.log(1 / policy.rollback_alpha))
    hit = promote | rollback
    first = np.where(hit.any(axis=1), hit.argmax(axis=1), n - 1)
    rows = np.arange(sims)
    at_budget = np.full(sims, ROLLBACK)
    if policy.at_budget == "promote_if_not_worse":
        at_budget = np.where(theta[:, n - 1] >= 0, PROMOTE, ROLLBACK)
    decision = np.where(promote[rows, first], PROMOTE, np.where(rollback[rows, first], ROLLBACK, at_budget))
    return decision, first + 1, (to_cand, success)


def scalar_replay(to_cand: np.ndarray, success: np.ndarray, policy: RolloutPolicy) -> tuple[int, int]:
    """The scalar `decide`, called after every sample of one stream: (decision, samples)."""
    arms = {"stable": ArmCounts(), "candidate": ArmCounts()}
    for i, (c, s) in enumerate(zip(to_cand.tolist(), success.tolist(), strict=True)):
        arm = arms["candidate" if c else "stable"]
        arm.n += 1
        arm.successes += int(s)
        verdict = decide(arms["stable"], arms["candidate"], policy)
        if verdict.decision != "collect":
            return (PROMOTE if verdict.decision == "promote" else ROLLBACK), i + 1
    return ROLLBACK, len(to_cand)


def run_setting(name: str, p_s: float, p_c: float, policy: RolloutPolicy, sims: int, seed: int, replay: int) -> dict:
    """One setting: the mSPRT and the naive baseline on the same number of simulations."""
    rng = np.random.default_rng(seed)
    decisions, events, agree = [], [], 0
    chunk = 50
    for start in range(0, sims, chunk):
        d, e, (tc, su) = simulate(p_s, p_c, policy, min(chunk, sims - start), rng)
        decisions.append(d)
        events.append(e)
        if start < replay:
            for i in range(min(replay - start, len(d))):
                agree += scalar_replay(tc[i], su[i], policy) == (int(d[i]), int(e[i]))
    naive = [simulate(p_s, p_c, policy, min(chunk, sims - s), rng, naive=True)[0] for s in range(0, sims, chunk)]
    d, e, nd = np.concatenate(decisions), np.concatenate(events), np.concatenate(naive)
    return {
        "setting": name,
        "p_stable": p_s,
        "p_candidate": p_c,
        "sims": sims,
        "promote_rate": round(float((d == PROMOTE).mean()), 4),
        "rollback_rate": round(float((d == ROLLBACK).mean()), 4),
        "budget_exhausted_rate": round(float((e >= policy.max_samples).mean()), 4),
        "median_events_to_decision": int(np.median(e)),
        "p90_events_to_decision": int(np.percentile(e, 90)),
        "baseline_naive_z_promote_rate": round(float((nd == PROMOTE).mean()), 4),
        "scalar_agreement": f"{agree}/{min(replay, sims)}",
    }


def main() -> None:
    """Parse options, run every setting, print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sims", type=int, default=500, help="simulated rollouts per setting")
    ap.add_argument("--p-stable", type=float, default=0.5, help="accept rate of the stable version")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--replay", type=int, default=4, help="simulations per setting re-run through the scalar decide")
    ap.add_argument("--demo", action="store_true", help="the policy `rlfeed demo` runs (default p-stable 0.3)")
    ap.add_argument("--traffic", type=float, help="override: the candidate's traffic share")
    ap.add_argument("--max-samples", type=int, help="override: the sample budget of both arms")
    ap.add_argument("--min-per-arm", type=int, help="override: samples per arm before the reward test decides")
    ap.add_argument("--samples-per-s", type=float, help="sample rate for the seconds figures (--demo: 0.8)")
    args = ap.parse_args()
    policy = policy_from_settings(StreamsSettings())
    publish_every_samples = None
    if args.demo:
        from services.demo.settings import DemoSettings

        demo = DemoSettings()
        policy = policy_from_settings(
            StreamsSettings(
                rollout_candidate_traffic_frac=demo.demo_rollout_traffic_frac,
                rollout_min_samples_per_arm=demo.demo_rollout_min_samples_per_arm,
                rollout_max_samples=demo.demo_rollout_max_samples,
                rollout_at_budget="promote_if_not_worse",
            )
        )
        if args.p_stable == 0.5:
            args.p_stable = 0.3
        if args.samples_per_s is None:
            args.samples_per_s = DEMO_SAMPLES_PER_S
        trained = demo.demo_publish_every_steps * demo.demo_trainer_batch_size
        publish_every_samples = round(trained / (1.0 - 1.0 / demo.demo_heldout_every))
    overrides = {
        "candidate_traffic_frac": args.traffic,
        "max_samples": args.max_samples,
        "min_samples_per_arm": args.min_per_arm,
    }
    policy = replace(policy, **{k: v for k, v in overrides.items() if v is not None})
    started = time.perf_counter()
    p = args.p_stable
    settings = [
        ("equal", p, p),
        ("worse_10pct", p, p * 0.9),
        ("worse_20pct", p, p * 0.8),
        ("better_20pct", p, p * 1.2),
        ("better_30pct", p, p * 1.3),
    ]
    results = {
        name: run_setting(name, ps, pc, policy, args.sims, args.seed + i, args.replay)
        for i, (name, ps, pc) in enumerate(settings)
    }
    false_promotion = max(results[n]["promote_rate"] for n in ("equal", "worse_10pct", "worse_20pct"))
    out = {
        "bench": "rollout-demo" if args.demo else "rollout",
        "test": "two-proportion mSPRT, normal mixture, evaluated after every sample",
        "policy": {k: getattr(policy, k) for k in policy.__dataclass_fields__},
        "event_budget_samples": policy.max_samples,
        "false_promotion_rate": false_promotion,
        "false_promotion_target": 0.05,
        "power_20pct_better": results["better_20pct"]["promote_rate"],
        "power_target": 0.8,
        "power_30pct_better": results["better_30pct"]["promote_rate"],
        "median_events_to_decision": {n: r["median_events_to_decision"] for n, r in results.items()},
        "p90_events_to_decision": {n: r["p90_events_to_decision"] for n, r in results.items()},
        "samples_per_s": args.samples_per_s,
        "median_s_to_decision": None
        if args.samples_per_s is None
        else {n: round(r["median_events_to_decision"] / args.samples_per_s) for n, r in results.items()},
        "publish_every_samples": publish_every_samples,
        "baseline_naive_z_false_promotion_rate": max(
            results[n]["baseline_naive_z_promote_rate"] for n in ("equal", "worse_10pct", "worse_20pct")
        ),
        "baseline_naive_z_power": results["better_20pct"]["baseline_naive_z_promote_rate"],
        "settings": list(results.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main()
