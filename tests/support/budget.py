"""Example budgets for property tests that are not in tests/fuzz: few examples under `make test`,
`fuzz_factor` times as many under `make fuzz` (HYPOTHESIS_PROFILE=fuzz)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"


def budget(examples: int, *, fuzz_factor: int = 50) -> settings:
    return settings(
        max_examples=examples * fuzz_factor if FUZZ else examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
