"""Load shedding end to end: while the event loop runs behind by more than limits.shedLoopLag, a
new connection is answered at once with 503 `overloaded` and Retry-After, and audited with one
decision and one close record; once the loop is on time again, the next connection is served.

The loop is made to run behind on purpose, the way a flood makes it: a callback blocks it for
STALL seconds and queues itself again, so each pass of the loop is late and every tick of the lag
meter with it. (The time.sleep is that load, not a wait: the test waits on answers.)"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path
from typing import Any

from proxy import metrics
from tests.support.fixtures import policy_allowing
from tests.support.inprocess import (
    Harness,
    closes,
    exchange_on_new_connection,
    inprocess_proxy,
)
from tests.support.origin import OriginServer
from tests.support.waiting import eventually

LOOPBACK = (ipaddress.ip_address("127.0.0.1"),)
STALL = 0.15  # seconds each pass of the loop is blocked while it is made to run behind
SHED_LAG = 0.05
LIMITS = {"newConnectionsPerSecond": 10000, "newConnectionsBurst": 10000, "shedLoopLag": "50ms"}
ATTEMPTS = 30  # requests tried, one after another, before a test gives up on an answer


def get(port: int) -> bytes:
    return (
        f"GET http://origin.test:{port}/hello HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n".encode()
    )


async def first_answer(
    proxy: Harness, port: int, wanted: int
) -> tuple[list[int], dict[str, str], bytes]:
    """Requests on new connections, one at a time, until one is answered `wanted`; every status
    seen, and the headers and body of that answer."""
    statuses: list[int] = []
    for _ in range(ATTEMPTS):
        status, headers, body, _ = await exchange_on_new_connection(proxy, get(port))
        statuses.append(status)
        if status == wanted:
            return statuses, headers, body
    raise AssertionError(f"no {wanted} in {ATTEMPTS} requests: {statuses}")


class Stall:
    """Blocks the running loop for STALL seconds on every pass until stopped."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._on = True
        self._loop.call_soon(self._block)

    def _block(self) -> None:
        if self._on:
            time.sleep(STALL)
            self._loop.call_soon(self._block)

    def stop(self) -> None:
        self._on = False


def loop_lag() -> float:
    return metrics.REGISTRY.get_sample_value("outgate_event_loop_lag_seconds") or 0.0


def shed_total() -> float:
    labels = {"signal": "loop_lag"}
    return metrics.REGISTRY.get_sample_value("outgate_shed_connections_total", labels) or 0.0


def by_id(records: list[dict[str, Any]], event_id: str) -> list[str]:
    return sorted(r["event"]["action"] for r in records if r["event"]["id"] == event_id)


def overloaded(record: dict[str, Any]) -> bool:
    return bool(record["outgate"].get("reason") == "overloaded")


async def test_a_loop_running_behind_sheds_new_connections_with_503_and_serves_again_after(
    tmp_path: Path, origin: OriginServer
) -> None:
    async with inprocess_proxy(
        tmp_path, policy_allowing("origin.test"), answers={"origin.test": LOOPBACK}, limits=LIMITS
    ) as proxy:
        shed_before = shed_total()
        stall = Stall()
        try:
            statuses, headers, body = await first_answer(proxy, origin.port, 503)
        finally:
            stall.stop()
        assert set(statuses) <= {200, 503}, statuses
        assert headers.get("retry-after", "").isdigit(), headers
        assert b"overloaded" in body
        shed_close = (await proxy.audit.wait_for(lambda r: closes(r) and overloaded(r)))[0]
        event_id = shed_close["event"]["id"]
        assert by_id(proxy.audit.records, event_id) == ["close", "decision"]
        decision = next(
            r for r in proxy.audit.records
            if r["event"]["id"] == event_id and r["event"]["action"] == "decision"
        )  # fmt: skip
        assert decision["outgate"]["decision"] == "deny"
        assert decision["http"]["response"]["status_code"] == 503
        assert shed_total() > shed_before

        # On time again (the lag meter's last tick ran on time): the next connection is served.
        await eventually(lambda: loop_lag() < SHED_LAG, what="the lag meter on time again")
        status, _, body, _ = await exchange_on_new_connection(proxy, get(origin.port))
        assert status == 200 and body

        # Every exchange of the test has its two records, shed or served.
        ids: set[str] = {r["event"]["id"] for r in proxy.audit.records}
        await proxy.audit.wait_for(closes, count=len(ids))
        assert all(by_id(proxy.audit.records, i) == ["close", "decision"] for i in ids)
