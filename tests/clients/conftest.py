"""The real-client range, started once for the clients suite (tests/support/clientrange.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.clientrange import ClientRange, start_client_range


@pytest.fixture(scope="package")
def client_range(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClientRange]:
    with start_client_range(tmp_path_factory.mktemp("clients")) as started:
        yield started
