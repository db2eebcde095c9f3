"""Issue 16: what splice(2) saves the real proxy on an opaque tunnel, and what it costs.

Two proxies run side by side (`python -m proxy run`, one worker each, pinned to CPU 0 when
there are two CPUs): `spliceMaxTunnels: 0` (the Protocol relay only) and the defaults (splice
from `spliceAfterBytes` on). Through each, alternately, ROUNDS times: one CONNECT tunnel
(`protocol: tcp` to 127.0.0.1) carries TOTAL_BYTES from an origin thread to a client thread;
the proxy's CPU (utime + stime of its process tree, /proc/PID/stat) over the transfer, per GB.
While the transfer runs, the proxy's descriptors are counted (a spliced tunnel holds two pipes).
Then IDLE_TUNNELS tunnels are opened through each, each carrying a few bytes, and held: the
descriptors and RSS per idle tunnel, which splicing must leave as they were.

Prints one JSON object and a markdown table (`make bench` runs it among its extra scripts).
Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

if not __package__:  # run as a script (bench/run.py's extra scripts): the repository's root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import procstat

TOTAL_BYTES = 1 << 30
ROUNDS = 3
IDLE_TUNNELS = 500
CHUNK = 1 << 20
START_TIMEOUT = 20.0
MODES = {"protocol": {"spliceMaxTunnels": 0}, "splice": {}}


class Origin:
    """Each accepted connection: read one byte (how much to send: 'b' bulk, 'i' idle), then
    send TOTAL_BYTES and close, or echo a few bytes and hold the connection until closed."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    @staticmethod
    def _one(conn: socket.socket) -> None:
        with conn:
            kind = conn.recv(1)
            if kind == b"b":
                payload = b"\0" * CHUNK
                left = TOTAL_BYTES
                while left > 0:
                    left -= conn.send(payload[: min(left, CHUNK)])
            elif kind == b"i":
                conn.sendall(b"i")
                while conn.recv(1024):
                    pass


class Proxy:
    def __init__(self, workdir: Path, name: str, limits: dict[str, Any], origin: Origin) -> None:
        home = workdir / name
        (home / "policies").mkdir(parents=True)
        policy = {
            "apiVersion": "outgate.dev/v1alpha1",
            "kind": "EgressPolicy",
            "metadata": {"name": "bench", "namespace": "bench"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "bench"}},
                "rules": [
                    {
                        "name": "origin",
                        "action": "Allow",
                        "to": [{"cidr": "127.0.0.1/32"}],
                        "ports": [origin.port],
                        "protocol": "tcp",
                    }
                ],
            },
        }
        (home / "policies" / "bench.yaml").write_text(yaml.safe_dump(policy))
        config = {
            "listen": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
            "policies": {"paths": ["policies"]},
            "identity": {
                "static": [
                    {
                        "name": "bench",
                        "namespace": "bench",
                        "cidrs": ["127.0.0.1/32"],
                        "labels": {"app": "bench"},
                    }
                ]
            },
            "timeouts": {"idle": "600s", "drain": "1s"},
            "limits": {
                "newConnectionsPerSecond": 100000,
                "newConnectionsBurst": 100000,
                "maxTunnelsPerWorkload": 20000,
                **limits,
            },
        }
        (home / "outgate.yaml").write_text(yaml.safe_dump(config))
        argv = [sys.executable, "-m", "proxy", "run", "--config", str(home / "outgate.yaml")]
        if (os.cpu_count() or 1) >= 2:
            argv = ["taskset", "-c", "0", *argv]
        self.audit = open(home / "audit.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=home, stdout=self.audit, stderr=subprocess.PIPE, text=True
        )
        self.port = self._wait_listening()
        self.origin_port = origin.port

    def _wait_listening(self) -> int:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == "listening":
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()
                return int(str(entry["proxy"]).rsplit(":", 1)[1])
        raise RuntimeError("the proxy did not start")

    def tunnel(self, kind: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port))
        target = f"127.0.0.1:{self.origin_port}"
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        sock.sendall(kind)
        return sock

    def bulk(self) -> dict[str, float]:
        """One TOTAL_BYTES download: the proxy's CPU s/GB, GB/s, descriptors while it ran."""
        before_fds = procstat.open_descriptors(self.proc.pid)
        start = procstat.sample(self.proc.pid).cpu_seconds
        began = time.monotonic()
        sock = self.tunnel(b"b")
        got = 0
        during_fds = 0
        with sock:
            while data := sock.recv(CHUNK):
                got += len(data)
                if not during_fds and got > TOTAL_BYTES // 2:
                    during_fds = procstat.open_descriptors(self.proc.pid)
        elapsed = time.monotonic() - began
        used = procstat.sample(self.proc.pid).cpu_seconds - start
        if got != TOTAL_BYTES:
            raise RuntimeError(f"received {got} of {TOTAL_BYTES}")
        return {
            "cpu_s_per_gb": used / (got / 1e9),
            "gb_per_s": got / 1e9 / elapsed,
            "descriptors_during": during_fds - before_fds,
        }

    def idle(self, count: int) -> dict[str, float]:
        """Open `count` tunnels, each carrying one byte each way, and hold them: the
        descriptors and RSS per tunnel."""
        time.sleep(0.5)  # let the last transfer's sockets close before the baseline
        base = procstat.sample(self.proc.pid).rss_kib
        base_fds = procstat.open_descriptors(self.proc.pid)
        held = []
        for _ in range(count):
            sock = self.tunnel(b"i")
            if sock.recv(1) != b"i":
                raise RuntimeError("idle tunnel not echoed")
            held.append(sock)
        rss = procstat.sample(self.proc.pid).rss_kib
        fds = procstat.open_descriptors(self.proc.pid)
        for sock in held:
            sock.close()
        return {
            "kib_per_tunnel": (rss - base) / count,
            "descriptors_per_tunnel": (fds - base_fds) / count,
        }

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)
        self.audit.close()


def main() -> int:
    origin = Origin()
    results: dict[str, Any] = {"bytes": TOTAL_BYTES, "rounds": ROUNDS}
    with tempfile.TemporaryDirectory(prefix="tunnel-splice-") as tmp:
        proxies = {name: Proxy(Path(tmp), name, limits, origin) for name, limits in MODES.items()}
        try:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in MODES}
            for _ in range(ROUNDS):
                for name, proxy in proxies.items():
                    runs[name].append(proxy.bulk())
            for name, proxy in proxies.items():
                cpu = [run["cpu_s_per_gb"] for run in runs[name]]
                results[name] = {
                    "cpu_s_per_gb": [round(value, 3) for value in cpu],
                    "cpu_s_per_gb_median": round(statistics.median(cpu), 3),
                    "gb_per_s": [round(run["gb_per_s"], 2) for run in runs[name]],
                    "descriptors_during_transfer": runs[name][0]["descriptors_during"],
                    "idle": {
                        key: round(value, 2) for key, value in proxy.idle(IDLE_TUNNELS).items()
                    },
                }
        finally:
            for proxy in proxies.values():
                proxy.stop()
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")
    off, on = results["protocol"], results["splice"]
    print("| figure | Protocol relay | splice(2) |")
    print("|---|---|---|")
    print(
        f"| proxy CPU s/GB, 1 GiB through one tunnel (each run; median) | "
        f"{', '.join(map(str, off['cpu_s_per_gb']))}; {off['cpu_s_per_gb_median']} | "
        f"{', '.join(map(str, on['cpu_s_per_gb']))}; {on['cpu_s_per_gb_median']} |"
    )
    print(f"| GB/s (each run) | {off['gb_per_s']} | {on['gb_per_s']} |")
    print(
        f"| descriptors held during the transfer | {off['descriptors_during_transfer']} | "
        f"{on['descriptors_during_transfer']} |"
    )
    print(
        f"| {IDLE_TUNNELS} idle tunnels: KiB RSS / descriptors per tunnel | "
        f"{off['idle']['kib_per_tunnel']} / {off['idle']['descriptors_per_tunnel']} | "
        f"{on['idle']['kib_per_tunnel']} / {on['idle']['descriptors_per_tunnel']} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
