"""Overload at twice capacity (issue 17): what Outgate does when offered more new connections
than it can serve.

1. **Capacity.** A closed loop (`loadgen -mode http-close`, 50 at a time) sends plain HTTP GETs
   through the proxy to nginx, a new connection each, for a few seconds: the rate it serves
   flat out, R, with the proxy pinned to CPU 0 and everything else on CPU 1 (as `make bench`).
2. **Flood.** An open loop (`loadgen -mode flood`) offers FACTOR x R new connections a second,
   whatever the answers, while this script asks the admin listener for /healthz and /metrics
   every PROBE_INTERVAL and samples the proxy's RSS.
3. **Checks** (exit 1 if one fails): the proxy shed (some 429/503), every refusal carried
   Retry-After, it kept serving (at least MIN_GOODPUT x R answered 200 a second during the
   flood), answers came quickly (p99 of served and of refused within ANSWER_P99_LIMIT: shed,
   not left to the kernel's SYN retries), few connections failed (MAX_ERROR_SHARE), the admin
   listener answered every probe within ADMIN_LIMIT, RSS grew less than RSS_LIMIT_MIB, and
   every exchange in the audit log has exactly one `decision` and one `close` record, with one
   `overloaded` pair per 503.

Prints the figures as one JSON object, then Markdown rows (`make bench` appends them).

    python bench/overload.py [--factor 2] [--flood-seconds 10] [--shed-loop-lag 1s]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import procstat  # noqa: E402
from bench.servers import (  # noqa: E402
    ORIGIN_NAME,
    NameServer,
    Origin,
    OutgateProxy,
    raise_open_files_limit,
)

LOADGEN = ROOT / "bench" / ".build" / "loadgen"
PROXY_CPU = "0"
LOAD_CPU = "1"
CAPACITY_CONCURRENCY = 50
PROBE_INTERVAL = 0.2
ADMIN_LIMIT = 1.0  # seconds for one /healthz or /metrics answer during the flood
RSS_LIMIT_MIB = 200
# Of the capacity, served (200) a second while flooded. A shed costs about a third of a served
# request (bench/README.md), so at twice capacity about half of it is the most shedding leaves.
MIN_GOODPUT = 0.25
ANSWER_P99_LIMIT = 2.0  # seconds, p99 of served and of refused answers: shed, not stalled
MAX_ERROR_SHARE = 0.01  # connections reset or timed out, of those started
STEP_TIMEOUT = 180.0


def loadgen(proxy: OutgateProxy, origin: Origin, mode: str, **flags: str) -> dict[str, Any]:
    argv = [
        "taskset", "-c", LOAD_CPU, str(LOADGEN), "-mode", mode,
        "-proxy", f"127.0.0.1:{proxy.port}", "-target", f"{ORIGIN_NAME}:{origin.http_port}",
        "-path", "/small",
    ]  # fmt: skip
    for flag, value in flags.items():
        argv += [f"-{flag.replace('_', '-')}", value]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


class AdminProbe:
    """Asks /healthz and /metrics in turn until stopped; keeps each answer's status and time,
    the event-loop lag /metrics reports, and the proxy's RSS."""

    def __init__(self, proxy: OutgateProxy) -> None:
        self._proxy = proxy
        self._stop = threading.Event()
        self.answers: list[tuple[str, int, float]] = []
        self.lags: list[float] = []
        self.accept_fills: list[float] = []
        self.rss_kib: list[int] = []
        self._thread = threading.Thread(target=self._run, name="admin-probe", daemon=True)

    def __enter__(self) -> AdminProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in ("/healthz", "/metrics"):
                started = time.monotonic()
                status, body = admin_get(self._proxy, path)
                self.answers.append((path, status, time.monotonic() - started))
                if path == "/metrics" and status == 200:
                    self.lags.append(metric_value(body, "outgate_event_loop_lag_seconds"))
                    self.accept_fills.append(metric_value(body, "outgate_accept_queue_fill_ratio"))
            self.rss_kib.append(procstat.sample(self._proxy.pid).rss_kib)
            self._stop.wait(PROBE_INTERVAL)


def cpu_busy() -> dict[str, float]:
    """Busy jiffies per CPU since boot, from /proc/stat (user..steal, not idle or iowait)."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            values = [int(v) for v in fields]
            busy[name] = float(sum(values[:8]) - values[3] - values[4])
    return busy


def utilisation(
    before: dict[str, float], after: dict[str, float], seconds: float
) -> dict[str, float]:
    return {k: round((after[k] - before[k]) / procstat.CLOCK_TICKS / seconds, 2) for k in after}


def admin_get(proxy: OutgateProxy, path: str) -> tuple[int, str]:
    """Status and body of one admin request; status 0 and the error when it failed."""
    url = f"http://127.0.0.1:{proxy.admin_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except OSError as exc:
        return 0, str(exc)


def metric_value(body: str, name: str) -> float:
    """The sum of a metric's samples (every label set) in a /metrics body."""
    total = 0.0
    for line in body.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric(proxy: OutgateProxy, name: str) -> float:
    status, body = admin_get(proxy, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}: {body}")
    return metric_value(body, name)


def audit_pairs(path: Path) -> tuple[int, int, int]:
    """(exchanges, exchanges without exactly one decision and one close, overloaded pairs)."""
    actions: dict[str, list[str]] = {}
    overloaded = 0
    with path.open() as lines:
        for line in lines:
            record = json.loads(line)
            actions.setdefault(record["event"]["id"], []).append(record["event"]["action"])
            if record.get("outgate", {}).get("reason") == "overloaded":
                overloaded += 1
    unpaired = sum(1 for acts in actions.values() if sorted(acts) != ["close", "decision"])
    return len(actions), unpaired, overloaded // 2


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    origin = Origin(workdir, cpu=LOAD_CPU)
    nameserver = NameServer()
    limits = {"shedLoopLag": args.shed_loop_lag} if args.shed_loop_lag else None
    proxy = OutgateProxy(
        workdir, origin, nameserver, cpu=PROXY_CPU, python=Path(sys.executable), limits=limits
    )
    origin.start()
    nameserver.start()
    try:
        proxy.start()
        proxy.ready()
        t0, c0, p0 = time.monotonic(), cpu_busy(), procstat.sample(proxy.pid).cpu_seconds
        capacity = loadgen(
            proxy, origin, "http-close", c=str(CAPACITY_CONCURRENCY),
            warmup="1s", duration=f"{args.capacity_seconds:g}s", timeout="30s",
        )  # fmt: skip
        rate = capacity["ops_per_sec"]
        t1, c1, p1 = time.monotonic(), cpu_busy(), procstat.sample(proxy.pid).cpu_seconds
        baseline_kib = procstat.sample(proxy.pid).rss_kib
        shed_before = metric(proxy, "outgate_shed_connections_total")
        with AdminProbe(proxy) as probe:
            flood = loadgen(
                proxy, origin, "flood", rate=f"{rate * args.factor:.0f}",
                duration=f"{args.flood_seconds:g}s", timeout="30s",
            )  # fmt: skip
        t2, c2, p2 = time.monotonic(), cpu_busy(), procstat.sample(proxy.pid).cpu_seconds
        shed = metric(proxy, "outgate_shed_connections_total") - shed_before
        backpressure = metric(proxy, "outgate_audit_backpressure_seconds_total")
    finally:
        proxy.stop()
        nameserver.stop()
        origin.stop()
    exchanges, unpaired, overloaded = audit_pairs(proxy.audit_log)
    statuses = Counter({k: int(v) for k, v in flood["statuses"].items()})
    refused = statuses["429"] + statuses["503"]
    served = statuses["200"]
    slowest = max(probe.answers, key=lambda a: a[2])
    peak_kib = max(probe.rss_kib, default=baseline_kib)
    figures = {
        "capacity_per_s": round(rate, 1),
        "capacity_errors": capacity["errors"],
        "capacity_cpus_busy": utilisation(c0, c1, t1 - t0),
        "capacity_proxy_cpu": round((p1 - p0) / (t1 - t0), 2),
        "flood_cpus_busy": utilisation(c1, c2, t2 - t1),
        "flood_proxy_cpu": round((p2 - p1) / (t2 - t1), 2),
        "offered_per_s": round(flood["offered"] / flood["seconds"], 1),
        "flood": flood,
        "served_per_s": round(served / flood["seconds"], 1),
        "refused": refused,
        "shed_metric": shed,
        "audit_backpressure_s": backpressure,
        "admin_probes": len(probe.answers),
        "admin_failures": sum(1 for _, status, _ in probe.answers if status != 200),
        "admin_slowest_s": round(slowest[2], 3),
        "loop_lag_peak_s": round(max(probe.lags, default=0.0), 3),
        "accept_queue_fill_peak": round(max(probe.accept_fills, default=0.0), 2),
        "rss_mib": [round(baseline_kib / 1024, 1), round(peak_kib / 1024, 1)],
        "audit_exchanges": exchanges,
        "audit_unpaired": unpaired,
        "audit_overloaded": overloaded,
    }
    figures["checks"] = {
        "shed (some 429/503)": refused > 0,
        "every refusal has Retry-After": flood["refused_without_retry_after"] == 0,
        f"kept serving (>= {MIN_GOODPUT:g}x capacity answered 200)": served / flood["seconds"]
        >= MIN_GOODPUT * rate,
        f"answers within {ANSWER_P99_LIMIT:g} s (p99 of served and of refused)": max(
            flood["served_p99_ms"] or 0.0, flood["refused_p99_ms"] or 0.0
        )
        <= ANSWER_P99_LIMIT * 1000,
        f"errors under {MAX_ERROR_SHARE:.0%} of connections started": sum(flood["errors"].values())
        <= MAX_ERROR_SHARE * (flood["offered"] - flood["not_started"]),
        f"admin answered every probe within {ADMIN_LIMIT:g} s": figures["admin_failures"] == 0
        and slowest[2] < ADMIN_LIMIT,
        f"RSS grew less than {RSS_LIMIT_MIB} MiB": peak_kib - baseline_kib < RSS_LIMIT_MIB * 1024,
        "every exchange has one decision and one close": unpaired == 0,
        "one overloaded pair per 503": overloaded == statuses["503"],
    }
    return figures


def markdown(figures: dict[str, Any], factor: float) -> list[str]:
    flood = figures["flood"]
    statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(flood["statuses"].items()))
    errors = ", ".join(f"{k}: {v:,}" for k, v in sorted(flood["errors"].items())) or "none"
    return [
        f"| overload, {factor:g}x capacity | capacity {figures['capacity_per_s']:,.0f}/s, "
        f"offered {figures['offered_per_s']:,.0f}/s | answers {statuses}; errors {errors}; "
        f"not started {flood['not_started']:,} | served {figures['served_per_s']:,.0f}/s, "
        f"p99 {flood['served_p99_ms']} ms; refusals p99 {flood['refused_p99_ms']} ms | "
        f"admin slowest {figures['admin_slowest_s']} s over {figures['admin_probes']} probes; "
        f"loop lag peak {figures['loop_lag_peak_s']} s; accept queue peak "
        f"{figures['accept_queue_fill_peak']:.0%}; RSS {figures['rss_mib'][0]} -> "
        f"{figures['rss_mib'][1]} MiB | audit: {figures['audit_exchanges']:,} exchanges, "
        f"{figures['audit_unpaired']} unpaired |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factor", type=float, default=2.0, help="offered rate / capacity")
    parser.add_argument("--capacity-seconds", type=float, default=5.0)
    parser.add_argument("--flood-seconds", type=float, default=10.0)
    parser.add_argument(
        "--shed-loop-lag", default="", help="limits.shedLoopLag (default: the proxy's)"
    )
    args = parser.parse_args(argv)
    if not LOADGEN.exists():
        print(f"{LOADGEN} is missing: run bench/install.sh first", file=sys.stderr)
        return 2
    raise_open_files_limit()
    with tempfile.TemporaryDirectory(prefix="outgate-overload-") as tmp:
        figures = run(args, Path(tmp))
    print(json.dumps(figures))
    for row in markdown(figures, args.factor):
        print(row)
    failed = [name for name, ok in figures["checks"].items() if not ok]
    for name in failed:
        print(f"overload: FAILED: {name}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
