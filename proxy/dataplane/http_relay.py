"""Forwards one HTTP request and relays its response (DESIGN section 1, step 6, "forward").

For an absolute-form request on the proxy listener, and for every request inside a tunnel
(interception, `protocol: http`), once it has been decided:

  1. send the head (rendered in origin form, hop-by-hop fields stripped, by proxy.core.http1);
  2. stream the request body, if any, in a task of its own, so an upstream that answers early
     is heard;
  3. relay interim (1xx) responses, then the final head and its body;
  4. say whether the client connection may carry another request, and keep the upstream for
     the next request when it may carry one too (`UpstreamPool`).

A request that offers an Upgrade the proxy passes on (proxy.core.http1.offered_upgrade) and is
answered `101 Switching Protocols` to that protocol hands both connections to the upgrade relay
(proxy.dataplane.upgrade) instead of step 3's body; a 101 nobody asked for is a 502.

Both bodies go through one loop (`_move_body`) driven by the reader for their framing
(proxy.core.bodies). A slow reader on either side pauses the other (`_drain`), and one that
takes nothing for the idle timeout is cut.

Keep-alive rules, in one place:
  - after a refusal, the client connection stays open only for a keep-alive request without a
    body (`keeps_connection_after_refusal`): an unread body cannot be told apart from a next
    request;
  - after a response, only when both sides keep alive, the response is not close-delimited, and
    the upstream took the whole request body;
  - an upstream is reused only by a later request for the same host and port, and only when it
    is connected to an address that request's route permits (or, through a parent proxy's
    tunnel, when the route still goes via that upstream);
  - a plain-HTTP connection to a parent proxy goes back to that parent's dialer instead, for any
    client's next request (proxy.dataplane.upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from enum import Enum

from proxy.audit import Exchange
from proxy.config import Settings
from proxy.core.bodies import RELAY_CHUNK_BYTES, BodyReader, body_reader
from proxy.core.http1 import (
    LAST_CHUNK,
    BodyFraming,
    RequestHead,
    check_switch,
    encode_chunk,
    offered_upgrade,
    parse_response_head,
    render_request_head,
    render_response_head,
)
from proxy.dataplane.dialer import Upstream
from proxy.dataplane.exchange_log import ExchangeLog
from proxy.dataplane.peer import Peer
from proxy.dataplane.router import Route
from proxy.dataplane.upgrade import UpgradeRelay
from proxy.errors import (
    BadGateway,
    GatewayTimeout,
    HeaderTimeout,
    OutgateError,
    Reason,
    UpstreamProxyRefused,
)


class _After(Enum):
    """What the client connection does once a response has been relayed."""

    KEEP = "keep"  # carry another request
    CLOSE = "close"
    SWITCH = "switch"  # the 101 went out: the upgrade relay takes both connections


def keeps_connection_after_refusal(req: RequestHead | None) -> bool:
    """May the client connection carry another request after `req` was refused? Only when it
    asked to keep alive and sent no body (its bytes would be read as the next request); never
    after a CONNECT (the client is about to speak another protocol)."""
    return (
        req is not None
        and req.keep_alive
        and req.framing is BodyFraming.NONE
        and not req.is_connect
    )


async def read_request_head(
    client: Peer, *, idle: float | None, header: float, max_head_bytes: int
) -> bytes | None:
    """The next request head, or None when the client left (or idled out) before sending one.

    With `idle`, the wait for a first byte is bounded by it (between kept-alive requests); once
    any byte of a head has arrived (or at once, without `idle`) the whole head must arrive within
    `header` seconds, else HeaderTimeout (408). The parser's limits raise 414/431, an EOF inside
    a head 400.
    """
    loop = asyncio.get_running_loop()
    if idle is not None and not client.buffer:
        idle_deadline = loop.time() + idle
        with contextlib.suppress(TimeoutError):
            while not client.buffer and not client.eof:
                await client.wait_data(deadline=idle_deadline)
        if not client.buffer:
            return None
    try:
        return await client.next_head(max_head_bytes=max_head_bytes, deadline=loop.time() + header)
    except TimeoutError:
        raise HeaderTimeout("request head not received in time") from None


class UpstreamPool:
    """The upstream connections one client connection keeps alive between requests."""

    __slots__ = ("_kept",)

    def __init__(self) -> None:
        self._kept: list[tuple[str, int, Upstream]] = []

    def take(self, route: Route) -> Upstream | None:
        """A kept upstream this route may use; every other kept one is closed (a client that
        moved on to another destination will not come back to it soon)."""
        found: Upstream | None = None
        for host, port, upstream in self._kept:
            usable = (
                found is None
                and host == route.host.name
                and port == route.port
                and (
                    upstream.ip in route.permitted
                    if upstream.ip is not None
                    else upstream.via is not None and upstream.via == route.via
                )
                and not upstream.peer.eof
                and not upstream.peer.buffer
            )
            if usable:
                found = upstream
            else:
                upstream.peer.close()
        self._kept.clear()
        return found

    def keep(self, req: RequestHead, upstream: Upstream) -> None:
        self._kept.append((req.host.name, req.port, upstream))

    def close(self) -> None:
        for _, _, upstream in self._kept:
            upstream.peer.close()
        self._kept.clear()


class HttpRelay:
    """Moves requests and responses; writes nothing to the audit log but through `log`."""

    def __init__(self, *, settings: Settings, log: ExchangeLog, upgrades: UpgradeRelay) -> None:
        self._timeouts = settings.timeouts
        self._max_head = settings.limits.max_header_bytes
        self._log = log
        self._upgrades = upgrades
        # Set by a draining listener: every response then says `Connection: close`, and the
        # connection ends after it.
        self.closing = False

    async def forward(
        self,
        client: Peer,
        upstream: Upstream,
        ex: Exchange,
        req: RequestHead,
        pool: UpstreamPool,
        *,
        head: bytes | None = None,
    ) -> bool:
        """Send one request (`head`, or `req` rendered) and relay its response; True if the
        client connection may carry another. Writes the exchange's close record."""
        up = upstream.peer
        self._log.dialled(ex, upstream)
        self._log.relay_started("forward")
        parent = upstream.forwarding
        if head is None:
            head = (
                render_request_head(req)
                if parent is None
                else render_request_head(req, absolute=True, extra_fields=parent.authorization())
            )
        up.write(head)
        body_task: asyncio.Task[None] | None = None
        reader = body_reader(req.framing, req.content_length, upstream=False)
        if reader is not None:
            body_task = asyncio.get_running_loop().create_task(
                self._move_body(
                    client,
                    up,
                    reader,
                    ex,
                    egress=True,
                    reframe=req.framing is BodyFraming.CHUNKED,
                ),
                name=f"body {ex.id}",
            )
            body_task.add_done_callback(lambda task: _abort_on_failure(task, up))
        reason = Reason.COMPLETED
        keep = False
        offered = offered_upgrade(req)
        try:
            after = await self._relay_response(
                client,
                up,
                ex,
                req,
                self._timeouts.idle if parent is None else parent.response_timeout,
                parent_proxy=upstream.proxy if parent is not None else None,
                offered=offered,
            )
            if after is _After.SWITCH and offered is not None:
                reason = await self._upgrades.run(client, up, ex, protocol=offered)
            keep = after is _After.KEEP
            if body_task is not None and not body_task.done():
                # The upstream answered before taking the whole body: the rest of the client's
                # body cannot be told apart from a next request, so this connection ends here.
                keep = False
        except OutgateError as exc:
            error = _body_error(body_task) or exc  # a bad request body explains an upstream cut
            reason = Reason.CLIENT_CLOSED if _client_left(body_task) else error.reason
            if ex.status is None and reason is not Reason.CLIENT_CLOSED:
                ex.status = error.status
                client.write(self._log.reply(ex, error, keep_alive=False))
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
            if self._log.close(ex, reason, client, up) is not Reason.COMPLETED:
                keep = False
            self._log.relay_ended("forward")
            if not keep or up.eof or up.buffer:
                up.close()
            elif parent is not None:
                parent.give_back(upstream)  # any client's next request to this parent may use it
            else:
                pool.keep(req, upstream)
        if not keep:
            client.close()
        return keep

    # -- bodies ---------------------------------------------------------------------------------
    async def _move_body(
        self,
        source: Peer,
        sink: Peer,
        reader: BodyReader,
        ex: Exchange,
        *,
        egress: bool,
        reframe: bool,
    ) -> None:
        """The one body loop: read what the framing allows, write the payload, wait for a slow
        sink. `egress` is the request body (client to upstream). With `reframe` the payload is
        chunked again (a chunked body: no chunk line of the sender's ever passes through);
        without, it goes out raw (a length or close-delimited body, or a chunked response to an
        HTTP/1.0 client, which cannot read chunks and learns the end from the close)."""
        while not reader.done:
            data = await (
                self._read_request_body(source, reader.want)
                if egress
                else source.read_some(reader.want)
            )
            if not data:
                if reader.ends_at_eof:
                    return
                if egress:
                    raise ConnectionResetError("client closed inside the request body")
                raise BadGateway("upstream closed inside the body", reason=Reason.UPSTREAM_RESET)
            for piece in reader.feed(data):
                if egress:
                    ex.source_bytes += len(piece)
                else:
                    ex.destination_bytes += len(piece)
                sink.write(encode_chunk(piece) if reframe else piece)
            await self._drain(sink)
        if reframe:
            sink.write(LAST_CHUNK)
        source.unread(reader.tail())

    async def _read_request_body(self, client: Peer, limit: int | None) -> bytes:
        """The next piece of a request body; a client silent for `timeouts.body` gets 408."""
        try:
            async with asyncio.timeout(self._timeouts.body):
                return await client.read_some(limit)
        except TimeoutError:
            raise HeaderTimeout("request body stalled", reason=Reason.BODY_TIMEOUT) from None

    async def _drain(self, peer: Peer) -> None:
        """Wait for a slow reader, but not forever: one that takes nothing for the idle timeout
        is cut, so a client or upstream that stops reading cannot pin a connection."""
        try:
            async with asyncio.timeout(self._timeouts.idle):
                await peer.drain()
        except TimeoutError:
            peer.close_reason = Reason.IDLE_TIMEOUT
            peer.abort()
            raise ConnectionResetError("peer stopped reading") from None

    # -- response -------------------------------------------------------------------------------
    async def _relay_response(
        self,
        client: Peer,
        upstream: Peer,
        ex: Exchange,
        req: RequestHead,
        response_timeout: float,
        *,
        parent_proxy: str | None = None,
        offered: str | None = None,
    ) -> _After:
        """Relay interim responses, then the final head and body, or the 101 to the upgrade
        `offered` (check_switch: any other 101 is a 502).

        Through a parent proxy (`parent_proxy`), a 407 is about Outgate's credentials, never the
        client's: it is a 502 upstream_proxy_refused, so no client is invited to send its own
        credentials. Every other answer of the parent is relayed as the origin's would be."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                deadline = loop.time() + response_timeout
                head = await upstream.next_response_head(
                    max_head_bytes=self._max_head, deadline=deadline
                )
                resp = parse_response_head(head, request_method=req.method)
                if resp.status == 101:
                    protocol = check_switch(resp, offered=offered)
                    ex.status = resp.status
                    client.write(render_response_head(resp, keep_alive=True, switch_to=protocol))
                    return _After.SWITCH
                if resp.status == 407 and parent_proxy is not None:
                    ex.upstream_status = resp.status
                    raise UpstreamProxyRefused(
                        f"parent proxy {parent_proxy} refused the request with status 407",
                        proxy=parent_proxy,
                        parent_status=resp.status,
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
        keep = (
            not self.closing
            and req.keep_alive
            and resp.keep_alive
            and resp.framing is not BodyFraming.UNTIL_CLOSE
        )
        head = render_response_head(resp, keep_alive=keep)
        length = resp.content_length or 0
        if resp.framing is BodyFraming.LENGTH and 0 < length <= min(
            len(upstream.buffer), RELAY_CHUNK_BYTES
        ):
            # The whole (small) body came with the head: one write, one syscall, not two.
            ex.destination_bytes += length
            client.write(head + upstream.take(length))
            await self._drain(client)
            return _After.KEEP if keep else _After.CLOSE
        client.write(head)
        # The upstream's own framing decides how its body is read; for HTTP/1.0 the chunked
        # payload goes out raw (`dechunk`), for everyone else it is re-chunked.
        chunked = dechunk or resp.framing is BodyFraming.CHUNKED
        reader = body_reader(
            BodyFraming.CHUNKED if chunked else resp.framing, resp.content_length, upstream=True
        )
        if reader is None:
            return _After.KEEP if keep else _After.CLOSE
        try:
            await self._move_body(
                upstream, client, reader, ex, egress=False, reframe=not dechunk and chunked
            )
        except OutgateError:
            # Headers are out: the only honest signal left is to cut the connection.
            client.abort()
            raise
        return _After.KEEP if keep else _After.CLOSE


def _client_left(task: asyncio.Task[None] | None) -> bool:
    """The request body failed because the client went away (so the upstream was cut)."""
    if task is None or not task.done() or task.cancelled():
        return False
    return isinstance(task.exception(), ConnectionError)


def _body_error(task: asyncio.Task[None] | None) -> OutgateError | None:
    if task is None or not task.done() or task.cancelled():
        return None
    error = task.exception()
    return error if isinstance(error, OutgateError) else None


def _abort_on_failure(task: asyncio.Task[None], upstream: Peer) -> None:
    """A request body that cannot be completed must not leave the upstream waiting for it."""
    if not task.cancelled() and task.exception() is not None:
        upstream.abort()
