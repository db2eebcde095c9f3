"""Owns one request's or tunnel's record from start to close (DESIGN section 1, step 7).

For every exchange, whatever path it takes, exactly one decision record and one close record
(proxy.audit), and with them:

  - the refusal reply: one renderer (proxy.dataplane.responses.render_error) for every error a
    client can see, naming the workload, the destination and the event id;
  - the close reason, by one rule (`settle_reason`): a reason set on a peer by whoever closed it
    on purpose (drain, a deleted source pod, a stalled reader) wins over what the relay saw;
  - byte accounting: the wire bytes of an exchange are counted in `outgate_bytes_total` once.
    A request inside a tunnel (interception, `protocol: http`) keeps its own byte counts in its
    record, but the metric counts its tunnel's bytes only, which already hold them;
  - the per-exchange metrics: decisions, shadow differences, guard refusals, open relays;
  - the live traffic aggregate (proxy.traffic: the admin page and the per-destination metrics),
    fed beside the decision and the close record, so it counts exactly what they record.
"""

from __future__ import annotations

import functools

import structlog

from proxy import metrics
from proxy.audit import AuditSink, Exchange
from proxy.core.hosts import IPAddress
from proxy.core.identity import IdentityLookup
from proxy.core.upstreams import DIRECT
from proxy.dataplane.dialer import Upstream
from proxy.dataplane.peer import Peer
from proxy.dataplane.proxy_header import ClientSource
from proxy.dataplane.responses import render_error
from proxy.dataplane.router import Route
from proxy.errors import OutgateError, Reason, UpstreamProxyRefused
from proxy.traffic import TrafficAggregate

log = structlog.get_logger(__name__)


def refusal_for(caught: Exception, ex: Exchange) -> OutgateError:
    """What to answer for an exception raised while an exchange is decided: an OutgateError as
    it is. Any other is a defect of the proxy: it is logged with its traceback and refused as
    500 `internal_error`, so the exchange still gets its two records and nothing is let
    through (fail closed)."""
    if isinstance(caught, OutgateError):
        return caught
    log.error("exchange_failed", event_id=ex.id, exc_info=caught)
    return OutgateError(
        f"internal error ({type(caught).__name__}); the proxy log names event {ex.id}"
    )


# Address text is memoised: a kept-alive client names the same few addresses on every request,
# and the ipaddress module formats in Python (microseconds a call).
@functools.lru_cache(maxsize=4096)
def ip_text(ip: IPAddress) -> str:
    return str(ip)


def settle_reason(reason: Reason, *peers: Peer) -> Reason:
    """The close reason of an exchange: the first of `peers` closed on purpose says why;
    otherwise what the relay saw."""
    for peer in peers:
        if peer.close_reason is not None:
            return peer.close_reason
    return reason


class ExchangeLog:
    """Creates exchanges and writes everything about them: records, replies, metrics."""

    def __init__(
        self,
        *,
        audit: AuditSink,
        identity: IdentityLookup,
        traffic: TrafficAggregate | None = None,
    ) -> None:
        self._audit = audit
        self._identity = identity
        self.traffic = traffic if traffic is not None else TrafficAggregate()

    # -- start --------------------------------------------------------------------------------
    def open(self, source: ClientSource, kind: str = "forward") -> Exchange:
        peer = source.peer_ip
        return Exchange(
            kind=kind,
            source_ip=ip_text(source.ip),
            source_port=source.port,
            workload=self._identity.lookup(source.ip),
            proxy_peer_ip=None if peer is None else ip_text(peer),
            proxy_peer_port=source.peer_port,
            proxy_protocol=source.proxy_protocol,
        )

    def open_inner(self, tunnel: Exchange, *, tls: bool) -> Exchange:
        """A request inside `tunnel`: same source, workload, destination and decision."""
        return Exchange(
            kind="intercept" if tls else "tunnel_http",
            source_ip=tunnel.source_ip,
            source_port=tunnel.source_port,
            workload=tunnel.workload,
            destination_domain=tunnel.destination_domain,
            destination_ip=tunnel.destination_ip,
            destination_port=tunnel.destination_port,
            server_name=tunnel.server_name,
            decision=tunnel.decision,
            tunnel_id=tunnel.id,
            upstream=tunnel.upstream,
            upstream_proxy=tunnel.upstream_proxy,
            upstream_resolve=tunnel.upstream_resolve,
            proxy_peer_ip=tunnel.proxy_peer_ip,
            proxy_peer_port=tunnel.proxy_peer_port,
            proxy_protocol=tunnel.proxy_protocol,
            user_name=tunnel.user_name,
        )

    # -- decision -----------------------------------------------------------------------------
    def routed(self, ex: Exchange, route: Route) -> None:
        """Take the router's answer: log what the guard dropped, and, when something may be
        dialled, write the allow record (a refusal's record is written by `refuse`)."""
        ex.decision = route.deciding
        for check in route.dropped:
            metrics.GUARD_REFUSALS.labels(address_class=str(check.guarded)).inc()
            log.warning(
                "guarded_address_dropped",
                host=route.host.name,
                address=ip_text(check.ip),
                address_class=str(check.guarded),
                event_id=ex.id,
            )
        if route.via is not None:
            ex.upstream = route.via
            if route.via != DIRECT:
                ex.upstream_resolve = "parent" if route.parent_resolves else "local"
        if route.allowed:
            if route.permitted and ex.upstream_resolve is None:
                # The close record has the one used. Via a parent, the parent chooses.
                ex.destination_ip = ip_text(route.permitted[0])
            self.allowed(ex)

    def dialled(self, ex: Exchange, upstream: Upstream) -> None:
        """Where the exchange went: the address connected to, or the parent proxy used."""
        if upstream.ip is not None:
            ex.destination_ip = ip_text(upstream.ip)
        if upstream.proxy is not None:
            ex.upstream_proxy = upstream.proxy

    def allowed(self, ex: Exchange) -> None:
        """The decision record for an exchange that goes ahead (`ex.decision` allows it)."""
        ex.decided = True
        self._record_decision(ex)

    def _record_decision(self, ex: Exchange) -> None:
        decision = ex.decision
        allowed = ex.decided and ex.status is None
        reason = ex.reason if ex.reason is not None else (decision.reason if decision else None)
        ex.reason = reason
        namespace = ex.workload.namespace
        metrics.DECISIONS.labels(
            action="allow" if allowed else "deny", reason=str(reason), namespace=namespace
        ).inc()
        if decision is not None and decision.shadow is not None:
            metrics.SHADOW_DIFFERENCES.labels(
                shadow_action=str(decision.shadow.action), namespace=namespace
            ).inc()
        self._audit.decision(ex)
        self.traffic.decided(ex, allowed=allowed)

    # -- refusals -----------------------------------------------------------------------------
    def refuse(
        self,
        client: Peer,
        ex: Exchange,
        error: OutgateError,
        *,
        keep_alive: bool,
        linger: float = 0.0,
    ) -> None:
        """Answer `error` with its decision record (unless the exchange was already decided)
        and its close record; close the client connection unless `keep_alive`. With `linger`,
        the connection is ended by Peer.finish (a FIN now, the close when the client closes or
        `linger` seconds later) for a reply sent before the request was read."""
        ex.status = error.status
        if isinstance(error, UpstreamProxyRefused):
            ex.upstream_proxy, ex.upstream_status = error.proxy, error.parent_status
        if not ex.decided:
            ex.reason = error.reason
            self._record_decision(ex)
        self._write_close(ex, error.reason)
        client.write(self.reply(ex, error, keep_alive=keep_alive))
        if keep_alive:
            return
        if linger:
            client.finish(linger)
        else:
            client.close()

    def drop(self, client: Peer, ex: Exchange, error: OutgateError) -> None:
        """`refuse` for a listener that has no HTTP to answer in (transparent TLS, port maps):
        the same records (the status is the one an HTTP client would have had, so the
        decision record reads as a refusal), then the connection is closed, no reply."""
        ex.status = error.status
        reason = settle_reason(error.reason, client)  # e.g. `drained`: closed on purpose
        if not ex.decided:
            ex.reason = reason
            self._record_decision(ex)
        self._write_close(ex, reason)
        client.close()

    def reply(self, ex: Exchange, error: OutgateError, *, keep_alive: bool) -> bytes:
        """The reply for `error`, naming this exchange's workload, destination and event id
        (also for a failure after the exchange was allowed, before a response head went out)."""
        destination = ex.destination_domain or ex.destination_ip or "-"
        if ex.destination_port is not None:
            destination = f"{destination}:{ex.destination_port}"
        return render_error(
            error,
            event_id=ex.id,
            workload=ex.workload.describe(),
            destination=destination,
            keep_alive=keep_alive,
        )

    # -- relays and close ---------------------------------------------------------------------
    def relay_started(self, kind: str) -> None:
        metrics.ACTIVE_CONNECTIONS.labels(kind=kind).inc()

    def relay_ended(self, kind: str) -> None:
        metrics.ACTIVE_CONNECTIONS.labels(kind=kind).dec()

    def close(self, ex: Exchange, reason: Reason, *peers: Peer) -> Reason:
        """Write the close record once, with the reason `settle_reason` picks; count the bytes.
        Returns the reason written."""
        reason = settle_reason(reason, *peers)
        if not ex.closed and ex.tunnel_id is None:
            if ex.source_bytes:  # most requests carry no body: skip the no-op update
                metrics.BYTES.labels(direction="egress").inc(ex.source_bytes)
            metrics.BYTES.labels(direction="ingress").inc(ex.destination_bytes)
        self._write_close(ex, reason)
        return reason

    def _write_close(self, ex: Exchange, reason: Reason) -> None:
        """The close record, once (a second call writes nothing), and the aggregate with it."""
        if not ex.closed:
            self.traffic.closed(ex, reason)
        self._audit.close(ex, reason)
