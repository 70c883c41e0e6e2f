"""Text bookkeeping for streamed completions (pure functions).

Detokenising one token at a time breaks multi-byte characters and merges (a token can
change how the previous one decodes), so the completion is decoded as a whole each time
and only the new suffix is sent; a trailing U+FFFD (an unfinished UTF-8 sequence) is held
back until the next token completes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


def stable_text(text: str, final: bool) -> str:
    """The part of a decoded text that will not change when more tokens arrive."""
    if final:
        return text
    return text.rstrip(REPLACEMENT)


def text_delta(sent: str, text: str) -> str:
    """What to send after `sent` has gone out and the completion now decodes to `text`."""
    if text.startswith(sent):
        return text[len(sent) :]
    # A merge rewrote already-sent text (rare); send only what extends past it.
    return text[len(sent) :] if len(text) > len(sent) else ""


def find_stop(text: str, stops: Sequence[str], search_from: int = 0) -> int | None:
    """Index in `text` where the earliest stop sequence begins, or None.

    `search_from` skips text already checked (minus the longest stop, for overlaps).
    """
    best: int | None = None
    for s in stops:
        i = text.find(s, max(0, search_from - len(s) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def hold_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` to hold back because they may begin a stop
    sequence (so a streamed client never sees part of a stop string)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                longest = max(longest, n)
                break
    return longest


class Detokenizer:
    """Tracks one completion's text as token ids arrive, with stop sequences."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stops = tuple(stops)
        self.text = ""
        """The completion text so far (cut before a stop sequence once one is seen)."""
        self.sent = ""
        """The prefix of `text` already handed out by `delta`."""
        self.stopped = False

    def update(self, token_ids: list[int]) -> bool:
        """Decode the completion after a new token; True if a stop sequence ended it."""
        full = self.decode(token_ids)
        if self.stops:
            i = find_stop(full, self.stops, len(self.text))
            if i is not None:
                self.text = full[:i]
                self.stopped = True
                return True
        self.text = full
        return False

    def delta(self, final: bool) -> str:
        """New text safe to send now (all of it once `final`)."""
        text = stable_text(self.text, final or self.stopped)
        if not (final or self.stopped) and self.stops:
            text = text[: len(text) - hold_back(text, self.stops)]
        out = text_delta(self.sent, text)
        if out:
            self.sent += out
        return out
