"""Hidden user preferences: `(prompt, completion) -> probability of accepting`.

The loop never sees these functions; it sees only what the simulated users do. A
preference is named `MODULE:CALLABLE` (`rlfeed demo --preference`, `RLFEED_SIM_PREFERENCE`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

Preference = Callable[[str, str], float]

_WORD = re.compile(r"\w+")


def concise(prompt: str, completion: str) -> float:
    """The demo's default: users accept answers of 3 to 25 words (p 0.9), else rarely (p 0.1).

    The floor of 3 words means an empty or one-word answer does not please anyone, so a
    policy that shrinks its answers to nothing loses reward instead of gaining it.
    """
    words = len(_WORD.findall(completion))
    return 0.9 if 3 <= words <= 25 else 0.1


def polite(prompt: str, completion: str) -> float:
    """An alternative: users like answers that thank or greet them."""
    text = completion.lower()
    return 0.85 if any(w in text for w in ("thank", "hello", "hi ", "glad", "happy to")) else 0.15


def load(spec: str) -> Preference:
    """Import `MODULE:CALLABLE` and check it returns probabilities."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"sim_preference: expected MODULE:CALLABLE, got {spec!r}")
    func = getattr(importlib.import_module(module_name), attr)
    if not callable(func):
        raise ValueError(f"sim_preference: {spec} is not callable")
    try:
        probe = func("Say hello.", "Hello there, how can I help you today?")
    except Exception as exc:
        raise ValueError(f"sim_preference: {spec} failed on a probe call: {exc}") from exc
    if not isinstance(probe, int | float) or not 0.0 <= float(probe) <= 1.0:
        raise ValueError(f"sim_preference: {spec} returned {probe!r}, not a probability in [0, 1]")
    return func
