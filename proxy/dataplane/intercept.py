"""Requests inside a tunnel: TLS interception for rules with `inspect`, and `http` tunnels.

Interception, in order (DESIGN section 1, "intercept"):

  1. Before the CONNECT is answered, open TLS to the address the guard approved, verifying the
     chain and the name against the system trust store plus `tls.upstreamCABundle`. A failure is
     the CONNECT's answer (502, `upstream_cert_invalid`): no certificate is ever minted for an
     origin whose own certificate did not verify.
  2. After the 200 and the ClientHello checks (proxy.dataplane.tunnel), terminate the client's
     TLS with a leaf for exactly the CONNECT host (proxy.tls.certs), ALPN http/1.1. If that
     handshake fails (the client does not trust the CA, or breaks off), the connection closes:
     nothing is ever relayed uninspected.
  3. Each request inside is read and parsed by the core parser, checked (Host -> 421, the rule's
     methods and paths -> 403, DLP -> 403), decided and audited on its own (one decision and one
     close record, `outgate.tunnel_id` naming the tunnel), and forwarded with the same relay that
     forwards absolute-form requests (proxy.dataplane.http_relay). A later request that needs a
     new upstream connection gets it from the Dialer, pinned to the tunnel's address.

A `protocol: http` tunnel runs step 3 over the plain sockets: every request's Host must name the
CONNECT host, and, with `inspect`, the rule's checks apply as well.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import structlog

from proxy import metrics
from proxy.audit import Exchange
from proxy.config import Settings
from proxy.core.hosts import Host
from proxy.core.http1 import RequestHead
from proxy.core.inspection import (
    check_authority,
    parse_inner_request,
    render_inner_request,
    request_line_hint,
)
from proxy.dataplane.dialer import Dialer, Upstream
from proxy.dataplane.exchange_log import ExchangeLog
from proxy.dataplane.http_relay import (
    HttpRelay,
    UpstreamPool,
    keeps_connection_after_refusal,
    read_request_head,
)
from proxy.dataplane.inspector import RequestInspector
from proxy.dataplane.peer import Peer
from proxy.dataplane.router import Route, Router
from proxy.dataplane.tlspeer import TLSPeer
from proxy.errors import (
    BadGateway,
    ConfigError,
    ConfigIssue,
    GatewayTimeout,
    OutgateError,
    Reason,
)
from proxy.tls.certs import ALPN_PROTOCOLS, CertCache

log = structlog.get_logger(__name__)


def upstream_context(bundle: str | None) -> ssl.SSLContext:
    """Verification for re-originated TLS: system trust store plus `tls.upstreamCABundle`,
    hostname checked, TLS 1.2+, ALPN http/1.1 (the inner requests are HTTP/1.1)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if bundle is not None:
        try:
            context.load_verify_locations(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                [
                    ConfigIssue(
                        file="<config>",
                        document=None,
                        path="tls.upstreamCABundle",
                        message=f"cannot load CA certificates from {bundle}: {exc}",
                        fix="point it at a PEM file of CA certificates",
                    )
                ]
            ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    return context


class Interceptor:
    """Per-proxy interception state: the leaf cache, upstream trust, DLP configuration."""

    def __init__(
        self,
        *,
        settings: Settings,
        certs: CertCache | None,
        router: Router,
        dialer: Dialer,
        log: ExchangeLog,
        relay: HttpRelay,
        inspector: RequestInspector,
    ) -> None:
        self._settings = settings
        self._router = router
        self._dialer = dialer
        self._log = log
        self._relay = relay
        self._inspector = inspector
        self._certs = certs
        self._upstream_tls = upstream_context(settings.tls_upstream_ca_bundle)

    # -- upstream -------------------------------------------------------------------------------
    async def open_upstream(self, upstream: Peer, connect: Host) -> TLSPeer:
        """TLS to the already connected upstream, verified for `connect`; OutgateError if not."""
        if self._certs is None:
            raise BadGateway(
                "this destination is inspected, but interception is not configured "
                "(tls.caCert and tls.caKey)",
                reason=Reason.INTERCEPT_HANDSHAKE_FAILED,
            )
        tls = TLSPeer(upstream, self._upstream_tls, server_side=False, server_hostname=connect.name)
        try:
            async with asyncio.timeout(self._settings.timeouts.connect):
                await tls.handshake()
        except ssl.SSLCertVerificationError as exc:
            tls.abort()
            metrics.INTERCEPT_HANDSHAKE_FAILURES.labels(side="upstream").inc()
            raise BadGateway(
                f"the upstream certificate did not verify: {exc.verify_message}",
                reason=Reason.UPSTREAM_CERT_INVALID,
            ) from None
        except TimeoutError:
            tls.abort()
            metrics.INTERCEPT_HANDSHAKE_FAILURES.labels(side="upstream").inc()
            raise GatewayTimeout("upstream TLS handshake timed out") from None
        except (ssl.SSLError, ConnectionError) as exc:
            tls.abort()
            metrics.INTERCEPT_HANDSHAKE_FAILURES.labels(side="upstream").inc()
            raise BadGateway(
                f"upstream TLS handshake failed: {exc}", reason=Reason.INTERCEPT_HANDSHAKE_FAILED
            ) from None
        return tls

    async def _dial_again(self, route: Route, *, tls: bool) -> Upstream:
        """A new upstream for a later request, to the tunnel's (pinned) address."""
        upstream = await self._dialer.dial(route, tunnel=True)
        if not tls:
            return upstream
        try:
            peer = await self.open_upstream(upstream.peer, route.host)
        except OutgateError:
            upstream.peer.close()
            raise
        return dataclasses.replace(upstream, peer=peer)

    # -- client ---------------------------------------------------------------------------------
    async def terminate_client(self, client: Peer, connect: Host, tunnel: Exchange) -> TLSPeer:
        """Answer the client's (already checked, still buffered) ClientHello with a leaf for
        `connect`. Raises OutgateError(INTERCEPT_HANDSHAKE_FAILED); the caller closes."""
        assert self._certs is not None
        try:
            leaf = await self._certs.leaf_for(connect)
        except Exception as exc:  # a mint failure must close the tunnel, never splice it
            log.error("leaf_mint_failed", host=connect.name, error=repr(exc), event_id=tunnel.id)
            raise BadGateway(
                "could not mint a certificate", reason=Reason.INTERCEPT_HANDSHAKE_FAILED
            ) from None
        tls = TLSPeer(client, leaf.context, server_side=True)
        try:
            async with asyncio.timeout(self._settings.timeouts.sni_peek):
                await tls.handshake()
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            metrics.INTERCEPT_HANDSHAKE_FAILURES.labels(side="client").inc()
            log.info(
                "intercept_handshake_failed",
                side="client",
                error=str(exc) or type(exc).__name__,
                host=connect.name,
                event_id=tunnel.id,
            )
            tls.abort()
            raise BadGateway(
                "client TLS handshake failed", reason=Reason.INTERCEPT_HANDSHAKE_FAILED
            ) from None
        return tls

    # -- requests -------------------------------------------------------------------------------
    async def serve_requests(
        self,
        client: Peer,
        upstream: Upstream,
        tunnel: Exchange,
        *,
        route: Route,
        tls: bool,
    ) -> Reason:
        """Read, check, decide and forward each request until the client connection ends: the
        rule's `inspect` checks are those of the route's (current) decision. Returns the
        tunnel's close reason."""
        connect, port = route.host, route.port
        pinned = route.pinned(upstream.ip)
        pool = UpstreamPool()
        current: Upstream | None = upstream
        scheme = "https" if tls else "http"
        timeouts = self._settings.timeouts
        try:
            while True:
                ex = self._log.open_inner(tunnel, tls=tls)
                try:
                    # Before each request (the first too) the client may think: the idle timeout.
                    head = await read_request_head(
                        client,
                        idle=timeouts.idle,
                        header=timeouts.header,
                        max_head_bytes=self._settings.limits.max_header_bytes,
                    )
                except OutgateError as exc:
                    self._log.refuse(client, ex, exc, keep_alive=False)
                    return exc.reason
                if head is None:
                    return client.close_reason or Reason.COMPLETED
                req: RequestHead | None = None
                ex.method, ex.path = request_line_hint(head)
                try:
                    inner = parse_inner_request(head, connect=connect, port=port)
                    req = inner.head
                    ex.method, ex.path = req.method, req.path
                    check_authority(inner, connect=connect, port=port)
                    # Decided again when the policy changed since the tunnel opened, for the
                    # tunnel's own address: a reload applies to the next request, not the next
                    # tunnel.
                    pinned = self._router.recheck(pinned)
                    ex.decision = pinned.deciding
                    refusal = pinned.refusal()
                    if refusal is not None:
                        raise refusal
                    inspect = pinned.decision.inspect
                    if inspect is not None:
                        self._inspector.check(req, inspect, ex, connect)
                    self._log.allowed(ex)  # a dial failure below is this allowed request's 502
                    if current is None:
                        current = pool.take(pinned) or await self._dial_again(pinned, tls=tls)
                except OutgateError as exc:
                    keep = keeps_connection_after_refusal(req)
                    self._log.refuse(client, ex, exc, keep_alive=keep)
                    if not keep:
                        return exc.reason
                    continue
                rendered = render_inner_request(inner, scheme=scheme)
                upstream_now, current = current, None
                if not await self._relay.forward(
                    client, upstream_now, ex, req, pool, head=rendered
                ):
                    return client.close_reason or Reason.COMPLETED
        finally:
            pool.close()
            if current is not None:
                current.peer.close()
