"""The image tier finds its container engine, or says what is missing (tests/support/image.py).
The skip, or the failure under CI=true, is tests/support/tiers.py's: tests/integration/test_tiers.py
shows both."""

from __future__ import annotations

import pytest

from tests.support.image import Unavailable, find_engine


def test_without_docker_or_podman_the_image_tier_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Neither on PATH nor in the sbin directories tools.tool() also searches.
    monkeypatch.setenv("PATH", "")
    with pytest.raises(Unavailable, match="no container engine: no docker daemon answers and "):
        find_engine()
