"""The proxy listener: reads each request head, decides it, then tunnels or forwards.

Per client connection, one task runs this loop (DESIGN section 1):

  1. read the head under the header deadline (408) and the head limits (414/431);
  2. parse it strictly (400 and close on anything ambiguous);
  3. identify the source from the socket peer, never from a header;
  4. decide by policy; a deny is a 403 and the connection stays usable;
  5. resolve the name (only now, after an allow), decide again per address, pass the guard;
  6. dial exactly the addresses that passed, in order, within the connect timeout;
  7. CONNECT: answer 200 only once the upstream is connected, then splice both sockets;
     absolute-form: rewrite to origin-form and stream both bodies, then read the next head.

Every request or tunnel leaves exactly one decision record and one close record.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import socket
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from proxy import metrics
from proxy.audit import AuditSink, Exchange
from proxy.config import Settings
from proxy.control.policy_source import PolicyStore
from proxy.control.resolver import Resolver
from proxy.core.addresses import AddressGuard
from proxy.core.hosts import IPAddress, parse_ip_address, unmap_ipv4
from proxy.core.http1 import (
    LAST_CHUNK,
    BodyFraming,
    ChunkedDecoder,
    RequestHead,
    encode_chunk,
    find_head_end,
    parse_request_head,
    parse_response_head,
    render_request_head,
    render_response_head,
)
from proxy.core.identity import IdentityLookup, Workload, WorkloadKind
from proxy.core.policy.engine import Decision, Destination, Engine
from proxy.core.policy.model import TunnelProtocol
from proxy.dataplane.intercept import Interceptor
from proxy.dataplane.limits import Admission, workload_key
from proxy.dataplane.peer import Peer
from proxy.dataplane.responses import CONNECT_ESTABLISHED, render_error
from proxy.dataplane.tunnel import check_hello, read_first_bytes, record_violation, splice
from proxy.errors import (
    BadGateway,
    GatewayTimeout,
    HeaderTimeout,
    OutgateError,
    PolicyDenied,
    Reason,
    ServiceUnavailable,
    TooManyRequests,
    TunnelViolation,
)
from proxy.tasks import TaskSet
from proxy.tls.certs import CertCache

log = structlog.get_logger(__name__)

# Bytes moved per read when relaying a framed body: matches the peer's read-buffer limit.
RELAY_CHUNK_BYTES = 256 * 1024
# Kernel accept queue: absorbs bursts of new connections while the loop is busy.
LISTEN_BACKLOG = 1024
# Routes remembered (ProxyServer._routes): a kept-alive client asks the same question on every
# request. An entry is a few hundred bytes; the memo is emptied when full.
ROUTE_MEMO_SIZE = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class _Route:
    """What deciding, resolving and guarding gave one (workload, destination). Valid while the
    engine, the workload and the resolver's answer are these same objects (a policy reload, an
    informer update or a new DNS answer replaces them)."""

    engine: Engine
    workload: Workload
    addresses: tuple[IPAddress, ...]
    decision: Decision
    permitted: tuple[IPAddress, ...]
    first_ip_text: str


@dataclass(slots=True)
class _KeptUpstream:
    """The upstream connection a client connection keeps alive between forwarded requests."""

    host: str
    port: int
    ip: IPAddress
    peer: Peer


class _ClientPeer(Peer):
    def __init__(self, server: ProxyServer) -> None:
        super().__init__()
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server._on_accept(self)


class ProxyServer:
    """Owns the proxy listener and every client connection it accepted."""

    def __init__(
        self,
        *,
        settings: Settings,
        policy: PolicyStore,
        identity: IdentityLookup,
        resolver: Resolver,
        guard: AddressGuard,
        audit: AuditSink,
        is_ready: Callable[[], bool],
        certs: CertCache | None = None,
    ) -> None:
        self._settings = settings
        self._policy = policy
        self._identity = identity
        self._resolver = resolver
        self._guard = guard
        self._audit = audit
        self._is_ready = is_ready
        self._interceptor = Interceptor(self, settings, certs)
        self._tasks = TaskSet()
        self._server: asyncio.AbstractServer | None = None
        self._admission = Admission(settings.limits)
        self._clients: dict[IPAddress, set[Peer]] = {}
        self._routes: dict[tuple[int, str, bool, int], _Route] = {}
        self.bound: tuple[str, int] | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self, *, sock: socket.socket | None = None) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._server = await loop.create_server(
                lambda: _ClientPeer(self), sock=sock, backlog=LISTEN_BACKLOG
            )
        else:
            listen = self._settings.listen
            self._server = await loop.create_server(
                lambda: _ClientPeer(self),
                host=listen.host,
                port=listen.port,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
        name = self._server.sockets[0].getsockname()
        self.bound = (name[0], name[1])
        return self.bound

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> None:
        """Let open connections finish for up to `timeout`, then close the rest (close records
        say `drained`)."""
        self.stop_accepting()
        if not await self._tasks.wait(timeout):
            await self._tasks.cancel_all()
        if self._server is not None:
            await self._server.wait_closed()

    def close_connections_from(self, source: IPAddress, reason: Reason) -> int:
        """Close every connection from `source` now (its pod left the index: the IP may be
        handed to another workload). Close records carry `reason`. Returns how many."""
        peers = list(self._clients.get(unmap_ipv4(source), ()))
        for peer in peers:
            peer.close_reason = reason
            peer.abort()
        return len(peers)

    # -- accept -------------------------------------------------------------------------------
    def _on_accept(self, client: Peer) -> None:
        assert client.transport is not None
        peername = client.transport.get_extra_info("peername")
        src_ip = unmap_ipv4(_parse_ip(peername[0].split("%")[0]))
        src_port = int(peername[1])
        metrics.CONNECTIONS_ACCEPTED.inc()
        self._tasks.spawn(
            self._serve_client(client, src_ip, src_port), name=f"client {src_ip}:{src_port}"
        )

    async def _serve_client(self, client: Peer, src_ip: IPAddress, src_port: int) -> None:
        self._admission.connection_opened(src_ip)
        self._clients.setdefault(src_ip, set()).add(client)
        metrics.ACTIVE_CONNECTIONS.labels(kind="client").inc()
        kept: list[_KeptUpstream] = []
        try:
            if self._audit.congested:
                # Audit backpressure: serve nothing new until the records are written.
                drained = asyncio.Event()
                self._audit.call_when_drained(drained.set)
                await drained.wait()
            try:
                ex = self._exchange(src_ip, src_port)
                self._admission.check_connection(src_ip, workload_key(ex.workload, src_ip))
            except TooManyRequests as exc:
                self._refuse(client, ex, exc, keep_alive=False)
                return
            first = True
            while True:
                head = await self._read_head(client, src_ip, src_port, first=first)
                if head is None:
                    return
                first = False
                if not await self._handle(client, head, src_ip, src_port, kept):
                    return
        finally:
            for up in kept:
                up.peer.close()
            client.close()
            self._admission.connection_closed(src_ip)
            clients = self._clients.get(src_ip)
            if clients is not None:
                clients.discard(client)
                if not clients:
                    del self._clients[src_ip]
            metrics.ACTIVE_CONNECTIONS.labels(kind="client").dec()

    def _exchange(self, src_ip: IPAddress, src_port: int, kind: str = "forward") -> Exchange:
        return Exchange(
            kind=kind,
            source_ip=_ip_text(src_ip),
            source_port=src_port,
            workload=self._identity.lookup(src_ip),
        )

    # -- request head -------------------------------------------------------------------------
    async def _read_head(
        self, client: Peer, src_ip: IPAddress, src_port: int, *, first: bool
    ) -> bytes | None:
        """The next request head, or None when the client left (or idled out) between requests.

        Between kept-alive requests the wait for a first byte is the idle timeout; once any byte
        of a head has arrived (or on a fresh connection) the whole head must arrive within the
        header timeout, else 408.
        """
        timeouts = self._settings.timeouts
        max_head = self._settings.limits.max_header_bytes
        loop = asyncio.get_running_loop()
        if not first and not client.buffer:
            idle_deadline = loop.time() + timeouts.idle
            with contextlib.suppress(TimeoutError):
                while not client.buffer and not client.eof:
                    await client.wait_data(deadline=idle_deadline)
            if not client.buffer:
                return None
        try:
            return await client.next_head(
                max_head_bytes=max_head, deadline=loop.time() + timeouts.header
            )
        except TimeoutError:
            error: OutgateError = HeaderTimeout("request head not received in time")
        except OutgateError as exc:
            error = exc
        self._refuse(client, self._exchange(src_ip, src_port), error, keep_alive=False)
        return None

    # -- one request ---------------------------------------------------------------------------
    async def _handle(
        self,
        client: Peer,
        head: bytes,
        src_ip: IPAddress,
        src_port: int,
        kept: list[_KeptUpstream],
    ) -> bool:
        """Serve one request; True when the client connection may carry another."""
        ex = self._exchange(src_ip, src_port)
        try:
            req = parse_request_head(head)
        except OutgateError as exc:
            self._refuse(client, ex, exc, keep_alive=False)
            return False
        ex.kind = "tunnel" if req.is_connect else "forward"
        ex.method = req.method
        ex.path = None if req.is_connect else req.path
        if req.host.ip is None:
            ex.destination_domain = req.host.name
        else:
            ex.destination_ip = str(req.host.ip)
        ex.destination_port = req.port
        has_body = req.framing is not BodyFraming.NONE
        held_tunnel: str | None = None
        try:
            if not self._is_ready():
                raise ServiceUnavailable("the proxy is not ready: policy or identity not loaded")
            if ex.workload.kind is WorkloadKind.AMBIGUOUS:
                raise PolicyDenied(
                    "two live pods claim this source address", reason=Reason.AMBIGUOUS_SOURCE
                )
            if req.is_connect:
                tunnel_key = workload_key(ex.workload, src_ip)
                self._admission.open_tunnel(tunnel_key)
                held_tunnel = tunnel_key
            addresses = await self._decide_and_resolve(ex, req)
            upstream = await self._upstream_for(ex, req, addresses, kept)
        except OutgateError as exc:
            if held_tunnel is not None:
                self._admission.close_tunnel(held_tunnel)
            keep = req.keep_alive and not has_body and not req.is_connect
            self._refuse(client, ex, exc, keep_alive=keep)
            return keep
        if held_tunnel is not None:
            try:
                await self._tunnel(client, upstream, ex, req)
            finally:
                self._admission.close_tunnel(held_tunnel)
            return False
        return await self._forward(client, upstream, ex, req, kept)

    async def _decide_and_resolve(self, ex: Exchange, req: RequestHead) -> list[IPAddress]:
        """Decide by name, resolve only after an allow, then check every address.

        An address is dropped when a rule about addresses denies it (a `cidr` Deny catches
        resolved addresses too), or when the address guard refuses it. The guard is lifted only
        by a `cidr` of the rule that allowed the request: a rule for another name cannot open
        guarded space to this one.
        """
        engine = self._policy.engine
        workload = ex.workload
        route_key = (id(workload), req.host.name, req.host.ip is None, req.port)
        route = self._routes.get(route_key)
        if route is not None and (route.engine is not engine or route.workload is not workload):
            route = None
        if route is not None:
            decision = route.decision
        else:
            decision = engine.decide(
                workload, Destination(host=req.host, port=req.port, ip=req.host.ip)
            )
        ex.decision = decision
        if decision.action != "allow":
            raise PolicyDenied("denied by policy", reason=decision.reason)
        if req.host.ip is not None:
            addresses: tuple[IPAddress, ...] = (req.host.ip,)
        else:
            addresses = await self._resolver.resolve(req.host.name)
        if route is not None and (addresses is route.addresses or addresses == route.addresses):
            # The same policy, workload, destination and DNS answer as a request before: every
            # step below is a pure function of those, so its outcome is replayed.
            ex.destination_ip = route.first_ip_text
            ex.decided = True
            self._record_decision(ex)
            return list(route.permitted)
        permitted: list[IPAddress] = []
        denied: Decision | None = None
        for ip in addresses:
            if req.host.ip is None:
                per_address = engine.decide(
                    workload, Destination(host=req.host, port=req.port, ip=ip)
                )
                if per_address.action != "allow":
                    denied = per_address
                    continue
            refused = self._guard.check(ip, req.port, allowed_cidrs=decision.allowed_cidrs)
            if refused is not None:
                metrics.GUARD_REFUSALS.labels(address_class=str(refused)).inc()
                log.warning(
                    "guarded_address_dropped",
                    host=req.host.name,
                    address=str(ip),
                    address_class=str(refused),
                    event_id=ex.id,
                )
                continue
            permitted.append(ip)
        if not permitted:
            if denied is not None:
                ex.decision = denied
                raise PolicyDenied("denied by policy for every address", reason=denied.reason)
            raise PolicyDenied(
                "destination address is private, reserved or metadata",
                reason=Reason.GUARDED_ADDRESS,
            )
        # The first to dial; the close record has the one used.
        ex.destination_ip = _ip_text(permitted[0])
        ex.decided = True
        self._record_decision(ex)
        if len(permitted) == len(addresses):  # nothing dropped, so nothing to log on a replay
            if len(self._routes) >= ROUTE_MEMO_SIZE:
                self._routes.clear()
            self._routes[route_key] = _Route(
                engine=engine,
                workload=workload,
                addresses=addresses,
                decision=decision,
                permitted=tuple(permitted),
                first_ip_text=ex.destination_ip,
            )
        return permitted

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

    def _refuse(self, client: Peer, ex: Exchange, error: OutgateError, *, keep_alive: bool) -> None:
        """Answer an error, with its decision record (unless already written) and close record."""
        ex.status = error.status
        if not ex.decided:
            ex.reason = error.reason
            self._record_decision(ex)
        self._audit.close(ex, error.reason)
        client.write(_error_reply(error, ex, keep_alive=keep_alive))
        if not keep_alive:
            client.close()

    # -- upstream -------------------------------------------------------------------------------
    async def _upstream_for(
        self, ex: Exchange, req: RequestHead, addresses: list[IPAddress], kept: list[_KeptUpstream]
    ) -> Peer:
        if not req.is_connect:
            for up in list(kept):
                kept.remove(up)
                usable = up.host == req.host.name and up.port == req.port and up.ip in addresses
                if usable and not up.peer.eof and not up.peer.buffer:
                    ex.destination_ip = _ip_text(up.ip)
                    return up.peer
                up.peer.close()
        return await self._dial(ex, addresses, req.port)

    async def _dial(self, ex: Exchange, addresses: list[IPAddress], port: int) -> Peer:
        """Connect to the checked addresses in order; never to anything else."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.timeouts.connect
        error: OutgateError = GatewayTimeout("upstream connect timed out")
        for ip in addresses:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    _, peer = await loop.create_connection(
                        Peer, host=str(ip), port=port, flags=socket.AI_NUMERICHOST
                    )
            except TimeoutError:
                metrics.UPSTREAM_CONNECT_ERRORS.labels(kind="timeout").inc()
                error = GatewayTimeout(f"connect to {ip} port {port} timed out")
                break
            except ConnectionRefusedError:
                metrics.UPSTREAM_CONNECT_ERRORS.labels(kind="refused").inc()
                error = BadGateway(f"{ip} port {port} refused the connection")
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("out_of_file_descriptors", during="upstream connect")
                metrics.UPSTREAM_CONNECT_ERRORS.labels(kind="unreachable").inc()
                error = BadGateway(f"cannot connect to {ip} port {port}: {exc.strerror}")
                continue
            ex.destination_ip = _ip_text(ip)
            return peer
        raise error

    # -- tunnel ---------------------------------------------------------------------------------
    async def _tunnel(self, client: Peer, upstream: Peer, ex: Exchange, req: RequestHead) -> None:
        """CONNECT (proxy.dataplane.tunnel): check the first bytes, then splice, or serve the
        requests inside (rules with `inspect`, `protocol: http`: proxy.dataplane.intercept)."""
        decision = ex.decision
        protocol = (decision.protocol if decision else None) or TunnelProtocol.TLS
        inspect = decision.inspect if decision is not None else None
        intercept_tls = inspect is not None and protocol is TunnelProtocol.TLS
        raw_upstream = upstream
        if intercept_tls:
            try:
                upstream = await self._interceptor.open_upstream(upstream, req.host)
            except OutgateError as exc:
                upstream.close()
                self._refuse(client, ex, exc, keep_alive=False)
                return
        client_base = client.bytes_in - len(client.buffer)
        client.write(CONNECT_ESTABLISHED)
        metrics.ACTIVE_CONNECTIONS.labels(kind="tunnel").inc()
        reason = Reason.COMPLETED
        inner: Peer = client
        try:
            hello = await read_first_bytes(
                client, protocol=protocol, timeouts=self._settings.timeouts
            )
            if hello is not None:
                workload = ex.workload
                check_hello(
                    hello,
                    ex,
                    connect=req.host,
                    port=req.port,
                    tls=decision.tls if decision is not None else None,
                    decide=lambda dest: self._policy.engine.decide(workload, dest),
                )
            if intercept_tls:
                inner = await self._interceptor.terminate_client(client, req.host, ex)
            if inspect is not None or protocol is TunnelProtocol.HTTP:
                reason = await self._interceptor.serve_requests(
                    inner,
                    upstream,
                    ex,
                    connect=req.host,
                    port=req.port,
                    inspect=inspect,
                    tls=intercept_tls,
                )
            else:
                reason = await splice(client, upstream, idle=self._settings.timeouts.idle)
        except TunnelViolation as exc:
            reason = exc.reason
            record_violation(ex, client, exc)
        except OutgateError as exc:  # interception could not start: closed, never spliced
            reason = exc.reason
        except asyncio.CancelledError:
            reason = Reason.DRAINED
            raise
        finally:
            if client.close_reason is not None:
                reason = client.close_reason
            inner.close()  # an intercepted session ends with close_notify
            client.close()
            upstream.close()
            raw_upstream.close()
            ex.source_bytes = client.bytes_in - client_base
            ex.destination_bytes = raw_upstream.bytes_in
            metrics.BYTES.labels(direction="egress").inc(ex.source_bytes)
            metrics.BYTES.labels(direction="ingress").inc(ex.destination_bytes)
            metrics.ACTIVE_CONNECTIONS.labels(kind="tunnel").dec()
            self._audit.close(ex, reason)

    # -- forward ----------------------------------------------------------------------------------
    async def _forward(
        self,
        client: Peer,
        upstream: Peer,
        ex: Exchange,
        req: RequestHead,
        kept: list[_KeptUpstream],
        *,
        head: bytes | None = None,
    ) -> bool:
        """Send one request (`head`, or `req` rendered) and relay its response; True if the
        client connection may carry another. Intercepted requests come here too."""
        metrics.ACTIVE_CONNECTIONS.labels(kind="forward").inc()
        upstream.write(head if head is not None else render_request_head(req))
        body_task: asyncio.Task[None] | None = None
        if req.framing is not BodyFraming.NONE:
            body_task = asyncio.get_running_loop().create_task(
                self._send_body(client, upstream, req, ex), name=f"body {ex.id}"
            )
            body_task.add_done_callback(lambda task: _abort_on_failure(task, upstream))
        reason = Reason.COMPLETED
        keep = False
        try:
            keep = await self._relay_response(client, upstream, ex, req)
            if body_task is not None and not body_task.done():
                # The upstream answered before taking the whole body: the rest of the client's
                # body cannot be told apart from a next request, so this connection ends here.
                keep = False
        except OutgateError as exc:
            error = _body_error(body_task) or exc  # a bad request body explains an upstream cut
            reason = Reason.CLIENT_CLOSED if _client_left(body_task) else error.reason
            if ex.status is None and reason is not Reason.CLIENT_CLOSED:
                ex.status = error.status
                client.write(_error_reply(error, ex, keep_alive=False))
            keep = False
        except ConnectionResetError:
            reason = Reason.CLIENT_CLOSED
            keep = False
        except asyncio.CancelledError:
            reason = Reason.DRAINED
            raise
        finally:
            if body_task is not None and not body_task.done():
                body_task.cancel()
                await asyncio.wait({body_task})
            body_failed = (
                body_task is not None
                and not body_task.cancelled()
                and body_task.exception() is not None
            )
            if body_failed and reason is Reason.COMPLETED:
                reason = Reason.CLIENT_CLOSED
                keep = False
            stalled = client.close_reason or upstream.close_reason
            if stalled is not None:
                reason = stalled
                keep = False
            metrics.ACTIVE_CONNECTIONS.labels(kind="forward").dec()
            if ex.source_bytes:  # most requests carry no body: skip the no-op update
                metrics.BYTES.labels(direction="egress").inc(ex.source_bytes)
            metrics.BYTES.labels(direction="ingress").inc(ex.destination_bytes)
            self._audit.close(ex, reason)
            reusable = keep and not upstream.eof and not upstream.buffer
            if reusable and ex.destination_ip is not None and req.host is not None:
                kept.append(
                    _KeptUpstream(
                        host=req.host.name,
                        port=req.port,
                        ip=_parse_ip(ex.destination_ip),
                        peer=upstream,
                    )
                )
            else:
                upstream.close()
        if not keep:
            client.close()
        return keep

    async def _drain(self, peer: Peer) -> None:
        """Wait for a slow reader, but not forever: one that takes nothing for the idle timeout
        is cut, so a client or upstream that stops reading cannot pin a connection."""
        try:
            async with asyncio.timeout(self._settings.timeouts.idle):
                await peer.drain()
        except TimeoutError:
            peer.close_reason = Reason.IDLE_TIMEOUT
            peer.abort()
            raise ConnectionResetError("peer stopped reading") from None

    async def _read_body(self, client: Peer, limit: int | None) -> bytes:
        """The next piece of a request body; a client silent for `timeouts.body` gets 408."""
        try:
            async with asyncio.timeout(self._settings.timeouts.body):
                return await client.read_some(limit)
        except TimeoutError:
            raise HeaderTimeout("request body stalled", reason=Reason.BODY_TIMEOUT) from None

    async def _send_body(
        self, client: Peer, upstream: Peer, req: RequestHead, ex: Exchange
    ) -> None:
        """Stream the request body: exactly Content-Length bytes, or chunks re-framed."""
        if req.framing is BodyFraming.LENGTH:
            remaining = req.content_length or 0
            while remaining:
                data = await self._read_body(client, min(remaining, RELAY_CHUNK_BYTES))
                if not data:
                    raise ConnectionResetError("client closed inside the request body")
                remaining -= len(data)
                ex.source_bytes += len(data)
                upstream.write(data)
                await self._drain(upstream)
            return
        decoder = ChunkedDecoder()
        while not decoder.done:
            data = await self._read_body(client, None)
            if not data:
                raise ConnectionResetError("client closed inside the chunked request body")
            for piece in decoder.feed(data):
                ex.source_bytes += len(piece)
                upstream.write(encode_chunk(piece))
            await self._drain(upstream)
        upstream.write(LAST_CHUNK)
        client.unread(decoder.tail())

    async def _read_response_head(self, upstream: Peer) -> bytes:
        max_head = self._settings.limits.max_header_bytes
        deadline = asyncio.get_running_loop().time() + self._settings.timeouts.idle
        scanned = 0
        while True:
            end = find_head_end(
                upstream.buffer, max_head_bytes=max_head, is_request=False, start=scanned
            )
            if end >= 0:
                return upstream.take(end)
            scanned = len(upstream.buffer)
            if upstream.eof:
                raise BadGateway(
                    "upstream closed before a complete response head",
                    reason=Reason.UPSTREAM_RESET,
                )
            await upstream.wait_data(deadline=deadline)  # TimeoutError: the caller's 504

    async def _relay_response(
        self, client: Peer, upstream: Peer, ex: Exchange, req: RequestHead
    ) -> bool:
        """Relay interim responses, then the final head and body; True if keep-alive."""
        try:
            while True:
                resp = parse_response_head(
                    await self._read_response_head(upstream), request_method=req.method
                )
                if resp.status == 101:
                    raise BadGateway(
                        "upstream switched protocols, which was not asked for",
                        reason=Reason.UPSTREAM_BAD_RESPONSE,
                    )
                if resp.status >= 200:
                    break
                client.write(render_response_head(resp, keep_alive=True))
        except TimeoutError:
            raise GatewayTimeout("upstream sent no response in time") from None
        ex.status = resp.status
        dechunk = resp.framing is BodyFraming.CHUNKED and req.version == "HTTP/1.0"
        if dechunk:
            # An HTTP/1.0 client cannot read chunked framing: send the body raw, end by closing.
            resp = dataclasses.replace(
                resp, framing=BodyFraming.UNTIL_CLOSE, transfer_codings=(), keep_alive=False
            )
        keep = req.keep_alive and resp.keep_alive and resp.framing is not BodyFraming.UNTIL_CLOSE
        head = render_response_head(resp, keep_alive=keep)
        length = resp.content_length or 0
        if resp.framing is BodyFraming.LENGTH and 0 < length <= min(
            len(upstream.buffer), RELAY_CHUNK_BYTES
        ):
            # The whole (small) body came with the head: one write, one syscall, not two.
            ex.destination_bytes += length
            client.write(head + upstream.take(length))
            await self._drain(client)
            return keep
        client.write(head)
        try:
            if dechunk:
                await self._relay_chunked(client, upstream, ex, reframe=False)
            else:
                await self._relay_response_body(
                    client, upstream, ex, resp.framing, resp.content_length
                )
        except OutgateError:
            # Headers are out: the only honest signal left is to cut the connection.
            client.abort()
            raise
        return keep

    async def _relay_chunked(
        self, client: Peer, upstream: Peer, ex: Exchange, *, reframe: bool
    ) -> None:
        """Decode the upstream's chunks; re-frame them (never pass chunk lines through, so no
        extension or trailer trick reaches the client) or, for HTTP/1.0, send them raw."""
        decoder = ChunkedDecoder(upstream=True)
        while not decoder.done:
            data = await upstream.read_some()
            if not data:
                raise BadGateway(
                    "upstream closed inside a chunked body", reason=Reason.UPSTREAM_RESET
                )
            for piece in decoder.feed(data):
                ex.destination_bytes += len(piece)
                client.write(encode_chunk(piece) if reframe else piece)
            await self._drain(client)
        if reframe:
            client.write(LAST_CHUNK)
        upstream.unread(decoder.tail())

    async def _relay_response_body(
        self,
        client: Peer,
        upstream: Peer,
        ex: Exchange,
        framing: BodyFraming,
        content_length: int | None,
    ) -> None:
        if framing is BodyFraming.NONE:
            return
        if framing is BodyFraming.LENGTH:
            remaining = content_length or 0
            while remaining:
                data = await upstream.read_some(min(remaining, RELAY_CHUNK_BYTES))
                if not data:
                    raise BadGateway(
                        "upstream closed inside the body", reason=Reason.UPSTREAM_RESET
                    )
                remaining -= len(data)
                ex.destination_bytes += len(data)
                client.write(data)
                await self._drain(client)
            return
        if framing is BodyFraming.CHUNKED:
            await self._relay_chunked(client, upstream, ex, reframe=True)
            return
        while data := await upstream.read_some():
            ex.destination_bytes += len(data)
            client.write(data)
            await self._drain(client)


def _client_left(task: asyncio.Task[None] | None) -> bool:
    """The request body failed because the client went away (so the upstream was cut)."""
    if task is None or not task.done() or task.cancelled():
        return False
    return isinstance(task.exception(), ConnectionError)


# Address text and parsing are memoised: a kept-alive client names the same few addresses on
# every request, and the ipaddress module formats and parses in Python (microseconds a call).
@functools.lru_cache(maxsize=4096)
def _ip_text(ip: IPAddress) -> str:
    return str(ip)


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> IPAddress:
    return parse_ip_address(text)


def _body_error(task: asyncio.Task[None] | None) -> OutgateError | None:
    if task is None or not task.done() or task.cancelled():
        return None
    error = task.exception()
    return error if isinstance(error, OutgateError) else None


def _abort_on_failure(task: asyncio.Task[None], upstream: Peer) -> None:
    """A request body that cannot be completed must not leave the upstream waiting for it."""
    if not task.cancelled() and task.exception() is not None:
        upstream.abort()


def _error_reply(error: OutgateError, ex: Exchange, *, keep_alive: bool) -> bytes:
    """The reply for `error`, naming this exchange's workload, destination and event id."""
    destination = ex.destination_domain or ex.destination_ip or "-"
    if ex.destination_port is not None:
        destination = f"{destination}:{ex.destination_port}"
    return render_error(
        error,
        event_id=ex.id,
        workload=_describe(ex.workload),
        destination=destination,
        keep_alive=keep_alive,
    )


def _describe(workload: Workload) -> str:
    if workload.kind is WorkloadKind.UNKNOWN:
        return "unknown source"
    return f"{workload.namespace}/{workload.name}"
