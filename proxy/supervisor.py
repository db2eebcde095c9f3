"""`workers: N`: one supervisor process runs N proxy workers and restarts any worker that dies.

Each worker is `python -m proxy run` on the same config: its own event loop, policy watcher,
informers and caches (DESIGN section 2: the proxy keeps no shared state). What the supervisor
adds, in the order `run` sets it up:

1. Ports. The proxy and admin addresses are bound here first with SO_REUSEPORT (port 0 becomes
   a real port) and held bound but never listening. Every worker then binds its own listener on
   that port with SO_REUSEPORT, and the kernel spreads new connections over the workers by
   4-tuple hash: no accept thundering herd, each loop sees only its share. When a worker dies,
   the connections waiting in its accept queue are reset (Linux moves them only with
   net.ipv4.tcp_migrate_req); the other workers serve on.
2. Metrics. prometheus-client's multiprocess mode, in a directory made for this run under
   $TMPDIR, else /tmp (removed at exit): every worker writes its samples to memory-mapped files
   there, and /metrics on the admin port, whichever worker answers, merges them (proxy.admin).
   Gauges say how to merge (proxy.metrics); a dead worker's live gauges are dropped, its counters
   kept. This is the only place the proxy writes files: with a read-only root filesystem,
   `workers` above 1 needs a writable /tmp (an emptyDir or tmpfs, docs/install.md), and without
   one `run` stops with a one-line config error that says so.
3. Lines. Each worker's stdout (audit records) and stderr (operational log) are pipes read
   here; whole lines go on to the supervisor's own, so lines of two workers never interleave
   (a log line can leave a worker in two writes), and a stdout that blocks blocks the workers'
   writer threads in turn (the never-drop backpressure of proxy.audit holds).
4. Workers. Started with OUTGATE_WORKER_* in their environment (read by `worker_settings`);
   each asks the kernel for SIGTERM if the supervisor dies. A worker that exits is started
   again after a back-off that doubles, from RESTART_BACKOFF_MIN to RESTART_BACKOFF_MAX, while
   workers keep dying young (sooner than HEALTHY_UPTIME after their start).
5. Signals. SIGTERM or SIGINT: every worker drains (timeouts.drain), stragglers are killed after
   the drain plus STOP_GRACE; SIGHUP is passed on (policy reload).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import FrameType
from typing import TextIO, cast

import structlog

from proxy import native
from proxy.config import Endpoint, Settings
from proxy.errors import ConfigError, ConfigIssue
from proxy.fdio import write_all

log = structlog.get_logger(__name__)

# Read by a worker; set by the supervisor only.
ENV_INDEX = "OUTGATE_WORKER_INDEX"
ENV_SUPERVISOR = "OUTGATE_SUPERVISOR_PID"
ENV_LISTEN_PORT = "OUTGATE_WORKER_LISTEN_PORT"
ENV_ADMIN_PORT = "OUTGATE_WORKER_ADMIN_PORT"
ENV_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client reads it at import
ENV_RESTARTED = "OUTGATE_WORKER_RESTARTED"  # "1": this worker replaces one that exited

# A worker that dies sooner than this after its start counts as crashing: the next start waits
# twice as long as the last one (0.1 s, 0.2 s ... 10 s), so a broken config does not spin a CPU.
HEALTHY_UPTIME = 10.0
RESTART_BACKOFF_MIN = 0.1
RESTART_BACKOFF_MAX = 10.0
# After the drain timeout, how long workers get to flush their audit lines and exit.
STOP_GRACE = 10.0
# How often the supervisor looks at its workers when no signal wakes it.
POLL_INTERVAL = 0.2
# Bytes read from a worker's stdout at a time.
RELAY_CHUNK = 1 << 16
PR_SET_PDEATHSIG = 1  # prctl(2)


def temp_root() -> str:
    """Where the metrics directory goes: $TMPDIR, else /tmp. Not tempfile's search, which falls
    back to /var/tmp, /usr/tmp and the working directory: an operator mounts one writable place
    and the error names that place."""
    # The directory is made with mkdtemp (mode 0700, a fresh random name): no S108 race.
    return os.environ.get("TMPDIR") or "/tmp"  # noqa: S108


def _make_metrics_dir(settings: Settings) -> str:
    root = temp_root()
    try:
        return tempfile.mkdtemp(prefix="outgate-metrics-", dir=root)
    except OSError as exc:
        issue = ConfigIssue(
            file=settings.source,
            document=None,
            path="workers",
            message=(
                f"{settings.workers} worker processes share their metrics through a temporary "
                f"directory, and {root} is not writable ({exc.strerror})"
            ),
            fix=(
                f"mount an emptyDir or a tmpfs at {root} (docker run --tmpfs {root}), or workers: 1"
            ),
        )
        raise ConfigError([issue]) from None


def in_worker() -> bool:
    return ENV_INDEX in os.environ


def worker_settings(settings: Settings) -> Settings:
    """In a worker: the supervisor's ports in place of the configured ones (port 0 resolved),
    and SIGTERM from the kernel should the supervisor die first."""
    _die_with_parent(int(os.environ[ENV_SUPERVISOR]))
    if os.environ.get(ENV_RESTARTED) == "1":
        from proxy import metrics

        # Counted by the replacement: the supervisor has no metrics files of its own.
        metrics.WORKER_RESTARTS.inc()
    return dataclasses.replace(
        settings,
        listen=Endpoint(host=settings.listen.host, port=int(os.environ[ENV_LISTEN_PORT])),
        admin=Endpoint(host=settings.admin.host, port=int(os.environ[ENV_ADMIN_PORT])),
    )


def _die_with_parent(supervisor: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor:  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _hold_port(endpoint: Endpoint) -> socket.socket:
    """Bind `endpoint` with SO_REUSEPORT without listening: fixes the port for the workers."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((endpoint.host, endpoint.port))
    return sock


class _Worker:
    """One worker process and the thread that copies its audit lines to our stdout."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = RESTART_BACKOFF_MIN
        self.restart_at: float | None = 0.0  # start as soon as the loop runs
        self.restarts = 0
        self.relays: list[threading.Thread] = []


class _LineWriter:
    """A file for structlog's WriteLogger: each log line (one write call) goes out whole."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def write(self, text: str) -> int:
        self._supervisor.write_lines(2, text.encode("utf-8", "replace"))
        return len(text)

    def flush(self) -> None:
        pass


class Supervisor:
    def __init__(self, settings: Settings, *, config: str | None) -> None:
        self.settings = settings
        self.config = config
        self.workers = [_Worker(index) for index in range(settings.workers)]
        self._wake = threading.Event()
        self._stop = False
        self._reload = False
        self._reopen = False
        self._locks = {1: threading.Lock(), 2: threading.Lock()}  # per output fd
        self._metrics_dir = ""
        self._held: list[socket.socket] = []

    # -- run --------------------------------------------------------------------------------
    def run(self) -> int:
        self._metrics_dir = _make_metrics_dir(self.settings)
        # Our own log lines take the same lock as the workers' relayed ones, in one write each.
        lines = cast(TextIO, _LineWriter(self))  # the part of TextIO WriteLogger uses
        structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=lines))
        try:
            listen = _hold_port(self.settings.listen)
            admin = _hold_port(self.settings.admin)
        except OSError as exc:
            log.error("cannot_bind", error=str(exc))
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            return 1
        self._held = [listen, admin]
        self._listen_port = listen.getsockname()[1]
        self._admin_port = admin.getsockname()[1]
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._on_signal)
        # Which build runs (proxy/native.py), once for all workers, now that they will start.
        log.info("build", **native.status().fields())
        log.info(
            "supervisor_started",
            workers=len(self.workers),
            proxy=str(Endpoint(host=self.settings.listen.host, port=self._listen_port)),
            admin=str(Endpoint(host=self.settings.admin.host, port=self._admin_port)),
        )
        try:
            while not self._stop:
                self._tend()
                if self._reload:
                    self._reload = False
                    self._signal_all(signal.SIGHUP)
                if self._reopen:
                    self._reopen = False
                    self._signal_all(signal.SIGUSR1)
                self._wake.wait(POLL_INTERVAL)
                self._wake.clear()
        finally:
            self._shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        elif signum == signal.SIGUSR1:
            self._reopen = True
        else:
            self._stop = True
        self._wake.set()

    def _tend(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            proc = worker.proc
            if proc is not None and proc.poll() is not None:
                self._reap(worker, proc, now)
            if worker.proc is None and worker.restart_at is not None and now >= worker.restart_at:
                self._start(worker)

    def _start(self, worker: _Worker) -> None:
        env = dict(os.environ)
        env.update(
            {
                ENV_INDEX: str(worker.index),
                ENV_SUPERVISOR: str(os.getpid()),
                ENV_LISTEN_PORT: str(self._listen_port),
                ENV_ADMIN_PORT: str(self._admin_port),
                ENV_METRICS_DIR: self._metrics_dir,
                ENV_RESTARTED: "1" if worker.restarts else "0",
            }
        )
        argv = [sys.executable, "-m", "proxy", "run"]
        if self.config:
            argv += ["--config", self.config]
        proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        worker.proc, worker.started, worker.restart_at = proc, time.monotonic(), None
        assert proc.stdout is not None and proc.stderr is not None
        worker.relays = [
            threading.Thread(
                target=self._relay_lines,
                args=(pipe.fileno(), out, worker.index),
                name=f"worker-{worker.index}-fd{out}",
                daemon=True,
            )
            for pipe, out in ((proc.stdout, 1), (proc.stderr, 2))
        ]
        for relay in worker.relays:
            relay.start()
        log.info("worker_started", worker=worker.index, pid=proc.pid)

    def _reap(self, worker: _Worker, proc: subprocess.Popen[bytes], now: float) -> None:
        from prometheus_client import multiprocess

        code = proc.returncode
        cause = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        for relay in worker.relays:
            relay.join(5.0)  # every line it wrote is out before it is replaced
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
        multiprocess.mark_process_dead(proc.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
        worker.proc = None
        if self._stop:
            return
        worker.restarts += 1
        young = now - worker.started < HEALTHY_UPTIME
        worker.backoff = (
            min(worker.backoff * 2, RESTART_BACKOFF_MAX) if young else RESTART_BACKOFF_MIN
        )
        delay = worker.backoff if young else RESTART_BACKOFF_MIN
        worker.restart_at = now + delay
        log.error("worker_exited", worker=worker.index, pid=proc.pid, cause=cause, restart_in=delay)

    # -- lines ------------------------------------------------------------------------------
    def _relay_lines(self, fd: int, out: int, index: int) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(fd, RELAY_CHUNK)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            if cut:
                self.write_lines(out, pending[:cut])
                pending = pending[cut:]
        if not pending:
            return
        if out == 2:
            self.write_lines(out, pending + b"\n")  # a dying worker's last words: keep them
        else:
            # A worker killed in the middle of an audit line: the fragment is not a record any
            # reader could parse, so it is reported instead of being passed on.
            log.warning("partial_audit_line_dropped", worker=index, bytes=len(pending))

    def write_lines(self, out: int, data: bytes) -> None:
        with self._locks[out]:
            write_all(out, data)

    # -- stop -------------------------------------------------------------------------------
    def _signal_all(self, signum: signal.Signals) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signum)

    def _shutdown(self) -> None:
        log.info("supervisor_stopping", drain_timeout=self.settings.timeouts.drain)
        self._stop = True
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.timeouts.drain + STOP_GRACE
        for worker in self.workers:
            proc = worker.proc
            if proc is None:
                continue
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker_killed", worker=worker.index, pid=proc.pid)
                proc.kill()
                proc.wait()
            self._reap(worker, proc, time.monotonic())
        for sock in self._held:
            sock.close()
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        log.info("stopped")
