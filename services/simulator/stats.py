"""Per-version acceptance figures with Wilson confidence intervals (pure)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.dashboard.stats import wilson_interval

_WORD = re.compile(r"\w+")


@dataclass
class VersionStats:
    """What users did with one policy version's answers."""

    answers: int = 0
    accepted: int = 0
    words: int = 0
    empty: int = 0
    distinct: set[str] = field(default_factory=set)

    def add(self, completion: str, accepted: bool) -> None:
        self.answers += 1
        self.accepted += int(accepted)
        n_words = len(_WORD.findall(completion))
        self.words += n_words
        self.empty += int(n_words == 0)
        if len(self.distinct) < 10_000:
            self.distinct.add(completion.strip())

    def summary(self) -> dict:
        low, high = wilson_interval(self.accepted, self.answers)
        n = max(self.answers, 1)
        return {
            "answers": self.answers,
            "accept_rate": round(self.accepted / n, 4),
            "accept_ci95": [round(low, 4), round(high, 4)],
            "mean_words": round(self.words / n, 2),
            "empty_share": round(self.empty / n, 4),
            "distinct_share": round(len(self.distinct) / n, 4),
        }
