"""System tools the tests start, found where Debian installs them.

Administration tools (iptables, runuser, haproxy, squid) live in /usr/sbin, which a user's or a
CI job's PATH may leave out; look there too rather than fail with "not found"."""

from __future__ import annotations

import os
import shutil

SBIN = ("/usr/sbin", "/sbin")


def tool(name: str) -> str:
    """The path of `name` on PATH or in the sbin directories; `name` itself if nowhere."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=search) or name
