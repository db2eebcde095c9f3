"""The transparent listeners (issue 13): for workloads that ignore HTTP_PROXY, whose traffic is
steered here by DNS or by iptables REDIRECT (docs/transparent-mode.md).

Three kinds, each named in the audit record's `outgate.connection` and in metrics:

  transparent-tls   the first bytes must be a TLS ClientHello (read like a tunnel's, bounded by
                    `timeouts.sniPeek`); its SNI is the destination and is required: no SNI, an
                    IP-literal SNI or ECH is refused and closed (proxy.core.tunnel_protocols
                    `sni_destination`); plain HTTP sent there gets a 403 first. The port is the
                    original destination's when the kernel reports one (SO_ORIGINAL_DST after a
                    REDIRECT), else `transparent.tlsPort`.
  transparent-http  origin-form requests (absolute form too) routed by their Host; every request
                    on a kept-alive connection is decided again, and checked by its rule's
                    `inspect`. The port: the target's or the Host field's when it names one,
                    else the original destination's, else `transparent.httpPort`. A refusal is
                    the proxy listener's 403; an https:// target is a 400.
  port-map          every connection goes to one fixed `to` (HOST:PORT), decided for the source
                    workload against it; the rule's `protocol` check applies.

Then each is a CONNECT or an absolute-form request by another door: the same Router decides,
resolves, decides per address and guards (a forged SNI or Host can only reach the addresses the
proxy resolved for that name, never the address the client dialled), the same Dialer dials, and
the same relays check and move bytes (TunnelRelay with no 200; HttpRelay). A refusal on a
listener with no HTTP to answer in closes the connection; its records are the same as ever
(`ExchangeLog.drop`).

The source is the proxy listener's too: the socket peer, or the client a trusted balancer's
PROXY header names. A source in `auth.basic.sources` is refused (`auth_required`): it is
identified by a login, which a transparent client cannot send.

Admission (caps, rates, tunnels per workload) is counted for these listeners together, apart
from the proxy listener's. Shutdown (`drain`) is the proxy listener's: a connection idle
between requests (HTTP) is closed at once, a fresh one that has sent nothing after a grace
(clients.WaitingConnections), busy ones get the drain timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from proxy import metrics
from proxy.audit import AuditSink, Exchange
from proxy.config import Settings, Transparent
from proxy.core.hosts import Host, IPAddress, parse_ip_address, split_authority
from proxy.core.http1 import RequestForm, RequestHead, parse_request_head
from proxy.core.identity import WorkloadKind
from proxy.core.policy.model import TunnelProtocol
from proxy.core.tunnel_protocols import sni_destination, starts_http_request
from proxy.dataplane.clients import (
    AcceptedPeer,
    ClientConnections,
    WaitingConnections,
    peer_address,
    wait_for_audit_room,
)
from proxy.dataplane.dialer import Dialer
from proxy.dataplane.exchange_log import ExchangeLog, refusal_for
from proxy.dataplane.http_relay import (
    HttpRelay,
    UpstreamPool,
    keeps_connection_after_refusal,
    read_request_head,
)
from proxy.dataplane.inspector import RequestInspector
from proxy.dataplane.limits import Admission, LoadMeter, workload_key
from proxy.dataplane.peer import Peer
from proxy.dataplane.proxy_auth import LoginScope
from proxy.dataplane.proxy_header import ClientSource, ProxyHeaderAdmission
from proxy.dataplane.router import Router
from proxy.dataplane.tunnel import TunnelRelay, read_first_bytes, record_violation
from proxy.errors import (
    AdmissionRefused,
    BadRequest,
    OutgateError,
    PolicyDenied,
    Reason,
    ServiceUnavailable,
    TunnelViolation,
)
from proxy.tasks import TaskSet

# Kernel accept queue, as the proxy listener's (proxy.dataplane.server.LISTEN_BACKLOG).
LISTEN_BACKLOG: Final = 1024

# linux/netfilter_ipv4.h SO_ORIGINAL_DST and linux/netfilter_ipv6/ip6_tables.h
# IP6T_SO_ORIGINAL_DST (both 80): the destination a connection had before a NAT rule
# (iptables REDIRECT/DNAT) changed it, as a sockaddr_in / sockaddr_in6.
SO_ORIGINAL_DST: Final = 80
SOCKADDR_IN_BYTES: Final = 16
SOCKADDR_IN6_BYTES: Final = 28


class ListenerKind(StrEnum):
    """`outgate.connection` of a transparent listener's records; a metric label too."""

    TLS = "transparent-tls"
    HTTP = "transparent-http"
    PORT_MAP = "port-map"


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    """One transparent listener: its kind, where it listens and where its traffic goes."""

    kind: ListenerKind
    host: str  # address to bind
    bind_port: int
    # The destination port when the kernel reports no original destination (TLS, HTTP), or the
    # fixed destination's port (port map).
    port: int
    to: Host | None = None  # port map: the fixed destination

    @property
    def name(self) -> str:
        where = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind} {where}:{self.bind_port}"


def transparent_listeners(config: Transparent) -> tuple[Listener, ...]:
    """The listeners `transparent` configures, in a fixed order (TLS, HTTP, port maps)."""
    found: list[Listener] = []
    if config.tls is not None:
        found.append(
            Listener(
                kind=ListenerKind.TLS,
                host=config.tls.host,
                bind_port=config.tls.port,
                port=config.tls_port,
            )
        )
    if config.http is not None:
        found.append(
            Listener(
                kind=ListenerKind.HTTP,
                host=config.http.host,
                bind_port=config.http.port,
                port=config.http_port,
            )
        )
    for mapping in config.ports:
        found.append(
            Listener(
                kind=ListenerKind.PORT_MAP,
                host=mapping.listen.host,
                bind_port=mapping.listen.port,
                port=mapping.port,
                to=mapping.host,
            )
        )
    return tuple(found)


def original_destination(sock: socket.socket) -> tuple[IPAddress, int] | None:
    """Where the client meant to connect before a NAT rule sent it here, when the kernel knows
    (connection tracking) and it differs from this socket's own address; else None."""
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_BYTES)
            ip: IPAddress = parse_ip_address(socket.inet_ntop(socket.AF_INET, raw[4:8]))
        elif sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, SOCKADDR_IN6_BYTES)
            ip = parse_ip_address(socket.inet_ntop(socket.AF_INET6, raw[8:24]))
        else:
            return None
        port = int.from_bytes(raw[2:4], "big")
        local = sock.getsockname()
    except (OSError, ValueError):  # no conntrack entry, no netfilter: not redirected
        return None
    if port == local[1] and ip == parse_ip_address(str(local[0]).split("%")[0]):
        return None  # reached directly (DNS steering): conntrack reports the socket itself
    return ip, port


def origin_form_port(req: RequestHead, fallback: int) -> int:
    """The destination port of a request on the HTTP listener: an absolute-form target's or a
    Host field's when it names one, else `fallback` (the original destination's port, else
    `transparent.httpPort`)."""
    if req.scheme is not None:
        return req.port
    try:
        split_authority(req.header("host") or "", default_port=None)
    except OutgateError:
        return fallback  # the Host field names no port
    return req.port


class TransparentServer:
    """Owns the transparent listeners and every connection they accepted."""

    def __init__(
        self,
        *,
        settings: Settings,
        router: Router,
        dialer: Dialer,
        log: ExchangeLog,
        relay: HttpRelay,
        tunnels: TunnelRelay,
        inspector: RequestInspector,
        proxy_header: ProxyHeaderAdmission,
        login: LoginScope | None,
        audit: AuditSink,
        is_ready: Callable[[], bool],
        load: LoadMeter,
    ) -> None:
        self._settings = settings
        self._router = router
        self._dialer = dialer
        self._log = log
        self._relay = relay
        self._tunnels = tunnels
        self._inspector = inspector
        self._proxy_header = proxy_header
        self._login = login
        self._audit = audit
        self._is_ready = is_ready
        self._tasks = TaskSet()
        self._servers: list[asyncio.AbstractServer] = []
        # The proxy listener's server runs the meter's tick (the loop is the same).
        self._load = load
        self._admission = Admission(
            settings.limits, lag=load.lag, accept_queue_fill=load.accept_queue_fill
        )
        self._clients = ClientConnections()
        self._waiting = WaitingConnections()  # for a request or a hello: drain closes them
        self._draining = False

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(
        self, bound: Sequence[tuple[Listener, socket.socket]]
    ) -> list[tuple[Listener, tuple[str, int]]]:
        """Serve each listener on its bound socket; returns where each listens."""
        loop = asyncio.get_running_loop()
        serving: list[tuple[Listener, tuple[str, int]]] = []
        for listener, sock in bound:
            on_accept = functools.partial(self._on_accept, listener)
            server = await loop.create_server(
                lambda accept=on_accept: AcceptedPeer(accept),  # type: ignore[misc]
                sock=sock,
                backlog=LISTEN_BACKLOG,
            )
            self._servers.append(server)
            self._load.watch([sock])
            name = sock.getsockname()
            serving.append((listener, (str(name[0]), int(name[1]))))
        return serving

    def stop_accepting(self) -> None:
        for server in self._servers:
            server.close()

    async def drain(self, timeout: float) -> None:
        """As the proxy listener's: stop accepting, close idle connections, let busy ones
        finish for up to `timeout`, cancel the rest (close records say `drained`)."""
        self.stop_accepting()
        self._draining = True
        self._relay.closing = True
        self._waiting.close_all(Reason.DRAINED)  # a TLS client that sent nothing is recorded
        if not await self._tasks.wait(timeout):
            await self._tasks.cancel_all()
        for server in self._servers:
            await server.wait_closed()

    def close_connections_from(self, source: IPAddress, reason: Reason) -> int:
        """Close every connection from `source` now (its pod left); records carry `reason`."""
        return self._clients.close_from(source, reason)

    # -- accept -------------------------------------------------------------------------------
    def _on_accept(self, listener: Listener, client: Peer) -> None:
        transport = client.transport
        assert transport is not None
        peer_ip, peer_port = peer_address(client)
        original = None
        if listener.kind is not ListenerKind.PORT_MAP:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                original = original_destination(sock)
        metrics.CONNECTIONS_ACCEPTED.inc()
        metrics.TRANSPARENT_CONNECTIONS.labels(listener=str(listener.kind)).inc()
        self._tasks.spawn(
            self._admit(listener, client, peer_ip, peer_port, original),
            name=f"{listener.kind} client {peer_ip}:{peer_port}",
        )

    async def _admit(
        self,
        listener: Listener,
        client: Peer,
        peer_ip: IPAddress,
        peer_port: int,
        original: tuple[IPAddress, int] | None,
    ) -> None:
        """The source, as on the proxy listener: the socket peer, or the client a trusted load
        balancer names in a PROXY header (`proxyProtocol.trustedCIDRs`) read before anything."""
        try:
            source = await self._proxy_header.admit(client, peer_ip, peer_port)
        except OutgateError as error:
            ex = self._log.open(ClientSource(ip=peer_ip, port=peer_port), str(listener.kind))
            if listener.kind is ListenerKind.HTTP:
                self._log.refuse(client, ex, error, keep_alive=False)
            else:
                self._log.drop(client, ex, error)
            return
        if source is None:  # closed before sending anything (a health check)
            client.close()
            return
        await self._serve(listener, client, source, original)

    async def _serve(
        self,
        listener: Listener,
        client: Peer,
        source: ClientSource,
        original: tuple[IPAddress, int] | None,
    ) -> None:
        src_ip = source.ip
        self._admission.connection_opened(src_ip)
        self._clients.add(src_ip, client)
        metrics.ACTIVE_CONNECTIONS.labels(kind=str(listener.kind)).inc()
        try:
            await wait_for_audit_room(self._audit)
            ex = self._log.open(source, str(listener.kind))
            try:
                self._admission.check_connection(src_ip, workload_key(ex.workload, src_ip))
            except AdmissionRefused as exc:
                if listener.kind is ListenerKind.HTTP:
                    self._log.refuse(client, ex, exc, keep_alive=False)
                else:
                    self._log.drop(client, ex, exc)
                return
            port = original[1] if original is not None else listener.port
            if listener.kind is ListenerKind.TLS:
                await self._serve_tls(client, ex, src_ip, port)
            elif listener.kind is ListenerKind.HTTP:
                await self._serve_http(client, ex, source, port)
            else:
                assert listener.to is not None
                await self._tunnel(client, ex, src_ip, listener.to, listener.port)
        finally:
            client.close()
            self._admission.connection_closed(src_ip)
            self._clients.discard(src_ip, client)
            metrics.ACTIVE_CONNECTIONS.labels(kind=str(listener.kind)).dec()

    def _check_ready(self, ex: Exchange) -> None:
        if not self._is_ready():
            raise ServiceUnavailable("the proxy is not ready: policy or identity not loaded")
        if ex.workload.kind is WorkloadKind.AMBIGUOUS:
            raise PolicyDenied(
                "two live pods claim this source address", reason=Reason.AMBIGUOUS_SOURCE
            )
        login = self._login
        if login is not None and login.applies(parse_ip_address(ex.source_ip), ex.workload):
            # Fail closed: this source is identified by its login (auth.basic), and a client
            # that does not know it talks to a proxy cannot send credentials.
            raise PolicyDenied(
                "this source must log in to the proxy (auth.basic.sources), which a transparent "
                "listener cannot ask for: use the proxy listener with credentials",
                reason=Reason.AUTH_REQUIRED,
            )

    # -- TLS by SNI, and port maps: a tunnel without a CONNECT ----------------------------------
    async def _serve_tls(self, client: Peer, ex: Exchange, src_ip: IPAddress, port: int) -> None:
        idle = not client.buffer
        if idle:
            self._waiting.add(client, fresh=True)
        try:
            hello = await read_first_bytes(
                client, protocol=TunnelProtocol.TLS, timeouts=self._settings.timeouts
            )
            assert hello is not None  # the TLS check returns its hello
            ex.server_name, ex.ech, ex.alpn = hello.server_name, hello.encrypted, hello.alpn
            host = sni_destination(hello)
        except TunnelViolation as exc:
            ex.destination_port = port
            record_violation(ex, client, exc)
            if exc.reason is Reason.PROTOCOL_MISMATCH and starts_http_request(client.buffer):
                # Plain HTTP sent to the TLS port: the client reads an answer, as in a tunnel.
                refusal = PolicyDenied(
                    "this is the transparent TLS listener, and the client sent a plain HTTP "
                    "request: plain HTTP goes to the transparent HTTP listener (port 80)",
                    reason=Reason.PROTOCOL_MISMATCH,
                )
                self._log.refuse(client, ex, refusal, keep_alive=False)
            else:
                self._log.drop(client, ex, exc)
            return
        finally:
            if idle:
                self._waiting.discard(client)
        await self._tunnel(client, ex, src_ip, host, port)

    async def _tunnel(
        self, client: Peer, ex: Exchange, src_ip: IPAddress, host: Host, port: int
    ) -> None:
        """Decide, route and dial `host:port` like a CONNECT to it, then the tunnel relay's
        checks (the rule's `protocol`, SNI, `inspect`) and splice, with no 200."""
        if host.ip is None:
            ex.destination_domain = host.name
        else:
            ex.destination_ip = host.name
        ex.destination_port = port
        held: str | None = None
        try:
            self._check_ready(ex)
            key = workload_key(ex.workload, src_ip)
            self._admission.open_tunnel(key)
            held = key
            route = await self._router.route(ex.workload, host, port)
            self._log.routed(ex, route)
            refusal = route.refusal()
            if refusal is not None:
                raise refusal
            upstream = await self._dialer.dial(route, tunnel=True)
        except Exception as caught:
            if held is not None:
                self._admission.close_tunnel(held)
            self._log.drop(client, ex, refusal_for(caught, ex))
            return
        try:
            await self._tunnels.run(client, upstream, ex, route, announce=False)
        finally:
            self._admission.close_tunnel(held)

    # -- plain HTTP by Host -------------------------------------------------------------------
    async def _serve_http(
        self, client: Peer, first_ex: Exchange, source: ClientSource, port: int
    ) -> None:
        """The proxy listener's request loop, in origin form: every request decided again."""
        timeouts = self._settings.timeouts
        pool = UpstreamPool()
        first = True
        try:
            while first or not self._draining:  # a fresh connection's request is served
                idle = not client.buffer
                if idle:
                    self._waiting.add(client, fresh=first)
                try:
                    head = await read_request_head(
                        client,
                        idle=None if first else timeouts.idle,
                        header=timeouts.header,
                        max_head_bytes=self._settings.limits.max_header_bytes,
                    )
                except OutgateError as error:
                    ex = first_ex if first else self._log.open(source, first_ex.kind)
                    self._log.refuse(client, ex, error, keep_alive=False)
                    return
                finally:
                    if idle:
                        self._waiting.discard(client)
                if head is None:
                    return
                ex = first_ex if first else self._log.open(source, first_ex.kind)
                first = False
                if not await self._handle_request(client, ex, head, port, pool):
                    return
        finally:
            pool.close()

    async def _handle_request(
        self, client: Peer, ex: Exchange, head: bytes, port: int, pool: UpstreamPool
    ) -> bool:
        """Serve one request; True when the client connection may carry another."""
        req: RequestHead | None = None
        try:
            req = parse_request_head(head, form=RequestForm.ORIGIN, authority=None)
            ex.method, ex.path = req.method, req.path
            if req.scheme == "https":
                # This listener speaks plain HTTP; the request would leave in plaintext.
                raise BadRequest(
                    "an https:// target on the plain-HTTP listener: send HTTPS to the TLS one",
                    reason=Reason.UNSUPPORTED_SCHEME,
                )
            if req.host.ip is None:
                ex.destination_domain = req.host.name
            else:
                ex.destination_ip = req.host.name
            port = origin_form_port(req, port)
            ex.destination_port = port
            self._check_ready(ex)
            route = await self._router.route(ex.workload, req.host, port)
            inspect = route.decision.inspect
            if inspect is not None and route.permitted:
                # As on the proxy listener: the rule's checks apply to a plain request as to
                # one inside a tunnel; a refusal is this request's decision.
                ex.decision = route.deciding
                self._inspector.check(req, inspect, ex, req.host)
            self._log.routed(ex, route)
            refusal = route.refusal()
            if refusal is not None:
                raise refusal
            upstream = pool.take(route)
            if upstream is None:
                upstream = await self._dialer.dial(route, tunnel=False)
        except Exception as caught:
            exc = refusal_for(caught, ex)
            keep = exc is caught and not self._draining and keeps_connection_after_refusal(req)
            self._log.refuse(client, ex, exc, keep_alive=keep)
            return keep
        if req.port != port:
            # The Host field named no port: the destination's is the original one.
            req = _with_port(req, port)
        return await self._relay.forward(client, upstream, ex, req, pool)


def _with_port(req: RequestHead, port: int) -> RequestHead:
    return dataclasses.replace(req, port=port)
