"""One socket of the data plane as an asyncio Protocol: buffered reads, or a direct relay.

A `Peer` starts in buffered mode: bytes land in `buffer` (reading pauses past
`READ_BUFFER_LIMIT`) and the connection handler awaits them. For a tunnel, two peers are
joined with `relay`: each `data_received` writes straight into the other transport, and the
other side's `pause_writing` pauses this side's reading, so a slow reader slows the writer and
memory stays bounded by the transports' buffer limits. No Python runs per byte, only per read.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import cast

from proxy.core.http1 import find_head_end
from proxy.errors import BadGateway, BadRequest, Reason

# 256 KiB: large reads amortise the per-call cost; bounded so a fast sender cannot fill memory.
READ_BUFFER_LIMIT = 256 * 1024
# Write-buffer marks for the transport: above HIGH the other side stops reading.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class Peer(asyncio.Protocol):
    """A client or upstream socket. Mutable state lives here and only here."""

    # A relay writes to a partner that encrypts (TLSPeer) through its `write`, to others
    # straight into the transport.
    encrypts = False
    # A byte mark (`watch_bytes`): past it, `_on_mark` is called once (the kernel relay's
    # "this tunnel is worth splicing"). One comparison per read on the relay's hot path. Class
    # defaults, set on an instance only when used: every idle tunnel holds two peers.
    _mark: int = sys.maxsize
    _on_mark: Callable[[], None] | None = None
    # Set while the socket is relayed by the kernel (proxy.dataplane.kernel_splice): the
    # transport is gone, so `abort` (a deleted source pod) must reach that relay.
    on_abort: Callable[[], None] | None = None

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.closed = False
        self.bytes_in = 0
        self.last_activity = time.monotonic()
        # Set by whoever closes this connection on purpose (drain, a deleted source pod), so the
        # close record says why instead of "client closed".
        self.close_reason: Reason | None = None
        self._partner: Peer | None = None  # relay mode: where our bytes go, who feeds us
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._paused_by_buffer = False
        self._paused_by_partner = False
        self._closed_waiter: asyncio.Future[None] | None = None
        self._close_on_eof = False  # set by finish(): the client's FIN ends the connection

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.last_activity = time.monotonic()
        if self.bytes_in >= self._mark:
            self._mark_reached()
        partner = self._partner
        if partner is not None:
            if partner.encrypts:
                partner.write(data)  # a TLSPeer encrypts (an upgrade inside interception)
            elif partner.transport is not None and not partner.closed:
                # The hot path of every spliced tunnel: straight to the transport, no call.
                partner.transport.write(data)
            return
        self.buffer += data
        if len(self.buffer) > READ_BUFFER_LIMIT and not self._paused_by_buffer:
            self._paused_by_buffer = True
            self._apply_reading()
        self._wake_data()

    def eof_received(self) -> bool:
        self.eof = True
        self.last_activity = time.monotonic()
        if self._close_on_eof:
            self.close()
            return True
        partner = self._partner
        if partner is not None:
            partner.write_eof()
            if partner.eof:
                self.close()
                partner.close()
        self._wake_data()
        return True  # keep our writing half open: half-close is propagated, not assumed

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.eof = True
        self._wake_data()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        partner = self._partner
        if partner is not None:
            partner.close()

    def pause_writing(self) -> None:
        self._write_paused = True
        feeder = self._partner
        if feeder is not None and not feeder._paused_by_partner:
            feeder._paused_by_partner = True
            feeder._apply_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        feeder = self._partner
        if feeder is not None and feeder._paused_by_partner:
            feeder._paused_by_partner = False
            feeder._apply_reading()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _mark_reached(self) -> None:
        self._mark = sys.maxsize
        callback, self._on_mark = self._on_mark, None
        if callback is not None:
            callback()

    def watch_bytes(self, more: int, callback: Callable[[], None]) -> None:
        """Call `callback` once, when `more` bytes past those read so far have been read."""
        self._on_mark = callback
        self._mark = self.bytes_in + more

    def unwatch_bytes(self) -> None:
        self._mark = sys.maxsize
        self._on_mark = None

    # -- reading ----------------------------------------------------------------------------
    def _apply_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if self._paused_by_buffer or self._paused_by_partner:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()

    def _wake_data(self) -> None:
        waiter = self._data_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_data(self, *, deadline: float | None = None) -> None:
        """Return once the buffer holds more than it did, or at EOF.

        With `deadline` (event-loop clock), raise TimeoutError if neither has happened by then.
        One timer per wait: a loop of waits under one deadline costs far less than wrapping it
        in `asyncio.timeout`, and this runs twice per kept-alive request.
        """
        if self.eof:
            return
        loop = asyncio.get_running_loop()
        waiter = self._data_waiter = loop.create_future()
        timer = None if deadline is None else loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            self._data_waiter = None
            if timer is not None:
                timer.cancel()

    async def next_head(self, *, max_head_bytes: int, deadline: float) -> bytes | None:
        """The next complete message head from the buffer, reading until `deadline` (event-loop
        clock; TimeoutError past it). None at a clean EOF between messages; BadRequest for an
        EOF inside a head, and whatever `find_head_end` raises for a head over the limits."""
        scanned = 0  # bytes already searched: each new read is scanned once
        while True:
            end = find_head_end(self.buffer, max_head_bytes=max_head_bytes, start=scanned)
            if end >= 0:
                return self.take(end)
            scanned = len(self.buffer)
            if self.eof:
                if self.buffer.strip():
                    raise BadRequest("connection closed inside the request head")
                return None
            await self.wait_data(deadline=deadline)

    async def next_response_head(self, *, max_head_bytes: int, deadline: float) -> bytes:
        """The next complete response head from this upstream, reading until `deadline`
        (TimeoutError past it). BadGateway (upstream_reset) for an EOF before it is complete,
        and whatever `find_head_end` raises for a head over the limits."""
        scanned = 0
        while True:
            end = find_head_end(
                self.buffer, max_head_bytes=max_head_bytes, is_request=False, start=scanned
            )
            if end >= 0:
                return self.take(end)
            scanned = len(self.buffer)
            if self.eof:
                raise BadGateway(
                    "upstream closed before a complete response head",
                    reason=Reason.UPSTREAM_RESET,
                )
            await self.wait_data(deadline=deadline)

    def take(self, limit: int | None = None) -> bytes:
        """Remove and return up to `limit` buffered bytes (all when None)."""
        if limit is None or limit >= len(self.buffer):
            data = bytes(self.buffer)
            self.buffer.clear()
        else:
            data = bytes(self.buffer[:limit])
            del self.buffer[:limit]
        if self._paused_by_buffer and len(self.buffer) <= READ_BUFFER_LIMIT:
            self._paused_by_buffer = False
            self._apply_reading()
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes back at the front (a decoder read past the end of a message)."""
        if data:
            self.buffer[:0] = data

    async def read_some(self, limit: int | None = None) -> bytes:
        """Up to `limit` bytes, waiting for at least one; b"" means EOF."""
        while not self.buffer:
            if self.eof:
                return b""
            await self.wait_data()
        return self.take(limit)

    # -- writing ----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def write_eof(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed and transport.can_write_eof():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                self.close()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above the high-water mark."""
        if self.closed:
            raise ConnectionResetError("peer closed while we were writing")
        if not self._write_paused:
            return
        loop = asyncio.get_running_loop()
        self._drain_waiter = loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None
        if self.closed:
            raise ConnectionResetError("peer closed while we were writing")

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def finish(self, linger: float) -> None:
        """End a connection whose request may not have been read: a FIN after what was
        written, then the close once the client closes its side, or `linger` seconds later.
        Closing at once with unread bytes would send a reset, which can destroy the reply on
        its way."""
        self.write_eof()
        if self.eof:
            self.close()
            return
        self._close_on_eof = True
        asyncio.get_running_loop().call_later(linger, self.close)

    def abort(self) -> None:
        if self.on_abort is not None:  # handed over: the transport is closed already
            self.on_abort()
            return
        if self.transport is not None:
            self.transport.abort()

    def wake_on_close(self, waiter: asyncio.Future[None]) -> None:
        """Resolve `waiter` when this connection is lost (RelayWait: one future, two peers);
        nothing if it is lost already."""
        if not self.closed:
            self._closed_waiter = waiter

    # -- relay ------------------------------------------------------------------------------
    def relay(self, other: Peer) -> None:
        """Join two peers: flush what each has buffered into the other, then splice."""
        for source, sink in ((self, other), (other, self)):
            if source.buffer:
                sink.write(source.take())
        self._partner, other._partner = other, self
        for peer in (self, other):
            peer._paused_by_buffer = False
            peer._apply_reading()
        for source, sink in ((self, other), (other, self)):
            if source.eof:
                sink.write_eof()
        if self.eof and other.eof:
            self.close()
            other.close()
        elif self.closed:
            other.close()
        elif other.closed:
            self.close()

    def unjoin(self, other: Peer) -> None:
        """Undo `relay`: reads go to each peer's buffer again, and neither pauses the other."""
        self._partner = other._partner = None
        for peer in (self, other):
            peer._paused_by_partner = False
            peer._apply_reading()

    async def flush(self) -> None:
        """Wait until the transport's write buffer is empty (ConnectionResetError if the
        connection is lost first)."""
        transport = self.transport
        if transport is None or self.closed:
            raise ConnectionResetError("peer closed while we were writing")
        transport.set_write_buffer_limits(high=0, low=0)  # pauses writing until it is all sent
        try:
            await self.drain()
        finally:
            if not self.closed:
                transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    @property
    def spliceable(self) -> bool:
        """Its bytes are its socket's bytes: no TLS in this process, neither a TLSPeer nor an
        SSL transport (a parent proxy reached over https)."""
        transport = self.transport
        return (
            not self.encrypts
            and transport is not None
            and not self.closed
            and transport.get_extra_info("ssl_object") is None
        )

    def hand_over(self) -> socket.socket:
        """The connection's socket for a relay that moves bytes itself: a duplicate of the
        descriptor, non-blocking. The caller closes the transport (`close`: its descriptor goes)
        once it has everything it needs; the duplicate keeps the connection open after that.
        Raises OSError (EMFILE, ENFILE) when no descriptor is left."""
        transport = self.transport
        if transport is None or self.closed:
            raise ConnectionResetError("peer closed before its socket was handed over")
        fd = cast(socket.socket, transport.get_extra_info("socket")).fileno()
        duplicate = socket.socket(fileno=os.dup(fd))
        duplicate.setblocking(False)
        return duplicate

    @property
    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0


async def splice(client: Peer, upstream: Peer, *, idle: float) -> Reason:
    """Join the peers (buffered bytes go first) and wait until both close or go idle: a tunnel
    after its checks, an upgraded connection after its 101."""
    client.relay(upstream)
    reason = await RelayWait().run(client, upstream, idle=idle)
    assert reason is not None  # None only after interrupt(), and nothing holds this one
    return reason


class RelayWait:
    """Waits while two joined peers relay, until both close or `idle` passes with no byte
    either way; `interrupt()` ends the wait early. No task and no timer of its own: an idle
    tunnel waits in this, on one future that either peer's close, the loop's shared
    IdleDeadlines or `interrupt()` resolves, and 5,000 of them must stay small."""

    __slots__ = ("_waiter", "interrupted")

    def __init__(self) -> None:
        self.interrupted = False
        self._waiter: asyncio.Future[None] | None = None

    def interrupt(self) -> None:
        self.interrupted = True
        self.wake()

    def wake(self) -> None:
        """Let the wait look again (a deadline passed, or it was interrupted)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self, client: Peer, upstream: Peer, *, idle: float) -> Reason | None:
        """COMPLETED, IDLE_TIMEOUT, or None once interrupted."""
        loop = asyncio.get_running_loop()
        deadlines: IdleDeadlines | None = None
        entry: list[object] | None = None
        try:
            while not (client.closed and upstream.closed):
                if self.interrupted:
                    return None
                quiet = time.monotonic() - max(client.last_activity, upstream.last_activity)
                if quiet >= idle:
                    return Reason.IDLE_TIMEOUT
                waiter = loop.create_future()
                self._waiter = waiter
                client.wake_on_close(waiter)
                upstream.wake_on_close(waiter)
                deadlines = IdleDeadlines.of(loop)
                entry = deadlines.add(loop.time() + idle - quiet, self)
                await waiter
                deadlines.discard(entry)
                entry = None
            return Reason.COMPLETED
        finally:
            self._waiter = None
            if deadlines is not None and entry is not None:
                deadlines.discard(entry)


class IdleDeadlines:
    """The idle deadlines of every RelayWait on one event loop, behind one loop timer: a heap
    of [when, sequence, wait] entries. A tunnel then holds one small list here instead of a
    timer of its own (an asyncio.Timeout and a loop TimerHandle with its bound method, about
    0.7 KiB an idle tunnel; bench/README.md).

    A wait that ends before its deadline blanks its entry (the heapq recipe for removal);
    blank entries are dropped when they reach the top, or all at once when they outnumber the
    live ones, so tunnels that open and close fast cannot fill the heap."""

    _by_loop: dict[asyncio.AbstractEventLoop, IdleDeadlines] = {}
    COMPACT_AFTER = 1024  # blank entries tolerated before a rebuild is considered

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[list[object]] = []
        self._sequence = 0
        self._blank = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> IdleDeadlines:
        """This loop's deadlines; made on first use, forgotten when the heap is empty."""
        found = cls._by_loop.get(loop)
        if found is None:
            found = cls._by_loop[loop] = cls(loop)
        return found

    def __len__(self) -> int:
        return len(self._heap) - self._blank

    def add(self, when: float, wait: RelayWait) -> list[object]:
        self._sequence += 1
        entry: list[object] = [when, self._sequence, wait]
        heapq.heappush(self._heap, entry)
        if when < self._timer_at:
            self._schedule(when)
        return entry

    def discard(self, entry: list[object]) -> None:
        if entry[2] is None:
            return
        entry[2] = None
        self._blank += 1
        if self._blank == len(self._heap):
            self._clear()
        elif self._blank > self.COMPACT_AFTER and self._blank * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._blank = 0

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        heap, now = self._heap, self._loop.time()
        while heap and (heap[0][2] is None or cast(float, heap[0][0]) <= now):
            entry = heapq.heappop(heap)
            wait = entry[2]
            if wait is None:
                self._blank -= 1
            else:
                entry[2] = None
                cast(RelayWait, wait).wake()
        if heap:
            self._schedule(cast(float, heap[0][0]))
        else:
            self._clear()

    def _clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, float("inf")
        self._heap, self._blank = [], 0
        if IdleDeadlines._by_loop.get(self._loop) is self:
            del IdleDeadlines._by_loop[self._loop]
