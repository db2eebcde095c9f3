"""Scale of the pod informer: index 150,000 pods (the Kubernetes scalability limit) from the fake
API server, over HTTPS, with the paged LIST the proxy uses.

Prints one JSON object, then one Markdown table row:

- `sync_seconds`: from the first LIST request to the pod informer's synced flag (the fake
  server runs in its own process, so its serialisation is not charged to the proxy);
- `rss_added_bytes_per_pod`: the growth of this process's resident memory over the sync,
  after a GC, per pod: what an operator sees (includes allocator slack);
- `index_bytes_per_pod`: what the PodIndex itself holds (records, IP table, label sets;
  shared objects counted once), per pod;
- `lookup_ns`: one source-IP lookup through the data plane's IdentityLookup (the index and the
  lookup counter), at 1,000, 10,000, 50,000 and 150,000 pods; `lookup_growth` is the
  150,000-pod cost over the 1,000-pod cost: lookups must not grow with the number of pods.
  A lookup is one dict read; the only rise is the step where the tables outgrow the CPU
  caches (compare 50,000 with 150,000: flat).

Usage: python bench/kube_scale.py [--pods N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import ipaddress
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy.control.kube.client import KubeClient  # noqa: E402
from proxy.control.kube.config import load_kubeconfig  # noqa: E402
from proxy.control.kube.informers import (  # noqa: E402
    NAMESPACES,
    PODS,
    KubeIdentity,
    NamespaceSink,
    PodSink,
)
from proxy.control.kube.reflector import Reflector  # noqa: E402
from proxy.core.hosts import IPAddress  # noqa: E402
from proxy.core.identity import StaticIdentityIndex  # noqa: E402
from proxy.core.podindex import PodIndex, pod_from_object  # noqa: E402
from tests.support.fakekube import generated_pod  # noqa: E402

LOOKUP_SIZES = (1_000, 10_000, 50_000)
LOOKUPS_PER_ROUND = 100_000
ROUNDS = 9
SERVER_START_TIMEOUT = 600.0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def deep_size(root: object) -> int:
    """Bytes of every object reachable from `root` through containers and slots, each once."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, bool | type):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        elif not isinstance(obj, str | int | float | bytes):
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(obj, slot):
                        stack.append(getattr(obj, slot))
            if hasattr(obj, "__dict__"):
                stack.append(vars(obj))
    return total


def index_of(count: int) -> tuple[PodIndex, list[IPAddress]]:
    index = PodIndex()
    ips: list[IPAddress] = []
    for n in range(count):
        record = pod_from_object(generated_pod(n))
        index.upsert(record)
        ips.extend(record.ips)
    return index, ips


def lookup_ns(indexes: dict[str, tuple[PodIndex, list[IPAddress]]]) -> dict[str, float]:
    """ns per lookup for each index; rounds alternate between the indexes, so a noisy
    neighbour slows them all alike, and the best round of each counts."""
    rng = random.Random(7)
    plans = {}
    for size, (index, ips) in indexes.items():
        identity = KubeIdentity(index, StaticIdentityIndex(()), synced=lambda: True)
        # Fresh address objects, as the data plane parses each peer address anew (reused
        # objects scattered in memory would charge the benchmark's cache misses to the lookup).
        picks = [rng.choice(ips) for _ in range(LOOKUPS_PER_ROUND)]
        sample = [type(pick)(int(pick)) for pick in picks]
        for ip in sample:
            identity.lookup(ip)  # first lookups build and cache each workload
        plans[size] = (identity, sample)
    best = dict.fromkeys(plans, float("inf"))
    for _ in range(ROUNDS):
        for size, (identity, sample) in plans.items():
            lookup = identity.lookup
            started = time.perf_counter()
            for ip in sample:
                lookup(ip)
            best[size] = min(best[size], time.perf_counter() - started)
    return {size: seconds / LOOKUPS_PER_ROUND * 1e9 for size, seconds in best.items()}


def _ips(index: PodIndex, uid: str) -> tuple[IPAddress, ...]:
    record = index.pod(uid)
    return record.ips if record is not None else ()


async def sync(kubeconfig: Path, pods: int) -> dict[str, Any]:
    client = KubeClient(load_kubeconfig(kubeconfig))
    index = PodIndex()
    gone: list[object] = []
    pod_reflector = Reflector(client, PODS, PodSink(index, lambda ip, name: gone.append(ip)))
    namespace_reflector = Reflector(client, NAMESPACES, NamespaceSink(index))
    gc.collect()
    before = rss_bytes()
    started = time.monotonic()
    tasks = [
        asyncio.create_task(pod_reflector.run(), name="pods"),
        asyncio.create_task(namespace_reflector.run(), name="namespaces"),
    ]
    await pod_reflector.wait_synced()
    seconds = time.monotonic() - started
    await namespace_reflector.wait_synced()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    await asyncio.sleep(0.1)
    gc.collect()
    after = rss_bytes()
    assert len(index) == pods, (len(index), pods)
    probe = ipaddress.ip_address("10.0.0.0") + pods - 1
    assert index.lookup(probe).name.endswith(f"{pods - 1:05x}")
    result: dict[str, Any] = {
        "sync_seconds": round(seconds, 2),
        "pods_per_second": round(pods / seconds),
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "rss_added_bytes_per_pod": round((after - before) / pods),
        "index_bytes_per_pod": round(deep_size(index) / pods),
        "label_sets": index.label_set_count,
    }
    sizes = [size for size in LOOKUP_SIZES if size < pods]
    indexes = {f"{size}": index_of(size) for size in sizes}
    indexes[f"{pods}"] = (index, [ip for uid in index.uids() for ip in _ips(index, uid)])
    timings = lookup_ns(indexes)
    result["lookup_ns"] = {size: round(ns) for size, ns in timings.items()}
    first = timings[str(sizes[0])] if sizes else timings[f"{pods}"]
    result["lookup_growth"] = round(timings[f"{pods}"] / first, 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=150_000)
    args = parser.parse_args()
    # The informers' log goes to stderr: stdout carries only the result.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    with tempfile.TemporaryDirectory(prefix="outgate-kube-bench-") as tmp:
        started = time.monotonic()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.fakekube",
                "--pods",
                str(args.pods),
                "--dir",
                tmp,
            ],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None and server.stdin is not None
            line = server.stdout.readline()
            if not line:
                raise RuntimeError("the fake API server did not start")
            seeded = time.monotonic() - started
            kubeconfig = Path(json.loads(line)["kubeconfig"])
            try:
                import uvloop  # the proxy's loop

                result = uvloop.run(sync(kubeconfig, args.pods))
            except ImportError:  # pragma: no cover - uvloop is a dependency
                result = asyncio.run(sync(kubeconfig, args.pods))
        finally:
            if server.stdin is not None:
                server.stdin.close()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
    result = {"benchmark": "kube_scale", "pods": args.pods, **result}
    result["fake_server_seed_seconds"] = round(seeded, 1)
    print(json.dumps(result))
    lookups = " · ".join(f"{ns} ns @{int(size):,}" for size, ns in result["lookup_ns"].items())
    print(
        f"| kube informer scale | {args.pods:,} pods | sync {result['sync_seconds']} s "
        f"({result['pods_per_second']:,} pods/s) | {result['index_bytes_per_pod']} B/pod index, "
        f"{result['rss_added_bytes_per_pod']} B/pod RSS | lookup {lookups} "
        f"(growth x{result['lookup_growth']}) |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
