"""When to start a batch and which waiting requests go into it (pure functions).

The engine runs one batch at a time: every request in it is prefilled together and
decoded step by step until all of them finish. A batch starts as soon as it is full, or
when the oldest waiting request has waited `batch_wait_ms`, so a lone request pays at most
that much extra latency and a burst fills whole batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Waiting(Protocol):
    """What batching needs to know about a waiting request."""

    arrived_s: float
    prompt_len: int
    max_tokens: int


def ready_in_s(
    n_waiting: int, oldest_arrived_s: float | None, now_s: float, max_batch_size: int, wait_s: float
) -> float | None:
    """Seconds until a batch should start: 0 now, None when nothing waits."""
    if n_waiting == 0 or oldest_arrived_s is None:
        return None
    if n_waiting >= max_batch_size:
        return 0.0
    return max(0.0, oldest_arrived_s + wait_s - now_s)


def select_batch(waiting: Sequence[Waiting], max_batch_size: int, max_batch_tokens: int | None = None) -> list[int]:
    """Indices of the waiting requests to run now, first come first served.

    `max_batch_tokens` bounds the padded batch (rows × (longest prompt + longest
    completion)), the size of the KV cache; the first request always goes in.
    """
    chosen: list[int] = []
    longest = 0
    for i, w in enumerate(waiting):
        if len(chosen) >= max_batch_size:
            break
        new_longest = max(longest, w.prompt_len + w.max_tokens)
        if chosen and max_batch_tokens is not None and new_longest * (len(chosen) + 1) > max_batch_tokens:
            break
        chosen.append(i)
        longest = new_longest
    return chosen


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """Left-pad token rows to one length: (ids, attention mask)."""
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + list(r) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return ids, mask
