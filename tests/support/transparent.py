"""Shared setup of the transparent-mode tests in the network namespace (tests/netns/enter.sh
binds these addresses on the namespace's loopback)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Final

from tests.support.clients import curl

ORIGIN: Final = "11.0.0.1"  # the real server of the allowed names
LISTENER: Final = "11.0.0.4"  # the proxy's transparent listeners
CANARY: Final = "11.0.0.5"  # an address clients "mean": the proxy must never reach it
CANARY_V6: Final = "2001:4860::1"  # the same, over IPv6


def steered_identity(name: str) -> dict[str, Any]:
    """`identity` config for a client that connects from anywhere in this namespace (a client
    dialling 11.0.0.x or 2001:4860::1 on loopback has that address as its source), labelled
    app=client."""
    return {
        "static": [
            {
                "name": name,
                "namespace": "tests",
                "cidrs": ["127.0.0.1/32", "11.0.0.0/24", "::1/128", f"{CANARY_V6}/128"],
                "labels": {"app": "client"},
            }
        ]
    }


def https_via(
    name: str, address: str, cafile: Path, *, port: int = 443
) -> subprocess.CompletedProcess[str]:
    """curl `https://name:port/hello` with no proxy setting, its DNS answer for `name` being
    `address` (the listener, or an address a NAT rule sends to it), verifying with `cafile`."""
    host = f"[{address}]" if ":" in address else address
    return curl(
        "--resolve",
        f"{name}:{port}:{host}",
        "--cacert",
        str(cafile),
        f"https://{name}:{port}/hello",
    )
