"""ClientHello bytes for tests: crafted field by field (to break one rule at a time), or taken
from Python's own TLS client (a real hello, as OpenSSL sends it)."""

from __future__ import annotations

import contextlib
import os
import ssl
import struct

SERVER_NAME = 0
ALPN = 16
ECH = 0xFE0D
ESNI = 0xFFCE
SUPPORTED_VERSIONS = 43


def vec(length_bytes: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_bytes, "big") + data


def server_name_ext(*names: bytes, name_type: int = 0) -> tuple[int, bytes]:
    entries = b"".join(bytes([name_type]) + vec(2, name) for name in names)
    return SERVER_NAME, vec(2, entries)


def alpn_ext(*protocols: bytes) -> tuple[int, bytes]:
    return ALPN, vec(2, b"".join(vec(1, p) for p in protocols))


def hello_body(
    *,
    extensions: list[tuple[int, bytes]] | None = None,
    version: int = 0x0303,
    session_id: bytes = b"\x00" * 32,
    suites: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
    raw_extensions: bytes | None = None,
) -> bytes:
    body = struct.pack(">H", version) + os.urandom(32) + vec(1, session_id)
    body += vec(2, suites) + vec(1, compression)
    if raw_extensions is not None:
        return body + raw_extensions
    if extensions is None:
        return body
    blob = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in extensions)
    return body + vec(2, blob)


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def client_hello(
    sni: bytes | None = b"origin.test",
    *,
    more: list[tuple[int, bytes]] | None = None,
    alpn: tuple[bytes, ...] = (b"http/1.1",),
) -> bytes:
    """A well-formed ClientHello handshake message (not yet in records)."""
    extensions: list[tuple[int, bytes]] = []
    if sni is not None:
        extensions.append(server_name_ext(sni))
    if alpn:
        extensions.append(alpn_ext(*alpn))
    extensions.append((SUPPORTED_VERSIONS, vec(1, b"\x03\x04\x03\x03")))
    extensions.extend(more or [])
    return handshake(hello_body(extensions=extensions))


def records(
    message: bytes, *sizes: int, content_type: int = 22, version: bytes = b"\x03\x01"
) -> bytes:
    """`message` framed as TLS records: one record, or one per size in `sizes` (the last
    record takes the rest)."""
    out = b""
    rest = message
    for size in sizes:
        chunk, rest = rest[:size], rest[size:]
        out += bytes([content_type]) + version + vec(2, chunk)
    if rest or not sizes:
        out += bytes([content_type]) + version + vec(2, rest)
    return out


def hello_record(sni: bytes | None = b"origin.test", **kwargs: object) -> bytes:
    return records(client_hello(sni, **kwargs))  # type: ignore[arg-type]


def real_client_hello(server_hostname: str | None) -> bytes:
    """The first flight of Python's (OpenSSL's) TLS client: record-framed ClientHello."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()
