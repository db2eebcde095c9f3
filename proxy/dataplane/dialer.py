"""The only code that opens an upstream connection.

A `Dialer` takes a `Route` (proxy.dataplane.router) and returns a connected `Upstream`, or
raises the error a client should see:

  - every permitted address refused the connection, or was unreachable: 502 `upstream_refused`;
  - the connect timeout passed: 504 `upstream_timeout`.

`DirectDialer` connects to exactly the addresses the router permitted, in order, within one
connect deadline for all of them. It is never handed a name, so a second DNS answer cannot
change where it goes (DESIGN section 1, step 5). The dialer via a parent proxy
(proxy.dataplane.upstream) is a second implementation of the same interface, and
`RoutingDialer` picks one of them by the route's `via`.

`tunnel` says what the connection is for: a CONNECT tunnel (or a connection that carries
requests inside one) needs a byte stream to the destination; a plain-HTTP request does not,
and via a parent it is sent to the parent in absolute form instead.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from proxy import metrics
from proxy.core.hosts import IPAddress
from proxy.core.upstreams import DIRECT
from proxy.dataplane.peer import Peer
from proxy.dataplane.router import Route
from proxy.errors import BadGateway, GatewayTimeout, OutgateError, Reason

log = structlog.get_logger(__name__)


class ParentForwarding(Protocol):
    """What the HTTP relay needs of a parent proxy that takes plain-HTTP requests."""

    @property
    def response_timeout(self) -> float: ...

    def authorization(self) -> bytes:
        """The `Proxy-Authorization` field line for the parent (b"" without credentials)."""
        ...

    def give_back(self, upstream: Upstream) -> None:
        """Keep an idle connection to the parent for a later request, any client's."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """A connected upstream and where it goes (what the close record says)."""

    peer: Peer
    # The destination address connected to; None via a parent proxy, which chose it.
    ip: IPAddress | None
    via: str | None = None  # the upstream's name, when connected through a parent proxy
    proxy: str | None = None  # that parent proxy's host:port
    # Set for a plain-HTTP connection to a parent: requests go to it in absolute form.
    forwarding: ParentForwarding | None = None


class Dialer(Protocol):
    async def dial(self, route: Route, *, tunnel: bool) -> Upstream:
        """Connect for an allowed `route`; OutgateError (502/504) when no address answers.
        `tunnel`: a byte stream to the destination is needed (CONNECT), not an HTTP hop."""
        ...

    def close(self) -> None:
        """Close what the dialer keeps between requests (at shutdown, after the drain)."""
        ...


class RoutingDialer:
    """Step 6 of the router, carried out: each route goes out the way its `via` names."""

    def __init__(self, *, direct: Dialer, upstreams: Mapping[str, Dialer]) -> None:
        self._direct = direct
        self._upstreams = upstreams

    def close(self) -> None:
        self._direct.close()
        for dialer in self._upstreams.values():
            dialer.close()

    async def dial(self, route: Route, *, tunnel: bool) -> Upstream:
        via = route.via
        if via is None or via == DIRECT:
            return await self._direct.dial(route, tunnel=tunnel)
        return await self._upstreams[via].dial(route, tunnel=tunnel)


class DirectDialer:
    """Connects straight to the route's permitted addresses."""

    def __init__(self, *, connect_timeout: float) -> None:
        self._timeout = connect_timeout

    def close(self) -> None:
        """Nothing is kept: each client connection keeps its own (proxy.dataplane.http_relay)."""

    async def dial(self, route: Route, *, tunnel: bool) -> Upstream:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        port = route.port
        error: OutgateError = GatewayTimeout("upstream connect timed out")
        for ip in route.permitted:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    _, peer = await loop.create_connection(
                        Peer, host=str(ip), port=port, flags=socket.AI_NUMERICHOST
                    )
            except TimeoutError:
                metrics.UPSTREAM_CONNECT_ERRORS.labels(kind="timeout").inc()
                error = GatewayTimeout(f"connect to {ip} port {port} timed out")
                break
            except ConnectionRefusedError:
                metrics.UPSTREAM_CONNECT_ERRORS.labels(kind="refused").inc()
                error = BadGateway(
                    f"{ip} port {port} refused the connection", reason=Reason.UPSTREAM_REFUSED
                )
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("out_of_file_descriptors", during="upstream connect")
                metrics.UPSTREAM_CONNECT_ERRORS.labels(kind="unreachable").inc()
                error = BadGateway(
                    f"cannot connect to {ip} port {port}: {exc.strerror}",
                    reason=Reason.UPSTREAM_REFUSED,
                )
                continue
            return Upstream(peer=peer, ip=ip)
        raise error
