"""Reward-model benchmark: held-out quality against a simulated preference, and scoring
throughput of the stream's batched scorer against unbatched scoring in the same run.

Synthetic completions of the simulator's prompts (1 to 50 words) are labelled by a
hidden preference (default `concise`): each completion of a pair is accepted with the
preference's probability, and a pair is kept when exactly one was. The model trains on
the pairs of 40 prompts (frozen MiniLM backbone, cached embeddings) and is measured on
the other prompts: pairwise AUROC, Brier and ECE on held-out pairs, and the AUROC of its
score against the hidden ground truth (preference > 0.5) on fresh completions.
Throughput: the same generations scored by `BackgroundScorer` (the stream's component,
batches of `--batch-size`) and one at a time.

    .venv/bin/python bench/rewardmodel.py [--pairs 200] [--score 256] [--batch-size 64]
        [--threads 2] [--finetune-layers 0] [--preference services.simulator.preference:concise]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sun",
    "tea",
    "rest",
    "walk",
    "read",
    "cook",
    "garden",
    "water",
    "sleep",
    "coffee",
    "plant",
    "name",
    "idea",
    "warm",
    "quiet",
    "friend",
    "morning",
    "evening",
    "book",
    "game",
    "music",
    "light",
    "fresh",
    "green",
    "small",
    "bright",
    "easy",
    "calm",
]


def completion(rng: random.Random) -> str:
    """A synthetic completion of 1 to 50 words."""
    n = rng.choice([1, 2, rng.randint(3, 25), rng.randint(3, 25), rng.randint(26, 50), rng.randint(26, 50)])
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def simulated_pairs(rng: random.Random, prompts: list[str], n: int, preference) -> list:
    """`n` pairs the simulated users ordered (one of the two accepted)."""
    from services.preferences.model import Pair

    out = []
    while len(out) < n:
        p = rng.choice(prompts)
        a, b = completion(rng), completion(rng)
        ya, yb = rng.random() < preference(p, a), rng.random() < preference(p, b)
        if ya != yb:
            out.append(Pair(p, a, b) if ya else Pair(p, b, a))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=200, help="training pairs")
    ap.add_argument("--heldout-pairs", type=int, default=60)
    ap.add_argument("--truth", type=int, default=120, help="fresh held-out completions scored against the ground truth")
    ap.add_argument("--score", type=int, default=256, help="generations scored for throughput")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--finetune-layers", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--preference", default="services.simulator.preference:concise")
    args = ap.parse_args()

    import torch

    from services.preferences.metrics import auroc
    from services.preferences.model import EmbeddingCache, RewardModel, TrainConfig, evaluate, train
    from services.preferences.scoring import BackgroundScorer
    from services.simulator.preference import load
    from services.simulator.prompts import PROMPTS

    torch.set_num_threads(args.threads)
    preference = load(args.preference)
    rng = random.Random(0)
    train_prompts, test_prompts = list(PROMPTS[:40]), list(PROMPTS[40:])
    pairs = simulated_pairs(rng, train_prompts, args.pairs, preference)
    heldout = simulated_pairs(rng, test_prompts, args.heldout_pairs, preference)

    t0 = time.perf_counter()
    model = RewardModel(finetune_layers=args.finetune_layers)
    load_s = time.perf_counter() - t0
    cache = EmbeddingCache(model, args.batch_size)
    t0 = time.perf_counter()
    figures = train(model, pairs, cfg=TrainConfig(epochs=args.epochs), cache=cache)
    train_s = time.perf_counter() - t0
    held = evaluate(model, heldout, cache=cache)
    texts = [(rng.choice(test_prompts), completion(rng)) for _ in range(args.truth)]
    truth_scores = model.score([p for p, _ in texts], [c for _, c in texts], batch_size=args.batch_size)
    truth_auroc = auroc(truth_scores, [preference(p, c) > 0.5 for p, c in texts])

    gens = [(f"g{i}", rng.choice(PROMPTS), completion(rng)) for i in range(args.score)]
    t0 = time.perf_counter()
    for _, p, c in gens:
        model.score([p], [c], batch_size=1)
    unbatched_s = time.perf_counter() - t0

    scorer = BackgroundScorer(
        lambda v: (0, lambda ps, cs: model.score(ps, cs, batch_size=args.batch_size)),
        batch_size=args.batch_size,
        linger_s=0.05,
    ).start()
    time.sleep(0.5)  # let the thread load its model before the clock starts
    t0 = time.perf_counter()
    submit_t0 = time.perf_counter()
    for gid, p, c in gens:
        scorer.submit(gid, p, c)
    submit_s = time.perf_counter() - submit_t0
    scorer.drain(600)
    batched_s = time.perf_counter() - t0
    scorer.stop()
    assert scorer.stats["scored"] == len(gens)

    out = {
        "preference": args.preference,
        "finetune_layers": args.finetune_layers,
        "torch_threads": args.threads,
        "train_pairs": len(pairs),
        "train_s": round(train_s, 2),
        "backbone_load_s": round(load_s, 2),
        "train_loss": round(figures["train_loss"], 4),
        "heldout_pairs": len(heldout),
        "heldout_pair_auroc": round(held["heldout_auroc"], 4),
        "heldout_brier": round(held["heldout_brier"], 4),
        "heldout_ece": round(held["heldout_ece"], 4),
        "truth_completions": len(texts),
        "auroc_vs_ground_truth": round(truth_auroc, 4) if truth_auroc is not None else None,
        "scored_generations": len(gens),
        "batched_batch_size": args.batch_size,
        "batched_gen_per_s": round(len(gens) / batched_s, 1),
        "unbatched_gen_per_s": round(len(gens) / unbatched_s, 1),
        "batched_over_unbatched": round(unbatched_s / batched_s, 2),
        "submit_us_per_generation": round(submit_s / len(gens) * 1e6, 2),
        "scorer_batches": scorer.stats["batches"],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
