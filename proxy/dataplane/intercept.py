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
     close record, `outgate.tunnel_id` naming the tunnel), and forwarded with the same code that
     forwards absolute-form requests (ProxyServer._forward).

A `protocol: http` tunnel runs step 3 over the plain sockets: every request's Host must name the
CONNECT host, and, with `inspect`, the rule's checks apply as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import TYPE_CHECKING

import structlog

from proxy import metrics
from proxy.audit import Exchange
from proxy.config import Settings
from proxy.core.dlp import DlpConfig, merge_credential_hosts, scan_request
from proxy.core.hosts import Host, parse_ip_address
from proxy.core.http1 import BodyFraming, RequestHead
from proxy.core.inspection import (
    check_authority,
    check_inspect,
    parse_inner_request,
    render_inner_request,
    request_line_hint,
)
from proxy.core.policy.model import Inspect
from proxy.dataplane.peer import Peer
from proxy.dataplane.tlspeer import TLSPeer
from proxy.errors import (
    BadGateway,
    ConfigError,
    ConfigIssue,
    GatewayTimeout,
    HeaderTimeout,
    OutgateError,
    PolicyDenied,
    Reason,
)
from proxy.tls.certs import ALPN_PROTOCOLS, CertCache

if TYPE_CHECKING:
    from proxy.dataplane.server import ProxyServer, _KeptUpstream

log = structlog.get_logger(__name__)

# What the audit record shows instead of a URL part in which a DLP detector fired.
REDACTED = "[redacted:dlp]"


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

    def __init__(self, server: ProxyServer, settings: Settings, certs: CertCache | None) -> None:
        self._server = server
        self._settings = settings
        self._certs = certs
        self._upstream_tls = upstream_context(settings.tls_upstream_ca_bundle)
        self._dlp = DlpConfig(
            custom=settings.dlp_custom,
            credential_hosts=merge_credential_hosts(settings.dlp_credential_hosts),
        )

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

    async def _dial_again(self, ex: Exchange, connect: Host, port: int, *, tls: bool) -> Peer:
        """A new upstream for a later request, to the same approved address."""
        assert ex.destination_ip is not None
        peer = await self._server._dial(ex, [parse_ip_address(ex.destination_ip)], port)
        if not tls:
            return peer
        try:
            return await self.open_upstream(peer, connect)
        except OutgateError:
            peer.close()
            raise

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
        upstream: Peer,
        tunnel: Exchange,
        *,
        connect: Host,
        port: int,
        inspect: Inspect | None,
        tls: bool,
    ) -> Reason:
        """Read, check, decide and forward each request until the client connection ends.
        Returns the tunnel's close reason."""
        kept: list[_KeptUpstream] = []
        current: Peer | None = upstream
        scheme = "https" if tls else "http"
        try:
            while True:
                ex = self._inner_exchange(tunnel, tls=tls)
                try:
                    head = await self._read_head(client)
                except OutgateError as exc:
                    self._server._refuse(client, ex, exc, keep_alive=False)
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
                    if inspect is not None:
                        self._inspect(req, inspect, ex, connect)
                except OutgateError as exc:
                    keep = req is not None and req.keep_alive and req.framing is BodyFraming.NONE
                    self._server._refuse(client, ex, exc, keep_alive=keep)
                    if not keep:
                        return exc.reason
                    continue
                ex.decided = True
                self._server._record_decision(ex)
                if current is None:
                    try:
                        current = kept.pop().peer if kept else None
                        if current is None:
                            current = await self._dial_again(ex, connect, port, tls=tls)
                    except OutgateError as exc:
                        keep = req.keep_alive and req.framing is BodyFraming.NONE
                        self._server._refuse(client, ex, exc, keep_alive=keep)
                        if not keep:
                            return exc.reason
                        continue
                rendered = render_inner_request(inner, scheme=scheme)
                upstream_now, current = current, None
                if not await self._server._forward(
                    client, upstream_now, ex, req, kept, head=rendered
                ):
                    return client.close_reason or Reason.COMPLETED
        finally:
            for up in kept:
                up.peer.close()
            if current is not None:
                current.close()

    def _inner_exchange(self, tunnel: Exchange, *, tls: bool) -> Exchange:
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
        )

    def _inspect(self, req: RequestHead, inspect: Inspect, ex: Exchange, connect: Host) -> None:
        check_inspect(req, inspect)
        hit = scan_request(
            headers=req.headers,
            target=req.path,
            destination=connect.name,
            detectors=inspect.dlp,
            config=self._dlp,
        )
        if hit is not None:
            ex.dlp_detector, ex.dlp_field = hit.detector, hit.field
            # The audit record names the detector and the field, never the secret: a URL that
            # carried one is recorded without the part that did.
            if hit.field == "url.query":
                ex.path = req.path.partition("?")[0] + "?" + REDACTED
            elif hit.field == "url.path":
                ex.path = REDACTED
            metrics.DLP_HITS.labels(detector=hit.detector).inc()
            raise PolicyDenied(
                f"request carries what DLP detector {hit.detector} looks for ({hit.field})",
                reason=Reason.DLP_VIOLATION,
            )

    async def _read_head(self, client: Peer) -> bytes | None:
        """The next request head; None when the client left or idled out between requests."""
        timeouts = self._settings.timeouts
        max_head = self._settings.limits.max_header_bytes
        if not client.buffer:
            # Between requests (and before the first) the client may think: the idle timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeouts.idle):
                    while not client.buffer and not client.eof:
                        await client.wait_data()
            if not client.buffer:
                return None
        deadline = asyncio.get_running_loop().time() + timeouts.header
        try:
            return await client.next_head(max_head_bytes=max_head, deadline=deadline)
        except TimeoutError:
            raise HeaderTimeout("request head not received in time") from None
