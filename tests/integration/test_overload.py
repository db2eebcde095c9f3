"""Overload: an open-loop flood of new connections from several client processes, more than
one worker serves. The admin listener answers /healthz and /metrics throughout, RSS stays
bounded, every refusal (429, or 503 `overloaded` while the process is behind) carries
Retry-After, and every exchange still has its two records.

Three Python processes are what a test can spare on this machine, and they seldom offer more
than one worker serves, so this test does not claim a shed: it shows what holds under the
flood whichever way the proxy meets it. The shed itself is shown by
tests/dataplane/test_shedding.py (503 with its records while the loop runs behind) and
tests/unit/test_admission_limits.py (both signals, the accept queue read from a real socket);
a flood at twice capacity from a Go load generator, with the proxy pinned to its own CPU, is
bench/overload.py (`make bench`)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.proxyproc import ProxyProcess, outgate_command

FLOOD_PROCESSES = 3
FLOOD_RATE = 1500  # new connections a second per process: together several times what one
# worker serves (about 1,000 a second for a denied request on this machine, bench/README.md)
FLOOD_SECONDS = 8.0
ADMIN_ANSWER_SECONDS = 5.0  # generous on a shared machine; an unshed flood takes far longer
RSS_GROWTH_LIMIT_KIB = 150 * 1024


def test_under_a_flood_admin_answers_memory_stays_bounded_and_refusals_say_when_to_retry(
    start_proxy: Callable[..., ProxyProcess],
    dns_server: ScriptedDNSServer,
    tmp_path: Path,
) -> None:
    dns_server.addresses("origin.test", "127.0.0.1")
    # Audit records go to a file, written as fast as the proxy writes them: a test reading a
    # pipe would be the bottleneck, and the proxy would wait for it (audit backpressure, by
    # design) instead of meeting the flood.
    audit_file = tmp_path / "audit.jsonl"
    proxy = start_proxy(
        policy_allowing("origin.test"),
        nameserver=dns_server.nameserver,
        command=lambda config: [
            "sh",
            "-c",
            f'exec "$@" > {audit_file}',
            "sh",
            *outgate_command(),
            "run",
            "--config",
            str(config),
        ],
        config={
            "limits": {
                "shedLoopLag": "250ms",
                "newConnectionsPerSecond": 1e6,
                "newConnectionsBurst": 1_000_000,
                "maxConnectionsPerSource": 20000,
            },
        },
    )
    baseline_rss = proxy.rss_kib()
    # A name the policy denies: the proxy answers it alone (no origin to wait for), so the
    # proxy, not an origin, is what the flood saturates.
    url = "http://denied.test/"
    flooders = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.flood",
                str(proxy.port),
                url,
                str(FLOOD_SECONDS),
                str(FLOOD_RATE),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(FLOOD_PROCESSES)
    ]
    probes: list[tuple[str, int, float]] = []
    lags: list[float] = []
    peak_rss = baseline_rss
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            for path in ("/healthz", "/metrics"):
                started = time.monotonic()
                status, body = proxy.admin(path)
                probes.append((path, status, time.monotonic() - started))
                for line in body.splitlines():
                    if line.startswith("outgate_event_loop_lag_seconds "):
                        lags.append(float(line.split()[1]))
            done.wait(0.5)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        while any(f.poll() is None for f in flooders):
            peak_rss = max(peak_rss, proxy.rss_kib())
            time.sleep(0.2)  # sampling RSS, not waiting for a state
    finally:
        done.set()
        prober.join(30)
    statuses: Counter[str] = Counter()
    for flooder in flooders:
        out, _ = flooder.communicate(timeout=60)
        statuses.update(json.loads(out))

    slowest = max(probes, key=lambda p: p[2])
    print(
        f"flood: {dict(statuses)}, slowest admin {slowest}, RSS {baseline_rss}->{peak_rss}, "
        f"loop lag peak {max(lags, default=0):.3f} s"
    )
    assert statuses["403"] > 0, f"nothing was served: {statuses}"
    assert statuses["refused_without_retry_after"] == 0, statuses
    assert all(status == 200 for _, status, _ in probes), probes
    assert slowest[2] < ADMIN_ANSWER_SECONDS, f"admin answered slowly: {slowest}"
    assert peak_rss - baseline_rss < RSS_GROWTH_LIMIT_KIB, (baseline_rss, peak_rss)
    proxy.stop()
    records = [json.loads(line) for line in audit_file.read_text().splitlines()]
    actions: dict[str, list[str]] = {}
    for record in records:
        actions.setdefault(record["event"]["id"], []).append(record["event"]["action"])
    unpaired = {k: v for k, v in actions.items() if sorted(v) != ["close", "decision"]}
    assert not unpaired, list(unpaired.items())[:5]
    shed = sum(1 for r in records if r["outgate"].get("reason") == "overloaded") // 2
    assert shed == statuses["503"]
