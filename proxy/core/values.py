"""The frozen values the compiled modules return, in a module mypyc does not compile.

proxy.core.http1 and proxy.core.clienthello are compiled (proxy/native.py); the values they
build are defined here, in pure Python, for one reason: cost. A frozen dataclass that mypyc
compiles keeps the `__init__` the dataclasses module writes, interpreted, which sets each field
through `object.__setattr__` (about 1,700 instructions a field, bench/README.md), and a native
class cannot take the cheaper path `proxy.core.frozen.maker` uses (it assigns `__class__`). Here
`maker` builds them for a fifth of that, in both builds. The parsing modules re-export the types,
so callers keep importing them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from proxy.core.frozen import maker
from proxy.core.hosts import Host

Headers = tuple[tuple[str, str], ...]


def field_values(headers: Headers, lower_name: str) -> list[str]:
    """Every value of the field named `lower_name` (lowercase), one per line, in order."""
    return [value for name, value in headers if name.lower() == lower_name]


def joined_field(headers: Headers, name: str) -> str | None:
    values = field_values(headers, name.lower())
    return ", ".join(values) if values else None


class BodyFraming(Enum):
    """How the message body is delimited (RFC 9112 section 6.3)."""

    NONE = "none"  # no body
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # chunked transfer coding, decode with ChunkedDecoder
    UNTIL_CLOSE = "until_close"  # responses only: the body ends when the upstream closes


# --- HTTP/1 heads (proxy.core.http1) ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestHead:
    """A parsed, validated request head.

    `host`/`port` are where the request goes: the target's in PROXY form, never the Host
    field's. In ORIGIN form they are the caller's authority when it gave one, else an
    absolute-form target's, else the Host field's (`parse_request_head`).
    """

    method: str
    version: str  # "HTTP/1.1" | "HTTP/1.0"
    is_connect: bool
    host: Host
    port: int
    # The absolute-form target's scheme, lowercased ("http"; "https" too in ORIGIN form); None
    # for CONNECT, origin-form and asterisk-form, whose scheme is the connection's.
    scheme: str | None
    # Path and query to send upstream: origin-form as sent, "*" for asterisk-form, derived for
    # absolute-form ("/" when the URL has none, "*" for OPTIONS without a path, RFC 9112 section
    # 3.2.4); "" for CONNECT.
    path: str
    raw_target: str  # as sent
    headers: Headers  # names as sent, values with OWS trimmed, in order
    framing: BodyFraming  # NONE, LENGTH or CHUNKED
    content_length: int | None
    keep_alive: bool
    expect_continue: bool
    connection_tokens: frozenset[str]  # lowercased

    def header(self, name: str) -> str | None:
        """The field's value, repeated lines joined with ", " (RFC 9110 section 5.3), or None."""
        return joined_field(self.headers, name)

    def header_values(self, name: str) -> tuple[str, ...]:
        """Every value of the field, one per line, in order."""
        return tuple(field_values(self.headers, name.lower()))


# Every parsed head is built without object.__setattr__ per field (proxy.core.frozen).
new_request_head = maker(RequestHead)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHead:
    """A parsed, validated response head and how its body is framed."""

    version: str  # "HTTP/1.x" as sent
    status: int
    reason: str
    headers: Headers
    framing: BodyFraming
    # The Content-Length value. Also kept when it does not frame the body (response to HEAD,
    # 304), since there it describes the representation; None for 1xx and 204.
    content_length: int | None
    # May the upstream connection carry another request after this response?
    keep_alive: bool
    connection_tokens: frozenset[str]
    # Transfer codings other than the final chunked (e.g. ("gzip",)), re-sent on render so the
    # body the client gets is still labelled correctly. Almost always empty.
    transfer_codings: tuple[str, ...] = ()

    def header(self, name: str) -> str | None:
        """The field's value, repeated lines joined with ", " (RFC 9110 section 5.3), or None."""
        return joined_field(self.headers, name)

    def header_values(self, name: str) -> tuple[str, ...]:
        """Every value of the field, one per line, in order (use for Set-Cookie)."""
        return tuple(field_values(self.headers, name.lower()))


new_response_head = maker(ResponseHead)


# --- TLS (proxy.core.clienthello) ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientHello:
    """What a ClientHello asks for. `server_name` is as sent (ASCII), not yet normalised."""

    server_name: str | None
    alpn: tuple[str, ...]
    ech: bool  # encrypted_client_hello (0xfe0d) present: the SNI seen is the outer one
    esni: bool  # the old encrypted_server_name extension (0xffce) present
    legacy_version: int
    size: int  # bytes of the handshake message, header included
    records: int  # TLS records it arrived in

    @property
    def encrypted(self) -> bool:
        """The client hides its real server name (ECH or ESNI)."""
        return self.ech or self.esni


new_client_hello = maker(ClientHello)  # without object.__setattr__ per field
