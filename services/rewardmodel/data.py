"""Pure data handling of the reward-model trainer: a bounded, deduplicated buffer of
preference events, the held-out split by prompt, and events to training examples."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from schemas.events import PreferenceEvent, PreferenceKind
from services.preferences.model import Pair, Unpaired


class PreferenceBuffer:
    """The newest `max_items` preference events, deduplicated by event id."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self.items: OrderedDict[str, PreferenceEvent] = OrderedDict()
        self.added_since_train = 0
        self.duplicates = 0

    def add(self, event: PreferenceEvent) -> bool:
        """Keep an event; False for a duplicate id (a replay)."""
        if event.event_id in self.items:
            self.duplicates += 1
            return False
        self.items[event.event_id] = event
        self.added_since_train += 1
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self.items)


def is_heldout(prompt: str, heldout_pct: int) -> bool:
    """Whether a prompt belongs to the held-out split (stable across runs and processes)."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < heldout_pct


def to_examples(events: Iterable[PreferenceEvent]) -> tuple[list[Pair], list[Unpaired]]:
    """Training pairs and unpaired labels of preference events."""
    pairs: list[Pair] = []
    unpaired: list[Unpaired] = []
    for e in events:
        if e.kind == PreferenceKind.UNPAIRED:
            liked = e.chosen is not None
            unpaired.append(Unpaired(e.prompt, (e.chosen if liked else e.rejected) or "", liked))
        elif e.chosen is not None and e.rejected is not None:
            pairs.append(Pair(e.prompt, e.chosen, e.rejected, e.margin))
    return pairs, unpaired


def split(
    events: Sequence[PreferenceEvent], heldout_pct: int
) -> tuple[tuple[list[Pair], list[Unpaired]], tuple[list[Pair], list[Unpaired]]]:
    """((train pairs, train unpaired), (held-out pairs, held-out unpaired)), split by prompt."""
    train = [e for e in events if not is_heldout(e.prompt, heldout_pct)]
    held = [e for e in events if is_heldout(e.prompt, heldout_pct)]
    return to_examples(train), to_examples(held)
