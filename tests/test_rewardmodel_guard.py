"""Held-out figures (AUROC, calibration) and the exploitation guard (pure)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from services.preferences.guard import judge_agreement, judge_samples, user_label
from services.preferences.metrics import auroc, brier, ece, pair_figures, spearman


def test_auroc_ranks_and_ties() -> None:
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.3, 0.4], [True, True]) is None
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)


def test_calibration_figures() -> None:
    assert brier([1.0, 0.0], [True, False]) == 0.0
    assert ece([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0)
    assert ece([0.9] * 10, [False] * 10) == pytest.approx(0.9)
    figs = pair_figures([2.0, 1.0], [0.0, 3.0])
    assert figs["heldout_auroc"] == 0.5 and figs["heldout_pairs"] == 2
    assert 0 <= figs["heldout_ece"] <= 1 and 0 <= figs["heldout_brier"] <= 1


def test_user_label_from_components() -> None:
    assert user_label({"accept": 0.75}) is True
    assert user_label({"reject": -0.25, "thumb": 1.0}) is False
    assert user_label({"thumb": -1.0}) is False
    assert user_label({"rating": 0.5}) is True
    assert user_label({"rating": 0.0, "copy": 0.5}) is None


@dataclass
class S:
    reward_components: dict[str, float]


def test_guard_passes_agreement_and_refuses_divergence() -> None:
    rng = random.Random(3)
    agree, diverge = [], []
    for _ in range(200):
        liked = rng.random() < 0.5
        signal = {"accept": 0.75} if liked else {"reject": -0.25}
        score = (1.0 if liked else -1.0) + rng.gauss(0, 0.8)
        agree.append(S({**signal, "reward_model": score}))
        # an exploited model: high scores where users reject
        diverge.append(S({**signal, "reward_model": -score}))
    ok = judge_samples(agree)
    assert ok.passed and ok.figures["rm_user_auroc"] > 0.8 and ok.figures["rm_guard_samples"] == 200
    bad = judge_samples(diverge)
    assert not bad.passed and "rm_user_auroc" in bad.failures[0]
    # Too few labelled samples: figures, no verdict.
    few = judge_agreement([0.9, -0.9], [False, True], min_samples=30)
    assert few.passed and few.figures["rm_user_auroc"] == 0.0
    # Samples without a reward-model score are left out.
    assert judge_samples([S({"accept": 0.75})]).figures["rm_guard_samples"] == 0
