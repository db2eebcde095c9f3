"""A real PostgreSQL server (Debian's `postgresql`) in a throwaway data directory, run as the
`postgres` user (the server refuses to run as root), for port-map tests inside the namespace."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.tools import tool
from tests.support.waiting import wait_for

# Seconds for initdb (a few on a loaded machine) and for the server to accept connections.
INITDB_TIMEOUT = 120
START_TIMEOUT = 30.0


def postgres_bin(name: str) -> str:
    """A server program from the newest installed major version (they are not on PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    assert found, "postgresql is needed: make install-test installs it"
    return found[-1]


class PostgresServer:
    """`initdb --auth=trust` then `postgres` listening on `host:port` only."""

    def __init__(self, *, host: str, port: int = 5432) -> None:
        self.host = host
        self.port = port
        self._dir = Path(tempfile.mkdtemp(prefix="outgate-pg-"))
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PostgresServer:
        user = pwd.getpwnam("postgres")
        os.chown(self._dir, user.pw_uid, user.pw_gid)
        data = self._dir / "data"
        self._as_postgres(
            [postgres_bin("initdb"), "--auth=trust", "--username=postgres", "-D", str(data)],
            timeout=INITDB_TIMEOUT,
        )
        # Clients come through the proxy, from this namespace's own addresses: trust them all
        # (a throwaway server reachable only inside the namespace).
        with (data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\n")
        self._proc = subprocess.Popen(
            [
                tool("runuser"), "-u", "postgres", "--",
                postgres_bin("postgres"), "-D", str(data),
                "-c", f"listen_addresses={self.host}", "-p", str(self.port),
                "-c", f"unix_socket_directories={self._dir}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self._ready, START_TIMEOUT, what="postgres accepting connections")
        return self

    def _ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise AssertionError(f"postgres exited with {self._proc.returncode}")
        probe = subprocess.run(
            ["pg_isready", "-h", self.host, "-p", str(self.port), "-U", "postgres"],
            capture_output=True,
            check=False,
        )
        return probe.returncode == 0

    def _as_postgres(self, command: list[str], *, timeout: float) -> None:
        subprocess.run(
            [tool("runuser"), "-u", "postgres", "--", *command],
            capture_output=True,
            check=True,
            timeout=timeout,
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()  # smart shutdown: SIGTERM
            self._proc.wait(30)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
