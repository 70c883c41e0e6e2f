"""The hostile-input corpus (tests/fuzz/make_corpus.py) and the hypothesis size profiles.

`RLFEED_FUZZ_PROFILE=large` (or `RLFEED_FUZZ_EXAMPLES=N`) runs the generated part of the
fuzz tests at a local size; the default `ci` profile keeps them to a few seconds each.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from tests.fuzz.make_corpus import cases

_COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
settings.register_profile("rlfeed-fuzz-ci", max_examples=40, **_COMMON)
settings.register_profile("rlfeed-fuzz-large", max_examples=2_000, **_COMMON)


def fuzz_settings() -> settings:
    """The hypothesis settings for this run (env: RLFEED_FUZZ_PROFILE, RLFEED_FUZZ_EXAMPLES)."""
    profile = settings.get_profile(f"rlfeed-fuzz-{os.environ.get('RLFEED_FUZZ_PROFILE', 'ci')}")
    examples = os.environ.get("RLFEED_FUZZ_EXAMPLES")
    return settings(profile, max_examples=int(examples)) if examples else profile


def corpus() -> list[tuple[str, bytes]]:
    """(file name, bytes) of every hand-written hostile input, sorted by name."""
    return sorted(cases().items())
