"""An upgraded connection (WebSocket and other `Upgrade`s): both ways after a `101`.

The HTTP relay (proxy.dataplane.http_relay) has forwarded the request, decided like any other,
and seen the upstream's `101 Switching Protocols` to the protocol the request offered
(proxy.core.http1.check_switch), and sent that 101 on. From then on the bytes are the new
protocol's, which the proxy does not parse: the two peers are joined as a tunnel's are
(proxy.dataplane.peer.splice), under the tunnel's idle timeout, until both sides close.

The exchange's record names the protocol (`outgate.upgrade`) and counts every byte relayed after
the switch. Nothing after the 101 is inspected: a rule that must see every request excludes the
upgrade's method or path (docs/policy-reference.md).
"""

from __future__ import annotations

from proxy.audit import Exchange
from proxy.config import Timeouts
from proxy.dataplane.exchange_log import ExchangeLog
from proxy.dataplane.peer import Peer, splice
from proxy.errors import Reason


class UpgradeRelay:
    """Drives an upgraded connection from its 101 to the end of both sides."""

    def __init__(self, *, timeouts: Timeouts, log: ExchangeLog) -> None:
        self._timeouts = timeouts
        self._log = log

    async def run(self, client: Peer, upstream: Peer, ex: Exchange, *, protocol: str) -> Reason:
        """Relay both ways until both close (COMPLETED) or neither sends for the idle timeout
        (IDLE_TIMEOUT); adds the bytes to `ex`. The caller writes the close record."""
        ex.upgrade = protocol.lower()
        # Bytes already read past the request or the 101 are relayed first, and counted here.
        client_base = client.bytes_in - len(client.buffer)
        upstream_base = upstream.bytes_in - len(upstream.buffer)
        self._log.relay_started("upgrade")
        try:
            return await splice(client, upstream, idle=self._timeouts.idle)
        finally:
            ex.source_bytes += client.bytes_in - client_base
            ex.destination_bytes += upstream.bytes_in - upstream_base
            self._log.relay_ended("upgrade")
