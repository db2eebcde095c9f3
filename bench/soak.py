"""Soak: mixed traffic for a while with faults injected on a schedule, then count.

    python bench/soak.py [--seconds 600] [--concurrency 32] [--workers 2] [--no-faults]

Traffic (bench/soak_traffic.py): keep-alive HTTP, short tunnels, long tunnels with bulk data,
denials, guarded destinations, DNS failures, slow clients, WebSocket upgrades, an origin that
resets, a name the policy storm allows and denies by turns, malformed requests.

Faults, one after another after the warm-up, each lasting `fault_seconds` (scaled with the run,
so a 90 s run still has every one; the long run reaches the issue's 30 s):
  dns_outage     the DNS server stops answering one name; refusals carry dns_timeout, and the
                 name is served again within RECOVERY_SECONDS of the DNS answering again.
  upstream_reset the origin resets mid-body; close records carry upstream_reset.
  audit_block    nobody reads the proxy's stdout; no record is lost, /healthz answers throughout.
  policy_storm   the policy file changes 10 times a second (for twice `fault_seconds`, at most
                 a minute), every fourth version invalid; bad
                 versions are refused (policy_reload_failed), and every decision on the toggled
                 name agrees with the version its rule names, replayed through `outgate explain`
                 for a sample.
  sighup_storm   20 SIGHUPs a second; the proxy keeps serving.
  worker_kill    SIGKILL of one of the two workers; it is started again, the other serves on.
                 Expected loss: the killed worker's open exchanges have a decision and no close
                 (or no record, if it had not written them yet), at most the connections it had
                 open; every other exchange is paired.

Every exchange must leave one `decision` and one `close` record with the same id (paired as
they arrive, so a million requests need no memory here). RSS of the proxy's process tree after
the warm-up, at its peak and at the end; open descriptors of the tree before the traffic, at the
peak and after it (the end must come back to the baseline). Prints JSON and Markdown rows;
exits 1 on an unpaired or missing record beyond the worker_kill allowance, RSS growth over
RSS_GROWTH_LIMIT, descriptors not back, a fault whose expected effect was not seen, or an
exchange failing outside a fault window. Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procstat import open_descriptors, per_process, sample, tree
from bench.soak_traffic import KINDS, RESET_BODY, Ports, run_kind
from tests.support.dnsserver import DROP, ScriptedDNSServer
from tests.support.fixtures import ORIGIN_PORTS, policy_allowing
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, run_outgate
from tests.support.rawserver import RawServer, read_head, reset
from tests.support.waiting import wait_for

RSS_GROWTH_LIMIT = 0.10  # of the RSS after the warm-up
RECOVERY_SECONDS = 5.0  # service is back this long after a fault ends (DNS timeout 2 s + margin)
DESCRIPTOR_SETTLE_SECONDS = 40.0  # idle connections close within timeouts.idle (30 s)
DESCRIPTOR_SLACK = 4  # a resolver socket or two opened lazily by a restarted worker
REPLAY_SAMPLE = 12
STORM_WRITES_PER_SECOND = 10
STORM_SECONDS = 60.0
SIGHUPS_PER_SECOND = 20
HEALTH_PROBE_SECONDS = 5.0  # /healthz must answer within this during the audit block
RECORDS_QUIET = 10.0  # after the traffic: no record for this long means no more will come
KILL_REACH = 30.0  # the longest an exchange of the soak stays open (IO_TIMEOUT 15 s, doubled)


@dataclass
class Window:
    name: str
    start: float = 0.0
    end: float = 0.0  # when the fault was lifted
    first_ok_after: float | None = None  # the first success of the watched kind after `end`
    watched: str = ""
    checks: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


class Ledger:
    """Pairs records by id as they are read (the reader thread calls `add`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[str, tuple[str, str]] = {}  # id -> (action seen, its timestamp)
        self.paired: set[str] = set()
        self.duplicated = 0
        self.reasons: Counter[str] = Counter()
        self.records = 0
        self.storm_decisions: list[dict[str, Any]] = []
        self.examples: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)

    def add(self, record: dict[str, Any]) -> bool:
        event = record["event"]
        key, action = event["id"], event["action"]
        reason = record.get("outgate", {}).get("reason")
        with self.lock:
            self.records += 1
            self.reasons[f"{action}:{reason}"] += 1
            if key in self.paired:
                self.duplicated += 1
            elif key in self.pending:
                if self.pending[key][0] == action:
                    self.duplicated += 1
                else:
                    del self.pending[key]
                    self.paired.add(key)
            else:
                self.pending[key] = (action, record.get("@timestamp", ""))
            if len(self.examples[f"{action}:{reason}"]) < 2:
                self.examples[f"{action}:{reason}"].append(record)
            rule = record.get("rule", {}).get("name", "")
            domain = record.get("destination", {}).get("domain")
            if action == "decision" and rule.startswith("toggle-") and domain == "toggle.test":
                self.storm_decisions.append(record)
        return False  # nothing kept in ProxyProcess.records


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.seconds: float = args.seconds
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.ledger = Ledger()
        self.tally: Counter[tuple[str, str]] = Counter()
        self.failed_outside: Counter[tuple[str, str]] = Counter()
        self.sent = 0
        self.in_flight = 0
        self.windows: list[Window] = []
        self.reset_mid_body = threading.Event()
        self.storm_versions: dict[int, str] = {}
        self.samples: list[tuple[int, int]] = []  # (rss KiB, descriptors) once a second
        self.stop_traffic = asyncio.Event()
        self.killed_in_flight = 0
        self.killed_at: float | None = None

    # -- plan ------------------------------------------------------------------------------
    @property
    def warmup(self) -> float:
        return min(60.0, max(5.0, self.seconds * 0.1))

    @property
    def fault_seconds(self) -> float:
        region = self.seconds - 2 * self.warmup
        return min(30.0, max(2.0, region / len(FAULTS) * 0.5))

    def slot(self) -> float:
        return (self.seconds - 2 * self.warmup) / len(FAULTS)

    # -- traffic ---------------------------------------------------------------------------
    def in_window(self, now: float) -> Window | None:
        for window in self.windows:
            if window.start <= now and (not window.end or now <= window.end + RECOVERY_SECONDS):
                return window
        return None

    async def client(self, ports: Ports, deadline: float) -> None:
        names = list(KINDS)
        weights = [KINDS[n][0] for n in names]
        while time.monotonic() < deadline and not self.stop_traffic.is_set():
            name = self.rng.choices(names, weights)[0]
            started = time.monotonic()
            self.in_flight += 1
            outcome = await run_kind(KINDS[name][1], ports)
            self.in_flight -= 1
            self.sent += outcome.exchanges
            self.tally[(name, outcome.result)] += 1
            now = time.monotonic()
            if outcome.result == "ok":
                for window in self.windows:
                    watched = window.watched in (name, "*")
                    after = bool(window.end) and started >= window.end
                    if watched and after and window.first_ok_after is None:
                        window.first_ok_after = now
            elif self.in_window(started) is None and self.in_window(now) is None:
                self.failed_outside[(name, outcome.result)] += 1

    async def sampler(self, pid: int) -> None:
        while not self.stop_traffic.is_set():
            self.samples.append((sample(pid).rss_kib, open_descriptors(pid)))
            await asyncio.sleep(1.0)

    # -- faults ----------------------------------------------------------------------------
    async def dns_outage(self, w: Window, dns: ScriptedDNSServer, proxy: ProxyProcess) -> None:
        w.watched = "flaky"
        before = self.ledger.reasons["decision:dns_timeout"]
        dns.answer("flaky.test", "A", DROP)
        await asyncio.sleep(self.fault_seconds)
        dns.addresses("flaky.test", "127.0.0.1", ttl=0)
        w.end = time.monotonic()
        await asyncio.sleep(RECOVERY_SECONDS)
        seen = self.ledger.reasons["decision:dns_timeout"] - before
        w.checks["dns_timeout_records"] = seen
        if not seen:
            w.failures.append("no decision record with dns_timeout during the outage")

    async def upstream_reset(self, w: Window, dns: ScriptedDNSServer, proxy: ProxyProcess) -> None:
        w.watched = "reset_origin"
        before = self.ledger.reasons["close:upstream_reset"]
        self.reset_mid_body.set()
        await asyncio.sleep(self.fault_seconds)
        self.reset_mid_body.clear()
        w.end = time.monotonic()
        await asyncio.sleep(RECOVERY_SECONDS)
        seen = self.ledger.reasons["close:upstream_reset"] - before
        w.checks["upstream_reset_records"] = seen
        if not seen:
            w.failures.append("no close record with upstream_reset while the origin reset")

    async def audit_block(self, w: Window, dns: ScriptedDNSServer, proxy: ProxyProcess) -> None:
        w.watched = "*"
        proxy.pause_stdout()
        probes, slowest = 0, 0.0
        ends = time.monotonic() + self.fault_seconds
        try:
            while time.monotonic() < ends:
                started = time.monotonic()
                status = await asyncio.to_thread(health, proxy.admin_port)
                slowest = max(slowest, time.monotonic() - started)
                probes += 1
                if status != 200:
                    w.failures.append(f"/healthz answered {status} while stdout was blocked")
                await asyncio.sleep(0.5)
        finally:
            proxy.resume_stdout()
        w.end = time.monotonic()
        w.checks.update(health_probes=probes, slowest_probe_s=round(slowest, 3))
        if slowest > HEALTH_PROBE_SECONDS:
            w.failures.append(f"/healthz took {slowest:.1f} s while stdout was blocked")

    async def policy_storm(self, w: Window, dns: ScriptedDNSServer, proxy: ProxyProcess) -> None:
        w.watched = "toggle"
        failed_before = count_logs(proxy, "policy_reload_failed")
        loaded_before = count_logs(proxy, "policy_loaded")
        # Twice the other faults (a whole slot): the long run reaches the full minute.
        ends = time.monotonic() + min(STORM_SECONDS, 2 * self.fault_seconds)
        version = max(self.storm_versions, default=0)
        while time.monotonic() < ends:
            version += 1
            write_storm_version(self.workdir, version, self.storm_versions)
            await asyncio.sleep(1 / STORM_WRITES_PER_SECOND)
        version += 1 + (version % 4 == 3)  # the last version written is a good one
        write_storm_version(self.workdir, version, self.storm_versions)
        w.end = time.monotonic()
        await asyncio.sleep(RECOVERY_SECONDS)
        w.checks.update(
            versions_written=len(self.storm_versions),
            reloads_refused=count_logs(proxy, "policy_reload_failed") - failed_before,
            reloads_done=count_logs(proxy, "policy_loaded") - loaded_before,
        )
        if not w.checks["reloads_refused"]:
            w.failures.append("no bad version was refused (policy_reload_failed)")
        if not w.checks["reloads_done"]:
            w.failures.append("no good version was loaded (policy_loaded)")

    async def sighup_storm(self, w: Window, dns: ScriptedDNSServer, proxy: ProxyProcess) -> None:
        w.watched = "*"
        before = count_logs(proxy, "reload_requested")
        ends = time.monotonic() + self.fault_seconds
        sent = 0
        while time.monotonic() < ends:
            proxy.signal(signal.SIGHUP)
            sent += 1
            await asyncio.sleep(1 / SIGHUPS_PER_SECOND)
        w.end = time.monotonic()
        await asyncio.sleep(RECOVERY_SECONDS)
        w.checks.update(sighups=sent, reloads=count_logs(proxy, "reload_requested") - before)
        if proxy.proc is None or proxy.proc.poll() is not None:
            w.failures.append("the proxy exited during the SIGHUP storm")
        elif not w.checks["reloads"]:
            w.failures.append("no reload_requested after the SIGHUPs")

    async def worker_kill(self, w: Window, dns: ScriptedDNSServer, proxy: ProxyProcess) -> None:
        w.watched = "*"
        assert proxy.proc is not None
        workers = [p for p in tree(proxy.proc.pid) if p != proxy.proc.pid]
        if not workers or self.args.workers < 2:
            w.failures.append("no worker to kill (run with --workers 2)")
            w.end = time.monotonic()
            return
        victim = workers[0]
        self.killed_in_flight = self.in_flight
        self.killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        exited = await asyncio.to_thread(
            proxy.wait_log,
            lambda e: e.get("event") == "worker_exited" and e.get("pid") == victim,
            30.0,
        )
        restarted = await asyncio.to_thread(
            proxy.wait_log,
            lambda e: e.get("event") == "worker_started" and e.get("pid") not in workers,
            30.0,
        )
        w.end = time.monotonic()
        w.checks.update(
            victim=victim,
            in_flight_at_kill=self.killed_in_flight,
            cause=exited.get("cause"),
            replacement=restarted.get("pid"),
        )
        await asyncio.sleep(RECOVERY_SECONDS)

    async def run_faults(self, dns: ScriptedDNSServer, proxy: ProxyProcess) -> None:
        await asyncio.sleep(self.warmup)
        for name in FAULTS:
            slot_end = time.monotonic() + self.slot()
            window = Window(name, start=time.monotonic())
            self.windows.append(window)
            if self.args.examples:
                print("WINDOW", name, time.strftime("%H:%M:%S"), file=sys.stderr)
            fault: Callable[[Window, ScriptedDNSServer, ProxyProcess], Awaitable[None]]
            fault = getattr(self, name)
            await fault(window, dns, proxy)
            if not window.end:
                window.end = time.monotonic()
            await asyncio.sleep(max(0.0, slot_end - time.monotonic()))

    # -- the run ---------------------------------------------------------------------------
    async def traffic(self, ports: Ports, dns: ScriptedDNSServer, proxy: ProxyProcess) -> float:
        assert proxy.proc is not None
        started = time.monotonic()
        deadline = started + self.args.seconds
        faults = asyncio.create_task(
            self.run_faults(dns, proxy) if not self.args.no_faults else asyncio.sleep(0)
        )
        sampler = asyncio.create_task(self.sampler(proxy.proc.pid))
        clients = [self.client(ports, deadline) for _ in range(self.args.concurrency)]
        await asyncio.gather(*clients)
        await faults
        self.stop_traffic.set()
        await sampler
        return time.monotonic() - started


def epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def health(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=HEALTH_PROBE_SECONDS * 2) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        head = s.recv(64)
    return int(head.split(b" ")[1]) if head else 0


def count_logs(proxy: ProxyProcess, event: str) -> int:
    return sum(1 for e in list(proxy.logs) if e.get("event") == event)


def storm_policy(version: int) -> str:
    """Version `version` of the stormed policy file: toggle.test allowed by a rule named after
    the version when it is even, denied by one when it is odd; every fourth version invalid."""
    if version % 4 == 3:
        return "apiVersion: outgate.dev/v1alpha1\nkind: EgressPolicy\nspec: {rules: [\n"
    action = "Allow" if version % 2 == 0 else "Deny"
    # An Allow also names loopback, which the address guard wants before it dials the origin.
    cidr = ", {cidr: 127.0.0.0/8}" if action == "Allow" else ""
    return f"""
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {{name: storm, namespace: tests}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  rules:
    - name: toggle-{version}
      action: {action}
      to: [{{fqdn: toggle.test}}{cidr}]
      ports: {ORIGIN_PORTS}
"""


def write_storm_version(workdir: Path, version: int, versions: dict[int, str]) -> None:
    """Replace the file whole (write aside, rename), as a ConfigMap update does."""
    text = storm_policy(version)
    versions[version] = text
    staged = workdir / "storm.yaml.new"
    staged.write_text(text)
    staged.replace(workdir / "policies" / "storm.yaml")


def replay(soak: Soak, config: Path, port: int) -> dict[str, Any]:
    """A sample of the storm's decisions, each replayed through `outgate explain` against the
    version its rule names: the same allow or deny."""
    decisions = soak.ledger.storm_decisions
    checked, mismatched, wrong_action = 0, [], 0
    wrong: Counter[str] = Counter()
    for record in decisions:
        version = int(record["rule"]["name"].split("-")[1])
        expected = "allow" if version % 2 == 0 else "deny"
        if record["outgate"]["decision"] != expected:
            wrong_action += 1
            wrong[f"{version}:{record['outgate']['reason']}"] += 1
            if soak.args.examples and wrong_action < 20:
                print("WRONG", record["@timestamp"], json.dumps(record["outgate"]), file=sys.stderr)
    picks = random.Random(7).sample(decisions, min(REPLAY_SAMPLE, len(decisions)))
    for record in picks:
        version = int(record["rule"]["name"].split("-")[1])
        policies = soak.workdir / "replay" / str(version)
        policies.mkdir(parents=True, exist_ok=True)
        (policies / "storm.yaml").write_text(soak.storm_versions[version])
        (policies / "base.yaml").write_text(base_policy())
        settings = yaml.safe_load(config.read_text())
        settings["policies"] = {"paths": [str(policies)]}
        settings.pop("workers", None)
        replay_config = policies.parent / f"{version}.yaml"
        replay_config.write_text(yaml.safe_dump(settings))
        result = run_outgate(
            "explain",
            "--config",
            str(replay_config),
            "--source",
            "127.0.0.1",
            "--url",
            f"http://toggle.test:{port}/hello",
        )
        said = explained_action(result.stdout)
        checked += 1
        if said != record["outgate"]["decision"]:
            mismatched.append((record["event"]["id"], version, said, result.stderr[-200:]))
    return {
        "storm_decisions": len(decisions),
        "wrong_action": wrong_action,
        "wrong_by_version_reason": dict(wrong.most_common(10)),
        "replayed": checked,
        "replay_mismatches": mismatched,
    }


def explained_action(text: str) -> str:
    """The action on explain's `decision:` line."""
    for line in text.splitlines():
        if line.startswith("decision:"):
            return line.split()[1]
    return f"no decision line in {text!r}"


def raw_origin(soak: Soak) -> Callable[[socket.socket], None]:
    def handle(conn: socket.socket) -> None:
        read_head(conn)
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {RESET_BODY}\r\n\r\n".encode()
        if soak.reset_mid_body.is_set():
            conn.sendall(head + b"x" * (RESET_BODY // 4))
            reset(conn)
            return
        conn.sendall(head + b"x" * RESET_BODY)

    return handle


def base_policy() -> str:
    return policy_allowing("origin.test", "flaky.test", "reset.test", "nx.test").replace(
        "      ports:", "      protocol: tcp\n      ports:"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--examples", action="store_true", help="print two records per reason")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ScriptedDNSServer() as dns, OriginServer() as origin:
        workdir = Path(tmp)
        soak = Soak(args, workdir)
        with RawServer(raw_origin(soak)) as raw:
            for name in ("origin.test", "reset.test", "toggle.test"):
                dns.addresses(name, "127.0.0.1")
            dns.addresses("flaky.test", "127.0.0.1", ttl=0)
            proxy = ProxyProcess(
                workdir,
                policies=base_policy(),
                nameserver=dns.nameserver,
                config={
                    "workers": args.workers,
                    "limits": {"newConnectionsPerSecond": 1e6, "newConnectionsBurst": 1_000_000},
                },
                on_record=soak.ledger.add,
            )
            write_storm_version(workdir, 0, soak.storm_versions)
            return run(soak, proxy, dns, origin, raw)


def run(
    soak: Soak, proxy: ProxyProcess, dns: ScriptedDNSServer, origin: OriginServer, raw: RawServer
) -> int:
    with proxy:
        assert proxy.proc is not None
        pid = proxy.proc.pid
        if soak.args.workers > 1:
            wait_for(lambda: count_logs(proxy, "listening") >= soak.args.workers, 30.0)
        baseline = per_process(pid)
        ports = Ports(proxy.port, proxy.admin_port, origin.port, raw.port)
        warm: dict[int, tuple[int, int]] = {}

        async def go() -> float:
            async def mark_warm() -> None:
                await asyncio.sleep(soak.warmup)
                warm.update(per_process(pid))

            marked = asyncio.create_task(mark_warm())
            elapsed = await soak.traffic(ports, dns, proxy)
            await marked
            return elapsed

        elapsed = asyncio.run(go())
        end = settle_descriptors(pid, baseline)
        records_done = wait_records(soak)
        replayed = replay(soak, proxy.config_path, origin.port) if not soak.args.no_faults else {}
        alive = proxy.proc.poll() is None
    usage = Usage(baseline, warm, end)
    return report(soak, elapsed, usage, records_done, replayed, alive)


@dataclass(frozen=True)
class Usage:
    """Per process of the tree (pid -> (RSS KiB, descriptors)): before the traffic, after the
    warm-up, at the end. Compared over the processes alive at both ends: a worker started again
    after worker_kill is new, and a fresh process would hide growth."""

    baseline: dict[int, tuple[int, int]]
    warm: dict[int, tuple[int, int]]
    end: dict[int, tuple[int, int]]

    def rss(self) -> tuple[int, int]:
        common = self.warm.keys() & self.end.keys()
        return sum(self.warm[p][0] for p in common), sum(self.end[p][0] for p in common)

    def descriptors(self) -> tuple[int, int]:
        common = self.baseline.keys() & self.end.keys()
        return sum(self.baseline[p][1] for p in common), sum(self.end[p][1] for p in common)


def settle_descriptors(
    pid: int, baseline: dict[int, tuple[int, int]]
) -> dict[int, tuple[int, int]]:
    """The tree once the descriptors of the processes in `baseline` are back to it (idle
    upstream connections close within timeouts.idle), or after DESCRIPTOR_SETTLE_SECONDS."""
    deadline = time.monotonic() + DESCRIPTOR_SETTLE_SECONDS
    while True:
        now = per_process(pid)
        usage = Usage(baseline, now, now)
        before, after = usage.descriptors()
        if after <= before + DESCRIPTOR_SLACK or time.monotonic() > deadline:
            return now
        time.sleep(0.5)


def wait_records(soak: Soak, timeout: float = 120.0) -> bool:
    """Until every exchange sent has both records; False if records stop arriving (for
    RECORDS_QUIET seconds) or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        with soak.ledger.lock:
            ids = len(soak.ledger.paired) + len(soak.ledger.pending)
            if ids >= soak.sent and not soak.ledger.pending:
                return True
            if soak.ledger.records != last:
                last, quiet_since = soak.ledger.records, time.monotonic()
        if time.monotonic() - quiet_since > RECORDS_QUIET:
            return False
        time.sleep(0.2)
    return False


def report(
    soak: Soak,
    elapsed: float,
    usage: Usage,
    records_done: bool,
    replayed: dict[str, Any],
    alive: bool,
) -> int:
    ledger = soak.ledger
    ids = len(ledger.paired) + len(ledger.pending)
    missing = max(0, soak.sent - ids)
    unpaired = len(ledger.pending)
    # Only the worker_kill fault may cost records: those of exchanges open when it was killed,
    # decided at most KILL_REACH seconds before.
    allowance = soak.killed_in_flight
    killed = soak.killed_at
    by_kill = [
        k
        for k, (_, at) in ledger.pending.items()
        if killed is not None and killed - KILL_REACH <= epoch(at) <= killed + 1
    ]
    peak_rss = max((s[0] for s in soak.samples), default=0)
    peak_fd = max((s[1] for s in soak.samples), default=0)
    rss_warm, rss_end = usage.rss()
    fd_baseline, fd_end = usage.descriptors()
    growth = (rss_end - rss_warm) / rss_warm
    kinds: dict[str, dict[str, int]] = {}
    for (kind, outcome), n in sorted(soak.tally.items()):
        kinds.setdefault(kind, {})[outcome] = n
    tunnels = sum(
        n for (k, _), n in soak.tally.items() if k in ("tunnel", "bulk_tunnel", "guarded")
    )
    result: dict[str, Any] = {
        "seconds": round(elapsed, 1),
        "concurrency": soak.args.concurrency,
        "workers": soak.args.workers,
        "fault_seconds": round(soak.fault_seconds, 1) if not soak.args.no_faults else 0,
        "requests_sent": soak.sent,
        "requests_per_second": round(soak.sent / elapsed, 1),
        "tunnels_opened": tunnels,
        "records": ledger.records,
        "ids": ids,
        "paired": len(ledger.paired),
        "unpaired": unpaired,
        "duplicated": ledger.duplicated,
        "missing": missing,
        "loss_allowance_worker_kill": allowance,
        "unpaired_open_at_kill": len(by_kill),
        "unpaired_sample": [
            {"id": k, "seen": a, "at": t} for k, (a, t) in list(ledger.pending.items())[:10]
        ],
        "rss_kib": {"after_warmup": rss_warm, "peak": peak_rss, "end": rss_end},
        "rss_growth_percent": round(100 * growth, 1),
        "descriptors": {"baseline": fd_baseline, "peak": peak_fd, "end": fd_end},
        "processes": {
            "at_start": sorted(usage.baseline),
            "at_end": sorted(usage.end),
            "compared": sorted(usage.warm.keys() & usage.end.keys()),
        },
        "results_by_kind": kinds,
        "failed_outside_faults": {f"{k}:{r}": n for (k, r), n in soak.failed_outside.items()},
        "record_reasons": dict(ledger.reasons.most_common()),
        "faults": [
            {
                "fault": w.name,
                "seconds": round(w.end - w.start, 1),
                "recovered_after_s": (
                    round(w.first_ok_after - w.end, 2) if w.first_ok_after is not None else None
                ),
                **w.checks,
                "failures": w.failures,
            }
            for w in soak.windows
        ],
        "replay": replayed,
        "proxy_alive": alive,
    }
    problems = [f"{w.name}: {f}" for w in soak.windows for f in w.failures]
    for w in soak.windows:
        if w.first_ok_after is None or w.first_ok_after - w.end > RECOVERY_SECONDS:
            problems.append(f"{w.name}: no success within {RECOVERY_SECONDS} s after the fault")
    if unpaired + missing > allowance or unpaired > len(by_kill) or ledger.duplicated:
        problems.append(
            f"{unpaired} unpaired, {missing} missing, {ledger.duplicated} duplicated records "
            f"(allowance {allowance})"
        )
    if not records_done and unpaired + missing > allowance:
        problems.append("records still missing when they stopped arriving")
    if growth > RSS_GROWTH_LIMIT:
        problems.append(f"RSS grew {100 * growth:.1f} % after the warm-up")
    if fd_end > fd_baseline + DESCRIPTOR_SLACK:
        problems.append(f"descriptors {fd_end} not back to the baseline {fd_baseline}")
    if soak.failed_outside:
        problems.append(f"failures outside fault windows: {result['failed_outside_faults']}")
    if replayed.get("wrong_action") or replayed.get("replay_mismatches"):
        problems.append("a storm decision disagrees with the version its rule names")
    if not soak.args.no_faults and not replayed.get("replayed"):
        problems.append("no storm decision to replay")
    if not alive:
        problems.append("the proxy exited")
    result["problems"] = problems
    print(json.dumps(result, indent=1))
    if soak.args.examples:
        print(json.dumps(soak.ledger.examples, indent=1))
    print(
        "| soak | {seconds} s | {requests_sent} requests ({requests_per_second}/s), "
        "{tunnels_opened} tunnels | {unpaired} unpaired, {missing} missing, {duplicated} "
        "duplicated | RSS {rss_kib[after_warmup]} -> {rss_kib[peak]} -> {rss_kib[end]} KiB | "
        "fds {descriptors[baseline]} -> {descriptors[peak]} -> {descriptors[end]} |".format(
            **result
        )
    )
    for fault in result["faults"]:
        print(
            f"| {fault['fault']} | {fault['seconds']} s | recovered after "
            f"{fault['recovered_after_s']} s | {fault['failures'] or 'as expected'} |"
        )
    return 1 if problems else 0


FAULTS = (
    "dns_outage",
    "upstream_reset",
    "audit_block",
    "policy_storm",
    "sighup_storm",
    "worker_kill",
)

if __name__ == "__main__":
    sys.exit(main())
