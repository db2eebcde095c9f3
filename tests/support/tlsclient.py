"""A TLS client driven by hand over a plain socket (ssl.MemoryBIO), so a test controls how its
first flight goes out: one byte a segment, for a proxy that must reassemble the ClientHello."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path


def https_get(
    sock: socket.socket,
    *,
    server_hostname: str,
    cafile: Path,
    path: str = "/hello",
    dribble_hello: bool = False,
) -> bytes:
    """Handshake with full verification for `server_hostname`, send `GET path` and return the
    whole response (the request asks the server to close). With `dribble_hello`, the
    ClientHello goes out one byte per send, Nagle off."""
    context = ssl.create_default_context(cafile=str(cafile))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    first_flight = True
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            data = outgoing.read()
            if dribble_hello and first_flight:
                for byte in data:
                    sock.sendall(bytes([byte]))
            else:
                sock.sendall(data)
            first_flight = False
            if not _feed(sock, incoming):
                raise ConnectionError("the server closed during the TLS handshake") from None
    sock.sendall(outgoing.read())
    tls.write(
        f"GET {path} HTTP/1.1\r\nHost: {server_hostname}\r\nConnection: close\r\n\r\n".encode()
    )
    sock.sendall(outgoing.read())
    response = b""
    while True:
        try:
            piece = tls.read(65536)
        except ssl.SSLWantReadError:
            if not _feed(sock, incoming):
                return response
            continue
        except ssl.SSLZeroReturnError:
            return response
        if not piece:
            return response
        response += piece


def _feed(sock: socket.socket, incoming: ssl.MemoryBIO) -> bool:
    """Read what the server sent into `incoming`; False at its end of stream."""
    data = sock.recv(65536)
    if not data:
        incoming.write_eof()
        return False
    incoming.write(data)
    return True
