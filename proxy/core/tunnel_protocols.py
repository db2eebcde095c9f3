"""What the first bytes of an allowed tunnel must be, per the rule's `protocol` (DESIGN section 3).

Pure and incremental: a `FirstBytesCheck` is fed the client's bytes as they arrive and answers
"accepted", "need more", or raises a `TunnelViolation`. The data plane sends nothing upstream
until a check has accepted, and bounds the wait with `timeouts.sniPeek`.

  tls       a TLS ClientHello (proxy.core.clienthello), then the SNI rules in `check_server_name`
  postgres  an SSLRequest, GSSENCRequest or CancelRequest, or a protocol 3 StartupMessage
  ssh       an `SSH-2.0-` identification line (RFC 4253 section 4.2)
  http      an HTTP/1.x request line start; each request is then parsed in full elsewhere
  tcp       anything
  (none)    a rule that names no protocol: `tls`, or `http` when the first bytes start an HTTP
            request (clients such as Node's undici and python's websockets tunnel every
            http:// and ws:// URL); the first byte tells them apart

`starts_http_request` says whether refused first bytes were an HTTP request, so the tunnel can
answer it with a 403 the client prints instead of a silent close (DESIGN section 6).

Every check refuses as soon as the bytes seen so far cannot start the protocol, so a client
speaking the wrong protocol is closed at once rather than at the timeout.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

from proxy.core.clienthello import ClientHello, ClientHelloReader
from proxy.core.hosts import Host, normalize_name
from proxy.core.policy.model import EchMode, SniMode, TlsOptions, TunnelProtocol
from proxy.errors import BadRequest, Reason, TunnelViolation

# The audit record keeps this many of the client's first bytes (hex) when a check refuses: enough
# to tell TLS (16 03 01), SSH ("SSH-"), HTTP ("GET ") and postgres apart, too few to carry data.
FIRST_BYTES_AUDITED: Final = 16

# PostgreSQL frontend/backend protocol, section 55.7 "Message Formats" (v16 docs).
PG_SSL_REQUEST: Final = 80877103
PG_GSSENC_REQUEST: Final = 80877104  # libpq sends it first when built with GSSAPI
PG_CANCEL_REQUEST: Final = 80877102
PG_PROTOCOL_MAJOR: Final = 3
# The server's own bound (src/include/libpq/pqcomm.h MAX_STARTUP_PACKET_LENGTH).
PG_MAX_STARTUP_BYTES: Final = 10000

# RFC 4253 section 4.2: the identification string, CR LF included, is at most 255 characters.
SSH_MAX_LINE_BYTES: Final = 255
SSH_PREFIX: Final = b"SSH-2.0-"

# Longest method we let open an `http` tunnel: proxy.core.http1.MAX_METHOD_BYTES.
HTTP_MAX_METHOD_BYTES: Final = 32
# RFC 9112 section 2.2 lets a server skip empty lines before the request line; a few, no more.
HTTP_MAX_LEADING_CRLF_BYTES: Final = 8
_TCHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)


# What an HTTP request may start with: a method's first character, or an empty line's CR or LF.
_HTTP_FIRST_BYTES: Final = _TCHARS | frozenset(b"\r\n")


def _mismatch(message: str) -> TunnelViolation:
    return TunnelViolation(message, reason=Reason.PROTOCOL_MISMATCH)


class FirstBytesCheck(Protocol):
    def feed(self, data: bytes) -> bool:
        """True once the bytes so far are accepted; False while more are needed."""
        ...


class TlsCheck:
    def __init__(self) -> None:
        self._reader = ClientHelloReader()
        self.hello: ClientHello | None = None

    def feed(self, data: bytes) -> bool:
        self.hello = self._reader.feed(data)
        return self.hello is not None


class PostgresCheck:
    """The first message of a PostgreSQL connection, whole (it is at most 10000 bytes)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> bool:
        self._buf += data
        buf = self._buf
        # Every valid first message is shorter than 64 KiB, so its length starts with 00 00.
        if any(buf[:2]):
            raise _mismatch("not a PostgreSQL SSLRequest or StartupMessage")
        if len(buf) < 8:
            return False
        length = int.from_bytes(buf[0:4], "big")
        code = int.from_bytes(buf[4:8], "big")
        if code in (PG_SSL_REQUEST, PG_GSSENC_REQUEST):
            if length != 8:
                raise _mismatch("PostgreSQL SSLRequest with a wrong length")
            return True
        if code == PG_CANCEL_REQUEST:
            if length != 16:
                raise _mismatch("PostgreSQL CancelRequest with a wrong length")
            return len(buf) >= 16
        if code >> 16 != PG_PROTOCOL_MAJOR:
            raise _mismatch("not a PostgreSQL protocol 3 StartupMessage")
        if not 8 < length <= PG_MAX_STARTUP_BYTES:
            raise _mismatch(f"PostgreSQL StartupMessage length {length} is out of range")
        if len(buf) < length:
            return False
        _check_startup_parameters(bytes(buf[8:length]))
        return True


def _check_startup_parameters(params: bytes) -> None:
    """Name/value pairs of NUL-terminated strings, then one NUL; `user` is required."""
    if not params.endswith(b"\x00"):
        raise _mismatch("PostgreSQL StartupMessage is not NUL-terminated")
    fields = params[:-1].split(b"\x00")
    if fields == [b""] or len(fields) % 2 != 1 or fields[-1] != b"":
        raise _mismatch("PostgreSQL StartupMessage parameters are not name/value pairs")
    names = fields[:-1:2]
    if b"user" not in names:
        raise _mismatch("PostgreSQL StartupMessage without a user")


class SshCheck:
    """`SSH-2.0-softwareversion [SP comments] CR LF` (RFC 4253 section 4.2)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> bool:
        self._buf += data
        buf = self._buf
        head = bytes(buf[: len(SSH_PREFIX)])
        if not SSH_PREFIX.startswith(head):
            raise _mismatch("not an SSH-2.0 identification string")
        end = buf.find(b"\n", 0, SSH_MAX_LINE_BYTES)
        if end < 0:
            if len(buf) >= SSH_MAX_LINE_BYTES:
                raise _mismatch(f"SSH identification line longer than {SSH_MAX_LINE_BYTES}")
            return False
        # RFC 4253 section 4.2 lets implementations accept a bare LF from older peers.
        line = bytes(buf[:end]).removesuffix(b"\r")
        if len(line) <= len(SSH_PREFIX) or not all(0x20 <= byte <= 0x7E for byte in line):
            raise _mismatch("malformed SSH identification line")
        if line[len(SSH_PREFIX) : len(SSH_PREFIX) + 1] == b" ":
            raise _mismatch("SSH identification without a software version")
        return True


class HttpCheck:
    """The start of an HTTP/1.x request line: a method token and a space. The request itself is
    then read and parsed by the strict core parser, request by request."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> bool:
        self._buf += data
        stripped = bytes(self._buf).lstrip(b"\r\n")
        if len(self._buf) - len(stripped) > HTTP_MAX_LEADING_CRLF_BYTES:
            raise _mismatch("too many empty lines before an HTTP request line")
        for index, byte in enumerate(stripped[: HTTP_MAX_METHOD_BYTES + 1]):
            if byte == 0x20:
                if index == 0:
                    raise _mismatch("not an HTTP request line")
                return True
            if byte not in _TCHARS:
                raise _mismatch("not an HTTP request line")
        if len(stripped) > HTTP_MAX_METHOD_BYTES:
            raise _mismatch("HTTP method longer than the longest accepted")
        return False


class TlsOrHttpCheck:
    """A rule without `protocol`: a TLS ClientHello or the start of an HTTP request. An HTTP
    request line starts with a token character (or an empty line's CR or LF); a TLS record with
    its content type, a byte below 0x20, never one of those. So the first byte picks the check,
    and bytes that are neither are refused by the TLS check, with its reasons."""

    def __init__(self) -> None:
        self._check: TlsCheck | HttpCheck | None = None
        self.hello: ClientHello | None = None  # set when the bytes were TLS

    def feed(self, data: bytes) -> bool:
        if self._check is None:
            if not data:
                return False
            self._check = HttpCheck() if data[0] in _HTTP_FIRST_BYTES else TlsCheck()
        try:
            done = self._check.feed(data)
        except TunnelViolation as exc:
            if isinstance(self._check, HttpCheck):
                raise _mismatch("neither a TLS ClientHello nor an HTTP request") from exc
            raise
        if done and isinstance(self._check, TlsCheck):
            self.hello = self._check.hello
        return done


def starts_http_request(data: bytes | bytearray) -> bool:
    """The bytes start an HTTP/1.x request line (a method token and a space)."""
    try:
        return HttpCheck().feed(bytes(data))
    except TunnelViolation:
        return False


class AnyBytes:
    def feed(self, data: bytes) -> bool:
        return True


def first_bytes_check(protocol: TunnelProtocol | None) -> FirstBytesCheck:
    """The check for a rule's `protocol`; None (not written) takes TLS or HTTP."""
    match protocol:
        case None:
            return TlsOrHttpCheck()
        case TunnelProtocol.TLS:
            return TlsCheck()
        case TunnelProtocol.POSTGRES:
            return PostgresCheck()
        case TunnelProtocol.SSH:
            return SshCheck()
        case TunnelProtocol.HTTP:
            return HttpCheck()
        case TunnelProtocol.TCP:
            return AnyBytes()


# --- SNI ------------------------------------------------------------------------------------------


class SniOutcome(StrEnum):
    MATCHES = "matches"  # the SNI names the CONNECT host
    ABSENT = "absent"  # no SNI, and the rule or an IP-literal CONNECT allows that
    CHECK_POLICY = "check_policy"  # CONNECT to an IP: the SNI name must itself be allowed


@dataclass(frozen=True, slots=True, kw_only=True)
class SniVerdict:
    outcome: SniOutcome
    name: str | None = None  # the normalised SNI, when there is one


def check_server_name(hello: ClientHello, *, connect: Host, tls: TlsOptions) -> SniVerdict:
    """The SNI rules for a `tls` tunnel to `connect` (the CONNECT host). Raises TunnelViolation.

    1. `tls: {ech: deny}` refuses a hello that offers ECH or the old ESNI.
    2. An SNI that is an IP literal is refused (RFC 6066 section 3: "Literal IPv4 and IPv6
       addresses are not permitted in HostName"); clients that follow the RFC never send one.
    3. CONNECT to a name: the SNI must be present (unless `tls: {sni: optional}`) and equal the
       name after the same normalisation rules get. A present SNI must always match: a
       different name is domain fronting, which no option relaxes.
    4. CONNECT to an IP literal: no SNI is normal; a present SNI is a claim about which host the
       client wants, so the caller decides it by policy on its own (CHECK_POLICY).
    With ECH the SNI seen is the outer (public) name; it is held to the same rules.
    """
    if tls.ech is EchMode.DENY and hello.encrypted:
        raise TunnelViolation(
            "the client offers Encrypted Client Hello, which this rule denies",
            reason=Reason.ECH_DENIED,
        )
    raw = hello.server_name
    if raw is None:
        if connect.ip is not None or tls.sni is SniMode.OPTIONAL:
            return SniVerdict(outcome=SniOutcome.ABSENT)
        raise TunnelViolation("the ClientHello has no server name", reason=Reason.SNI_MISSING)
    if _is_ip_literal(raw):
        raise TunnelViolation(
            "the server name is an IP address (RFC 6066 section 3)", reason=Reason.SNI_IP_LITERAL
        )
    try:
        name = normalize_name(raw)
    except BadRequest as exc:
        raise TunnelViolation(
            f"the server name is not a host name: {exc.message}",
            reason=Reason.CLIENTHELLO_MALFORMED,
        ) from None
    if connect.ip is not None:
        return SniVerdict(outcome=SniOutcome.CHECK_POLICY, name=name)
    if name != connect.name:
        raise TunnelViolation(
            "the server name differs from the CONNECT host", reason=Reason.SNI_MISMATCH
        )
    return SniVerdict(outcome=SniOutcome.MATCHES, name=name)


def _is_ip_literal(raw: str) -> bool:
    """Any spelling a resolver or URL parser would take as an address: dotted quads, bracketed
    or bare IPv6, and the numeric IPv4 forms (a last label that is all digits or hex)."""
    text = raw.strip("[]").removesuffix(".")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return True
    last = text.rsplit(".", 1)[-1].lower()
    return last.isdigit() or (
        last.startswith("0x") and all(c in "0123456789abcdef" for c in last[2:])
    )


def sni_destination(hello: ClientHello) -> Host:
    """The destination a transparent TLS listener routes by (issue 13): the SNI, normalised like
    every host. Raises TunnelViolation when the hello cannot name one:

    1. ECH or the old ESNI: the SNI seen is the outer (public) name, not the server the client
       means, and splicing would let the client-facing server route the real (hidden) one.
    2. No SNI: nothing names a destination, and the address the client dialled is the proxy's.
    3. An IP-literal SNI (RFC 6066 section 3 forbids them): the proxy never dials an address a
       client chose.
    """
    if hello.encrypted:
        raise TunnelViolation(
            "the client offers Encrypted Client Hello, which hides the destination from a "
            "transparent listener",
            reason=Reason.ECH_DENIED,
        )
    raw = hello.server_name
    if raw is None:
        raise TunnelViolation(
            "the ClientHello names no server, so there is no destination",
            reason=Reason.SNI_MISSING,
        )
    if _is_ip_literal(raw):
        raise TunnelViolation(
            "the server name is an IP address (RFC 6066 section 3)", reason=Reason.SNI_IP_LITERAL
        )
    try:
        return Host(name=normalize_name(raw))
    except BadRequest as exc:
        raise TunnelViolation(
            f"the server name is not a host name: {exc.message}",
            reason=Reason.CLIENTHELLO_MALFORMED,
        ) from None
