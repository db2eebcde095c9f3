"""The ClientHello parser as it was before the one-pass rewrite (issue 16), kept unchanged as the
reference that tests/tls/test_clienthello_differential.py holds the proxy's parser to: a cursor
step per field, every hello reassembled record by record. Not used by the proxy.

It builds the proxy's own `ClientHello` and `TunnelViolation`, so results compare equal.
"""

from __future__ import annotations

from proxy.core.clienthello import (
    ALERT,
    APPLICATION_DATA,
    CHANGE_CIPHER_SPEC,
    CLIENT_HELLO,
    EXT_ALPN,
    EXT_ECH,
    EXT_ESNI,
    EXT_SERVER_NAME,
    HANDSHAKE,
    HANDSHAKE_HEADER_BYTES,
    HOST_NAME_TYPE,
    MAX_CLIENT_HELLO_BYTES,
    MAX_RECORD_PAYLOAD,
    MAX_SERVER_NAME_BYTES,
    RECORD_HEADER_BYTES,
    ClientHello,
)
from proxy.errors import Reason, TunnelViolation

_NOT_YET_TLS_MESSAGES = {
    CHANGE_CIPHER_SPEC: "ChangeCipherSpec before the ClientHello",
    ALERT: "alert before the ClientHello",
    APPLICATION_DATA: "application data before the ClientHello",
}


def _malformed(message: str) -> TunnelViolation:
    return TunnelViolation(message, reason=Reason.CLIENTHELLO_MALFORMED)


def _not_tls(message: str) -> TunnelViolation:
    return TunnelViolation(message, reason=Reason.PROTOCOL_MISMATCH)


class ReferenceClientHelloReader:
    """Feed the client's first bytes; get a `ClientHello`, None (need more), or a TunnelViolation.

    Once it has returned a ClientHello it keeps returning it and ignores further bytes (they are
    the rest of the client's stream, relayed as they are). After an error every call raises.
    """

    __slots__ = (
        "_error",
        "_handshake",
        "_header",
        "_needed",
        "_record_left",
        "_records",
        "_result",
        "_seen",
    )

    def __init__(self) -> None:
        self._header = bytearray()  # a record header being collected
        self._record_left = 0  # payload bytes of the current record not yet received
        self._handshake = bytearray()  # reassembled handshake bytes
        self._needed = 0  # handshake bytes the ClientHello needs, once its header is in
        self._records = 0
        self._seen = 0
        self._result: ClientHello | None = None
        self._error: TunnelViolation | None = None

    @property
    def bytes_seen(self) -> int:
        return self._seen

    def feed(self, data: bytes | bytearray | memoryview) -> ClientHello | None:
        if self._error is not None:
            raise self._error
        if self._result is not None:
            return self._result
        try:
            return self._feed(memoryview(data))
        except TunnelViolation as exc:
            self._error = exc
            raise

    def _feed(self, view: memoryview) -> ClientHello | None:
        pos, end = 0, len(view)
        while pos < end:
            if self._record_left == 0:
                take = min(RECORD_HEADER_BYTES - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                self._seen += take
                self._check_header_prefix()
                if len(self._header) == RECORD_HEADER_BYTES:
                    self._start_record()
                continue
            take = min(self._record_left, end - pos)
            self._handshake += view[pos : pos + take]
            pos += take
            self._seen += take
            self._record_left -= take
            hello = self._check_handshake()
            if hello is not None:
                return hello
        return None

    def _check_header_prefix(self) -> None:
        """Refuse as early as the bytes allow: a client that is not speaking TLS is told at its
        first byte, not after a timeout."""
        first = self._header[0]
        if self._records:
            return
        if first in _NOT_YET_TLS_MESSAGES:
            raise _malformed(_NOT_YET_TLS_MESSAGES[first])
        if first & 0x80:
            # SSLv2 record: 2-byte length with the high bit set, then msg_type 1 (CLIENT-HELLO).
            if len(self._header) >= 3 and self._header[2] == CLIENT_HELLO:
                raise _malformed("SSLv2-format ClientHello (RFC 6176 prohibits SSL 2.0)")
            if len(self._header) >= 3:
                raise _not_tls("first bytes are not a TLS record")
            return
        if first != HANDSHAKE:
            raise _not_tls("first bytes are not a TLS record")
        if len(self._header) >= 2 and self._header[1] != 3:
            raise _not_tls("first bytes are not a TLS record (record version is not 3.x)")

    def _start_record(self) -> None:
        content_type = self._header[0]
        major, minor = self._header[1], self._header[2]
        length = int.from_bytes(self._header[3:5], "big")
        self._header.clear()
        if content_type != HANDSHAKE:
            # Only reachable for a second record: the first was checked byte by byte.
            raise _malformed("another record type inside the ClientHello (RFC 8446 section 5.1)")
        if major != 3 or minor > 4:
            raise _malformed(f"record version {major}.{minor} is not TLS")
        if length == 0:
            raise _malformed("zero-length handshake record (RFC 8446 section 5.1)")
        if length > MAX_RECORD_PAYLOAD:
            raise _malformed(f"record of {length} bytes is over 2^14 (RFC 8446 section 5.1)")
        self._records += 1
        self._record_left = length

    def _check_handshake(self) -> ClientHello | None:
        have = len(self._handshake)
        if not self._needed:
            if have and self._handshake[0] != CLIENT_HELLO:
                raise _malformed(f"first handshake message is type {self._handshake[0]}, not 1")
            if have < HANDSHAKE_HEADER_BYTES:
                return None
            self._needed = HANDSHAKE_HEADER_BYTES + int.from_bytes(self._handshake[1:4], "big")
            if self._needed > MAX_CLIENT_HELLO_BYTES:
                raise _malformed(
                    f"ClientHello of {self._needed} bytes is over {MAX_CLIENT_HELLO_BYTES}"
                )
        if have > self._needed or (have == self._needed and self._record_left):
            # The record that ends the hello declares bytes beyond it: another handshake message
            # in the same record, which no client sends before the ServerHello.
            raise _malformed("bytes after the ClientHello inside its record")
        if have < self._needed:
            return None
        self._result = _parse_body(
            memoryview(self._handshake)[HANDSHAKE_HEADER_BYTES:],
            size=self._needed,
            records=self._records,
        )
        self._handshake = bytearray()
        return self._result


class _Cursor:
    """Bounds-checked reads over one vector; every overrun is a malformed hello."""

    __slots__ = ("_end", "_pos", "_view", "_what")

    def __init__(self, view: memoryview, what: str) -> None:
        self._view = view
        self._pos = 0
        self._end = len(view)
        self._what = what

    @property
    def left(self) -> int:
        return self._end - self._pos

    def take(self, count: int) -> memoryview:
        if count > self.left:
            raise _malformed(f"{self._what}: length {count} runs past the {self.left} bytes left")
        chunk = self._view[self._pos : self._pos + count]
        self._pos += count
        return chunk

    def take_all(self) -> memoryview:
        return self.take(self.left)

    def uint(self, width: int) -> int:
        return int.from_bytes(self.take(width), "big")

    def vector(self, length_bytes: int, what: str) -> _Cursor:
        return _Cursor(self.take(self.uint(length_bytes)), what)

    def expect_end(self) -> None:
        if self.left:
            raise _malformed(f"{self._what}: {self.left} trailing bytes")


def _parse_body(body: memoryview, *, size: int, records: int) -> ClientHello:
    """RFC 8446 section 4.1.2 (TLS 1.2's ClientHello is the same shape, RFC 5246 7.4.1.2)."""
    cursor = _Cursor(body, "ClientHello")
    legacy_version = cursor.uint(2)
    if legacy_version >> 8 != 3:
        raise _malformed(f"ClientHello version {legacy_version:#06x} is not TLS")
    cursor.take(32)  # random
    session_id = cursor.vector(1, "legacy_session_id")
    if session_id.left > 32:
        raise _malformed("legacy_session_id longer than 32 bytes")
    suites = cursor.vector(2, "cipher_suites")
    if suites.left < 2 or suites.left % 2:
        raise _malformed("cipher_suites is empty or not a list of 2-byte values")
    if cursor.vector(1, "legacy_compression_methods").left < 1:
        raise _malformed("legacy_compression_methods is empty")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    if cursor.left:  # TLS 1.2 and earlier may omit the extensions block entirely
        extensions = cursor.vector(2, "extensions")
        cursor.expect_end()
        while extensions.left:
            ext_type = extensions.uint(2)
            data = extensions.vector(2, f"extension {ext_type}")
            if ext_type in seen:
                raise _malformed(f"extension {ext_type} appears twice (RFC 8446 section 4.2)")
            seen.add(ext_type)
            if ext_type == EXT_SERVER_NAME:
                server_name = _parse_server_name(data)
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(data)
    return ClientHello(
        server_name=server_name,
        alpn=alpn,
        ech=EXT_ECH in seen,
        esni=EXT_ESNI in seen,
        legacy_version=legacy_version,
        size=size,
        records=records,
    )


def _parse_server_name(data: _Cursor) -> str:
    """RFC 6066 section 3: ServerNameList server_name_list<1..2^16-1>."""
    names = data.vector(2, "server_name list")
    data.expect_end()
    if not names.left:
        raise _malformed("server_name extension with an empty list")
    name_type = names.uint(1)
    if name_type != HOST_NAME_TYPE:
        raise _malformed(f"server_name entry of type {name_type}, not host_name")
    raw = bytes(names.vector(2, "host_name").take_all())
    if names.left:
        raise _malformed("server_name lists more than one name (RFC 6066 section 3)")
    if not raw:
        raise _malformed("empty server name")
    if len(raw) > MAX_SERVER_NAME_BYTES:
        raise _malformed(f"server name longer than {MAX_SERVER_NAME_BYTES} bytes")
    if b"\x00" in raw:
        raise _malformed("NUL byte in the server name")
    if not all(0x21 <= byte <= 0x7E for byte in raw):
        raise _malformed("server name is not printable ASCII (RFC 6066: ASCII host name)")
    return raw.decode("ascii")


def _parse_alpn(data: _Cursor) -> tuple[str, ...]:
    """RFC 7301 section 3.1: ProtocolName protocol_name_list<2..2^16-1>, names <1..2^8-1>."""
    names = data.vector(2, "ALPN list")
    data.expect_end()
    if not names.left:
        raise _malformed("ALPN extension with an empty list")
    protocols: list[str] = []
    while names.left:
        name = bytes(names.vector(1, "ALPN protocol name").take_all())
        if not name:
            raise _malformed("empty ALPN protocol name")
        protocols.append(name.decode("ascii", "backslashreplace"))
    return tuple(protocols)
