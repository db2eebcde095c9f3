"""The proxy listener: accepts client connections and runs each one's request loop.

Per client connection, one task runs this loop (DESIGN section 1); each step names its owner:

  0. the source: the socket peer, or the client a trusted load balancer names in a PROXY
     protocol header (proxy.dataplane.proxy_header);
  1. admission: audit backpressure, connection caps and rates (proxy.dataplane.limits);
  2. read the head under the header deadline (408) and the head limits (414/431), and parse it
     strictly (proxy.core.http1; 400 and close on anything ambiguous);
  3. identify the source from step 0, never from a request header (the exchange log looks it
     up when it opens the exchange); a non-pod source in `auth.basic.sources` authenticates,
     and its user's identity replaces it (proxy.dataplane.proxy_auth; 407 otherwise);
  4. route: decide, resolve, decide per address, guard (proxy.dataplane.router); a deny is a
     403 and the connection stays usable; a forwarded request under a rule with `inspect` is
     checked as one inside a tunnel would be (proxy.dataplane.inspector);
  5. dial exactly what the route permits (proxy.dataplane.dialer), or reuse a kept upstream;
  6. CONNECT: the tunnel relay (proxy.dataplane.tunnel) answers 200 and checks, splices or
     intercepts; absolute-form: the HTTP relay (proxy.dataplane.http_relay) forwards it, then
     the loop reads the next head.

Every request or tunnel leaves exactly one decision record and one close record
(proxy.dataplane.exchange_log).

Shutdown (`drain`), in uvicorn's order: stop accepting; close at once every connection that is
idle between requests, and after a grace a fresh one that has sent nothing (its request may be
on the way; clients.WaitingConnections); let busy ones finish their exchange (then close them)
up to the drain timeout; cancel what is left (close records say `drained`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Final

from proxy import metrics
from proxy.audit import AuditSink, Exchange
from proxy.config import Settings
from proxy.core.hosts import Host, IPAddress
from proxy.core.http1 import UnsupportedScheme, parse_request_head
from proxy.core.identity import WorkloadKind
from proxy.core.inspection import sent_fields
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
from proxy.dataplane.proxy_auth import ProxyAuth
from proxy.dataplane.proxy_header import ClientSource, ProxyHeaderAdmission
from proxy.dataplane.router import Router
from proxy.dataplane.tunnel import TunnelRelay
from proxy.errors import (
    AdmissionRefused,
    OutgateError,
    PolicyDenied,
    Reason,
    ServiceUnavailable,
)
from proxy.tasks import TaskSet

# Kernel accept queue: absorbs bursts of new connections while the loop is busy.
LISTEN_BACKLOG: Final = 1024
# A connection shed at accept: its 503 and a FIN go at once, the socket is closed this much later
# (or when the client closes): its request, never read, would otherwise turn the close into a
# reset that can destroy the 503 in flight.
SHED_LINGER: Final = 1.0


class ProxyServer:
    """Owns the proxy listener and every client connection it accepted."""

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
        audit: AuditSink,
        is_ready: Callable[[], bool],
        proxy_header: ProxyHeaderAdmission,
        load: LoadMeter,
        auth: ProxyAuth | None = None,
    ) -> None:
        self._settings = settings
        self._auth = auth
        self._router = router
        self._dialer = dialer
        self._log = log
        self._relay = relay
        self._tunnels = tunnels
        self._inspector = inspector
        self._audit = audit
        self._is_ready = is_ready
        self._tasks = TaskSet()
        self._server: asyncio.AbstractServer | None = None
        # How far behind the process runs; shared with the transparent listeners
        # (build_data_plane). This server runs its tick while it accepts.
        self._load = load
        self._load_task: asyncio.Task[None] | None = None
        self._admission = Admission(
            settings.limits, lag=load.lag, accept_queue_fill=load.accept_queue_fill
        )
        self._proxy_header = proxy_header
        self._clients = ClientConnections()
        self._waiting = WaitingConnections()  # for a request, nothing of it read: drain closes
        self._draining = False
        self.bound: tuple[str, int] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, *, sock: socket.socket | None = None) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(
                lambda: AcceptedPeer(self._on_accept), sock=sock, backlog=LISTEN_BACKLOG
            )
        else:
            listen = self._settings.listen
            self._server = await loop.create_server(
                lambda: AcceptedPeer(self._on_accept),
                host=listen.host,
                port=listen.port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
        name = self._server.sockets[0].getsockname()
        self.bound = (name[0], name[1])
        self._load.watch(self._server.sockets)
        self._load_task = asyncio.create_task(self._load.run(), name="load meter")
        return self.bound

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._load_task is not None:
            self._load_task.cancel()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, close idle connections now, let busy ones finish their exchange for
        up to `timeout`, then close the rest (close records say `drained`)."""
        self.stop_accepting()
        self._draining = True
        self._relay.closing = True
        self._waiting.close_all()
        if not await self._tasks.wait(timeout):
            await self._tasks.cancel_all()
        self._dialer.close()
        if self._server is not None:
            await self._server.wait_closed()

    def close_connections_from(self, source: IPAddress, reason: Reason) -> int:
        """Close every connection from `source` now; see ClientConnections.close_from."""
        return self._clients.close_from(source, reason)

    # -- accept -------------------------------------------------------------------------------
    def _on_accept(self, client: Peer) -> None:
        peer_ip, peer_port = peer_address(client)
        metrics.CONNECTIONS_ACCEPTED.inc()
        if not self._audit.congested and not self._proxy_header.trusts(peer_ip):
            refusal = self._admission.overloaded()
            if refusal is not None:
                # Behind: refused here, before a task or anything else is made for it, the
                # cheapest answer the proxy has (docs/operations.md, "Overload"). Not while
                # the audit output is behind (its records would pile up: the connection waits
                # for room in the task as any other), nor from a balancer whose PROXY header
                # names the source.
                ex = self._log.open(ClientSource(ip=peer_ip, port=peer_port))
                self._log.refuse(client, ex, refusal, keep_alive=False, linger=SHED_LINGER)
                return
        self._tasks.spawn(
            self._serve_client(client, peer_ip, peer_port), name=f"client {peer_ip}:{peer_port}"
        )

    async def _serve_client(self, client: Peer, peer_ip: IPAddress, peer_port: int) -> None:
        try:
            source = await self._proxy_header.admit(client, peer_ip, peer_port)
        except OutgateError as error:
            ex = self._log.open(ClientSource(ip=peer_ip, port=peer_port))
            self._log.refuse(client, ex, error, keep_alive=False)
            return
        if source is None:
            client.close()
            return
        await self._serve_source(client, source)

    async def _serve_source(self, client: Peer, source: ClientSource) -> None:
        src_ip = source.ip
        self._admission.connection_opened(src_ip)
        self._clients.add(src_ip, client)
        metrics.ACTIVE_CONNECTIONS.labels(kind="client").inc()
        pool = UpstreamPool()
        try:
            await wait_for_audit_room(self._audit)
            if not self._admit_connection(client, source):
                return
            first = True
            while first or not self._draining:  # a fresh connection's request is served
                head = await self._read_head(client, source, first=first)
                if head is None:
                    return
                first = False
                if not await self._handle(client, head, source, pool):
                    return
        finally:
            pool.close()
            client.close()
            self._admission.connection_closed(src_ip)
            self._clients.discard(src_ip, client)
            metrics.ACTIVE_CONNECTIONS.labels(kind="client").dec()

    def _admit_connection(self, client: Peer, source: ClientSource) -> bool:
        """The per-source and per-workload connection limits; a refusal is answered and
        recorded. Its own frame: the exchange made to name the workload is not held by the
        connection's (memory per idle tunnel, bench/README.md)."""
        ex = self._log.open(source)
        try:
            self._admission.check_connection(source.ip, workload_key(ex.workload, source.ip))
        except AdmissionRefused as exc:
            self._log.refuse(client, ex, exc, keep_alive=False)
            return False
        return True

    async def _read_head(self, client: Peer, source: ClientSource, *, first: bool) -> bytes | None:
        """The next request head, or None when the client left (or idled out, or the proxy is
        draining) between requests. A fresh connection's first head is under the header timeout
        from the start; a kept-alive one waits up to the idle timeout for a first byte."""
        timeouts = self._settings.timeouts
        idle = not client.buffer
        if idle:
            self._waiting.add(client, fresh=first)
        try:
            return await read_request_head(
                client,
                idle=None if first else timeouts.idle,
                header=timeouts.header,
                max_head_bytes=self._settings.limits.max_header_bytes,
            )
        except OutgateError as error:
            self._log.refuse(client, self._log.open(source), error, keep_alive=False)
            return None
        finally:
            if idle:
                self._waiting.discard(client)

    # -- one request ---------------------------------------------------------------------------
    async def _handle(
        self, client: Peer, head: bytes, source: ClientSource, pool: UpstreamPool
    ) -> bool:
        """Serve one request; True when the client connection may carry another."""
        ex = self._log.open(source)
        try:
            req = parse_request_head(head)
        except OutgateError as exc:
            if isinstance(exc, UnsupportedScheme):  # the target is refused, but says what it asked
                ex.method, ex.path = exc.method, exc.path
                _name_destination(ex, exc.host, exc.port)
            _, ex.raw_target, ex.host_field, ex.user_agent = sent_fields(head)
            self._log.refuse(client, ex, exc, keep_alive=False)
            return False
        ex.kind = "tunnel" if req.is_connect else "forward"
        ex.method = req.method
        ex.path = None if req.is_connect else req.path
        _name_destination(ex, req.host, req.port)
        held_tunnel: str | None = None
        try:
            if not self._is_ready():
                raise ServiceUnavailable("the proxy is not ready: policy or identity not loaded")
            if self._auth is not None:
                await self._auth.admit(ex, source.ip, req)
            if ex.workload.kind is WorkloadKind.AMBIGUOUS:
                raise PolicyDenied(
                    "two live pods claim this source address", reason=Reason.AMBIGUOUS_SOURCE
                )
            if req.is_connect:
                tunnel_key = workload_key(ex.workload, source.ip)
                self._admission.open_tunnel(tunnel_key)
                held_tunnel = tunnel_key
            route = await self._router.route(ex.workload, req.host, req.port)
            inspect = route.decision.inspect
            if inspect is not None and route.permitted and not req.is_connect:
                # The rule's checks apply to a forwarded request as to one inside a tunnel;
                # a refusal is this request's decision.
                ex.decision = route.deciding
                self._inspector.check(req, inspect, ex, req.host)
            self._log.routed(ex, route)
            refusal = route.refusal()
            if refusal is not None:
                raise refusal
            upstream = None if req.is_connect else pool.take(route)
            if upstream is None:
                upstream = await self._dialer.dial(route, tunnel=req.is_connect)
        except Exception as caught:
            error = refusal_for(caught, ex)
            if held_tunnel is not None:
                self._admission.close_tunnel(held_tunnel)
            keep = error is caught and not self._draining and keeps_connection_after_refusal(req)
            ex.raw_target, ex.user_agent = req.raw_target, req.header("user-agent")
            ex.host_field = req.header("host")
            self._log.refuse(client, ex, error, keep_alive=keep)
            return keep
        if held_tunnel is not None:
            del req  # a tunnel can live for hours: its CONNECT head is not kept
            try:
                await self._tunnels.run(client, upstream, ex, route)
            finally:
                self._admission.close_tunnel(held_tunnel)
            return False
        return await self._relay.forward(client, upstream, ex, req, pool)


def _name_destination(ex: Exchange, host: Host | None, port: int | None) -> None:
    if host is not None:
        if host.ip is None:
            ex.destination_domain = host.name
        else:
            ex.destination_ip = str(host.ip)
    ex.destination_port = port
