"""The sticky canary split: which users a rollout's candidate serves (pure functions).

A user's bucket is a stable hash of (model, candidate version, user id) mapped to [0, 1);
the candidate serves the users whose bucket is below its traffic share. Every replica
computes the same bucket, so one user sees one version for the whole rollout whichever
replica answers, and raising the share only adds users. The candidate version is part of
the hash so that each rollout tries its version on a different slice of users instead of
always the same unlucky 10%. Requests without a user id always get the stable version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from services.serving.ids import ANONYMOUS

_BUCKET_BYTES = 8


def user_bucket(model: str, candidate_version: int, user_id: str) -> float:
    """The user's position in [0, 1) for this rollout (blake2b of model, version and user id)."""
    digest = hashlib.blake2b(f"{model}\x00{candidate_version}\x00{user_id}".encode(), digest_size=_BUCKET_BYTES)
    return int.from_bytes(digest.digest(), "big") / float(1 << (8 * _BUCKET_BYTES))


@dataclass(frozen=True)
class Split:
    """A model's traffic split as the latest rollouts.v1 event declares it."""

    stable_version: int
    candidate_version: int | None = None
    candidate_traffic: float = 0.0

    def wants_candidate(self, model: str, user_id: str | None) -> bool:
        """Whether this user's requests go to the candidate (never without a user id)."""
        if self.candidate_version is None or self.candidate_traffic <= 0.0 or not user_id or user_id == ANONYMOUS:
            return False
        return user_bucket(model, self.candidate_version, user_id) < self.candidate_traffic
