"""Training the MiniLM Bradley-Terry model on a simulated preference (the real packaged
backbone, small data: well under a minute on two slow cores), and a published version
loading back from the checkpoint store. About 30 s of CPU; the wall time grows when
the cores are shared."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.preferences.metrics import auroc
from services.preferences.model import EmbeddingCache, Pair, RewardModel, TrainConfig, evaluate, train
from services.simulator.preference import concise
from services.simulator.prompts import PROMPTS

pytestmark = pytest.mark.timeout(120)

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
]


def completion(rng: random.Random) -> str:
    n = rng.choice([1, 2, rng.randint(3, 25), rng.randint(3, 25), rng.randint(26, 50), rng.randint(26, 50)])
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def simulated_pairs(rng: random.Random, prompts: list[str], n: int) -> list[Pair]:
    """Two completions per prompt; the simulated user accepts each with concise()'s
    probability, and a pair is kept when exactly one was accepted."""
    out = []
    while len(out) < n:
        p = rng.choice(prompts)
        a, b = completion(rng), completion(rng)
        ya, yb = rng.random() < concise(p, a), rng.random() < concise(p, b)
        if ya != yb:
            out.append(Pair(p, a, b) if ya else Pair(p, b, a))
    return out


@pytest.fixture(scope="module")
def model() -> RewardModel:
    return RewardModel(max_seq_tokens=80)


def test_training_beats_chance_on_held_out_prompts(model: RewardModel, tmp_path: Path) -> None:
    rng = random.Random(0)
    train_prompts, test_prompts = list(PROMPTS[:40]), list(PROMPTS[40:])
    pairs = simulated_pairs(rng, train_prompts, 80)
    heldout = simulated_pairs(rng, test_prompts, 30)
    cache = EmbeddingCache(model)
    before = evaluate(model, heldout, cache=cache)
    assert before["heldout_auroc"] == 0.5  # a zero head ties every pair
    figures = train(model, pairs, cfg=TrainConfig(epochs=60, lr=1e-2), cache=cache)
    after = evaluate(model, heldout, cache=cache)
    assert figures["train_pairs"] == 80
    assert after["heldout_auroc"] > 0.65, after
    assert 0 <= after["heldout_ece"] <= 1 and 0 <= after["heldout_brier"] < 0.25 + 0.1
    # Against the hidden ground truth itself, on fresh held-out completions.
    texts = [(rng.choice(test_prompts), completion(rng)) for _ in range(40)]
    scores = model.score([p for p, _ in texts], [c for _, c in texts])
    truth = [concise(p, c) > 0.5 for p, c in texts]
    assert auroc(scores, truth) > 0.65


def test_published_version_loads_back_and_scores_the_same(model: RewardModel, tmp_path: Path) -> None:
    from services.checkpoints.store import CheckpointStore
    from services.preferences.scoring import load_published

    store = CheckpointStore(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_published(tmp_path, "rewardmodel-minilm", None)
    weights = model.trainable_state()
    assert set(weights) == {"head.weight", "head.bias", "kto_ref"}  # frozen backbone: the head only
    event = store.publish("rewardmodel-minilm", 0, weights, parent_version=None, full=True, eval_metrics={"a": 1.0})
    assert event.size_bytes < 10_000
    version, score = load_published(tmp_path, "rewardmodel-minilm", None)
    prompts, completions = ["Suggest a name for a cat."] * 2, ["Whiskers.", "A cat could be named many things " * 5]
    assert version == 0
    assert score(prompts, completions) == pytest.approx(model.score(prompts, completions), abs=1e-5)
