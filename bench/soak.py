"""Soak: mixed traffic for a while, then check that nothing was lost and memory stayed flat.

    python bench/soak.py [--seconds 60] [--concurrency 32]

Every request must leave exactly one decision and one close record with the same id, the
proxy's RSS at the end must be within a bound of its RSS after warm-up, and no request may
fail in a way its kind does not expect. Prints JSON and a Markdown row; exits 1 on a loss.
Everything runs on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess

# RSS growth allowed between warm-up and the end: allocator noise, never a per-request leak
# (a leak of even 1 KiB a request over a soak's hundred thousand requests is 100 MiB).
RSS_GROWTH_LIMIT_KIB = 24 * 1024


async def _exchange(port: int, raw: bytes, expect: bytes) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(65536), 10)
        return data.startswith(expect)
    finally:
        writer.close()
        await writer.wait_closed()


async def _worker(
    port: int, origin_port: int, deadline: float, seed: int, tally: Counter[str]
) -> None:
    rng = random.Random(seed)
    allowed = (
        f"GET http://origin.test:{origin_port}/hello HTTP/1.1\r\n"
        "Host: origin.test\r\nConnection: close\r\n\r\n"
    )
    kinds = {
        "allowed": (allowed.encode(), b"HTTP/1.1 200"),
        "denied": (
            b"GET http://denied.test/ HTTP/1.1\r\nHost: denied.test\r\n\r\n",
            b"HTTP/1.1 403",
        ),
        "malformed": (b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", b"HTTP/1.1 400"),
        "tunnel": (
            f"CONNECT origin.test:{origin_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
            b"HTTP/1.1 200",
        ),
    }
    names = list(kinds)
    while time.monotonic() < deadline:
        kind = rng.choice(names)
        raw, expect = kinds[kind]
        try:
            ok = await _exchange(port, raw, expect)
        except (OSError, TimeoutError):
            ok = False
        tally[f"{kind}_{'ok' if ok else 'failed'}"] += 1


async def _load(port: int, origin_port: int, seconds: float, concurrency: int) -> Counter[str]:
    tally: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    await asyncio.gather(
        *(_worker(port, origin_port, deadline, seed, tally) for seed in range(concurrency))
    )
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ScriptedDNSServer() as dns, OriginServer() as origin:
        dns.addresses("origin.test", "127.0.0.1")
        policy = policy_allowing("origin.test") + "      protocol: tcp\n"
        proxy = ProxyProcess(
            Path(tmp),
            policies=policy,
            nameserver=dns.nameserver,
            config={"limits": {"newConnectionsPerSecond": 1e6, "newConnectionsBurst": 1_000_000}},
        )
        with proxy:
            warm = asyncio.run(
                _load(proxy.port, origin.port, min(5.0, args.seconds), args.concurrency)
            )
            warm_rss = proxy.rss_kib()
            started = time.monotonic()
            tally = asyncio.run(_load(proxy.port, origin.port, args.seconds, args.concurrency))
            elapsed = time.monotonic() - started
            end_rss = proxy.rss_kib()
            requests = sum(tally.values())
            expected = 2 * (requests + sum(warm.values()))
            records = proxy.wait_records(lambda r: True, count=expected, timeout=120)
        by_id: Counter[str] = Counter(r["event"]["id"] for r in records)
        unpaired = sum(1 for count in by_id.values() if count != 2)
    failed = sum(v for k, v in tally.items() if k.endswith("_failed"))
    result = {
        "seconds": round(elapsed, 1),
        "requests": requests,
        "requests_per_second": round(requests / elapsed, 1),
        "failed": failed,
        "records": len(records),
        "records_expected": expected,
        "unpaired_records": unpaired,
        "rss_after_warmup_kib": warm_rss,
        "rss_end_kib": end_rss,
        "rss_growth_kib": end_rss - warm_rss,
        "tally": dict(tally),
    }
    print(json.dumps(result, indent=1))
    print(
        "| soak | {seconds} s | {requests} requests ({requests_per_second}/s) | "
        "{failed} failed | {unpaired_records} unpaired records | RSS {rss_after_warmup_kib} -> "
        "{rss_end_kib} KiB |".format(**result)
    )
    lost = unpaired or failed or len(records) != expected
    lost = lost or result["rss_growth_kib"] > RSS_GROWTH_LIMIT_KIB
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
