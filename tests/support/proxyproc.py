"""Start the proxy exactly as the CLI does (`outgate run --config FILE`) and read what it writes.

Stdout carries the audit records (one JSON object a line), stderr the operational log; both are
collected by reader threads so a test can wait for a record instead of sleeping.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

OUTGATE = str(Path(sys.executable).with_name("outgate"))
START_TIMEOUT = 20.0


def outgate_command() -> list[str]:
    return [OUTGATE] if os.path.exists(OUTGATE) else [sys.executable, "-m", "proxy"]


def run_outgate(*args: str) -> subprocess.CompletedProcess[str]:
    """One CLI command (check-config, explain, ...) as an operator runs it; output captured."""
    return subprocess.run(
        [*outgate_command(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def terminate(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as an orchestrator stops a pod; SIGKILL if it has not exited within 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def json_lines(stream: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """A process's log lines as JSON objects; a line that is not JSON as an `unparsed` entry."""
    for line in stream:
        try:
            yield json.loads(line)
        except ValueError:
            yield {"event": "unparsed", "text": line.decode(errors="replace")}


class ProxyProcess:
    def __init__(
        self,
        workdir: Path,
        *,
        policies: str,
        nameserver: str | None = None,
        config: dict[str, Any] | None = None,
        rlimit_nofile: int | None = None,
        embedded_config: bool = False,
        command: Callable[[Path], list[str]] | None = None,
        env: Mapping[str, str] | None = None,
        on_record: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """`on_record`: called with each audit record as it is read; the record is kept (in
        `records`, its line in `raw_stdout`) only if it returns True, so a long run can count
        millions of records without holding them. `embedded_config`: run with no --config, on
        the embedded laptop default (its fixed ports: only in the network namespace);
        `policies` and `config` are then unused.
        `command`: the argv that runs `outgate run` on the given config file in another way
        (in a container: tests/support/image.py), with `env` as its environment."""
        self.command = command
        self.env = env
        self.on_record = on_record
        self.rlimit_nofile = rlimit_nofile
        self.embedded_config = embedded_config
        self._stdout_gate = threading.Event()
        self._stdout_gate.set()
        self.workdir = workdir
        self.policy_dir = workdir / "policies"
        self.policy_dir.mkdir(parents=True, exist_ok=True)
        (self.policy_dir / "policies.yaml").write_text(policies)
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "admin": "127.0.0.1:0",
            "policies": {"paths": ["policies"]},
            "identity": {
                "static": [
                    {
                        "name": "test-client",
                        "namespace": "tests",
                        "cidrs": ["127.0.0.1/32"],
                        "labels": {"app": "client"},
                    }
                ]
            },
            "dns": {
                "nameservers": [nameserver] if nameserver else [],
                "timeout": "2s",
                "minTTL": "0s",
            },
            "timeouts": {"header": "5s", "connect": "3s", "idle": "30s", "drain": "5s"},
        }
        for key, value in (config or {}).items():
            if isinstance(value, dict) and isinstance(settings.get(key), dict):
                settings[key] = {**settings[key], **value}
            else:
                settings[key] = value
        self.config_path = workdir / "outgate.yaml"
        self.config_path.write_text(yaml.safe_dump(settings))
        self.records: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self.raw_stdout: list[bytes] = []
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin_port = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> ProxyProcess:
        limit = self.rlimit_nofile

        def limit_files() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        config = [] if self.embedded_config else ["--config", str(self.config_path)]
        argv = [*outgate_command(), "run", *config]
        if self.command is not None:
            argv = self.command(self.config_path)
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
            env=self.env,
            preexec_fn=limit_files if limit is not None else None,
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        listening = self.wait_log(lambda e: e.get("event") == "listening", timeout=START_TIMEOUT)
        self.port = int(listening["proxy"].rsplit(":", 1)[1])
        self.admin_port = int(listening["admin"].rsplit(":", 1)[1])
        return self

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self._stdout_gate.set()
        terminate(self.proc)
        for thread in self._threads:
            thread.join(5)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- output ---------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._stdout_gate.wait()
            record = json.loads(line)
            if self.on_record is not None and not self.on_record(record):
                continue
            with self._cond:
                self.raw_stdout.append(line)
                self.records.append(record)
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for entry in json_lines(self.proc.stderr):
            with self._cond:
                self.logs.append(entry)
                self._cond.notify_all()

    def _wait(
        self, source: list[dict[str, Any]], pred: Any, count: int, timeout: float
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in source if pred(e)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or (
                    self.proc is not None and self.proc.poll() is not None and not found
                ):
                    raise AssertionError(
                        f"waited {timeout}s for {count} entries, found {len(found)}; "
                        f"logs: {self.logs[-10:]}"
                    )
                self._cond.wait(min(left, 0.2))

    def wait_log(self, pred: Any, timeout: float = 10.0) -> dict[str, Any]:
        return self._wait(self.logs, pred, 1, timeout)[0]

    def wait_logs(self, pred: Any, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return self._wait(self.logs, pred, count, timeout)

    def wait_records(
        self, pred: Any, count: int = 1, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        return self._wait(self.records, pred, count, timeout)

    def records_for(
        self, event_id: str, count: int = 2, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """The decision and close records of one request, in that order."""
        found = self.wait_records(lambda r: r["event"]["id"] == event_id, count, timeout)
        return sorted(found, key=lambda r: r["event"]["action"] != "decision")

    def records_by_path(self, path: str, timeout: float = 10.0) -> list[dict[str, Any]]:
        found = self.wait_records(
            lambda r: r.get("url", {}).get("path") == path and r["event"]["action"] == "close",
            1,
            timeout,
        )
        return self.records_for(found[-1]["event"]["id"], timeout=timeout)

    def pause_stdout(self) -> None:
        """Stop reading the proxy's stdout (after the current line): the pipe fills, as when a
        log collector stalls."""
        self._stdout_gate.clear()

    def resume_stdout(self) -> None:
        self._stdout_gate.set()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    # -- probes ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin(self, path: str) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def connect(self, timeout: float = 10.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return sock


def read_until_close(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the proxy sends until it closes the connection (asserts it does close)."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


class ResponseReader:
    """Reads successive responses from one socket, keeping bytes of the next one buffered."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def next(self, *, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
        """One response framed by Content-Length or chunked; (status, headers, body).

        `head_request=True` for the answer to a HEAD request, which has no body whatever it says."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise AssertionError(f"closed before a full head: {self.buf!r}")
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    if not self._fill():
                        raise AssertionError("closed inside a chunk size line")
                size_line, _, self.buf = self.buf.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    if not self._fill():
                        raise AssertionError("closed inside a chunk")
                body += self.buf[:size]
                self.buf = self.buf[size + 2 :]
                if size == 0:
                    return status, headers, body
        length = int(headers.get("content-length", "0"))
        if head_request or 100 <= status < 200 or status in (204, 304):
            length = 0
        while len(self.buf) < length:
            if not self._fill():
                break
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body


def read_response(sock: socket.socket, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One response on a fresh socket (bytes after it are dropped)."""
    return ResponseReader(sock, timeout).next()


def ready(proxy: ProxyProcess) -> bool:
    """The proxy's /readyz answers 200 (policy loaded, informers synced)."""
    return proxy.admin("/readyz")[0] == 200


def get_from(proxy: ProxyProcess, source: str, url: str) -> tuple[int, dict[str, str], bytes]:
    """A plain GET through the proxy from `source` (a pod's loopback address)."""
    sock = socket.create_connection(
        ("127.0.0.1", proxy.port), timeout=10, source_address=(source, 0)
    )
    with sock:
        host = url.split("/")[2]
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return read_response(sock)


def explain(proxy: ProxyProcess, source: str, url: str) -> dict[str, Any]:
    status, body = proxy.admin(f"/explain?source={source}&url={url}&format=json")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result
