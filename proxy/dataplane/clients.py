"""What every listener does with the client connections it accepts, in one place: the accepted
peer that announces itself, the peer's address, the connections held per source (so a source
pod that leaves has them closed), the connections waiting for a request (what a drain closes),
and the wait for room in the audit output.

Shared by the proxy listener (proxy.dataplane.server) and the transparent listeners
(proxy.dataplane.transparent).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from proxy.audit import AuditSink
from proxy.core.hosts import IPAddress, parse_ip_address, unmap_ipv4
from proxy.dataplane.peer import Peer
from proxy.errors import Reason


class AcceptedPeer(Peer):
    """A client socket that hands itself to its listener once connected."""

    def __init__(self, on_accept: Callable[[Peer], None]) -> None:
        super().__init__()
        self._on_accept = on_accept

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._on_accept(self)


# Address parsing is memoised: clients come from the same few addresses, and the ipaddress
# module parses in Python (microseconds a call).
@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> IPAddress:
    return parse_ip_address(text)


def peer_address(client: Peer) -> tuple[IPAddress, int]:
    """The socket peer's address (IPv4-mapped IPv6 unwrapped, zone dropped) and port."""
    assert client.transport is not None
    peername = client.transport.get_extra_info("peername")
    return unmap_ipv4(_parse_ip(str(peername[0]).split("%")[0])), int(peername[1])


class ClientConnections:
    """The open client connections of one listener's server, by source address."""

    def __init__(self) -> None:
        self._by_source: dict[IPAddress, set[Peer]] = {}

    def add(self, source: IPAddress, client: Peer) -> None:
        self._by_source.setdefault(source, set()).add(client)

    def discard(self, source: IPAddress, client: Peer) -> None:
        clients = self._by_source.get(source)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self._by_source[source]

    def close_from(self, source: IPAddress, reason: Reason) -> int:
        """Close every connection from `source` now (its pod left the index: the IP may be
        handed to another workload). Close records carry `reason`. Returns how many."""
        peers = list(self._by_source.get(unmap_ipv4(source), ()))
        for peer in peers:
            peer.close_reason = reason
            peer.abort()
        return len(peers)


# A connection accepted just before a drain began may have its first request on the way: it gets
# this long for its first bytes before the drain closes it (docs/operations.md, "Draining").
FIRST_BYTES_GRACE = 1.0


class WaitingConnections:
    """One listener's connections waiting for a request (or a TLS hello) with nothing of it read
    yet: what a drain may close without cutting an exchange short.

    On `close_all`, a connection kept alive between requests is closed at once: its client
    knows that race and retries (RFC 9112 section 9.3.1). A fresh connection, accepted before
    the listener closed, gets FIRST_BYTES_GRACE first: its client has not seen a response on
    it, and may have sent its request already, so closing it would lose that request. Either is
    left alone when bytes have begun to arrive: it is serving a request now."""

    def __init__(self) -> None:
        self._between: set[Peer] = set()
        self._fresh: set[Peer] = set()
        self._closing = False
        self._reason: Reason | None = None

    def add(self, client: Peer, *, fresh: bool) -> None:
        if fresh:
            self._fresh.add(client)
            if self._closing:  # its task began after the drain did
                self._close_later(client)
        else:
            self._between.add(client)

    def discard(self, client: Peer) -> None:
        self._fresh.discard(client)
        self._between.discard(client)

    def close_all(self, reason: Reason | None = None) -> None:
        """The drain: close what waits, as the class says; close records carry `reason`."""
        self._closing, self._reason = True, reason
        for client in list(self._between):
            self._close_if_silent(client)
        for client in self._fresh:
            self._close_later(client)

    def _close_later(self, client: Peer) -> None:
        asyncio.get_running_loop().call_later(FIRST_BYTES_GRACE, self._close_if_silent, client)

    def _close_if_silent(self, client: Peer) -> None:
        if client.buffer or (client not in self._fresh and client not in self._between):
            return
        if self._reason is not None:
            client.close_reason = self._reason
        client.close()


async def wait_for_audit_room(audit: AuditSink) -> None:
    """Audit backpressure: serve nothing new until the records waiting are written."""
    if audit.congested:
        drained = asyncio.Event()
        audit.call_when_drained(drained.set)
        await drained.wait()
