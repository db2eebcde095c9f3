"""Relays an opaque tunnel's bytes in the kernel with splice(2) once it has moved enough of them
to be worth it (issue 16); until then, and whenever that is not possible, the Protocol relay
(proxy.dataplane.peer.splice) moves them.

Opaque: the tunnel's checks are done and nothing more of it will be read by the proxy (not
intercepted, not served as `protocol: http`); TunnelRelay decides that, this module only moves.

  1. The tunnel starts on the Protocol relay. When either side has sent `limits.spliceAfterBytes`
     more, and the budget (`limits.spliceMaxTunnels`) has room, it is switched:
  2. the peers are separated (new reads stay in their buffers) and each transport's write
     buffer is flushed to its socket: of the Protocol relay's bytes, only the peers' read
     buffers are left in user space;
  3. each socket's descriptor is duplicated, two pipes are made, and each way is tried once
     (splice's EINVAL on a descriptor it cannot take is found here, while the transports still
     stand); then the transports are closed (the duplicates keep the connections open);
  4. per way: the bytes still buffered in user space are sent first, then source -> pipe ->
     destination, driven by the loop's reader and writer callbacks on the raw descriptors.
     While the destination is full its source is not read (the pipe holds at most its size);
  5. EOF from a source: once its pipe is empty the destination is shut for writing (half-close),
     as the Protocol relay does. Both ways at EOF, or an error either way (a reset), end it.

Bytes are counted where they are read (`Peer.bytes_in`), as the Protocol relay counts them, so
the close record and the per-destination metrics are the same whichever relay moved them.

Descriptors: a spliced tunnel holds 6 instead of 2 (its two sockets and two pipes), 8 for a
moment while switching. Past the budget, or when a pipe or a duplicate cannot be had (EMFILE,
ENFILE), or splice refuses a descriptor (EINVAL), the tunnel stays on the Protocol relay and
`outgate_tunnel_splices_total` says why. Without os.splice (not Linux) nothing is spliced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket
import time
from typing import Final

import structlog

from proxy import metrics
from proxy.dataplane.peer import Peer, RelayWait, splice
from proxy.errors import Reason

log = structlog.get_logger(__name__)

SPLICE_AVAILABLE: Final = hasattr(os, "splice")
# 1 MiB per pipe: the proxy's CPU per GB through one tunnel was 0.33 s with 256 KiB pipes, 0.28
# with 512 KiB and 0.24 with 1 MiB (bench/tunnel_splice.py; the Protocol relay: 0.5). Pipe
# capacity is charged to the user whether used or not (fs.pipe-user-pages-soft, 16,384 pages by
# default), which is what limits.spliceMaxTunnels bounds; past that allowance F_SETPIPE_SZ is
# refused and the pipe keeps its default size (64 KiB, or 8 KiB), which still works in smaller
# steps.
PIPE_BYTES: Final = 1024 * 1024
F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # fcntl(2), Linux
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
# Pipe fills per callback before the loop serves others (at most 16 MiB, a few ms), so one fast
# tunnel cannot hold the loop for long, while a callback still amortises over many calls.
ROUNDS_PER_CALLBACK: Final = 16
# Socket kinds splice(2) reads and writes (TCP and Unix stream sockets).
_SPLICEABLE_FAMILIES: Final = frozenset({socket.AF_INET, socket.AF_INET6, socket.AF_UNIX})


class Splicer:
    """Relays opaque tunnels, switching them to splice(2) within the budget.

    `join` starts the Protocol relay and returns its wait; the wait returns None when the
    tunnel passed `after_bytes`, and then `switch` carries it on to its end. Nothing beyond
    the wait is held by a tunnel that never gets there (an idle one)."""

    def __init__(self, *, max_tunnels: int, after_bytes: int) -> None:
        self.max_tunnels = max_tunnels if SPLICE_AVAILABLE else 0
        self.after_bytes = after_bytes
        self.spliced = 0  # tunnels on splice now

    def join(self, client: Peer, upstream: Peer) -> RelayWait:
        """Join the peers (buffered bytes go first) on the Protocol relay."""
        wait = RelayWait()
        if self.max_tunnels > 0 and client.spliceable and upstream.spliceable:
            if self.after_bytes == 0:
                wait.interrupted = True
            else:
                interrupt = wait.interrupt
                client.watch_bytes(self.after_bytes, interrupt)
                upstream.watch_bytes(self.after_bytes, interrupt)
        client.relay(upstream)
        return wait

    async def switch(self, client: Peer, upstream: Peer, *, idle: float, event_id: str) -> Reason:
        """After `join`'s wait returned None: splice the tunnel if it can be, else carry on with
        the Protocol relay; either way until both sides close or the tunnel idles out."""
        client.unwatch_bytes()
        upstream.unwatch_bytes()
        tunnel = await self._switch(client, upstream, idle=idle, event_id=event_id)
        if tunnel is None:
            return await splice(client, upstream, idle=idle)
        metrics.SPLICED_TUNNELS.inc()
        try:
            return await tunnel.run(idle=idle)
        finally:
            tunnel.close()
            self.spliced -= 1
            metrics.SPLICED_TUNNELS.dec()

    async def _switch(
        self, client: Peer, upstream: Peer, *, idle: float, event_id: str
    ) -> SplicedTunnel | None:
        """Steps 2 and 3; None when the tunnel stays on the Protocol relay (counted, said).
        A place in the budget is taken before the first await (two tunnels switching at once
        cannot both take the last one); `switch` gives it back when the tunnel ends."""
        client.unjoin(upstream)  # every None below leaves them apart: the caller joins again
        if self.spliced >= self.max_tunnels:
            _stay("budget", event_id)
            return None
        self.spliced += 1
        try:
            async with asyncio.timeout(idle):
                await client.flush()
                await upstream.flush()
            tunnel = SplicedTunnel.take(client, upstream)
        except (ConnectionResetError, TimeoutError):
            # A side left (or read nothing for the idle timeout) while flushing: the rejoin
            # closes the other, or the idle timeout ends the tunnel.
            self.spliced -= 1
            _stay("closed", event_id)
            return None
        except OSError as exc:
            self.spliced -= 1
            _stay(
                "unsupported" if exc.errno == errno.EINVAL else "descriptors", event_id, error=exc
            )
            return None
        except BaseException:  # cancelled (drain) while flushing
            self.spliced -= 1
            raise
        metrics.TUNNEL_SPLICES.labels(outcome="spliced").inc()
        return tunnel


def _stay(cause: str, event_id: str, *, error: OSError | None = None) -> None:
    metrics.TUNNEL_SPLICES.labels(outcome=cause).inc()
    if error is not None:
        log.warning("tunnel_splice_fallback", cause=cause, error=str(error), event_id=event_id)


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # EPERM past the user's pipe allowance: default size
        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_BYTES)
    return read_end, write_end


class SplicedTunnel:
    """Two ways of splice(2) between two sockets taken from their peers."""

    def __init__(self, ways: tuple[Way, Way], sockets: tuple[socket.socket, socket.socket]) -> None:
        self._ways = ways
        self._sockets = sockets
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_activity = time.monotonic()

    @classmethod
    def take(cls, client: Peer, upstream: Peer) -> SplicedTunnel:
        """Steps 3 and 4's start. Raises OSError with nothing changed (the peers may go on
        with the Protocol relay); bytes a trial splice moved are back in their peer's buffer."""
        taken: list[socket.socket] = []
        pipes: list[int] = []
        try:
            for peer in (client, upstream):
                taken.append(peer.hand_over())
            for sock in taken:
                if sock.type != socket.SOCK_STREAM or sock.family not in _SPLICEABLE_FAMILIES:
                    raise OSError(errno.EINVAL, f"splice(2) cannot take a {sock.family!r} socket")
            for _ in range(2):
                pipes.extend(_pipe())
            ways = (
                Way(client, taken[0], taken[1], pipes[0], pipes[1]),
                Way(upstream, taken[1], taken[0], pipes[2], pipes[3]),
            )
            try:
                for way in ways:
                    way.trial()
            except OSError:
                for way in ways:
                    way.give_back()
                raise
        except OSError:
            for sock in taken:
                sock.close()
            for fd in pipes:
                os.close(fd)
            raise
        tunnel = cls(ways, (taken[0], taken[1]))
        for way in ways:
            way.owner = tunnel
            way.pending = way.source.take()  # what was read and not yet relayed goes first
        for peer in (client, upstream):
            peer.close()  # the transport's descriptor goes; the duplicate holds the connection
            peer.on_abort = tunnel.close
        for way in ways:
            way.pump()
        return tunnel

    async def run(self, *, idle: float) -> Reason:
        """Until both ways end (COMPLETED) or nothing moves for `idle` (IDLE_TIMEOUT)."""
        while not self.done.done():
            quiet = time.monotonic() - self.last_activity
            if quiet >= idle:
                return Reason.IDLE_TIMEOUT
            await asyncio.wait([self.done], timeout=idle - quiet)
        return Reason.COMPLETED

    def way_ended(self) -> None:
        if all(way.ended for way in self._ways):
            self.close()

    def destination_lost(self, way: Way) -> None:
        """`way` cannot deliver any more: the other way's source is that same lost socket, so
        it stops reading, delivers what it holds, then closes the tunnel."""
        way.stop_waiting()
        way.ended = True
        other = self._ways[1] if way is self._ways[0] else self._ways[0]
        if other.ended:
            self.close()
        else:
            other.source_lost = True
            other.pump()

    def close(self) -> None:
        """Stop both ways and close every descriptor (once)."""
        if self.done.done():
            return
        for way in self._ways:
            way.stop()
        for sock in self._sockets:
            sock.close()
        self.done.set_result(None)


class Way:
    """One direction: `source`'s socket -> a pipe -> the other socket."""

    def __init__(
        self,
        source: Peer,
        src: socket.socket,
        dst: socket.socket,
        read_end: int,
        write_end: int,
    ) -> None:
        self.source = source
        self.owner: SplicedTunnel | None = None
        self.pending = b""
        self.ended = False
        self._src = src
        self._src_fd = src.fileno()
        self._dst = dst
        self._dst_fd = dst.fileno()
        self._read_end = read_end
        self._write_end = write_end
        self._in_pipe = 0
        self._eof = False
        self.source_lost = False  # the source socket failed: deliver what is held, then close
        self._waiting: str | None = None  # "read" (the source) or "write" (the destination)
        self._loop = asyncio.get_running_loop()

    def trial(self) -> None:
        """One splice from the source into the pipe, so a descriptor splice refuses (EINVAL)
        shows before the transports are closed. No data (EAGAIN) is fine."""
        with contextlib.suppress(BlockingIOError):
            self._fill()

    def give_back(self) -> None:
        """Return what a trial moved into the pipe to the source peer's buffer (its bytes were
        counted as read), for the Protocol relay to send."""
        while self._in_pipe:
            data = os.read(self._read_end, self._in_pipe)
            self.source.buffer += data
            self._in_pipe -= len(data)

    def _fill(self) -> None:
        moved = os.splice(self._src_fd, self._write_end, PIPE_BYTES, flags=_FLAGS)
        if moved == 0:
            self._eof = True
            return
        self._in_pipe += moved
        self.source.bytes_in += moved

    def pump(self) -> None:
        """Move what can be moved now, then wait for the socket that holds it up."""
        owner = self.owner
        assert owner is not None
        if self.ended:
            return
        try:
            for _ in range(ROUNDS_PER_CALLBACK):
                if self.pending:
                    self.pending = self.pending[self._dst.send(self.pending) :]
                elif self._in_pipe:
                    self._in_pipe -= os.splice(
                        self._read_end, self._dst_fd, self._in_pipe, flags=_FLAGS
                    )
                elif self._eof or self.source_lost:
                    self._end()
                    return
                else:
                    try:
                        self._fill()
                    except BlockingIOError:
                        raise
                    except OSError:  # a reset: the source is gone, with nothing left to send
                        self.source_lost = True
                    owner.last_activity = time.monotonic()
            self._wait("write" if self.pending or self._in_pipe else "read")
        except BlockingIOError:
            self._wait("write" if self.pending or self._in_pipe else "read")
        except OSError:  # the destination is gone (a reset, a broken pipe)
            owner.destination_lost(self)

    def _end(self) -> None:
        """Everything the source sent is delivered: after its EOF, half-close the destination
        (the other way goes on); after its loss, close the tunnel, as connection_lost closes
        the partner."""
        self.stop_waiting()
        self.ended = True
        assert self.owner is not None
        if self.source_lost:
            self.owner.close()
            return
        with contextlib.suppress(OSError):  # the other side may be gone already
            self._dst.shutdown(socket.SHUT_WR)
        self.owner.way_ended()

    def _wait(self, what: str | None) -> None:
        if what == self._waiting:
            return
        if self._waiting == "read":
            self._loop.remove_reader(self._src_fd)
        elif self._waiting == "write":
            self._loop.remove_writer(self._dst_fd)
        self._waiting = what
        if what == "read":
            self._loop.add_reader(self._src_fd, self.pump)
        elif what == "write":
            self._loop.add_writer(self._dst_fd, self.pump)

    def stop_waiting(self) -> None:
        self._wait(None)

    def stop(self) -> None:
        """Stop waiting and close this way's pipe (the sockets are the tunnel's)."""
        self._wait(None)
        self.ended = True
        for fd in (self._read_end, self._write_end):
            os.close(fd)
