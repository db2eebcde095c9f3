"""System tools the tests start, found where Debian installs them.

Administration tools (iptables, runuser, haproxy, squid) live in /usr/sbin, which a user's or a
CI job's PATH may leave out; look there too rather than fail with "not found"."""

from __future__ import annotations

import os
import shutil
import socket

SBIN = ("/usr/sbin", "/sbin")


def tool(name: str) -> str:
    """The path of `name` on PATH or in the sbin directories; `name` itself if nowhere."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=search) or name


def free_port() -> int:
    """A loopback port nothing listens on now, for a server that takes its port as an argument
    (etcd, kube-apiserver, Squid). Another process may take it before that server binds it:
    the server then fails to start and says so."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
