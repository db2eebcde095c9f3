"""Runs tests/netns, tests/security and tests/clients inside a network namespace this test
creates (`unshare -n`).

Those tests point the proxy at metadata, private and public-looking addresses, and real
clients at public-looking names. In the namespace the only device is a loopback carrying those
addresses, so even a broken address guard cannot send a packet to a real network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Seconds: the three directories take a few minutes; the first run on a machine also compiles
# the Go and Java clients of tests/clients (cached afterwards).
SUITE_TIMEOUT = 900


@pytest.mark.skipif(os.environ.get("OUTGATE_IN_NETNS") == "1", reason="already inside")
def test_network_namespace_suite_passes() -> None:
    assert shutil.which("unshare"), "unshare (util-linux) is needed: make test installs it"
    assert os.geteuid() == 0, "creating a network namespace needs root (CI and dev machines are)"
    result = subprocess.run(
        [
            "unshare",
            "--net",
            "--",
            "sh",
            str(REPO / "tests" / "netns" / "enter.sh"),
            sys.executable,
            "-m",
            "pytest",
            str(REPO / "tests" / "netns"),
            str(REPO / "tests" / "security"),
            str(REPO / "tests" / "clients"),
            "-p",
            "no:cacheprovider",
            "-q",
            "-rfE",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT,
        check=False,
    )
    print(result.stdout[-20000:])
    print(result.stderr[-5000:], file=sys.stderr)
    assert result.returncode == 0, "tests inside the network namespace failed (output above)"
    assert " passed" in result.stdout and " failed" not in result.stdout
