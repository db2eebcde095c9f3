"""What every listener does with the client connections it accepts, in one place: the accepted
peer that announces itself, the peer's address, the connections held per source (so a source
pod that leaves has them closed), and the wait for room in the audit output.

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


async def wait_for_audit_room(audit: AuditSink) -> None:
    """Audit backpressure: serve nothing new until the records waiting are written."""
    if audit.congested:
        drained = asyncio.Event()
        audit.call_when_drained(drained.set)
        await drained.wait()
