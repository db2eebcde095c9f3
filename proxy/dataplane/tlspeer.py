"""A `Peer` that speaks TLS over another peer's socket, for interception.

The TLS state machine is an `ssl.SSLObject` over two memory BIOs, driven from this protocol's
callbacks: ciphertext from the socket goes into the incoming BIO, plaintext comes out into the
ordinary `Peer` buffer (so the forwarding code reads it exactly as it reads a plain socket), and
whatever OpenSSL wants to send is flushed to the transport after every step.

Why not `loop.start_tls`: the client's ClientHello has already been read (it had to be checked
before anything else happened), and start_tls cannot be handed bytes that were read before it.
Memory BIOs can: `TLSPeer` starts by feeding them whatever the plain peer had buffered.

The socket's own counters (bytes in, last activity, closed) stay on the plain peer it replaces,
so the tunnel's byte accounting, idle checks and `close_connections_from` see one connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time

from proxy.dataplane.peer import Peer

# Plaintext taken out of the TLS object per read call: one TLS record is at most 16 KiB.
TLS_READ_BYTES = 64 * 1024


class TLSPeer(Peer):
    encrypts = True

    def __init__(
        self,
        raw: Peer,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        super().__init__()
        transport = raw.transport
        if transport is None:
            raise ConnectionResetError("the connection is not open")
        self.raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._handshaken = False
        self._handshake_waiter: asyncio.Future[None] | None = None
        pending = raw.take()
        self.connection_made(transport)
        transport.set_protocol(self)
        if pending:
            self._incoming.write(pending)
        if raw.closed:
            self.closed = True
            self.eof = True
        elif raw.eof:
            self._incoming.write_eof()
            self.eof = True
        self._apply_reading()  # the plain peer may have paused reading for its own buffer

    @property
    def tls_object(self) -> ssl.SSLObject:
        return self._tls

    # -- handshake ---------------------------------------------------------------------------
    async def handshake(self) -> None:
        """Complete the handshake; raises ssl.SSLError (SSLCertVerificationError for a bad
        certificate) or ConnectionResetError. The caller bounds it with a timeout."""
        loop = asyncio.get_running_loop()
        while not self._step_handshake():
            if self.closed or self._incoming.eof:
                raise ConnectionResetError("connection closed during the TLS handshake")
            self._handshake_waiter = loop.create_future()
            try:
                await self._handshake_waiter
            finally:
                self._handshake_waiter = None
        self._flush()
        self._handshaken = True
        self._decrypt()

    def _step_handshake(self) -> bool:
        """One handshake step; True when done, False when it needs the peer's next bytes."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except ssl.SSLError:
            self._flush()  # the alert that tells the peer why
            raise
        return True

    def _wake_handshake(self) -> None:
        waiter = self._handshake_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- asyncio.Protocol --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.raw.bytes_in += len(data)
        self.raw.last_activity = time.monotonic()
        self._incoming.write(data)
        if self._handshaken:
            self._decrypt()
        else:
            self._wake_handshake()

    def eof_received(self) -> bool:
        self.raw.eof = True
        self._incoming.write_eof()
        if self._handshaken:
            self._decrypt()
        self._wake_handshake()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._wake_handshake()
        self.raw.connection_lost(exc)

    def _decrypt(self) -> None:
        while not self.closed:
            try:
                chunk = self._tls.read(TLS_READ_BYTES)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or the TCP stream ended without one: either way no more data.
                Peer.eof_received(self)
                break
            except ssl.SSLError:
                self.abort()  # a record that does not decrypt: nothing after it can be trusted
                break
            if not chunk:
                Peer.eof_received(self)
                break
            Peer.data_received(self, chunk)
        self._flush()  # post-handshake messages (key updates) may want an answer

    # -- writing -----------------------------------------------------------------------------
    def _flush(self) -> None:
        data = self._outgoing.read()
        transport = self.transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def write(self, data: bytes) -> None:
        if self.closed or not self._handshaken:
            return
        try:
            self._tls.write(data)
        except ssl.SSLError:
            self.abort()
            return
        self._flush()

    def write_eof(self) -> None:
        """TLS has no half-close that HTTP/1.1 relies on: send close_notify."""
        self._close_notify()

    def _close_notify(self) -> None:
        if self._handshaken and not self.closed:
            # SSLWantReadError: our close_notify is out, the peer's has not come yet.
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            self._flush()

    def close(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._close_notify()
        transport.close()
