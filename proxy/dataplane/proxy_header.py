"""Who a client connection is from: its socket peer, or the client a trusted load balancer names
in a PROXY protocol header (DESIGN section 1, step 1; the parser is proxy.core.proxy_protocol).

The listener asks `ProxyHeaderAdmission.admit` once per accepted connection, before anything else
is read. The rules:

  1. A peer outside `proxyProtocol.trustedCIDRs` is its own source, and nothing is read here: a
     PROXY header it sends is then the start of its request, which the request parser refuses
     (400), as it would without this feature.
  2. From a trusted peer the header is required. A balancer configured to send it always does,
     so a connection without one is a misconfiguration (or someone else on the balancer's
     network) and is refused (400 proxy_protocol_missing) rather than served as the balancer.
  3. The header must be complete within `timeouts.header` (408 proxy_protocol_timeout, then
     close), and well formed (400 proxy_protocol_invalid, then close). A connection that closes
     before sending a byte is a TCP health check: it leaves no record, as an empty connection
     never has.
  4. PROXY with an address: that address is the source (identity, limits, records); the peer
     is kept for the record (`outgate.proxy_protocol.peer`). LOCAL (v2) and UNKNOWN (v1) name no
     client: the balancer's own checks; the peer is the source.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.core.hosts import IPAddress, unmap_ipv4
from proxy.core.identity import CidrTable
from proxy.core.proxy_protocol import parse_proxy_header, starts_like_proxy_header
from proxy.dataplane.peer import Peer
from proxy.errors import BadRequest, HeaderTimeout, Reason

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSource:
    """The client of a connection, and the balancer that relayed it when a PROXY header did."""

    ip: IPAddress
    port: int
    peer_ip: IPAddress | None = None  # the balancer, when a PROXY header was read
    peer_port: int | None = None
    proxy_protocol: int | None = None  # the header's version (1 or 2)


class ProxyHeaderAdmission:
    """Reads the PROXY header of connections from trusted peers; see the module's rules."""

    def __init__(self, *, trusted: Iterable[IPNetwork], timeout: float) -> None:
        self._trusted: CidrTable[bool] = CidrTable()
        self._any = False
        for network in trusted:
            self._trusted.setdefault(network, True)
            self._any = True
        self._timeout = timeout

    def trusts(self, peer: IPAddress) -> bool:
        return self._any and next(self._trusted.containing(peer), False)

    async def admit(self, client: Peer, peer_ip: IPAddress, peer_port: int) -> ClientSource | None:
        """The connection's source; None when it closed before sending anything. Raises
        BadRequest or HeaderTimeout (the caller answers and records them)."""
        if not self.trusts(peer_ip):
            return ClientSource(ip=peer_ip, port=peer_port)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            while True:
                buffer = client.buffer
                if buffer and not starts_like_proxy_header(buffer):
                    raise BadRequest(
                        "this peer is a trusted load balancer: a PROXY protocol header must "
                        "come first",
                        reason=Reason.PROXY_PROTOCOL_MISSING,
                    )
                header = parse_proxy_header(buffer)
                if header is not None:
                    break
                if client.eof:
                    if not buffer:
                        return None
                    raise BadRequest(
                        "connection closed inside the PROXY protocol header",
                        reason=Reason.PROXY_PROTOCOL_INVALID,
                    )
                await client.wait_data(deadline=deadline)
        except TimeoutError:
            raise HeaderTimeout(
                f"PROXY protocol header not received within {self._timeout:g}s",
                reason=Reason.PROXY_PROTOCOL_TIMEOUT,
            ) from None
        client.take(header.length)
        if header.source is None:  # LOCAL / UNKNOWN: the balancer speaks for itself
            ip, port = peer_ip, peer_port
        else:
            ip, port = unmap_ipv4(header.source[0]), header.source[1]
        return ClientSource(
            ip=ip,
            port=port,
            peer_ip=peer_ip,
            peer_port=peer_port,
            proxy_protocol=header.version,
        )
