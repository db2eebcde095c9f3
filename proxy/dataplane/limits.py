"""Admission limits: load shedding on event-loop lag, global and per-source connection caps, a
per-workload rate of new connections (token bucket), and a per-workload cap on open tunnels.

Plain bookkeeping with an injected clock, so the arithmetic is tested without sockets; the
listener asks `admit` per accepted connection and `open_tunnel` per CONNECT. A refusal is a
TooManyRequests (429 with Retry-After), or, while the loop is behind, Overloaded (503 with
Retry-After). Admin and health endpoints live on another listener and never pass through here.

Why lag: past the rate a worker can serve, accepted connections wait in the loop's queue of
ready callbacks, every open connection slows down with them, and memory grows with the queue.
LoopLag measures how late a periodic tick runs; while two ticks in a row are later than
limits.shedLoopLag a new connection gets a 503 at once (a few hundred bytes and its two
records), which costs far less than serving it, so the loop catches up and the admin listener
keeps answering.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import Limits
from proxy.core.hosts import IPAddress
from proxy.core.identity import Workload, WorkloadKind
from proxy.errors import Overloaded, TooManyRequests
from proxy.metrics import EVENT_LOOP_LAG, SHED_CONNECTIONS

# How often LoopLag's tick runs: finer sees a backlog sooner, each tick costs a wake-up.
LAG_TICK_SECONDS = 0.05

# Buckets of workloads not seen for a while are dropped oldest-first past this many: a full
# bucket and a forgotten one admit the same, so forgetting costs nothing but bounds memory.
MAX_TRACKED_WORKLOADS = 10_000


def workload_key(workload: Workload, source: IPAddress) -> str:
    """Who a limit applies to: the owning controller of a pod, a static identity, or, for an
    unknown source, its address (unknown sources must not share one bucket)."""
    if workload.kind is WorkloadKind.UNKNOWN:
        return f"unknown/{source}"
    return workload.describe()


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class LoopLag:
    """How far behind the event loop runs, in seconds: the smaller lateness of the last two
    ticks. A loop with a backlog is late tick after tick; one late tick alone is a single stall
    (a long callback, or the process stopped or descheduled for a while), after which the loop
    is on time again and nothing should be shed."""

    def __init__(self, *, tick: float = LAG_TICK_SECONDS) -> None:
        self._tick = tick
        self._previous = 0.0
        self._last = 0.0

    def __call__(self) -> float:
        return min(self._previous, self._last)

    async def run(self) -> None:
        """Tick until cancelled."""
        while True:
            due = time.monotonic() + self._tick
            await asyncio.sleep(self._tick)
            self._previous, self._last = self._last, max(0.0, time.monotonic() - due)
            EVENT_LOOP_LAG.set(self._last)


class Admission:
    """Counts what is open and refuses what is over a limit. One per listener."""

    def __init__(
        self,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.monotonic,
        lag: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._lag = lag
        self.open_connections = 0
        self._per_source: Counter[IPAddress] = Counter()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._tunnels: Counter[str] = Counter()

    # -- connections ------------------------------------------------------------------------
    def connection_opened(self, source: IPAddress) -> None:
        self.open_connections += 1
        self._per_source[source] += 1

    def connection_closed(self, source: IPAddress) -> None:
        self.open_connections -= 1
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]

    def check_connection(self, source: IPAddress, key: str) -> None:
        """Raise Overloaded while the loop is behind, TooManyRequests if the connection just
        opened is over a limit."""
        limits = self._limits
        lag = self._lag()
        if limits.shed_loop_lag and lag > limits.shed_loop_lag:
            SHED_CONNECTIONS.inc()
            raise Overloaded(
                f"the proxy is overloaded (event loop {lag * 1000:.0f} ms behind); retry shortly"
            )
        if self.open_connections > limits.max_connections:
            raise TooManyRequests(f"over {limits.max_connections} open connections")
        if self._per_source[source] > limits.max_connections_per_source:
            raise TooManyRequests(
                f"over {limits.max_connections_per_source} open connections from this source"
            )
        if not self._take_token(key):
            raise TooManyRequests(
                f"over {limits.new_connections_per_second:g} new connections a second "
                "for this workload"
            )

    def _take_token(self, key: str) -> bool:
        limits = self._limits
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=float(limits.new_connections_burst), stamp=now)
            self._buckets[key] = bucket
            if len(self._buckets) > MAX_TRACKED_WORKLOADS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            refill = (now - bucket.stamp) * limits.new_connections_per_second
            bucket.tokens = min(float(limits.new_connections_burst), bucket.tokens + refill)
            bucket.stamp = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    # -- tunnels ----------------------------------------------------------------------------
    def open_tunnel(self, key: str) -> None:
        if self._tunnels[key] >= self._limits.max_tunnels_per_workload:
            raise TooManyRequests(
                f"over {self._limits.max_tunnels_per_workload} open tunnels for this workload"
            )
        self._tunnels[key] += 1

    def close_tunnel(self, key: str) -> None:
        self._tunnels[key] -= 1
        if self._tunnels[key] <= 0:
            del self._tunnels[key]
