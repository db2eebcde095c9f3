"""Fixtures shared by the in-process data-plane tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.inprocess import Intercepting, intercepting_proxy


@pytest.fixture
async def intercepting(tmp_path: Path) -> AsyncIterator[Intercepting]:
    """The in-process proxy intercepting origin.test (`inspect: {}`), a TLS origin for it."""
    async with intercepting_proxy(tmp_path) as proxy:
        yield proxy
