"""Shared fixtures: the scripted DNS server, real origins, and proxies started as the CLI does."""

import os
import socket
from pathlib import Path

import pytest

pytest_plugins = ["tests.support.dnsserver", "tests.support.fixtures", "tests.support.image"]

# These directories aim the proxy at metadata, private and public-looking addresses (and clients
# at public-looking names). They are collected only inside the network namespace that
# tests/test_netns_suite.py creates for them.
NAMESPACED = ("netns", "security", "clients")
HERE = Path(__file__).resolve().parent

if os.environ.get("OUTGATE_IN_NETNS") != "1":
    collect_ignore = list(NAMESPACED)


@pytest.fixture(autouse=True)
def _namespaced_tests_run_only_in_an_isolated_namespace(request: pytest.FixtureRequest) -> None:
    """Belt and braces: a namespaced test refuses to run where a real network device exists."""
    if request.node.path.resolve().relative_to(HERE).parts[0] in NAMESPACED:
        names = [name for _, name in socket.if_nameindex()]
        assert names == ["lo"], f"not an isolated network namespace: {names}"
