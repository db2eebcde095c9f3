"""Admission limits: load shedding when the process is behind, global and per-source connection
caps, a per-workload rate of new connections (token bucket), and a per-workload cap on open
tunnels.

Plain bookkeeping with an injected clock, so the arithmetic is tested without sockets; the
listener asks `check_connection` per accepted connection and `open_tunnel` per CONNECT. A
refusal is a TooManyRequests (429 with Retry-After), or, while the process is behind,
Overloaded (503 with Retry-After). Admin and health endpoints live on another listener and
never pass through here.

Past the rate a worker can serve, new connections wait somewhere, and LoadMeter watches both
places, every LOAD_TICK_SECONDS:
- the kernel's accept queue of each listener (TCP_INFO of the listening socket). A saturated
  worker still turns its loop quickly, a little work for each of many connections, so the loop
  is on time while the queue fills; once it is full the kernel drops SYNs and clients wait 1,
  3, 7 s and more to retry (bench/README.md, "Overload at twice capacity"). While two ticks in
  a row find a queue at least limits.shedAcceptQueue full, new connections are shed.
- the event loop's lateness: accepted connections waiting in the loop's queue of ready
  callbacks slow every open connection and hold memory. While two ticks in a row run later than
  limits.shedLoopLag, new connections are shed.
A shed connection gets a 503 at once (a few hundred bytes and its two records), which costs far
less than serving it, so the queue drains and the admin listener keeps answering. One late tick
or one full queue alone is a stall or a burst, and sheds nothing.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from proxy.config import Limits
from proxy.core.hosts import IPAddress
from proxy.core.identity import Workload, WorkloadKind
from proxy.errors import Overloaded, TooManyRequests
from proxy.metrics import ACCEPT_QUEUE_FILL, EVENT_LOOP_LAG, SHED_CONNECTIONS

# How often LoadMeter's tick runs: finer sees a backlog sooner, each tick costs a wake-up.
LOAD_TICK_SECONDS = 0.05

# struct tcp_info (linux/tcp.h) up to tcpi_sacked: for a listening socket tcpi_unacked is the
# accept queue's length and tcpi_sacked its limit (the listen backlog, capped by somaxconn).
_TCP_INFO_QUEUE = struct.Struct("=24xII")

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


class ListeningSocket(Protocol):
    """A listening socket as the event loop's server hands it out (asyncio's TransportSocket,
    uvloop's pseudo-socket, or the socket itself): options can be read."""

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def accept_queue(sock: ListeningSocket) -> tuple[int, int] | None:
    """(connections waiting to be accepted, the queue's limit) of a listening TCP socket, or
    None where the kernel does not say (not Linux, not TCP)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_QUEUE.size)
    except (OSError, AttributeError):
        return None
    if len(raw) < _TCP_INFO_QUEUE.size:
        return None
    queued, limit = _TCP_INFO_QUEUE.unpack_from(raw)
    return (queued, limit) if limit else None


class LoadMeter:
    """How far behind this process runs, measured every tick: how late the tick ran (the event
    loop's lag, seconds) and how full the fullest watched accept queue is (a fraction). Each
    reading is the smaller of the last two ticks: a backlog shows tick after tick, while one
    late tick alone is a single stall (a long callback, or the process stopped or descheduled
    for a while) and one full queue alone is a burst the next turn of the loop accepts."""

    def __init__(self, *, tick: float = LOAD_TICK_SECONDS) -> None:
        self._tick = tick
        self._lags = (0.0, 0.0)
        self._fills = (0.0, 0.0)
        self._listeners: list[ListeningSocket] = []

    def watch(self, sockets: Iterable[ListeningSocket]) -> None:
        """Also read these listening sockets' accept queues."""
        self._listeners.extend(sockets)

    def lag(self) -> float:
        return min(self._lags)

    def accept_queue_fill(self) -> float:
        return min(self._fills)

    async def run(self) -> None:
        """Tick until cancelled."""
        while True:
            due = time.monotonic() + self._tick
            await asyncio.sleep(self._tick)
            late = max(0.0, time.monotonic() - due)
            fill = 0.0
            for sock in self._listeners:
                queue = accept_queue(sock)
                if queue is not None:
                    fill = max(fill, queue[0] / queue[1])
            self._lags = (self._lags[1], late)
            self._fills = (self._fills[1], fill)
            EVENT_LOOP_LAG.set(late)
            ACCEPT_QUEUE_FILL.set(fill)


class Admission:
    """Counts what is open and refuses what is over a limit. One per listener."""

    def __init__(
        self,
        limits: Limits,
        *,
        clock: Callable[[], float] = time.monotonic,
        lag: Callable[[], float] = lambda: 0.0,
        accept_queue_fill: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._lag = lag
        self._accept_queue_fill = accept_queue_fill
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

    def overloaded(self) -> Overloaded | None:
        """The refusal for a new connection while the process is behind, else None."""
        limits = self._limits
        lag = self._lag()
        if limits.shed_loop_lag and lag > limits.shed_loop_lag:
            SHED_CONNECTIONS.labels(signal="loop_lag").inc()
            return Overloaded(
                f"the proxy is overloaded (event loop {lag * 1000:.0f} ms behind); retry shortly"
            )
        fill = self._accept_queue_fill()
        if limits.shed_accept_queue and fill >= limits.shed_accept_queue:
            SHED_CONNECTIONS.labels(signal="accept_queue").inc()
            return Overloaded(
                f"the proxy is overloaded (its accept queue {fill:.0%} full); retry shortly"
            )
        return None

    def check_connection(self, source: IPAddress, key: str) -> None:
        """Raise Overloaded while the process is behind, TooManyRequests if the connection
        just opened is over a limit."""
        refusal = self.overloaded()
        if refusal is not None:
            raise refusal
        limits = self._limits
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
