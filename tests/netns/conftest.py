"""Tests here run only inside the namespace tests/test_netns_suite.py creates."""

from __future__ import annotations

import os
import socket

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get("OUTGATE_IN_NETNS") == "1":
        return
    skip = pytest.mark.skip(reason="runs inside the namespace made by tests/test_netns_suite.py")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _only_loopback_here() -> None:
    """Belt and braces: refuse to run if a non-loopback device exists in this namespace."""
    names = [name for _, name in socket.if_nameindex()]
    assert names == ["lo"], f"not an isolated namespace: {names}"
