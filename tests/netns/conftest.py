"""Tests here run only inside the namespace tests/test_netns_suite.py creates (tests/conftest.py
leaves this directory out of any other run)."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(autouse=True)
def _only_loopback_here() -> None:  # autouse fixtures of a conftest apply to its directory only
    """Belt and braces: refuse to run if a non-loopback device exists in this namespace."""
    names = [name for _, name in socket.if_nameindex()]
    assert names == ["lo"], f"not an isolated namespace: {names}"
