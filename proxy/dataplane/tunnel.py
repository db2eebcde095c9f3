"""What happens on a CONNECT tunnel once its upstream is connected: 200, check the first
bytes, then splice, or serve the requests inside (proxy.dataplane.intercept).

Order (DESIGN section 1, step 6, and section 3 `protocol`):

  0. For an intercepted rule (`inspect` with `protocol: tls`), TLS to the upstream is opened and
     verified before the 200; a failure is the CONNECT's answer (502).

  1. The upstream is connected (the 200 is only sent after that), but nothing the client sends
     goes to it yet: the client peer stays in buffered mode while `read_first_bytes` feeds the
     rule's protocol check, bounded by `timeouts.sniPeek` (or the idle timeout, if shorter).
  2. For `tls`, the ClientHello's SNI is held to the CONNECT host and the rule's `tls` options
     (proxy.core.tunnel_protocols.check_server_name); for a CONNECT to an IP literal, a present
     SNI is decided by policy as a name of its own.
  3. Only then are the peers spliced (`Splicer.relay`), the buffered first bytes flushed upstream
     first: by the Protocol relay, and from `limits.spliceAfterBytes` on by splice(2) in the
     kernel (proxy.dataplane.kernel_splice), since nothing more of such a tunnel is inspected.

A rule that names no `protocol` takes TLS, or plain HTTP: when the first bytes start an HTTP
request the tunnel is served as a `protocol: http` one (every request parsed, its Host held to
the CONNECT host, decided again). Node's undici and python's websockets tunnel every http:// and
ws:// URL this way. With `inspect` such a rule is TLS only: it is intercepted, and its upstream
TLS is open before the 200.

A failed check raises `TunnelViolation`: `TunnelRelay` closes both sides and audits the reason,
the names involved and the first bytes. Nothing of the client's reached the upstream. When the
refused bytes were an HTTP request, the client is first answered inside the tunnel with a 403
naming the reason (DESIGN section 6), which it prints where it would print a silent close as an
empty reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Final

import structlog

from proxy import metrics
from proxy.audit import Exchange
from proxy.config import Timeouts
from proxy.core.clienthello import ClientHello
from proxy.core.hosts import Host
from proxy.core.policy.engine import Decision, Destination
from proxy.core.policy.model import DEFAULT_TLS, TlsOptions, TunnelProtocol
from proxy.core.tunnel_protocols import (
    FIRST_BYTES_AUDITED,
    SniOutcome,
    TlsCheck,
    TlsOrHttpCheck,
    check_server_name,
    first_bytes_check,
    starts_http_request,
)
from proxy.dataplane.dialer import Upstream
from proxy.dataplane.exchange_log import ExchangeLog
from proxy.dataplane.intercept import Interceptor
from proxy.dataplane.kernel_splice import Splicer
from proxy.dataplane.peer import Peer
from proxy.dataplane.responses import CONNECT_ESTABLISHED
from proxy.dataplane.router import Route, Router
from proxy.errors import OutgateError, PolicyDenied, Reason, TunnelViolation

log = structlog.get_logger(__name__)

# Reasons that count as a tunnel-content violation (outgate_tunnel_violations_total). A client
# that simply leaves, or idles out before sending anything, is not one.
VIOLATIONS: Final = frozenset(
    {
        Reason.SNI_MISSING,
        Reason.SNI_MISMATCH,
        Reason.SNI_IP_LITERAL,
        Reason.SNI_DENIED,
        Reason.ECH_DENIED,
        Reason.CLIENTHELLO_MALFORMED,
        Reason.CLIENTHELLO_TIMEOUT,
        Reason.PROTOCOL_MISMATCH,
    }
)

Decide = Callable[[Destination], Decision]


async def read_first_bytes(
    client: Peer, *, protocol: TunnelProtocol | None, timeouts: Timeouts
) -> ClientHello | None:
    """Wait until the client's first bytes pass `protocol`'s check; the ClientHello for `tls`,
    and for a rule without protocol (None) when the bytes were TLS rather than HTTP.

    The bytes stay in `client.buffer` (they are relayed, or handed to TLS termination, after).
    Raises TunnelViolation: the check's reason, CLIENTHELLO_TIMEOUT (nothing acceptable within
    `timeouts.sniPeek`), IDLE_TIMEOUT (the idle timeout is the shorter and the client sent
    nothing), or CLIENT_CLOSED.
    """
    if protocol is TunnelProtocol.TCP:
        return None
    check = first_bytes_check(protocol)
    limit = min(timeouts.sni_peek, timeouts.idle)
    deadline = asyncio.get_running_loop().time() + limit  # one deadline for every read
    fed = 0
    try:
        while True:
            if len(client.buffer) > fed:
                data = bytes(client.buffer[fed:])
                fed = len(client.buffer)
                if check.feed(data):
                    return check.hello if isinstance(check, TlsCheck | TlsOrHttpCheck) else None
            if client.eof:
                raise TunnelViolation(
                    "the client closed before its first bytes were complete",
                    reason=Reason.CLIENT_CLOSED,
                )
            await client.wait_data(deadline=deadline)
    except TimeoutError:
        if not client.buffer and timeouts.idle < timeouts.sni_peek:
            raise TunnelViolation(
                "nothing sent on the tunnel", reason=Reason.IDLE_TIMEOUT
            ) from None
        raise TunnelViolation(
            f"first bytes not complete within {limit:g}s", reason=Reason.CLIENTHELLO_TIMEOUT
        ) from None


def check_hello(
    hello: ClientHello,
    ex: Exchange,
    *,
    connect: Host,
    port: int,
    tls: TlsOptions | None,
    decide: Decide,
) -> None:
    """Record what the hello asks for on `ex`, then apply the SNI rules (raises on a breach)."""
    ex.server_name = hello.server_name
    ex.ech = hello.encrypted
    ex.alpn = hello.alpn
    verdict = check_server_name(hello, connect=connect, tls=tls or DEFAULT_TLS)
    if verdict.outcome is SniOutcome.CHECK_POLICY and verdict.name is not None:
        decision = decide(Destination(host=Host(name=verdict.name), port=port))
        if not decision.allowed:
            raise TunnelViolation(
                f"the server name is not allowed by policy ({decision.reason})",
                reason=Reason.SNI_DENIED,
            )


def record_violation(ex: Exchange, client: Peer, violation: TunnelViolation) -> None:
    """Audit fields and metric for a refused tunnel: its first bytes (hex), the reason."""
    if client.buffer:
        ex.first_bytes_hex = bytes(client.buffer[:FIRST_BYTES_AUDITED]).hex()
    if violation.reason in VIOLATIONS:
        metrics.TUNNEL_VIOLATIONS.labels(reason=str(violation.reason)).inc()
        log.info(
            "tunnel_refused",
            reason=str(violation.reason),
            detail=violation.message,
            event_id=ex.id,
            destination=ex.destination_domain or ex.destination_ip,
            server_name=ex.server_name,
        )


def plaintext_refusal(protocol: TunnelProtocol | None) -> PolicyDenied:
    """What a client that spoke plain HTTP in a tunnel whose rule forbids it is told."""
    required = protocol if protocol is not None else TunnelProtocol.TLS
    return PolicyDenied(
        f"this tunnel's rule requires protocol {required}, and the client sent a plain HTTP "
        "request; a rule with protocol: http (or none, without inspect) allows it",
        reason=Reason.PROTOCOL_MISMATCH,
    )


class TunnelRelay:
    """Drives a CONNECT tunnel from the 200 to its close record."""

    def __init__(
        self,
        *,
        timeouts: Timeouts,
        router: Router,
        log: ExchangeLog,
        interceptor: Interceptor,
        splicer: Splicer,
    ) -> None:
        self._timeouts = timeouts
        self._router = router
        self._log = log
        self._interceptor = interceptor
        self._splicer = splicer

    async def run(
        self,
        client: Peer,
        upstream: Upstream,
        ex: Exchange,
        route: Route,
        *,
        announce: bool = True,
    ) -> None:
        """Serve the tunnel until it ends; writes its close record (or its refusal).

        `announce=False`: no CONNECT, so no 200 (a transparent listener or a port map,
        proxy.dataplane.transparent); the checks and the splice are the same."""
        self._log.dialled(ex, upstream)
        decision = ex.decision
        inspect = decision.inspect if decision is not None else None
        # None: the rule names no protocol (TLS or HTTP); an intercepted rule is TLS.
        protocol = decision.protocol if decision is not None else None
        if protocol is None and inspect is not None:
            protocol = TunnelProtocol.TLS
        intercept_tls = inspect is not None and protocol is TunnelProtocol.TLS
        raw_upstream = upstream.peer
        inner_upstream: Peer = raw_upstream
        if intercept_tls:
            try:
                inner_upstream = await self._interceptor.open_upstream(raw_upstream, route.host)
            except OutgateError as exc:
                raw_upstream.close()
                self._log.refuse(client, ex, exc, keep_alive=False)
                return
        client_base = client.bytes_in - len(client.buffer)
        if announce:
            client.write(CONNECT_ESTABLISHED)
        self._log.relay_started("tunnel")
        reason = Reason.COMPLETED
        inner: Peer = client
        try:
            hello = await read_first_bytes(client, protocol=protocol, timeouts=self._timeouts)
            if hello is not None:
                workload = ex.workload
                check_hello(
                    hello,
                    ex,
                    connect=route.host,
                    port=route.port,
                    tls=decision.tls if decision is not None else None,
                    decide=lambda dest: self._router.decide(workload, dest),
                )
            if intercept_tls:
                inner = await self._interceptor.terminate_client(client, route.host, ex)
            plain_http = protocol is TunnelProtocol.HTTP or (protocol is None and hello is None)
            if inspect is not None or plain_http:
                reason = await self._interceptor.serve_requests(
                    inner,
                    dataclasses.replace(upstream, peer=inner_upstream),
                    ex,
                    route=route,
                    tls=intercept_tls,
                )
            else:
                # Opaque from here: nothing more of it is read by the proxy.
                idle = self._timeouts.idle
                wait = self._splicer.join(client, raw_upstream)
                ended = await wait.run(client, raw_upstream, idle=idle)
                if ended is None:  # past limits.spliceAfterBytes: worth the kernel's relay
                    ended = await self._splicer.switch(
                        client, raw_upstream, idle=idle, event_id=ex.id
                    )
                reason = ended
        except TunnelViolation as exc:
            reason = exc.reason
            record_violation(ex, client, exc)
            if exc.reason is Reason.PROTOCOL_MISMATCH and starts_http_request(client.buffer):
                client.write(self._log.reply(ex, plaintext_refusal(protocol), keep_alive=False))
        except OutgateError as exc:  # interception could not start: closed, never spliced
            reason = exc.reason
        except asyncio.CancelledError:
            reason = Reason.DRAINED
            raise
        finally:
            inner.close()  # an intercepted session ends with close_notify
            client.close()
            inner_upstream.close()
            raw_upstream.close()
            ex.source_bytes = client.bytes_in - client_base
            ex.destination_bytes = raw_upstream.bytes_in
            self._log.relay_ended("tunnel")
            self._log.close(ex, reason, client)
