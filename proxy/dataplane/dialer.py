"""The only code that opens an upstream connection.

A `Dialer` takes a `Route` (proxy.dataplane.router) and returns a connected `Upstream`, or
raises the error a client should see:

  - every permitted address refused the connection, or was unreachable: 502 `upstream_refused`;
  - the connect timeout passed: 504 `upstream_timeout`.

`DirectDialer` connects to exactly the addresses the router permitted, in order, within one
connect deadline for all of them. It is never handed a name, so a second DNS answer cannot
change where it goes (DESIGN section 1, step 5). A dialer that goes via an upstream proxy is a
second implementation of the same interface.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass
from typing import Protocol

import structlog

from proxy import metrics
from proxy.core.hosts import IPAddress
from proxy.dataplane.peer import Peer
from proxy.dataplane.router import Route
from proxy.errors import BadGateway, GatewayTimeout, OutgateError, Reason

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Upstream:
    """A connected upstream and the address it is connected to (the close record's)."""

    peer: Peer
    ip: IPAddress


class Dialer(Protocol):
    async def dial(self, route: Route) -> Upstream:
        """Connect for an allowed `route`; OutgateError (502/504) when no address answers."""
        ...


class DirectDialer:
    """Connects straight to the route's permitted addresses."""

    def __init__(self, *, connect_timeout: float) -> None:
        self._timeout = connect_timeout

    async def dial(self, route: Route) -> Upstream:
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
