"""Real clients run against the proxy as a user would run them."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping

# Seconds: past every timeout a test provokes in the proxy, so curl reports the proxy's answer
# rather than giving up first; and a bound, so a hung exchange fails the test.
CURL_MAX_TIME = 20


def curl(
    *args: str,
    max_time: int = CURL_MAX_TIME,
    status_only: bool = False,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run curl with `args`; `status_only` discards the body and prints only the status code.

    The environment is just a PATH and `env`: no http_proxy/https_proxy/no_proxy from the
    caller's shell, so only `-x` in `args` or the proxy variables in `env` decide where curl
    connects."""
    command = ["curl", "--silent", "--show-error", "--max-time", str(max_time)]
    if status_only:
        command += ["-o", "/dev/null", "-w", "%{http_code}"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        check=False,
    )
