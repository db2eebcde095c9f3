"""Admission limits: global and per-source connection caps, a per-workload rate of new
connections (token bucket), and a per-workload cap on open tunnels.

Plain bookkeeping with an injected clock, so the arithmetic is tested without sockets; the
listener asks `admit` per accepted connection and `open_tunnel` per CONNECT. A refusal is a
TooManyRequests (429 with Retry-After). Admin and health endpoints live on another listener
and never pass through here.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import Limits
from proxy.core.hosts import IPAddress
from proxy.core.identity import Workload, WorkloadKind
from proxy.errors import TooManyRequests

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


class Admission:
    """Counts what is open and refuses what is over a limit. One per listener."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
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
        """Raise TooManyRequests if the connection just opened is over a limit."""
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
