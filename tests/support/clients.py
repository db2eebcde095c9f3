"""Real clients run against the proxy as a user would run them."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

# Seconds: past every timeout a test provokes in the proxy, so curl reports the proxy's answer
# rather than giving up first; and a bound, so a hung exchange fails the test.
CURL_MAX_TIME = 20


def curl(
    *args: str, max_time: int = CURL_MAX_TIME, status_only: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run curl with `args`; `status_only` discards the body and prints only the status code.

    The environment is just a PATH: no http_proxy/https_proxy/no_proxy from the caller's shell,
    so only `-x` in `args` decides where curl connects."""
    command = ["curl", "--silent", "--show-error", "--max-time", str(max_time)]
    if status_only:
        command += ["-o", "/dev/null", "-w", "%{http_code}"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )


# The Go client (tests/support/goclient/main.go): built once per machine, cached by source hash.
GO_CLIENT_SOURCE = Path(__file__).with_name("goclient") / "main.go"


def go_client(cache_dir: Path) -> Path:
    """The Go client built under `cache_dir` (a persistent pytest cache directory), rebuilt only
    when its source changes. Standard library only: no module download, no network."""
    digest = hashlib.sha256(GO_CLIENT_SOURCE.read_bytes()).hexdigest()[:16]
    binary = cache_dir / f"goclient-{digest}"
    if not binary.exists():
        env = {
            "PATH": "/usr/bin:/bin:/usr/local/go/bin",
            "HOME": str(cache_dir),
            "GOCACHE": str(cache_dir / "gocache"),
            "GOPATH": str(cache_dir / "gopath"),
            "GOPROXY": "off",
            "GOFLAGS": "",
            "CGO_ENABLED": "0",
        }
        building = binary.with_suffix(".building")
        subprocess.run(
            ["go", "build", "-o", str(building), str(GO_CLIENT_SOURCE)],
            env=env,
            check=True,
            capture_output=True,
        )
        building.replace(binary)
    return binary
