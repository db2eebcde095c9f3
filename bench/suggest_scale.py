"""How long `outgate suggest` takes over a million audit records (issue 8: under a minute).

Standalone: `python bench/suggest_scale.py [--records 1000000] [--keep FILE]`. It writes a log of
decision and close records with the proxy's own schema functions (proxy.audit), in the mix a busy
cluster produces: 20 namespaces x 10 workloads, each calling ~40 names on 443 and a few on 80,
CDN shards above the wildcard threshold, some requests denied by policy or refused by the
address guard, some tunnels that are not TLS, and a few records from unknown sources. Then it
runs `outgate suggest FILE -o /dev/null` as an operator would, and times that process.

Prints one JSON object, then a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy.audit import Exchange, close_record, decision_record, render
from proxy.core.identity import UNKNOWN_WORKLOAD, Workload, WorkloadKind
from proxy.core.policy.engine import Decision, Outcome, Verdict
from proxy.errors import Reason

SEED = 8
NAMESPACES = 20
WORKLOADS_PER_NAMESPACE = 10
NAMES_PER_WORKLOAD = 40
SHARDS_PER_WORKLOAD = 12

ALLOW = Decision(
    verdict=Verdict(action=Outcome.ALLOW, reason=Reason.RULE_ALLOW, rule="r", ruleset="ns/p"),
    revision=3,
)
DENY = Decision(
    verdict=Verdict(action=Outcome.DENY, reason=Reason.NAMESPACE_ISOLATION, ruleset="ns/p"),
    revision=3,
)


def workloads() -> list[tuple[str, Workload, list[tuple[str, int]]]]:
    rng = random.Random(SEED)
    found = []
    for n in range(NAMESPACES):
        for w in range(WORKLOADS_PER_NAMESPACE):
            owner = f"svc-{w}"
            workload = Workload(
                kind=WorkloadKind.POD,
                namespace=f"team-{n}",
                name=f"{owner}-7d9f-{w}",
                labels={"app": owner},
                service_account=owner,
                owner_kind="Deployment",
                owner_name=owner,
            )
            names = [(f"api-{rng.randrange(400)}.vendor-{rng.randrange(60)}.example", 443)
                     for _ in range(NAMES_PER_WORKLOAD)]  # fmt: skip
            names += [(f"shard-{s}.cdn-{w}.example.net", 443) for s in range(SHARDS_PER_WORKLOAD)]
            names += [(f"mirror-{rng.randrange(5)}.packages.example.org", 80) for _ in range(3)]
            found.append((f"10.{n}.{w}.{rng.randrange(1, 250)}", workload, names))
    return found


def write_log(path: Path, records: int) -> int:
    """Write `records` lines (decision + close per request); return the decision count."""
    rng = random.Random(SEED)
    sources = workloads()
    decisions = 0
    with path.open("wb") as out:
        written = 0
        while written < records:
            source, workload, names = sources[rng.randrange(len(sources))]
            host, port = names[rng.randrange(len(names))]
            roll = rng.random()
            if roll < 0.002:
                workload, source = UNKNOWN_WORKLOAD, "192.0.2.77"
            ex = Exchange(
                kind="forward" if port == 80 else "tunnel",
                source_ip=source,
                source_port=rng.randrange(32768, 60999),
                workload=workload,
                destination_domain=host,
                destination_port=port,
                method="GET" if port == 80 else "CONNECT",
                path="/dists/stable/Release" if port == 80 else None,
            )
            if roll < 0.01:
                ex.decision, ex.reason, ex.status = DENY, Reason.NAMESPACE_ISOLATION, 403
                close_reason = Reason.NAMESPACE_ISOLATION
            elif roll < 0.015:
                ex.decision, ex.reason, ex.status = ALLOW, Reason.GUARDED_ADDRESS, 403
                close_reason = Reason.GUARDED_ADDRESS
            else:
                ex.decision, ex.reason, ex.decided = ALLOW, Reason.RULE_ALLOW, True
                ex.destination_ip = f"203.0.113.{rng.randrange(1, 250)}"
                close_reason = Reason.PROTOCOL_MISMATCH if roll > 0.998 else Reason.COMPLETED
            decision = decision_record(ex)
            if ex.decided and port == 80:
                ex.status = 200
            ex.source_bytes, ex.destination_bytes = rng.randrange(600), rng.randrange(90_000)
            out.write(render(decision))
            out.write(render(close_record(ex, close_reason)))
            written += 2
            decisions += 1
    return decisions


def outgate_command() -> list[str]:
    script = Path(sys.executable).with_name("outgate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keep", help="write the generated log here and keep it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="outgate-suggest-") as scratch:
        log = Path(args.keep) if args.keep else Path(scratch) / "audit.jsonl"
        started = time.perf_counter()
        decisions = write_log(log, args.records)
        generated = time.perf_counter() - started

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(
            [*outgate_command(), "suggest", str(log), "-o", os.devnull],
            capture_output=True,
            text=True,
            check=False,
        )
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
        report = {
            "benchmark": "suggest_scale",
            "records": args.records,
            "decision_records": decisions,
            "log_bytes": log.stat().st_size,
            "workloads": NAMESPACES * WORKLOADS_PER_NAMESPACE,
            "generate_seconds": round(generated, 2),
            "suggest_seconds": round(elapsed, 2),
            "suggest_cpu_seconds": round(
                (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2
            ),
            "records_per_second": round(args.records / elapsed),
            "peak_rss_mib": round(after.ru_maxrss / 1024, 1),
            "under_a_minute": elapsed < 60,
            "cli_summary": result.stderr.strip().splitlines()[-1],
        }
    print(json.dumps(report))
    print("| benchmark | records | log size | wall time | CPU time | records/s | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| outgate suggest | {args.records:,} | {report['log_bytes'] / 2**20:.0f} MiB | "
        f"{report['suggest_seconds']} s | {report['suggest_cpu_seconds']} s | "
        f"{report['records_per_second']:,} | {report['peak_rss_mib']} MiB |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
