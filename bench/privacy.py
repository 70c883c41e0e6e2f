"""Cost of privacy on the hot paths: redaction in the sink's row building and on the stream
worker's samples, and the forget filter. Prints one JSON object.

    .venv/bin/python bench/privacy.py [--events 20000]

Each figure is measured against its baseline in the same run (the unwrapped row function,
a batch output without the privacy step), so a ratio holds on a noisy machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.codec import encode
from services.privacy import redact
from services.privacy.redact import Redactor
from services.sink.rows import SPECS
from streams.forget import apply
from streams.join import FB, GEN, JoinConfig, PartitionState, Record, process_batch
from tests.factories import feedback, generation

WORDS = [
    "the",
    "a",
    "cat",
    "sat",
    "on",
    "mat",
    "it",
    "was",
    "warm",
    "and",
    "bright",
    "so",
    "we",
    "went",
    "out",
    "to",
    "see",
    "what",
    "the",
    "day",
    "would",
    "bring",
]


def prose(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def best_of(fn, repeat: int = 5) -> float:
    """The fastest of `repeat` runs, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--pii-share", type=float, default=0.05, help="share of completions with an email in them")
    ap.add_argument("--digit-share", type=float, default=0.3, help="share of completions with numbers (no PII) in them")
    args = ap.parse_args()
    rng = random.Random(0)
    n = args.events
    texts = [prose(rng, 40) for _ in range(n)]
    pii = set(rng.sample(range(n), int(n * args.pii_share)))
    numbers = set(rng.sample(range(n), int(n * args.digit_share)))
    texts = [t + " In 2023 it took 15 minutes and 3.5 km." if i in numbers else t for i, t in enumerate(texts)]
    texts = [t + " Mail me at jane@example.com." if i in pii else t for i, t in enumerate(texts)]
    r = Redactor()

    # 1. Redactor.text per completion
    text_s = best_of(lambda: [r.text(t) for t in texts])
    noop_s = best_of(lambda: [str(t) for t in texts])

    # 2. the sink's generation row: wrapped (redacting) vs the plain tuple function
    gens = [
        generation(f"g{i}", completion=texts[i], prompt="Tell me something.", user_id=f"u{i % 500}") for i in range(n)
    ]
    spec = SPECS["generations.v1"]
    plain = spec.row.__wrapped__
    redact.configure(r)
    wrapped_s = best_of(lambda: [spec.row(g) for g in gens])
    plain_s = best_of(lambda: [plain(g) for g in gens])
    redact.reset()

    # 3. the stream worker: process_batch alone vs process_batch + privacy (redaction, 10k forgotten users)
    records = []
    for i, g in enumerate(gens):
        records.append(Record(GEN, 0, 2 * i, g.generation_id.encode(), encode(g)))
        fb = feedback(g.generation_id, kind="accept", value=None, user_id=g.user_id, event_id=f"f{i}")
        records.append(Record(FB, 0, 2 * i + 1, g.generation_id.encode(), encode(fb)))
    cfg = JoinConfig(user_cap_per_partition=10**9)
    now = max(g.event_time_ms for g in gens)
    forgotten = {("default", f"gone-{i}") for i in range(10_000)} | {("default", "u7")}

    def join_only():
        return process_batch({0: PartitionState(0)}, records, now, cfg)

    outs = [join_only() for _ in range(5)]
    join_s = best_of(join_only)
    it = iter(outs)
    privacy_s = best_of(lambda: apply(copy.copy(next(it)), forgotten, r))
    outs = [join_only() for _ in range(5)]
    it = iter(outs)
    forget_s = best_of(lambda: apply(copy.copy(next(it)), forgotten, None))
    outs = [join_only() for _ in range(5)]
    it = iter(outs)
    redact_s = best_of(lambda: apply(copy.copy(next(it)), (), r))
    dropped = next(iter([join_only()]))
    apply(dropped, forgotten, r)

    print(
        json.dumps(
            {
                "events": n,
                "pii_share": args.pii_share,
                "digit_share": args.digit_share,
                "redact_text_us": round(text_s / n * 1e6, 2),
                "str_copy_us": round(noop_s / n * 1e6, 2),
                "sink_row_plain_us": round(plain_s / n * 1e6, 2),
                "sink_row_redacting_us": round(wrapped_s / n * 1e6, 2),
                "sink_row_ratio": round(wrapped_s / plain_s, 2),
                "join_batch_us_per_generation": round(join_s / n * 1e6, 2),
                "privacy_apply_us_per_sample": round(privacy_s / n * 1e6, 2),
                "privacy_over_join": round(privacy_s / join_s, 3),
                "forget_only_over_join": round(forget_s / join_s, 3),
                "redact_only_over_join": round(redact_s / join_s, 3),
                "samples_dropped_check": dropped.counts["forgotten_dropped"],
                "samples_redacted_check": dropped.counts["samples_redacted"],
            }
        )
    )


if __name__ == "__main__":
    main()
