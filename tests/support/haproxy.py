"""A real HAProxy (Debian's `haproxy`, installed by the Makefile's test stamp) in TCP mode in front
of a proxy, sending the PROXY protocol header as a cloud load balancer would.

It listens on 127.0.0.1 and ::1 only (a client on ::1 arrives in a TCP6 / INET6 header), runs
in the foreground (`-db`) as a child of the test, and is stopped by `stop` (SIGTERM, then its
PID is waited for).
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.support.tools import tool
from tests.support.waiting import wait_for

HAPROXY = tool("haproxy")
# Seconds HAProxy gets to start listening and to exit after SIGTERM.
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

CONFIG = """
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend clients
    bind 127.0.0.1:{port}
    bind [::1]:{port}
    default_backend outgate

backend outgate
    server outgate 127.0.0.1:{backend_port} {send_proxy}
"""


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class HAProxy:
    """`send_proxy` is HAProxy's server option: `send-proxy` (v1) or `send-proxy-v2`."""

    def __init__(self, workdir: Path, *, backend_port: int, send_proxy: str) -> None:
        self.port = _unused_port()
        self.config = workdir / f"haproxy-{self.port}.cfg"
        self.config.write_text(
            CONFIG.format(port=self.port, backend_port=backend_port, send_proxy=send_proxy)
        )
        self.stderr = workdir / f"haproxy-{self.port}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url6(self) -> str:
        return f"http://[::1]:{self.port}"

    def start(self) -> HAProxy:
        check = subprocess.run(
            [HAPROXY, "-c", "-f", str(self.config)], capture_output=True, check=False
        )
        assert check.returncode == 0, check.stderr.decode(errors="replace")
        # stderr to a file, not a pipe nobody reads (a full pipe would stall HAProxy).
        with open(self.stderr, "wb") as stderr:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config)], stdout=subprocess.DEVNULL, stderr=stderr
            )
        wait_for(
            lambda: _accepting(self.port) or self.proc is None or self.proc.poll() is not None,
            START_TIMEOUT,
            what="HAProxy listening",
        )
        assert self.proc.poll() is None, self.stderr.read_text(errors="replace")
        # The readiness probe above was a connection that sent nothing: HAProxy may have opened
        # a backend connection for it, which closed without a request (and left no record).
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        self.proc = None

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
