"""Instructions per operation: the proxy's deterministic cost, counted by Valgrind.

The wall-clock CPU figures of `make bench` move by about ±30 % from run to run on a shared VM,
too much to tell whether a change costs 5 % more. The number of instructions the proxy executes
for the same work does not depend on what else the machine runs: this script runs Outgate (the
same config and policy `make bench` uses, `bench.servers.OutgateProxy`) under
`valgrind --tool=cachegrind --cache-sim=no`, drives a fixed number of operations through it from
a client in another process (plain sockets and `ssl`; not counted), lets it go idle, stops it
with SIGTERM and reads "I refs" from Valgrind's log. Each scenario's run does the same warm-up
and start-up as a reference run plus K operations of its kind, so

    instructions per operation = (I(scenario run) - I(reference run)) / K

leaves start-up, warm-up (first connections, DNS lookup, lazy imports) and shutdown out.
Held fixed, so that only the code varies: PYTHONHASHSEED=0, and two wall-clock timers whose
work Valgrind's slowdown would otherwise charge to the operations, in amounts that follow the
machine's load (see LAUNCHER): the policy file watcher's 0.5 s poll (an hour here) and the
audit writer's 5 ms batching delay (0.25 s here). Then the same invocation gives the same
figures to about 0.1 %. What is not fixed is the memory layout, which moves CPython's
method-cache hits (LAYOUT_PADS): up to ~1 % per operation; `--repeats N` runs everything N times,
each in another layout, and reports medians and the spread.
Scenarios: HTTP keep-alive GETs by name over 10 kept connections; new CONNECT + TLS 1.3
handshake + one GET + close, by name (tunnel protocol `tls`: SNI checked against the CONNECT
host); GETs inside one kept TLS tunnel. The origin is nginx (`bench.servers.Origin`), names come
from `bench.servers.NameServer`. With `--baseline REV` the same runs are made with the `proxy`
package of REV from a temporary git worktree (`bench.run.BaselineTree`) and the table gives the
ratio. Everything listens on 127.0.0.1; every wait is bounded; writes
bench/results/instructions.json.

  python -m bench.instructions [--baseline REV] [--requests 3000] [--tunnels 400]
                               [--tunnel-gets 20000] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.run import LOAD_CPU, PROXY_CPU, RESULTS, BaselineTree, current_tree
from bench.servers import (
    ORIGIN_NAME,
    NameServer,
    Origin,
    OutgateProxy,
    outgate_environment,
    raise_open_files_limit,
    require_imports,
    tool,
)

REPO = Path(__file__).resolve().parent.parent
# Kept client connections of the HTTP scenario (each request goes to the next one in turn).
HTTP_CONNECTIONS = 10
# Warm-up, the same in every run (the reference run does only this): one GET on each kept
# connection, a few new tunnels, and the kept tunnel opened with one GET in it.
WARM_TUNNELS = 5
# Bounds: Valgrind start-up of the proxy is about 8 s; one client run is well under a minute.
START_TIMEOUT = 120.0
CLIENT_TIMEOUT = 600.0
SOCKET_TIMEOUT = 60.0
SETTLE_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
# The proxy is idle when it used less than this share of a CPU over QUIET_WINDOW seconds.
QUIET_WINDOW = 0.5
QUIET_SHARE = 0.2
I_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")
# Shared by both trees: set and dict order (str hashes) is then the same in every run.
HASH_SEED = "0"
# Two wall-clock timers of the proxy are stretched by the launcher, because under Valgrind (about
# 10x slower here) they would charge the operations with work that depends on the machine's
# speed and load rather than on the code:
# - the policy file watcher polls every 0.5 s: a per-second cost (measured: +3 % on a GET in a
#   tunnel, +0.5 % on an HTTP request);
# - the audit writer thread is woken 5 ms after the first pending record (proxy/audit.py,
#   WRITER_WAKE_DELAY), which at full speed batches tens of records per wake-up; under Valgrind
#   the batches hold one or two and their number follows the load (measured: +1.7 % per HTTP
#   request with a CPU hog beside the proxy; with 0.25 s, +0.002 %).
POLICY_POLL_INTERVAL = 3600.0
AUDIT_WRITER_WAKE_DELAY = 0.25
# CPython's method cache is indexed by the addresses of interned names, so the memory layout
# decides how often hot attribute lookups collide there: the same code measured with a run
# directory of another name length moves by up to ~1 % per HTTP request (580.2k to 586.7k
# instructions over four lengths here). Every run of a repeat uses the same layout (one name
# length for its run directories); each repeat uses the next length, so `--repeats` samples
# layouts and its spread shows their effect.
LAYOUT_PADS = (0, 17, 5, 40, 11, 29, 23, 2)

# `python -c LAUNCHER TREE CONFIG POLL WAKE`: what `python -m proxy run --config CONFIG` does,
# with TREE first on sys.path (asserted) and the two timers above set. Fails loudly when a tree
# has neither knob, rather than measure something else.
LAUNCHER = """
import sys
tree, config, poll, wake = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
sys.path.insert(0, tree)
import proxy
assert proxy.__file__.startswith(tree + "/proxy/"), (proxy.__file__, tree)
import proxy.audit
from proxy.control.policy_source import PolicyFileWatcher
assert hasattr(proxy.audit, "WRITER_WAKE_DELAY"), "bench.instructions: no WRITER_WAKE_DELAY"
proxy.audit.WRITER_WAKE_DELAY = wake
_init = PolicyFileWatcher.__init__
def _slow_poll(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    assert hasattr(self, "interval"), "bench.instructions: PolicyFileWatcher has no interval"
    self.interval = poll
PolicyFileWatcher.__init__ = _slow_poll
from proxy.cli import main
sys.exit(main(["run", "--config", config]))
"""


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    unit: str


SCENARIOS = (
    Scenario(
        "http",
        f"HTTP keep-alive GET by name (via DNS), 128 B body, {HTTP_CONNECTIONS} connections",
        "request",
    ),
    Scenario(
        "connect_tls",
        "New CONNECT + TLS 1.3 handshake + one GET + close, by name (SNI checked)",
        "tunnel",
    ),
    Scenario("tunnel_gets", "GETs inside one kept TLS tunnel", "request"),
)


@dataclass
class Run:
    """One proxy process under Valgrind: what the client did and what it cost."""

    tree: str
    scenario: str  # a Scenario key, or "reference"
    ops: int  # operations of the scenario beyond the reference run's warm-up
    repeat: int = 0
    layout: int = 0  # extra characters in the run directory's name (LAYOUT_PADS)
    instructions: int = 0
    exchanges: int = 0  # audit close records the proxy wrote (requests + tunnels)
    wall_s: float = 0.0
    client: dict[str, Any] = field(default_factory=dict)


# -- the client (a separate process: its instructions are not counted) -------------------------


def _read_response(sock: socket.socket | ssl.SSLSocket, buffer: bytes) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length body; returns (head, bytes after it)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed before a response head: {buffer[:200]!r}")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"answered {head[:200]!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed inside a response body")
        rest += chunk
    return head, rest[length:]


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _tunnel(spec: dict[str, Any], context: ssl.SSLContext) -> ssl.SSLSocket:
    """CONNECT to the origin's HTTPS port by name, then a full TLS 1.3 handshake inside."""
    target = f"{ORIGIN_NAME}:{spec['https_port']}"
    raw = _connect(spec["proxy_port"])
    raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = raw.recv(4096)
        if not chunk:
            raise RuntimeError(f"CONNECT: closed after {buffer[:200]!r}")
        buffer += chunk
    if not buffer.startswith(b"HTTP/1.1 200") or not buffer.endswith(b"\r\n\r\n"):
        raise RuntimeError(f"CONNECT answered {buffer[:200]!r}")
    return context.wrap_socket(raw, server_hostname=ORIGIN_NAME)


def drive(spec: dict[str, Any]) -> dict[str, int]:
    """Warm-up, then spec["ops"][scenario] operations of each scenario, then close everything.
    The requests are the ones `make bench`'s load generators send (wrk's absolute-form GET;
    bench/loadgen's GET inside a tunnel)."""
    ops: dict[str, int] = spec["ops"]
    http_target = f"{ORIGIN_NAME}:{spec['http_port']}"
    http_request = (
        f"GET http://{http_target}/small HTTP/1.1\r\nHost: {http_target}\r\nUser-Agent: wrk\r\n\r\n"
    ).encode()
    tunnel_request = (
        f"GET /small HTTP/1.1\r\nHost: {ORIGIN_NAME}\r\nUser-Agent: outgate-bench\r\n\r\n"
    ).encode()
    closing_request = tunnel_request[:-2] + b"Connection: close\r\n\r\n"
    context = ssl.create_default_context(cafile=spec["cafile"])
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    counts = {"requests": 0, "tunnels": 0}

    connections = [_connect(spec["proxy_port"]) for _ in range(HTTP_CONNECTIONS)]
    leftovers = [b""] * HTTP_CONNECTIONS

    def http_get(index: int) -> None:
        sock = connections[index]
        sock.sendall(http_request)
        _, leftovers[index] = _read_response(sock, leftovers[index])
        counts["requests"] += 1

    def new_tunnel() -> None:
        with _tunnel(spec, context) as tls:
            tls.sendall(closing_request)
            _read_response(tls, b"")
        counts["tunnels"] += 1

    for index in range(HTTP_CONNECTIONS):
        http_get(index)
    for _ in range(WARM_TUNNELS):
        new_tunnel()
    kept = _tunnel(spec, context)
    counts["tunnels"] += 1
    kept_rest = b""
    for _ in range(1 + ops.get("tunnel_gets", 0)):
        kept.sendall(tunnel_request)
        _, kept_rest = _read_response(kept, kept_rest)

    for number in range(ops.get("http", 0)):
        http_get(number % HTTP_CONNECTIONS)
    for _ in range(ops.get("connect_tls", 0)):
        new_tunnel()

    kept.close()
    for sock in connections:
        sock.close()
    return counts


# -- the proxy under Valgrind -------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _close_records(audit_log: Path) -> int:
    with contextlib.suppress(OSError):
        return audit_log.read_bytes().count(b'"action":"close"')
    return 0


class Measurer:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.python = Path(sys.executable)
        self.valgrind = tool("valgrind")
        self.nameserver = NameServer()
        self.origin = Origin(workdir, cpu=LOAD_CPU)
        self.cafile = workdir / "origin.crt"  # written by Origin (self-signed, ECDSA P-256)

    def start(self) -> None:
        self.nameserver.start()
        self.origin.start()

    def stop(self) -> None:
        self.origin.stop()
        self.nameserver.stop()

    def check_imports(self, label: str, source: Path) -> dict[str, Any]:
        """The tree's proxy package is the one a proxy started with its environment imports."""
        probe = Path(tempfile.mkdtemp(prefix="import-probe-", dir=self.workdir))
        return require_imports(self.python, source, probe, label=label, prefix="instructions")

    def measure(
        self, label: str, source: Path, scenario: str, ops: dict[str, int], repeat: int = 0
    ) -> Run:
        layout = LAYOUT_PADS[repeat % len(LAYOUT_PADS)]
        run_dir = Path(tempfile.mkdtemp(prefix=f"run-{'x' * layout}-", dir=self.workdir))
        run_dir.chmod(0o777)
        proxy = OutgateProxy(
            run_dir,
            self.origin,
            self.nameserver,
            cpu=PROXY_CPU,
            python=self.python,
            name="outgate",
            source=source,
        )
        # `python -m proxy run --config ...` (LAUNCHER), under Valgrind; the tree first on
        # PYTHONPATH too (check_imports showed that this imports only the tree's modules).
        env = outgate_environment(source) or dict(os.environ)
        env["PYTHONHASHSEED"] = HASH_SEED
        proxy.env = env
        valgrind_log = proxy.workdir / "valgrind.log"
        config = proxy.argv[proxy.argv.index("--config") + 1]
        proxy.argv = [
            self.valgrind,
            "--tool=cachegrind",
            "--cache-sim=no",
            "--branch-sim=no",
            f"--cachegrind-out-file={proxy.workdir / 'cachegrind.out'}",
            f"--log-file={valgrind_log}",
            str(self.python),
            "-c",
            LAUNCHER,
            str(source),
            config,
            str(POLICY_POLL_INTERVAL),
            str(AUDIT_WRITER_WAKE_DELAY),
        ]
        run = Run(label, scenario, sum(ops.values()), repeat=repeat, layout=layout)
        started = time.monotonic()
        proxy.start()
        try:
            self._ready(proxy)
            spec = {
                "proxy_port": proxy.port,
                "http_port": self.origin.http_port,
                "https_port": self.origin.https_port,
                "cafile": str(self.cafile),
                "ops": ops,
            }
            out = subprocess.run(
                [
                    *("taskset", "-c", LOAD_CPU, str(self.python), "-m", "bench.instructions"),
                    *("--drive", json.dumps(spec)),
                ],
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=CLIENT_TIMEOUT,
                check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"client failed: {out.stderr[-2000:]}")
            run.client = json.loads(out.stdout.strip().splitlines()[-1])
            expected = run.client["requests"] + run.client["tunnels"]
            run.exchanges = self._settle(proxy, expected)
            run.instructions = self._stop(proxy, valgrind_log)
        finally:
            proxy.stop()  # a no-op once _stop saw it exit
        run.wall_s = round(time.monotonic() - started, 1)
        return run

    def _ready(self, proxy: OutgateProxy) -> None:
        """Poll the admin /healthz until it answers (bounded), then wait for the "listening"
        line. A connection the admin listener accepted is waited for, not abandoned: the proxy
        answers exactly one /healthz per run, so the probe costs every run the same."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not proxy.alive():
                raise RuntimeError(f"the proxy exited: {proxy.stderr_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no /healthz answer in {START_TIMEOUT:.0f} s")
            try:
                sock = socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=2.0)
            except OSError:
                time.sleep(0.2)
                continue
            with sock:
                sock.settimeout(max(1.0, deadline - time.monotonic()))
                sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                answer = b""
                with contextlib.suppress(TimeoutError):
                    while chunk := sock.recv(4096):
                        answer += chunk
            if answer.split(b" ", 2)[1:2] != [b"200"]:
                raise RuntimeError(f"/healthz answered {answer[:200]!r}")
            break
        err = proxy.workdir / f"{proxy.name}.err"
        while b'"listening"' not in err.read_bytes():
            if time.monotonic() > deadline:
                raise RuntimeError("no 'listening' line from the proxy")
            time.sleep(0.1)

    def _settle(self, proxy: OutgateProxy, expected: int) -> int:
        """Wait (bounded) until the proxy wrote a close record for every request and tunnel the
        client made and then stopped using CPU: its work for the run is done."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (found := _close_records(proxy.audit_log)) < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{found} close records, {expected} expected")
            time.sleep(0.1)
        before = _cpu_seconds(proxy.pid)
        while time.monotonic() < deadline:
            time.sleep(QUIET_WINDOW)
            now = _cpu_seconds(proxy.pid)
            if now - before < QUIET_WINDOW * QUIET_SHARE:
                break
            before = now
        return _close_records(proxy.audit_log)

    def _stop(self, proxy: OutgateProxy, valgrind_log: Path) -> int:
        assert proxy.proc is not None
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.proc.wait(STOP_TIMEOUT)
        text = valgrind_log.read_text(errors="replace")
        found = I_REFS.findall(text)
        if not found:
            raise RuntimeError(f"no 'I refs' in {valgrind_log}: {text[-1000:]}")
        return int(found[-1].replace(",", ""))


# -- the run ------------------------------------------------------------------------------------


def per_op(runs: list[Run], tree: str, key: str) -> list[float]:
    """Instructions per operation of `key` in each repeat, against that repeat's reference."""
    found = []
    for run in runs:
        if run.tree == tree and run.scenario == key:
            reference = next(
                r
                for r in runs
                if r.tree == tree and r.scenario == "reference" and r.repeat == run.repeat
            )
            found.append((run.instructions - reference.instructions) / run.ops)
    return found


def render(results: dict[str, Any]) -> str:
    baseline = results.get("baseline")
    if baseline is not None:
        rev = baseline["rev"]
        lines = [
            f"| Scenario | Instructions per op (current) | Per op ({rev}) | Ratio |",
            "|---|---|---|---|",
        ]
    else:
        lines = ["| Scenario | Instructions per op (current) |", "|---|---|"]
    for key, row in results["scenarios"].items():
        title = f"{row['title']} (`{key}`, {row['ops']:,} {row['unit']}s)"
        cells = [title, f"{row['current']:,.0f}"]
        if baseline is not None:
            cells += [f"{row['baseline']:,.0f}", f"{row['ratio']:.3f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    repeats = results["settings"]["repeats"]
    if repeats > 1:
        spread = max(
            (max(values) - min(values)) / statistics.median(values)
            for row in results["scenarios"].values()
            for name in ("current_runs", "baseline_runs")
            if (values := row.get(name))
        )
        lines.append("")
        lines.append(
            f"Medians of {repeats} runs, each with another memory layout; widest spread "
            f"between runs: {spread:.2%}."
        )
    return "\n".join(lines) + "\n"


def _valgrind_version(valgrind: str) -> str:
    out = subprocess.run([valgrind, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.instructions", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", metavar="REV", default="", help="also measure REV's proxy")
    parser.add_argument("--requests", type=int, default=3000, help="HTTP keep-alive GETs")
    parser.add_argument("--tunnels", type=int, default=400, help="new CONNECT + TLS tunnels")
    parser.add_argument(
        "--tunnel-gets", type=int, default=20000, help="GETs inside the one kept tunnel"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of everything, each in another memory layout; cells are the medians",
    )
    parser.add_argument("--out", default=str(RESULTS), help="directory for instructions.json")
    parser.add_argument("--drive", help=argparse.SUPPRESS)  # the client process
    args = parser.parse_args(argv)

    if args.drive:
        print(json.dumps(drive(json.loads(args.drive))))
        return 0
    counts = {"http": args.requests, "connect_tls": args.tunnels, "tunnel_gets": args.tunnel_gets}
    if min(counts.values()) < 1 or args.repeats < 1:
        parser.error("--requests, --tunnels, --tunnel-gets and --repeats must be at least 1")
    for name in ("valgrind", "nginx", "taskset"):
        try:
            tool(name)
        except RuntimeError:
            print(f"instructions: {name} not found: run bench/install.sh", file=sys.stderr)
            return 2
    raise_open_files_limit()
    os.sched_setaffinity(0, {int(LOAD_CPU)})  # this script shares the client's CPU
    started = time.monotonic()

    baseline: BaselineTree | None = None
    if args.baseline:
        try:
            baseline = BaselineTree.add(args.baseline)
        except RuntimeError as error:
            print(f"instructions: --baseline {args.baseline}: {error}", file=sys.stderr)
            return 2
    trees: list[tuple[str, Path]] = [("current", REPO)]
    if baseline is not None:
        trees.append(("baseline", baseline.path))

    workdir = Path(tempfile.mkdtemp(prefix="outgate-instructions-"))
    workdir.chmod(0o777)
    measurer = Measurer(workdir)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "valgrind": _valgrind_version(measurer.valgrind),
        },
        "method": "(I(run) - I(reference)) / ops; I = valgrind cachegrind 'I refs' of the proxy",
        "settings": {
            "http_connections": HTTP_CONNECTIONS,
            "warm_tunnels": WARM_TUNNELS,
            "ops": counts,
            "repeats": args.repeats,
            "pythonhashseed": HASH_SEED,
            "policy_poll_interval_s": POLICY_POLL_INTERVAL,
            "audit_writer_wake_delay_s": AUDIT_WRITER_WAKE_DELAY,
        },
        "current": current_tree(),
        "scenarios": {},
    }
    if baseline is not None:
        results["baseline"] = {
            "rev": baseline.rev,
            "commit": baseline.commit,
            "label": baseline.label,
        }
    runs: list[Run] = []
    try:
        measurer.start()
        for tree, source in trees:
            results[tree]["imports"] = measurer.check_imports(tree, source)
        plan: list[tuple[str, dict[str, int]]] = [("reference", {})]
        plan += [(key, {key: count}) for key, count in counts.items()]
        for repeat in range(args.repeats):
            for tree, source in trees if repeat % 2 == 0 else trees[::-1]:
                for key, ops in plan:
                    print(f"instructions: {tree} / {key} (run {repeat + 1})", flush=True)
                    run = measurer.measure(tree, source, key, ops, repeat)
                    print(
                        f"instructions:   {run.instructions:,} I refs, {run.exchanges} "
                        f"exchanges, {run.wall_s} s",
                        flush=True,
                    )
                    runs.append(run)
    finally:
        measurer.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if baseline is not None:
            baseline.remove()

    for scenario in SCENARIOS:
        current = per_op(runs, "current", scenario.key)
        row: dict[str, Any] = {
            "title": scenario.title,
            "unit": scenario.unit,
            "ops": counts[scenario.key],
            "current": statistics.median(current),
            "current_runs": current,
        }
        if baseline is not None:
            base = per_op(runs, "baseline", scenario.key)
            row["baseline"] = statistics.median(base)
            row["baseline_runs"] = base
            row["ratio"] = row["current"] / row["baseline"]
        results["scenarios"][scenario.key] = row
    results["runs"] = [asdict(run) for run in runs]
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    markdown = render(results)
    results["markdown"] = markdown
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "instructions.json").write_text(json.dumps(results, indent=1) + "\n")
    print(markdown)
    print(f"instructions: {results['elapsed_s']} s; wrote {out / 'instructions.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
