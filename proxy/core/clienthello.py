"""TLS ClientHello parser: the first bytes of a `tls` tunnel in, what the client asks for out.

Sans-I/O and incremental, in the manner of h11: `ClientHelloReader.feed` takes bytes as they
arrive, however the TCP stream or the TLS records split them, and returns a `ClientHello` once
the whole message is in. Every byte is looked at once, so a hello delivered one byte at a time
costs the same as one delivered whole.

Speed: this runs once per `tls` tunnel. The usual first read is one record holding the whole
hello; it is parsed where it lies, without reassembly, and anything else takes the record by
record path, which ends in the same body parser. The body is read in one pass with `struct` and
offsets (see there), not one call per field.

Rules this module enforces, and why:

1. Only a handshake record may come first (RFC 8446 section 5.1: handshake messages MUST NOT be
   interleaved with other record types). An alert, a ChangeCipherSpec or application data before
   the hello is refused: no client sends them, and a parser that skipped them would let a client
   smuggle bytes past the check.
2. Records are bounded: a zero-length handshake fragment or a record over 2^14 bytes is refused
   (RFC 8446 section 5.1 "MUST NOT"); the hello itself is bounded by MAX_CLIENT_HELLO_BYTES.
3. The first handshake message must be a ClientHello; it may span records, but nothing may
   follow it inside its last record (a client waits for the ServerHello).
4. Every length is checked against what contains it before anything is read: nothing is read
   past the bytes the client actually declared, and trailing bytes inside a vector are refused.
5. server_name (RFC 6066 section 3): one extension, exactly one entry, of type host_name, a
   non-empty name of printable ASCII (no NUL: C-string parsers would truncate it). Two names
   are what a client uses to make two parsers see two different hosts.
6. An SSLv2-format hello is refused: TLS 1.0 and later clients do not send it (RFC 6176).
7. Any extension type appearing twice is refused (RFC 8446 section 4.2: "There MUST NOT be more
   than one extension of the same type").

Bytes that are not a TLS record at all (an SSH banner, plaintext HTTP) are a PROTOCOL_MISMATCH;
TLS that breaks the rules is CLIENTHELLO_MALFORMED. Both are `TunnelViolation`s.
"""

from __future__ import annotations

import re
import struct
from typing import Final

# Built in a module mypyc does not compile (proxy.core.values says why); this module's type too.
from proxy.core.values import ClientHello as ClientHello
from proxy.core.values import new_client_hello
from proxy.errors import Reason, TunnelViolation

# --- Limits ---------------------------------------------------------------------------------------

# RFC 8446 section 5.1: "The length MUST NOT exceed 2^14 bytes."
MAX_RECORD_PAYLOAD: Final = 1 << 14
# The ClientHello as a handshake message (header included). Go's crypto/tls bounds every
# handshake message it reads at 65536 bytes (`maxHandshake`); browsers send 0.5-2 KiB, and a
# post-quantum key share plus a large PSK ticket stays under 8 KiB. The protocol allows 16 MiB,
# which is memory we will not hold per connection before knowing where it goes.
MAX_CLIENT_HELLO_BYTES: Final = 65536
# RFC 1035 section 2.3.4: 255 octets a name on the wire.
MAX_SERVER_NAME_BYTES: Final = 255

RECORD_HEADER_BYTES: Final = 5
HANDSHAKE_HEADER_BYTES: Final = 4
# A record header (content type, version major and minor, length; RFC 8446 section 5.1) and the
# first handshake header after it (msg_type in the top byte, then a 24-bit length; section 4).
_FIRST_RECORD = struct.Struct(">BBBHI")

# Record content types (RFC 8446 section 5.1).
CHANGE_CIPHER_SPEC: Final = 20
ALERT: Final = 21
HANDSHAKE: Final = 22
APPLICATION_DATA: Final = 23
# Handshake message type (RFC 8446 section 4).
CLIENT_HELLO: Final = 1

# Extension types (IANA TLS ExtensionType Values).
EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
# Encrypted Client Hello (draft-ietf-tls-esni-18 onwards, the code point browsers ship).
EXT_ECH: Final = 0xFE0D
# The older Encrypted SNI (draft-ietf-tls-esni up to -02), still seen from old Firefox builds.
EXT_ESNI: Final = 0xFFCE
# RFC 6066 section 3: NameType host_name.
HOST_NAME_TYPE: Final = 0

_NOT_YET_TLS_MESSAGES = {
    CHANGE_CIPHER_SPEC: "ChangeCipherSpec before the ClientHello",
    ALERT: "alert before the ClientHello",
    APPLICATION_DATA: "application data before the ClientHello",
}


def _malformed(message: str) -> TunnelViolation:
    return TunnelViolation(message, reason=Reason.CLIENTHELLO_MALFORMED)


def _not_tls(message: str) -> TunnelViolation:
    return TunnelViolation(message, reason=Reason.PROTOCOL_MISMATCH)


class ClientHelloReader:
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
            if not self._seen:
                hello = self._whole_hello(data)
                if hello is not None:
                    return hello
            return self._feed(memoryview(data))
        except TunnelViolation as exc:
            self._error = exc
            raise

    def _whole_hello(self, data: bytes | bytearray | memoryview) -> ClientHello | None:
        """The first read is one valid handshake record that holds exactly one whole ClientHello
        (what clients send): parse it in place. None, with nothing consumed, for anything else,
        which `_feed` then takes record by record and refuses as the rules say."""
        if len(data) < RECORD_HEADER_BYTES + HANDSHAKE_HEADER_BYTES:
            return None
        content_type, major, minor, length, message = _FIRST_RECORD.unpack_from(data)
        if (
            content_type != HANDSHAKE
            or major != 3
            or minor > 4
            or length > MAX_RECORD_PAYLOAD
            or len(data) < RECORD_HEADER_BYTES + length
            or message >> 24 != CLIENT_HELLO
            or HANDSHAKE_HEADER_BYTES + (message & 0xFFFFFF) != length
        ):
            return None
        end = RECORD_HEADER_BYTES + length
        self._seen = end  # the bytes after the record are the rest of the stream: not ours
        self._records = 1
        buf = data if isinstance(data, bytes) else bytes(data[:end])
        self._result = _parse_body(
            buf, RECORD_HEADER_BYTES + HANDSHAKE_HEADER_BYTES, end, size=length, records=1
        )
        return self._result

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
            bytes(self._handshake),
            HANDSHAKE_HEADER_BYTES,
            self._needed,
            size=self._needed,
            records=self._records,
        )
        self._handshake = bytearray()
        return self._result


# --- The message body ----------------------------------------------------------------------------
#
# One pass over the reassembled bytes with explicit offsets: each fixed group of fields is one
# `struct` unpack, each vector one bounds check against what contains it. Every check and every
# error message is what a field-by-field cursor would give (length L runs past the N bytes left,
# N trailing bytes), named after the vector being read, in the order the fields come.

_U16 = struct.Struct(">H")
# An extension's header: extension_type, then the length of extension_data (RFC 8446 4.2).
_EXTENSION_HEADER = struct.Struct(">HH")
# legacy_version, random (skipped), then legacy_session_id's 1-byte length (RFC 8446 4.1.2).
_VERSION_RANDOM_SESSION = struct.Struct(">H32xB")
_RANDOM_BYTES = 32
MAX_SESSION_ID_BYTES = 32
# RFC 6066 section 3 host names: printable ASCII without space; bytes outside it are refused.
_NOT_HOST_NAME_BYTE = re.compile(rb"[^\x21-\x7e]")


def _overrun(what: str, count: int, left: int) -> TunnelViolation:
    return _malformed(f"{what}: length {count} runs past the {left} bytes left")


def _trailing(what: str, count: int) -> TunnelViolation:
    return _malformed(f"{what}: {count} trailing bytes")


def _parse_body(buf: bytes, pos: int, end: int, *, size: int, records: int) -> ClientHello:
    """The ClientHello in `buf[pos:end]` (after its handshake header): RFC 8446 section 4.1.2
    (TLS 1.2's ClientHello is the same shape, RFC 5246 7.4.1.2)."""
    if end - pos >= _VERSION_RANDOM_SESSION.size:
        legacy_version, length = _VERSION_RANDOM_SESSION.unpack_from(buf, pos)
        if legacy_version >> 8 != 3:
            raise _malformed(f"ClientHello version {legacy_version:#06x} is not TLS")
        pos += _VERSION_RANDOM_SESSION.size
    else:
        legacy_version, length = _short_start(buf, pos, end)  # always raises
    # legacy_session_id<0..32>
    if length > end - pos:
        raise _overrun("ClientHello", length, end - pos)
    if length > MAX_SESSION_ID_BYTES:
        raise _malformed("legacy_session_id longer than 32 bytes")
    pos += length
    # cipher_suites<2..2^16-2>
    if end - pos < 2:
        raise _overrun("ClientHello", 2, end - pos)
    (length,) = _U16.unpack_from(buf, pos)
    pos += 2
    if length > end - pos:
        raise _overrun("ClientHello", length, end - pos)
    if length < 2 or length % 2:
        raise _malformed("cipher_suites is empty or not a list of 2-byte values")
    pos += length
    # legacy_compression_methods<1..2^8-1>
    if pos >= end:
        raise _overrun("ClientHello", 1, 0)
    length = buf[pos]
    pos += 1
    if length > end - pos:
        raise _overrun("ClientHello", length, end - pos)
    if length < 1:
        raise _malformed("legacy_compression_methods is empty")
    pos += length
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    if pos < end:  # TLS 1.2 and earlier may omit the extensions block entirely
        _vector_filling(buf, pos, end, "ClientHello")
        pos += 2
        while pos < end:
            if end - pos < _EXTENSION_HEADER.size:
                # The type (2 bytes) or the length after it does not fit.
                short = end - pos if end - pos < 2 else end - pos - 2
                raise _overrun("extensions", 2, short)
            ext_type, length = _EXTENSION_HEADER.unpack_from(buf, pos)
            pos += _EXTENSION_HEADER.size
            if length > end - pos:
                raise _overrun("extensions", length, end - pos)
            if ext_type in seen:
                raise _malformed(f"extension {ext_type} appears twice (RFC 8446 section 4.2)")
            seen.add(ext_type)
            if ext_type == EXT_SERVER_NAME:
                server_name = _parse_server_name(buf, pos, pos + length)
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(buf, pos, pos + length)
            pos += length
    return new_client_hello(
        server_name=server_name,
        alpn=alpn,
        ech=EXT_ECH in seen,
        esni=EXT_ESNI in seen,
        legacy_version=legacy_version,
        size=size,
        records=records,
    )


def _short_start(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A body too short for version, random and the session id's length: say which is cut."""
    if end - pos < 2:
        raise _overrun("ClientHello", 2, end - pos)
    (legacy_version,) = _U16.unpack_from(buf, pos)
    if legacy_version >> 8 != 3:
        raise _malformed(f"ClientHello version {legacy_version:#06x} is not TLS")
    left = end - pos - 2
    if left < _RANDOM_BYTES:
        raise _overrun("ClientHello", _RANDOM_BYTES, left)
    raise _overrun("ClientHello", 1, 0)  # the random ends the body: no session id length


def _vector_filling(buf: bytes, pos: int, end: int, what: str) -> int:
    """The 2-byte-length vector at `pos`, which must fill `what` up to `end` (the extensions
    block, an extension's one list); returns its length (its bytes start at pos + 2)."""
    if end - pos < 2:
        raise _overrun(what, 2, end - pos)
    length: int = _U16.unpack_from(buf, pos)[0]
    left = end - pos - 2
    if length > left:
        raise _overrun(what, length, left)
    if left > length:
        raise _trailing(what, left - length)
    return length


def _parse_server_name(buf: bytes, pos: int, end: int) -> str:
    """RFC 6066 section 3: ServerNameList server_name_list<1..2^16-1>."""
    if not _vector_filling(buf, pos, end, "extension 0"):
        raise _malformed("server_name extension with an empty list")
    pos += 3  # the list's length, then the entry's NameType
    name_type = buf[pos - 1]
    if name_type != HOST_NAME_TYPE:
        raise _malformed(f"server_name entry of type {name_type}, not host_name")
    # HostName host_name<1..2^16-1>
    if end - pos < 2:
        raise _overrun("server_name list", 2, end - pos)
    (length,) = _U16.unpack_from(buf, pos)
    pos += 2
    if length > end - pos:
        raise _overrun("server_name list", length, end - pos)
    raw = buf[pos : pos + length]
    if end - pos > length:
        raise _malformed("server_name lists more than one name (RFC 6066 section 3)")
    if not raw:
        raise _malformed("empty server name")
    if length > MAX_SERVER_NAME_BYTES:
        raise _malformed(f"server name longer than {MAX_SERVER_NAME_BYTES} bytes")
    if b"\x00" in raw:
        raise _malformed("NUL byte in the server name")
    if _NOT_HOST_NAME_BYTE.search(raw):
        raise _malformed("server name is not printable ASCII (RFC 6066: ASCII host name)")
    return raw.decode("ascii")


def _parse_alpn(buf: bytes, pos: int, end: int) -> tuple[str, ...]:
    """RFC 7301 section 3.1: ProtocolName protocol_name_list<2..2^16-1>, names <1..2^8-1>."""
    if not _vector_filling(buf, pos, end, "extension 16"):
        raise _malformed("ALPN extension with an empty list")
    pos += 2
    protocols: list[str] = []
    while pos < end:
        length = buf[pos]
        pos += 1
        if length > end - pos:
            raise _overrun("ALPN list", length, end - pos)
        if not length:
            raise _malformed("empty ALPN protocol name")
        protocols.append(buf[pos : pos + length].decode("ascii", "backslashreplace"))
        pos += length
    return tuple(protocols)
