"""The gateway's bounded memory of recent event ids (the first of two dedupe layers).

Layer 1 (here): an event id accepted within `idempotency_window_s` is not produced again;
the retry gets the original acceptance. While the first attempt is still waiting for the
broker, a retry waits on that same attempt instead of producing a second copy. The memory
is bounded (`idempotency_max_entries`, oldest forgotten first) and per gateway process.

Layer 2 (downstream): every consumer (streams join, sink) deduplicates by `event_id`, so a
retry that reaches another gateway replica, or comes after the window, or a producer-level
retry inside librdkafka, still counts once.

Entries are scoped by (tenant, topic, event_id): one tenant can neither see nor suppress
another tenant's ids at this layer.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass
class Entry:
    """What the cache knows about one event id."""

    digest: bytes
    """Digest of the event as the client sent it (a reuse with another body is a conflict)."""
    pending: Any = None
    """While the first attempt waits for the broker: an awaitable that settles with it."""
    accepted: bool = False
    """The broker acknowledged the event."""


class IdempotencyCache:
    """Insertion-ordered map with a TTL and a size bound; the clock is injectable for tests.

    Every entry lives `window_s` from its last `put`; since all entries share one window,
    the oldest entries are at the front, and pruning is amortised O(1).
    """

    def __init__(self, window_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self.clock = clock
        self._data: OrderedDict[Hashable, tuple[float, Entry]] = OrderedDict()
        self.evicted = 0
        """Entries forgotten because the cache was full (before their window ended)."""

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> Entry | None:
        """The live entry for `key`, or None (an expired one is dropped)."""
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= self.clock():
            del self._data[key]
            return None
        return item[1]

    def put(self, key: Hashable, entry: Entry) -> None:
        """Remember `entry` for `window_s` from now (replacing any previous one)."""
        now = self.clock()
        self._data.pop(key, None)
        self._data[key] = (now + self.window_s, entry)
        self._prune(now)

    def discard(self, key: Hashable, entry: Entry | None = None) -> None:
        """Forget `key` (only if it still maps to `entry`, when given)."""
        item = self._data.get(key)
        if item is not None and (entry is None or item[1] is entry):
            del self._data[key]

    def _prune(self, now: float) -> None:
        data = self._data
        while data:
            key, (expires, _) = next(iter(data.items()))
            if expires <= now:
                del data[key]
            elif len(data) > self.max_entries:
                del data[key]
                self.evicted += 1
            else:
                break
