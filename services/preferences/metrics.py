"""Figures of a reward model on held-out data: ranking (AUROC, rank correlation) and
calibration (Brier score, expected calibration error). Pure Python, no torch."""

from __future__ import annotations

import math
from collections.abc import Sequence


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance that a random positive outscores a random
    negative (ties count half). None when one class is absent."""
    if len(scores) != len(labels):
        raise ValueError(f"auroc: {len(scores)} scores, {len(labels)} labels")
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _ranks(scores)
    rank_sum = sum(r for r, y in zip(ranks, labels, strict=True) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def pair_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float | None:
    """Share of pairs the model orders like the user did (ties count half): the AUROC of
    the score difference. None without pairs."""
    if len(chosen) != len(rejected):
        raise ValueError("pair_accuracy: chosen and rejected differ in length")
    if not chosen:
        return None
    won = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True))
    return won / len(chosen)


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman rank correlation; None with fewer than 2 points or a constant input."""
    if len(xs) != len(ys):
        raise ValueError("spearman: inputs differ in length")
    if len(xs) < 2:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def sigmoid(x: float) -> float:
    """The logistic function, stable for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def brier(probs: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Mean squared error of predicted probabilities against 0/1 outcomes."""
    if not probs:
        return None
    return sum((p - (1.0 if y else 0.0)) ** 2 for p, y in zip(probs, labels, strict=True)) / len(probs)


def ece(probs: Sequence[float], labels: Sequence[bool], bins: int = 10) -> float | None:
    """Expected calibration error: |accuracy - confidence| per equal-width bin of the
    predicted probability, weighted by the bin's share of the predictions."""
    if not probs:
        return None
    totals = [[0, 0.0, 0.0] for _ in range(bins)]  # count, sum of p, sum of y
    for p, y in zip(probs, labels, strict=True):
        b = min(int(p * bins), bins - 1)
        totals[b][0] += 1
        totals[b][1] += p
        totals[b][2] += 1.0 if y else 0.0
    n = len(probs)
    return sum(abs(sy - sp) / n for count, sp, sy in totals if count)


def pair_figures(chosen: Sequence[float], rejected: Sequence[float], prefix: str = "heldout_") -> dict[str, float]:
    """Ranking and calibration of a Bradley-Terry model on held-out pairs.

    P(chosen beats rejected) = sigmoid(r_c - r_r). Each pair is counted in both
    orientations ((p, 1) and (1 - p, 0)), so that calibration sees both classes.
    """
    out: dict[str, float] = {f"{prefix}pairs": float(len(chosen))}
    acc = pair_accuracy(chosen, rejected)
    if acc is None:
        return out
    probs = [sigmoid(c - r) for c, r in zip(chosen, rejected, strict=True)]
    both = probs + [1.0 - p for p in probs]
    labels = [True] * len(probs) + [False] * len(probs)
    out[f"{prefix}auroc"] = acc
    out[f"{prefix}brier"] = brier(both, labels) or 0.0
    out[f"{prefix}ece"] = ece(both, labels) or 0.0
    return out
