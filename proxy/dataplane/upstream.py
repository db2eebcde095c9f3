"""The way out through a parent proxy: the second `Dialer` (proxy.dataplane.dialer).

`ParentDialer` serves one configured upstream (proxy.core.upstreams.UpstreamSpec). The router
has already decided, resolved and guarded the request (or, for `resolve: parent`, decided it by
name and refused guarded IP literals); this code only connects.

  - Proxies are tried in order. A connect failure (refused, unreachable, timed out, TLS to the
    parent failed) counts against that proxy; `failLimit` failures in a row mark it down, and a
    down proxy is skipped for `retryAfter` seconds, then tried again by the next request (Squid's
    `connect-fail-limit` and `dead_peer_timeout`). A proxy that answers, whatever it answers, is
    up. When every proxy is down the request fails at once (502 upstream_proxy_unavailable).
  - Tunnels: `CONNECT host:port` to the parent, with `Proxy-Authorization` when credentials are
    configured. The dialer returns only after the parent's 2xx, so the client's CONNECT is
    answered 200 only then, and the tunnel relay's SNI and protocol checks still run before any
    client byte is sent on. Any other answer is a 502 `upstream_proxy_refused` naming the
    parent's status (the client never sees a parent's 407); no answer within `responseTimeout`
    is a 504 `upstream_proxy_timeout`.
  - Plain HTTP: a connection to the parent that the HTTP relay sends absolute-form requests on.
    An idle one is kept for the next request of any client (`give_back`), as Squid keeps
    persistent connections to its peers: it only ever carries Outgate's own credentials, and it
    is only given back after a complete response with known framing.
  - Credentials come from a file (a mounted Secret), re-read when it changes. They are sent to
    the parent only: never logged, never in a record, a metric or an error body.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
from collections import deque
from dataclasses import dataclass
from typing import Final

import structlog

from proxy import metrics
from proxy.core.http1 import parse_response_head
from proxy.core.upstreams import ProxyAddress, UpstreamSpec
from proxy.dataplane.dialer import Upstream
from proxy.dataplane.peer import Peer
from proxy.dataplane.router import Route
from proxy.errors import (
    BadGateway,
    GatewayTimeout,
    OutgateError,
    Reason,
    UpstreamProxyRefused,
)

log = structlog.get_logger(__name__)

# A parent's answer to CONNECT is a head and nothing else: 16 KiB is far more than any sends.
MAX_PARENT_HEAD_BYTES: Final = 16384
# Idle plain-HTTP connections kept per upstream, and for how long. Squid closes idle client
# connections after 2 minutes (client_idle_pconn_timeout); dropping ours well before that means
# a kept connection is almost never one the parent is closing as we send on it.
POOL_SIZE: Final = 32
POOL_IDLE_SECONDS: Final = 30.0
# The credentials file is looked at (one stat) at most this often.
CREDENTIALS_CHECK_SECONDS: Final = 1.0


class CredentialsFile:
    """`user:password` from the first line of a file, as a `Proxy-Authorization` field line.

    Re-read when the file's inode, size or modification time changes (a Secret update swaps a
    symlink). A file that cannot be read, or holds no `user:password`, keeps the last good value
    and is logged without its content."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._checked = -CREDENTIALS_CHECK_SECONDS
        self._line = b""
        self.refresh()

    def field_line(self) -> bytes:
        now = time.monotonic()
        if now - self._checked >= CREDENTIALS_CHECK_SECONDS:
            self.refresh()
        return self._line

    def refresh(self) -> None:
        self._checked = time.monotonic()
        try:
            info = os.stat(self._path)
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            if stamp == self._stamp:
                return
            with open(self._path, encoding="utf-8") as file:
                first = file.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            log.error("upstream_credentials_unreadable", file=self._path, error=type(exc).__name__)
            return
        user, sep, _ = first.partition(":")
        if not sep or not user:
            log.error(
                "upstream_credentials_invalid",
                file=self._path,
                fix="write user:password on the first line",
            )
            return
        self._stamp = stamp
        token = base64.b64encode(first.encode("utf-8")).decode("ascii")
        self._line = f"Proxy-Authorization: Basic {token}\r\n".encode("ascii")
        log.info("upstream_credentials_loaded", file=self._path)  # never the user or password


@dataclass(slots=True)
class ProxyHealth:
    """Connect failures of one parent proxy and whether it is skipped (clock: `time.monotonic`)."""

    fail_limit: int
    retry_after: float
    failures: int = 0
    down_until: float = 0.0

    def available(self, now: float) -> bool:
        return self.failures < self.fail_limit or now >= self.down_until

    def failed(self, now: float) -> bool:
        """Count a failure; True when it marks the proxy down."""
        self.failures += 1
        if self.failures >= self.fail_limit:
            self.down_until = now + self.retry_after
            return True
        return False

    def succeeded(self) -> None:
        self.failures = 0
        self.down_until = 0.0


class ParentDialer:
    """Connects through one upstream's parent proxies (`Dialer`, and `ParentForwarding` for
    the plain-HTTP connections it hands out)."""

    def __init__(self, spec: UpstreamSpec, *, max_head_bytes: int = MAX_PARENT_HEAD_BYTES) -> None:
        self._spec = spec
        self._max_head = max_head_bytes
        self._health = {
            proxy: ProxyHealth(spec.fail_limit, spec.retry_after) for proxy in spec.proxies
        }
        self._credentials = (
            CredentialsFile(spec.credentials_file) if spec.credentials_file else None
        )
        self._tls = _parent_tls(spec) if any(p.scheme == "https" for p in spec.proxies) else None
        self._idle: deque[tuple[float, Upstream]] = deque()
        for proxy in spec.proxies:
            metrics.UPSTREAM_PROXY_UP.labels(upstream=spec.name, proxy=proxy.label).set(1)

    @property
    def response_timeout(self) -> float:
        return self._spec.response_timeout

    def authorization(self) -> bytes:
        return self._credentials.field_line() if self._credentials is not None else b""

    def give_back(self, upstream: Upstream) -> None:
        now = time.monotonic()
        while self._idle and now - self._idle[0][0] >= POOL_IDLE_SECONDS:
            self._idle.popleft()[1].peer.close()
        if len(self._idle) >= POOL_SIZE:
            upstream.peer.close()
            return
        self._idle.append((now, upstream))

    def close(self) -> None:
        while self._idle:
            self._idle.popleft()[1].peer.close()

    async def dial(self, route: Route, *, tunnel: bool) -> Upstream:
        kind = "tunnel" if tunnel else "forward"
        requests = metrics.UPSTREAM_REQUESTS
        if not tunnel:
            kept = self._take_idle()
            if kept is not None:
                requests.labels(upstream=self._spec.name, kind=kind, result="ok").inc()
                return kept
        try:
            peer, proxy = await self._connect()
            if tunnel:
                await self._open_tunnel(peer, proxy, route)
        except OutgateError as exc:
            requests.labels(upstream=self._spec.name, kind=kind, result=_result(exc)).inc()
            raise
        requests.labels(upstream=self._spec.name, kind=kind, result="ok").inc()
        return Upstream(
            peer=peer,
            ip=None,
            via=self._spec.name,
            proxy=proxy.label,
            forwarding=None if tunnel else self,
        )

    # -- connect with failover ----------------------------------------------------------------
    async def _connect(self) -> tuple[Peer, ProxyAddress]:
        spec = self._spec
        now = time.monotonic()
        candidates = [proxy for proxy in spec.proxies if self._health[proxy].available(now)]
        if not candidates:
            raise BadGateway(
                f"every proxy of upstream {spec.name} is marked down after connect failures",
                reason=Reason.UPSTREAM_PROXY_UNAVAILABLE,
            )
        error: OutgateError | None = None
        loop = asyncio.get_running_loop()
        for proxy in candidates:
            started = loop.time()
            try:
                async with asyncio.timeout(spec.connect_timeout):
                    _, peer = await loop.create_connection(
                        Peer,
                        host=proxy.host,
                        port=proxy.port,
                        ssl=self._tls if proxy.scheme == "https" else None,
                        server_hostname=proxy.host if proxy.scheme == "https" else None,
                        ssl_handshake_timeout=spec.connect_timeout
                        if proxy.scheme == "https"
                        else None,
                    )
            except TimeoutError:
                error = GatewayTimeout(
                    f"connect to parent proxy {proxy.label} of upstream {spec.name} timed out",
                    reason=Reason.UPSTREAM_PROXY_TIMEOUT,
                )
            except (OSError, ssl.SSLError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                error = BadGateway(
                    f"cannot connect to parent proxy {proxy.label} of upstream {spec.name}: "
                    f"{detail or type(exc).__name__}",
                    reason=Reason.UPSTREAM_PROXY_UNAVAILABLE,
                )
            else:
                metrics.UPSTREAM_CONNECT_SECONDS.labels(upstream=spec.name).observe(
                    loop.time() - started
                )
                self._mark_up(proxy)
                return peer, proxy
            self._mark_failed(proxy, error)
        assert error is not None
        raise error

    def _mark_up(self, proxy: ProxyAddress) -> None:
        health = self._health[proxy]
        if health.failures >= health.fail_limit:
            log.info("upstream_proxy_up", upstream=self._spec.name, proxy=proxy.label)
        health.succeeded()
        metrics.UPSTREAM_PROXY_UP.labels(upstream=self._spec.name, proxy=proxy.label).set(1)

    def _mark_failed(self, proxy: ProxyAddress, error: OutgateError) -> None:
        metrics.UPSTREAM_PROXY_FAILURES.labels(upstream=self._spec.name, proxy=proxy.label).inc()
        if self._health[proxy].failed(time.monotonic()):
            metrics.UPSTREAM_PROXY_UP.labels(upstream=self._spec.name, proxy=proxy.label).set(0)
            log.warning(
                "upstream_proxy_down",
                upstream=self._spec.name,
                proxy=proxy.label,
                error=error.message,
                retry_after_seconds=self._spec.retry_after,
            )

    # -- CONNECT ------------------------------------------------------------------------------
    async def _open_tunnel(self, peer: Peer, proxy: ProxyAddress, route: Route) -> None:
        """CONNECT through `peer`; return after the parent's 2xx, else close it and raise."""
        host = route.host
        name = f"[{host.name}]" if host.ip is not None and host.ip.version == 6 else host.name
        authority = f"{name}:{route.port}"
        peer.write(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")
            + self.authorization()
            + b"\r\n"
        )
        deadline = asyncio.get_running_loop().time() + self._spec.response_timeout
        try:
            head = await peer.next_response_head(max_head_bytes=self._max_head, deadline=deadline)
            status = parse_response_head(head, request_method="CONNECT").status
        except TimeoutError:
            peer.close()
            raise GatewayTimeout(
                f"parent proxy {proxy.label} did not answer CONNECT within "
                f"{self._spec.response_timeout:g}s",
                reason=Reason.UPSTREAM_PROXY_TIMEOUT,
            ) from None
        except OutgateError as exc:
            peer.close()
            raise BadGateway(
                f"parent proxy {proxy.label} sent no valid answer to CONNECT: {exc.message}",
                reason=Reason.UPSTREAM_PROXY_REFUSED,
            ) from None
        if not 200 <= status < 300:
            peer.close()
            raise UpstreamProxyRefused(
                f"parent proxy {proxy.label} refused CONNECT {authority} with status {status}",
                proxy=proxy.label,
                parent_status=status,
            )

    # -- kept plain-HTTP connections ----------------------------------------------------------
    def _take_idle(self) -> Upstream | None:
        """The most recently kept connection still usable; stale ones are closed."""
        now = time.monotonic()
        while self._idle:
            since, upstream = self._idle.pop()
            peer = upstream.peer
            if now - since < POOL_IDLE_SECONDS and not peer.eof and not peer.buffer:
                return upstream
            peer.close()
        return None


def _parent_tls(spec: UpstreamSpec) -> ssl.SSLContext:
    """TLS to an https:// parent: its `caBundle`, or the system trust store; full verification."""
    context = ssl.create_default_context(cafile=spec.ca_bundle)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _result(error: OutgateError) -> str:
    """outgate_upstream_requests_total's `result` for a failed dial."""
    if error.reason is Reason.UPSTREAM_PROXY_REFUSED:
        return "refused"
    if error.reason is Reason.UPSTREAM_PROXY_TIMEOUT:
        return "timeout"
    return "unavailable"
