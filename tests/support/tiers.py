"""Test tiers that need a part this machine may not have (a real API server, a container engine).

Where the part cannot be had, the tier says why and is skipped, so a developer without it still
runs everything else. Under `CI=true` the same condition fails the run instead: CI must never
pass because a tier quietly did not run.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def tier_unavailable(tier: str, reason: str) -> NoReturn:
    """Skip the calling test (or fixture) with `reason`; fail it instead under CI=true."""
    message = f"the {tier} tier cannot run here: {reason}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: a skipped tier fails the run)", pytrace=False)
    pytest.skip(message)
