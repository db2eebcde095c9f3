"""Real clients run against the proxy as a user would run them."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Mapping

# Seconds: past every timeout a test provokes in the proxy, so curl reports the proxy's answer
# rather than giving up first; and a bound, so a hung exchange fails the test.
CURL_MAX_TIME = 20


def _curl_command(args: tuple[str, ...], *, max_time: int, status_only: bool) -> list[str]:
    command = ["curl", "--silent", "--show-error", "--max-time", str(max_time)]
    if status_only:
        command += ["-o", "/dev/null", "-w", "%{http_code}"]
    return [*command, *args]


# The environment is just a PATH: no http_proxy/https_proxy/no_proxy from the caller's shell, so
# only `-x` in the arguments (or proxy variables a test hands in) decides where curl connects.
CURL_ENV = {"PATH": "/usr/bin:/bin"}


def curl(
    *args: str,
    max_time: int = CURL_MAX_TIME,
    status_only: bool = False,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run curl with `args`; `status_only` discards the body and prints only the status code.
    The environment is CURL_ENV plus `env`."""
    return subprocess.run(
        _curl_command(args, max_time=max_time, status_only=status_only),
        capture_output=True,
        text=True,
        env={**CURL_ENV, **(env or {})},
        check=False,
    )


async def curl_async(*args: str, max_time: int = CURL_MAX_TIME) -> subprocess.CompletedProcess[str]:
    """`curl` for a test whose proxy runs in its own event loop (a blocking run would stall it)."""
    command = _curl_command(args, max_time=max_time, status_only=False)
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CURL_ENV
    )
    out, err = await process.communicate()
    return subprocess.CompletedProcess(
        command, process.returncode or 0, out.decode("latin-1"), err.decode("latin-1")
    )
