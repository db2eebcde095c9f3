"""Strict HTTP/1.1 (RFC 9112) heads and body framing for a forward proxy. Bytes in, values out.

Rules this module enforces, and why:

1. A forward proxy sits between two parsers. Any input the two could read differently (request
   smuggling, response splitting) is refused, never repaired: bare CR or LF, obs-fold, whitespace
   before a field colon, control bytes, ambiguous Content-Length / Transfer-Encoding.
2. Requests: the listener says which request-targets it takes (RFC 9112 section 3.2), as a
   `RequestForm`. The proxy listener (PROXY, the default) takes only `CONNECT host:port`
   (authority-form) and absolute-form `http://`; origin-form and asterisk-form are for origin
   servers. Where the proxy stands in for the origin server (ORIGIN: inside a tunnel, later a
   transparent listener) it takes origin-form, asterisk-form for OPTIONS and absolute-form, and
   refuses CONNECT. The destination is the target's, or in ORIGIN form the caller's (the CONNECT
   authority); the Host field is checked for validity, and believed only in ORIGIN form when the
   caller has no authority and the target names none.
3. Request bodies: one Content-Length line of digits, or `Transfer-Encoding: chunked` exactly.
   RFC 9112 section 6.3 only requires chunked to be the final coding; we accept nothing else,
   because no real client sends other request codings and an upstream that does not know one
   would read a different body length than we do.
4. Response framing follows RFC 9112 section 6.3, except that Content-Length together with
   Transfer-Encoding is refused (502) instead of letting Transfer-Encoding win: a response that
   carries both was made by a broken or hostile server, and relaying it invites desync.
5. Everything sent on is rendered from parsed values: the upstream and the client only ever see
   our canonical framing headers, never the peer's spelling of them.
6. Upgrade (RFC 9110 section 7.8) is the one hop-by-hop field passed on, and only for a request
   that can switch safely (`offered_upgrade`): HTTP/1.1, no body (the switch never happens in the
   middle of a body two parsers might frame apart), `Connection: upgrade`, exactly one protocol,
   and not h2c. h2c would carry HTTP/2 frames the proxy does not parse, so every request after the
   switch would pass undecided (h2c smuggling); RFC 9113 section 3.1 deprecates it anyway. Any
   other Upgrade is dropped, as a server may ignore one, and the request goes on as plain HTTP/1.1.
   A 101 is accepted only in answer to the protocol offered (`check_switch`).

Speed: every kept-alive request passes through here twice (request and response head), so each
parse first tries one regular expression that accepts only a head the line-by-line parser would
accept unchanged (CRLF endings, token names, values without control bytes, a common start line)
and extracts every field in one pass. Anything else, and every error, takes the line-by-line
path, so what is accepted and every error message are the same either way. Field names are
lowercased once per head, not once per lookup.

Errors are `proxy.errors` types: a client's bad input is a BadRequest (400) with a specific reason,
or UriTooLong (414) / HeadersTooLarge (431); an upstream's bad response is a BadGateway (502,
reason upstream_bad_response).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from enum import Enum, StrEnum
from types import MappingProxyType

from proxy.core.hosts import Host, split_authority

# The parsed heads are built in a module mypyc does not compile (proxy.core.values says why);
# they are this module's public types too.
from proxy.core.values import BodyFraming as BodyFraming
from proxy.core.values import Headers as Headers
from proxy.core.values import RequestHead as RequestHead
from proxy.core.values import ResponseHead as ResponseHead
from proxy.core.values import new_request_head, new_response_head
from proxy.errors import (
    BadGateway,
    BadRequest,
    HeadersTooLarge,
    OutgateError,
    Reason,
    UriTooLong,
    VersionNotSupported,
)

# --- Limits ---------------------------------------------------------------------------------------

# RFC 9112 section 3: "It is RECOMMENDED that all HTTP senders and recipients support, at a
# minimum, request-line lengths of 8000 octets." 8 KiB of target covers that with room to spare.
MAX_TARGET_BYTES = 8192
# The longest registered method (IANA HTTP Method Registry) is 17 characters; 32 leaves room
# for extension methods while keeping the method a bounded value for logs and audit records.
MAX_METHOD_BYTES = 32
# method SP target SP "HTTP/1.1" CRLF. A request line longer than this is answered with 414.
MAX_REQUEST_LINE_BYTES = MAX_METHOD_BYTES + 1 + MAX_TARGET_BYTES + 1 + len("HTTP/1.1") + 2
# Apache httpd's LimitRequestFieldsDefault is 100; browsers send 10-30 fields. Bounds the work
# and memory per head independently of maxHeaderBytes (many tiny fields are cheap in bytes).
MAX_HEADER_COUNT = 100
# RFC 9112 section 2.2: a server SHOULD ignore at least one empty line (CRLF) before the
# request-line. A few cover clients that send an extra CRLF after a body; more is not a client.
MAX_LEADING_EMPTY_LINES = 4
# RFC 9112 section 7.1.1: "A server ought to limit the total length of chunk extensions received
# in a request to an amount reasonable for the services provided". We use none of them; 4 KiB is
# far above any real use and keeps a chunk-size line a bounded buffer.
MAX_CHUNK_LINE_BYTES = 4096
# Trailers are parsed (for strictness) and discarded. 16 KiB is h11's default bound for any
# incomplete event; real trailers are a checksum or a status of a few dozen bytes.
MAX_TRAILER_BYTES = 16384
# Content-Length values that do not fit a signed 64-bit integer are read differently by
# different parsers (overflow, wrap, refuse); 18 digits always fit.
MAX_CONTENT_LENGTH_DIGITS = 18
# RFC 9112 section 7.1: chunk-size is 1*HEXDIG; 16 digits are a 64-bit size, more is an attack.
MAX_CHUNK_SIZE_DIGITS = 16

# RFC 9110 section 7.6.1 (Connection, Proxy-Connection, Keep-Alive, TE, Transfer-Encoding,
# Upgrade) plus Trailer (RFC 2616 section 13.5.1): meaningful for one connection only.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Credentials for this proxy (RFC 9110 section 11.7) are never sent on, and framing headers are
# re-rendered from parsed values.
_NOT_FORWARDED = HOP_BY_HOP_HEADERS | {
    "proxy-authorization",
    "proxy-authenticate",
    "content-length",
}
# Client-address claims. The proxy identifies sources by the socket peer only; passing a
# client's own claim upstream would let a pod speak for another address (or leak internal
# addresses to the internet), so every common spelling is dropped and none is added.
IDENTITY_CLAIM_HEADERS = frozenset(
    {
        "forwarded",  # RFC 7239
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-real-ip",
        "x-client-ip",
        "client-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-cluster-client-ip",
        "x-originating-ip",
        "x-remote-ip",
        "x-remote-addr",
    }
)
_NOT_FORWARDED_REQUEST = _NOT_FORWARDED | IDENTITY_CLAIM_HEADERS
# Upgrades never offered upstream (rule 6 above).
REFUSED_UPGRADES = frozenset({"h2c"})

LAST_CHUNK = b"0\r\n\r\n"

# The port an absolute-form target means when it names none (RFC 9110 sections 4.2.1, 4.2.2).
DEFAULT_PORTS: Mapping[str, int] = MappingProxyType({"http": 80, "https": 443})

# --- Grammar (RFC 9110 section 5.6, RFC 9112) -----------------------------------------------------

_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN_STR = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 section 7.8: protocol = protocol-name ["/" protocol-version], both tokens.
_PROTOCOL = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?")
# field-value after OWS is trimmed: VCHAR, obs-text, SP and HTAB (RFC 9110 section 5.5).
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# request-target characters: visible ASCII only (RFC 3986 has no raw space, control or 8-bit).
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]+")
_ABSOLUTE_FORM = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?]*)(.*)", re.DOTALL)
# Its scheme and authority only: the rest of the target is sliced off, not scanned.
_ABSOLUTE_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*+)://([^/?]*+)")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[0-9]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
_DIGITS = re.compile(rf"[0-9]{{1,{MAX_CONTENT_LENGTH_DIGITS}}}")
# chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ).
# BWS is accepted as RFC 9112 section 7.1.1 requires; it cannot mislead an upstream because
# chunk lines are never forwarded: every chunk is re-encoded by `encode_chunk`.
_TOKEN_RE = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED_STRING_RE = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,%d})" % MAX_CHUNK_SIZE_DIGITS
    + rb"(?:[ \t]*;[ \t]*"
    + _TOKEN_RE
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN_RE
    + rb"|"
    + _QUOTED_STRING_RE
    + rb"))?)*"
)

_CRLF = b"\r\n"
_HEAD_END = b"\r\n\r\n"

# The fast path (module docstring), over the head decoded as latin-1 (one byte, one character).
_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# Field lines: token ":" then field-value characters only (no CR, LF, NUL or other controls).
# Every repeat is possessive (`++`, `*+`, `{m,n}+`): each stops at a byte it cannot take (":",
# CR, SP), so giving bytes back could never make a match, and the engine keeps no state to try.
_FIELD_BLOCK_RE = (
    r"((?:" + _TCHAR + r"++:[\t\x20-\x7e\x80-\xff]*+\r\n){0," + str(MAX_HEADER_COUNT) + r"}+)\r\n"
)
# method SP target SP version: a short token, visible ASCII without "#", HTTP/1.0 or 1.1.
_FAST_REQUEST = re.compile(
    "(" + _TCHAR + "{1," + str(MAX_METHOD_BYTES) + "}+) "
    r"([\x21\x22\x24-\x7e]{1," + str(MAX_TARGET_BYTES) + r"}+) (HTTP/1\.[01])\r\n" + _FIELD_BLOCK_RE
)
_FAST_RESPONSE = re.compile(
    r"(HTTP/1\.[0-9]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*+))?\r\n" + _FIELD_BLOCK_RE
)

# Authorities seen recently -> (Host, port). Kept-alive clients name the same few hosts on every
# request and normalising a name (IDNA, label checks) is the costliest step of a head; parsing
# is pure, so the memo never changes an answer. Bounded, and emptied when full.
AUTHORITY_CACHE_SIZE = 4096
_authorities: dict[tuple[str, int | None], tuple[Host, int]] = {}


def _split_authority(authority: str, *, default_port: int | None) -> tuple[Host, int]:
    key = (authority, default_port)
    found = _authorities.get(key)
    if found is None:
        found = split_authority(authority, default_port=default_port)  # raises: not memoised
        if len(_authorities) >= AUTHORITY_CACHE_SIZE:
            _authorities.clear()
        _authorities[key] = found
    return found


class RequestForm(StrEnum):
    """Which request-targets a listener takes (RFC 9112 section 3.2)."""

    # The proxy listener: `CONNECT host:port` (authority-form) and absolute-form `http://...`.
    # Origin-form and asterisk-form name no host; they are for origin servers (400).
    PROXY = "proxy"
    # Where the proxy stands in for the origin server (inside an intercepted or `http` tunnel, a
    # transparent listener): origin-form `/path?query`, asterisk-form `*` (OPTIONS only, section
    # 3.2.4), and absolute-form `http://` or `https://`, which a server MUST accept (section
    # 3.2.2). CONNECT is refused: the connection already has its destination.
    ORIGIN = "origin"


_PROXY = RequestForm.PROXY  # one global lookup on the hot path instead of global + attribute


# --- Head detection -------------------------------------------------------------------------------


def find_head_end(
    buf: bytes | bytearray,
    *,
    max_head_bytes: int,
    is_request: bool = True,
    start: int = 0,
) -> int:
    """Index just past the blank line that ends the head in `buf`, or -1 if it is not complete.

    A head that ends in a bare-LF blank line (`\\n\\n`, `\\n\\r\\n`) is found too, so that the
    parser refuses it at once instead of the client waiting for the header timeout.

    `start` makes repeated calls on a growing buffer cheap: pass the length `buf` had at the
    previous call that returned -1 (0 the first time, and again whenever bytes are removed from
    the front of the buffer); only the new bytes are searched.

    Raises UriTooLong (414) when a request line does not end within MAX_REQUEST_LINE_BYTES and
    HeadersTooLarge (431) when the head does not end within `max_head_bytes`; for responses
    (`is_request=False`) both are BadGateway (upstream_bad_response).
    """
    skip = 0
    if is_request and buf.startswith(_CRLF):
        skip = _count_leading_empty_lines(buf)
    search_from = skip if start - 2 < skip else start - 2  # a terminator can straddle the end
    crlf_end = buf.find(b"\n\r\n", search_from, max_head_bytes)
    # A bare-LF blank line before a CRLF one must win; it can only end before crlf_end + 2.
    lf_limit = crlf_end + 2 if crlf_end >= 0 else max_head_bytes
    lf_end = buf.find(b"\n\n", search_from, lf_limit)
    # The request line must end within MAX_REQUEST_LINE_BYTES. A terminator that starts before
    # that bound ends it there (it is a LF at or after `skip`, inside max_head_bytes), so the
    # line is looked for only when there is none; a previous call with a longer buffer than
    # this (`start` past the bound) already saw it end.
    first_lf = lf_end if lf_end >= 0 else crlf_end
    line_bound = skip + MAX_REQUEST_LINE_BYTES
    if is_request and start <= line_bound and not 0 <= first_lf < line_bound:
        line_end = buf.find(b"\n", skip, line_bound)
        if line_end < 0:
            if len(buf) - skip >= MAX_REQUEST_LINE_BYTES or len(buf) >= max_head_bytes:
                raise UriTooLong(
                    f"request line longer than {min(MAX_REQUEST_LINE_BYTES, max_head_bytes)} bytes"
                )
            return -1
        if line_end >= max_head_bytes:
            raise UriTooLong(f"request line longer than the {max_head_bytes}-byte head limit")
    if lf_end >= 0:
        return lf_end + 2
    if crlf_end >= 0:
        return crlf_end + 3
    if len(buf) >= max_head_bytes:
        message = f"head not complete within {max_head_bytes} bytes"
        if is_request:
            raise HeadersTooLarge(message)
        raise BadGateway(f"upstream {message}", reason=Reason.UPSTREAM_BAD_RESPONSE)
    return -1


def _count_leading_empty_lines(buf: bytes | bytearray) -> int:
    """Bytes of CRLF empty lines before a request line (RFC 9112 section 2.2), at most a few."""
    skip = 0
    while buf.startswith(_CRLF, skip):
        skip += 2
        if skip > 2 * MAX_LEADING_EMPTY_LINES:
            raise BadRequest(
                f"more than {MAX_LEADING_EMPTY_LINES} empty lines before the request line"
            )
    return skip


# --- Field lines ----------------------------------------------------------------------------------


def _split_head_lines(head: bytes) -> list[bytes]:
    """Lines of a head (start line first) without the final blank line; every ending is CRLF."""
    if not head.endswith(_HEAD_END):
        raise BadRequest("head does not end with CRLF CRLF (bare LF line ending)")
    crlf_count = head.count(_CRLF)
    if head.count(b"\n") != crlf_count:
        raise BadRequest("bare LF line ending (RFC 9112 section 2.2 requires CRLF)")
    if head.count(b"\r") != crlf_count:
        raise BadRequest("bare CR in head (RFC 9112 section 2.2)")
    lines = head[: -len(_HEAD_END)].split(_CRLF)
    if b"" in lines:
        raise BadRequest("empty line inside the head")
    return lines


def _parse_field_line(line: bytes) -> tuple[str, str]:
    """`name: value` -> (name as sent, value with OWS trimmed, latin-1). RFC 9112 section 5."""
    colon = line.find(b":")
    name = line[:colon] if colon >= 0 else line
    if colon < 0 or not _TOKEN.fullmatch(name):
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 section 5.2: obs-fold outside message/http MUST be refused (or replaced).
            raise BadRequest("obsolete line folding (obs-fold) in a field")
        if colon < 0:
            raise BadRequest(f"field line without a colon: {_excerpt(line)}")
        if name[-1:] in (b" ", b"\t"):
            # RFC 9112 section 5.1: whitespace between name and colon MUST be answered with 400.
            raise BadRequest(f"whitespace between field name and colon: {_excerpt(line)}")
        raise BadRequest(f"field name is empty or not a token: {_excerpt(line)}")
    value = line[colon + 1 :].strip(b" \t")
    if not _FIELD_VALUE.fullmatch(value):
        raise BadRequest(f"control byte in the value of field {_excerpt(name)}")
    return name.decode("ascii"), value.decode("latin-1")


def _parse_fields(lines: list[bytes]) -> Headers:
    if len(lines) > MAX_HEADER_COUNT:
        raise HeadersTooLarge(f"more than {MAX_HEADER_COUNT} header fields")
    return tuple(_parse_field_line(line) for line in lines)


def _excerpt(raw: bytes, limit: int = 64) -> str:
    """A bounded, printable excerpt of client bytes for an error message."""
    return repr(raw[:limit].decode("latin-1"))


_NO_VALUES: list[str] = []  # shared, never modified: what a missing field looks up to

FieldIndex = dict[str, list[str]]


# The fields parsing looks at; `_index` keeps only these.
_INDEXED_FIELDS = frozenset({"host", "content-length", "transfer-encoding", "connection", "expect"})


def _index(headers: Headers) -> FieldIndex:
    """Lowercased name -> its values in order, for the fields parsing needs: one lower() per
    field, however many lookups follow."""
    index: FieldIndex = {}
    for name, value in headers:
        lower = name.lower()
        if lower in _INDEXED_FIELDS:
            index.setdefault(lower, []).append(value)
    return index


def _fast_fields(block: str) -> tuple[Headers, FieldIndex]:
    """The fields of a block one of the _FAST_* patterns accepted, as _parse_fields gives them,
    and their `_index`, in one pass: every line is `token:value CRLF` there, so the first colon
    ends the name."""
    fields = []
    index: FieldIndex = {}
    for line in block.split("\r\n")[:-1]:
        name, _, value = line.partition(":")
        value = value.strip(" \t")
        fields.append((name, value))
        lower = name.lower()
        if lower in _INDEXED_FIELDS:
            index.setdefault(lower, []).append(value)
    return tuple(fields), index


def _list_elements(values: list[str]) -> list[str]:
    """Elements of a comma-separated list field (RFC 9110 section 5.6.1); empty ones ignored."""
    return [item.strip(" \t") for value in values for item in value.split(",") if item.strip(" \t")]


_NO_TOKENS: frozenset[str] = frozenset()
# Connection values seen -> their tokens: peers send the same one or two spellings on every
# message ("keep-alive", "close"). Bounded, emptied when full; only valid values are kept.
_CONNECTION_MEMO_SIZE = 256
_connection_memo: dict[tuple[str, ...], frozenset[str]] = {}


def _connection_tokens(index: FieldIndex) -> frozenset[str]:
    values = index.get("connection")
    if values is None:
        return _NO_TOKENS
    key = tuple(values)
    found = _connection_memo.get(key)
    if found is not None:
        return found
    tokens = _list_elements(values)
    for token in tokens:
        if not _TOKEN_STR.fullmatch(token):
            raise BadRequest(f"Connection field element is not a token: {token[:64]!r}")
    found = frozenset(token.lower() for token in tokens)
    if len(_connection_memo) >= _CONNECTION_MEMO_SIZE:
        _connection_memo.clear()
    _connection_memo[key] = found
    return found


def _keep_alive(version: str, tokens: frozenset[str]) -> bool:
    """RFC 9112 section 9.3: 1.1 persists unless `close`; 1.0 only with `keep-alive`."""
    if "close" in tokens:
        return False
    return version != "HTTP/1.0" or "keep-alive" in tokens


# --- Requests -------------------------------------------------------------------------------------


def parse_request_head(
    head: bytes,
    *,
    form: RequestForm = RequestForm.PROXY,
    authority: tuple[Host, int] | None = None,
) -> RequestHead:
    """Parse `head` (as delimited by find_head_end) or raise BadRequest / UriTooLong / 431 / 505.

    `form` is the listener's (RequestForm). In ORIGIN form `authority` is where the connection
    goes, the CONNECT host and port of a tunnel: it becomes `host`/`port` whatever the request
    names; `target_authority(req)` is what an absolute-form target named, for the caller to
    compare (a 421 is the caller's to give, once it knows the request's framing).
    Without `authority` the request names it: an absolute-form target's (RFC 9112 section 3.2.2:
    it wins over Host; port by scheme), else the Host field's (port 80: such a listener is plain
    HTTP); a request with neither is a 400. PROXY form takes no `authority` (ValueError).
    """
    if authority is not None and form is _PROXY:
        raise ValueError("an authority is only given in ORIGIN form")
    head = bytes(head)
    fast = _FAST_REQUEST.fullmatch(head.decode("latin-1"))
    if fast is not None:
        method, raw_target, version, block = fast.groups()
        headers, index = _fast_fields(block)
        return _request(method, raw_target, version, headers, index, form, authority)
    skip = _count_leading_empty_lines(head)
    lines = _split_head_lines(head[skip:])
    method, raw_target, version = _parse_request_line(lines[0])
    headers = _parse_fields(lines[1:])
    return _request(method, raw_target, version, headers, _index(headers), form, authority)


def _request(
    method: str,
    raw_target: str,
    version: str,
    headers: Headers,
    index: FieldIndex,
    form: RequestForm,
    authority: tuple[Host, int] | None,
) -> RequestHead:
    """The checks after the lines are split (and indexed, which never raises: the target is
    still the first thing checked): target, Host, framing, Connection, Expect."""
    # The PROXY branch calls no helper of its own: it runs for every request on the proxy
    # listener, and a Python call is a measurable part of a head's parse.
    if form is _PROXY:
        is_connect = method == "CONNECT"
        if is_connect:
            host, port = _split_authority(_connect_authority(raw_target), default_port=None)
            scheme: str | None = None
            path = ""
        else:
            scheme, host, port, path = _parse_absolute_form(raw_target, method, form)
        _check_host_field(index, version=version, is_connect=is_connect)
    else:
        is_connect = False
        scheme, named, path = _parse_origin_target(raw_target, method)
        _check_host_field(index, version=version, is_connect=False)
        host, port = _origin_authority(index, authority, scheme, named)
    framing, content_length = _request_framing(index, version=version, is_connect=is_connect)
    tokens = _connection_tokens(index)
    # RFC 9110 section 10.1.1: a 100-continue expectation in an HTTP/1.0 request MUST be ignored.
    expect = index.get("expect")
    expect_continue = (
        expect is not None
        and version == "HTTP/1.1"
        and any(value.lower() == "100-continue" for value in _list_elements(expect))
    )
    return new_request_head(
        method=method,
        version=version,
        is_connect=is_connect,
        host=host,
        port=port,
        scheme=scheme,
        path=path,
        raw_target=raw_target,
        headers=headers,
        framing=framing,
        content_length=content_length,
        keep_alive=_keep_alive(version, tokens),
        expect_continue=expect_continue,
        connection_tokens=tokens,
    )


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    """`method SP request-target SP HTTP-version` with single spaces (RFC 9112 section 3)."""
    if len(line) + len(_CRLF) > MAX_REQUEST_LINE_BYTES:
        raise UriTooLong(f"request line longer than {MAX_REQUEST_LINE_BYTES} bytes")
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise BadRequest(f"request line is not 'method SP target SP version': {_excerpt(line)}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest(f"method is not a token: {_excerpt(method)}")
    if len(method) > MAX_METHOD_BYTES:
        raise BadRequest(f"method longer than {MAX_METHOD_BYTES} bytes")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        # A well-formed version we do not speak (HTTP/2.0, HTTP/1.2) is a 505 (RFC 9110
        # section 15.6.6); anything else in that place is a malformed request line.
        if _HTTP_VERSION.fullmatch(version):
            raise VersionNotSupported(f"unsupported HTTP version {_excerpt(version, 16)}")
        raise BadRequest(f"malformed HTTP version {_excerpt(version, 16)}")
    if len(target) > MAX_TARGET_BYTES:
        raise UriTooLong(f"request target longer than {MAX_TARGET_BYTES} bytes")
    if not _VISIBLE_ASCII.fullmatch(target):
        raise BadRequest(
            "request target has a byte that is not visible ASCII", reason=Reason.BAD_TARGET
        )
    if b"#" in target:
        raise BadRequest("fragment (#) in the request target", reason=Reason.BAD_TARGET)
    return method.decode("ascii"), target.decode("ascii"), version.decode("ascii")


def _connect_authority(target: str) -> str:
    if any(char in target for char in "/?"):
        raise BadRequest(
            "CONNECT needs an authority-form target host:port", reason=Reason.BAD_TARGET
        )
    return target


def _parse_origin_target(
    target: str, method: str
) -> tuple[str | None, tuple[Host, int] | None, str]:
    """ORIGIN form: origin-, asterisk- or absolute-form (RFC 9112 sections 3.2.1, 3.2.2, 3.2.4)
    -> (scheme, the target's own authority with port 0 when it named none, path)."""
    if method == "CONNECT":
        raise BadRequest(
            "CONNECT sent where the proxy stands in for the origin server (inside a tunnel or"
            " to a transparent listener)",
            reason=Reason.BAD_TARGET,
        )
    if target.startswith("/"):
        return None, None, target
    if target == "*":
        if method != "OPTIONS":
            raise BadRequest("asterisk-form is only for OPTIONS", reason=Reason.BAD_TARGET)
        return None, None, target
    scheme, host, port, path = _parse_absolute_form(target, method, RequestForm.ORIGIN)
    return scheme, (host, port), path


def _parse_absolute_form(target: str, method: str, form: RequestForm) -> tuple[str, Host, int, str]:
    """`scheme://authority[path][?query]` -> (lowercased scheme, host, port, origin-form path).

    The scheme is `http`, or in ORIGIN form `https` too. `ws` is read as `http`: RFC 6455
    section 3 puts a ws:// URI's handshake on the same host and port as http://, and aiohttp's
    WebSocket client sends a proxy that target as it is. A port the target omits is 80 in PROXY
    form and 0 in ORIGIN form (see `target_authority`).
    """
    match = _ABSOLUTE_PREFIX.match(target)
    if match is None:
        raise _not_absolute_form(target, form)
    scheme, authority = match.groups()
    scheme = scheme.lower()
    rest = target[match.end() :]
    if scheme == "ws":
        scheme = "http"
    if not rest:
        # RFC 9112 section 3.2.4: an OPTIONS for the whole server (empty path) goes on as "*".
        path = "*" if method == "OPTIONS" else "/"
    elif rest.startswith("?"):
        path = "/" + rest
    else:
        path = rest
    if scheme != "http" and (scheme != "https" or form is _PROXY):
        raise _unsupported_scheme(scheme, authority, path, method)
    if not authority:
        raise BadRequest("absolute-form target without a host", reason=Reason.BAD_TARGET)
    host, port = _split_authority(authority, default_port=80 if form is _PROXY else 0)
    return scheme, host, port, path


class UnsupportedScheme(BadRequest):
    """An absolute-form target whose scheme this listener does not forward (`https://` and
    `ws://` sent as plain requests, `ftp://`). It carries what was asked, so the refusal and its
    records name the destination, method and path: a user sees where the request was going, and
    an operator which client sends `https://` where CONNECT was meant. `host` is None when the
    authority is not a valid host."""

    default_reason = Reason.UNSUPPORTED_SCHEME

    def __init__(
        self, message: str, *, method: str, host: Host | None, port: int | None, path: str
    ) -> None:
        super().__init__(message)
        self.method = method
        self.host = host
        self.port = port
        self.path = path


# Ports the schemes a client may send by mistake mean when they name none (RFC 9110 section
# 4.2.2, RFC 6455 section 3): what a refused target is recorded with.
_REFUSED_SCHEME_PORTS: Mapping[str, int] = MappingProxyType(
    {"https": 443, "ws": 80, "wss": 443, "ftp": 21}
)


def _unsupported_scheme(scheme: str, authority: str, path: str, method: str) -> UnsupportedScheme:
    if scheme == "https":
        message = "https:// targets are not forwarded: use CONNECT host:443"
    elif scheme in ("ws", "wss"):
        message = f"{scheme}:// targets are not forwarded: send http:// with Upgrade, or CONNECT"
    else:
        message = f"scheme {scheme[:16]!r} is not supported"
    host: Host | None
    port: int | None
    try:
        # 0 (never a valid port) stands for "the target named none and the scheme has no default".
        host, port = _split_authority(authority, default_port=_REFUSED_SCHEME_PORTS.get(scheme, 0))
    except OutgateError:
        host, port = None, None  # a bad authority as well: the scheme is still the refusal
    return UnsupportedScheme(message, method=method, host=host, port=port or None, path=path)


def target_authority(req: RequestHead) -> tuple[Host, int] | None:
    """The authority an absolute-form target names, port 0 where it names none (0 is never a
    valid port, so "omitted" is not mistaken for the scheme's default); None for CONNECT,
    origin-form and asterisk-form.

    In ORIGIN form with the caller's authority, this is what the request itself named. It is
    derived on demand rather than kept on RequestHead: only a tunnel's check asks, while a field
    would cost every request (a frozen dataclass sets each one through object.__setattr__,
    about 2% of a head's parse).
    """
    if req.scheme is None:
        return None
    match = _ABSOLUTE_FORM.fullmatch(req.raw_target)
    if match is None:
        raise ValueError("RequestHead with a scheme but no absolute-form target")
    return _split_authority(match.group(2), default_port=0)  # the parse checked it: no raise


def _not_absolute_form(target: str, form: RequestForm) -> BadRequest:
    """Why a target that is not absolute-form is refused. Origin-form and asterisk-form never
    match _ABSOLUTE_FORM (a scheme starts with a letter), so they are told apart only here."""
    if form is _PROXY and target == "*":
        message = "asterisk-form is for origin servers, not a proxy"
    elif form is _PROXY and target.startswith("/"):
        message = "origin-form target sent to a proxy: use absolute-form http://host/path"
    else:
        expected = "absolute-form" if form is _PROXY else "origin-form /path or absolute-form"
        message = (
            f"request target is not {expected} http://host/path (authority-form is only for"
            " CONNECT)"
        )
    return BadRequest(message, reason=Reason.BAD_TARGET)


def _origin_authority(
    index: FieldIndex,
    authority: tuple[Host, int] | None,
    scheme: str | None,
    named: tuple[Host, int] | None,
) -> tuple[Host, int]:
    """ORIGIN form: where the request goes (`parse_request_head`), given the caller's authority
    and the one an absolute-form target `named`. The Host field is already checked."""
    if authority is not None:
        return authority
    if named is not None and scheme is not None:
        host, port = named
        return host, port or DEFAULT_PORTS[scheme]
    values = index.get("host")
    if not values:
        raise BadRequest("request without a Host field names no destination")
    return _split_authority(values[0], default_port=80)


def _check_host_field(index: FieldIndex, *, version: str, is_connect: bool) -> None:
    """RFC 9112 section 3.2: 400 for a 1.1 request without Host, or with several or a bad one."""
    values = index.get("host", _NO_VALUES)
    if len(values) > 1:
        raise BadRequest("more than one Host field")
    if not values:
        if version == "HTTP/1.1" and not is_connect:
            raise BadRequest("HTTP/1.1 request without a Host field")
        return
    try:
        _split_authority(values[0], default_port=80)
    except BadRequest as exc:
        raise BadRequest(f"invalid Host field: {exc.message}") from None


def _request_framing(
    index: FieldIndex, *, version: str, is_connect: bool
) -> tuple[BodyFraming, int | None]:
    """RFC 9112 section 6.3 for requests, refusing every case two parsers might read apart."""
    lengths = index.get("content-length", _NO_VALUES)
    codings = index.get("transfer-encoding", _NO_VALUES)
    if lengths and codings:
        raise _ambiguous("both Content-Length and Transfer-Encoding")
    if codings:
        if version == "HTTP/1.0":
            # RFC 9112 section 6.1: Transfer-Encoding in 1.0 MUST be treated as faulty framing.
            raise _ambiguous("Transfer-Encoding in an HTTP/1.0 request")
        if len(codings) != 1 or codings[0].lower() != "chunked":
            raise _ambiguous(
                f"Transfer-Encoding must be exactly 'chunked', got {', '.join(codings)[:64]!r}"
            )
        if is_connect:
            raise _ambiguous("CONNECT request with a body (Transfer-Encoding)")
        return BodyFraming.CHUNKED, None
    if lengths:
        if len(lengths) != 1:
            raise _ambiguous("more than one Content-Length field")
        if not _DIGITS.fullmatch(lengths[0]):
            raise _ambiguous(f"invalid Content-Length {lengths[0][:32]!r}")
        length = int(lengths[0])
        if is_connect:
            if length:
                raise _ambiguous("CONNECT request with a body (Content-Length)")
            return BodyFraming.NONE, 0  # RFC 9110 section 9.3.6: CONNECT has no content.
        return BodyFraming.LENGTH, length
    return BodyFraming.NONE, None


def _ambiguous(message: str) -> BadRequest:
    return BadRequest(message, reason=Reason.AMBIGUOUS_FRAMING)


def offered_upgrade(req: RequestHead) -> str | None:
    """The protocol `req` asks to switch to (the Upgrade value as sent), when the proxy passes
    the offer on (rule 6 in the module docstring); None otherwise."""
    if "upgrade" not in req.connection_tokens:
        return None
    values = req.header_values("upgrade")
    # `Content-Length: 0` is no body (Java's HttpClient sends it on its WebSocket handshake).
    bodiless = req.framing is BodyFraming.NONE or (
        req.framing is BodyFraming.LENGTH and req.content_length == 0
    )
    if len(values) != 1 or req.version != "HTTP/1.1" or not bodiless or req.is_connect:
        return None
    protocol = values[0]
    if not _PROTOCOL.fullmatch(protocol):  # one `token ["/" token]`, no list
        return None
    if protocol.partition("/")[0].lower() in REFUSED_UPGRADES:
        return None
    return protocol


def check_switch(resp: ResponseHead, *, offered: str | None) -> str:
    """The protocol a 101 switches to; BadGateway (502) unless it is the one offered."""
    if offered is None:
        raise BadGateway(
            "upstream switched protocols, which was not asked for",
            reason=Reason.UPSTREAM_BAD_RESPONSE,
        )
    named = resp.header_values("upgrade")
    if len(named) != 1 or named[0].lower() != offered.lower():
        raise BadGateway(
            f"upstream switched to {', '.join(named)[:64]!r}, not the {offered[:64]!r} offered",
            reason=Reason.UPSTREAM_BAD_RESPONSE,
        )
    return offered


def render_request_head(
    req: RequestHead,
    *,
    framing_header: bool = True,
    absolute: bool = False,
    extra_fields: bytes = b"",
) -> bytes:
    """The origin-form request to send upstream (RFC 9112 section 3.2.1, RFC 9110 section 7.6.1).

    Host comes from the target, then the client's end-to-end fields in order, then the framing
    field rendered from `req.framing` (omitted with `framing_header=False`). Keep-alive toward
    the upstream is HTTP/1.1's default, so no Connection field is written, except for an upgrade
    the proxy passes on (`offered_upgrade`): `Connection: upgrade` and its Upgrade field.

    With `absolute` the target is in absolute form, for a parent proxy (RFC 9112 section 3.2.2;
    asterisk-form becomes the bare authority, section 3.2.4), and `extra_fields` (the parent's
    own `Proxy-Authorization`, complete lines) follow Host. The client's own proxy credentials
    are never among the fields sent on.
    """
    if req.is_connect:
        raise ValueError("a CONNECT request is tunnelled, not rendered upstream")
    host = (
        f"[{req.host.name}]"
        if req.host.ip is not None and req.host.ip.version == 6
        else req.host.name
    )
    authority = host if req.port == 80 else f"{host}:{req.port}"
    target = req.path
    if absolute:
        target = f"http://{authority}" + ("" if req.path == "*" else req.path)
    out = [f"{req.method} {target} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")]
    if extra_fields:
        out.append(extra_fields)
    tokens = req.connection_tokens
    drop = _DROPPED_REQUEST_FIELDS | tokens if tokens else _DROPPED_REQUEST_FIELDS
    _render_fields(out, req.headers, drop)
    if tokens and (upgrade := offered_upgrade(req)) is not None:
        out.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % upgrade.encode("latin-1"))
    if framing_header:
        if req.framing is BodyFraming.LENGTH:
            out.append(b"Content-Length: %d\r\n" % (req.content_length or 0))
        elif req.framing is BodyFraming.CHUNKED:
            out.append(b"Transfer-Encoding: chunked\r\n")
    out.append(_CRLF)
    return b"".join(out)


_DROPPED_REQUEST_FIELDS = _NOT_FORWARDED_REQUEST | {"host"}


def _render_fields(out: list[bytes], headers: Headers, drop: frozenset[str]) -> None:
    # Names are tokens (ASCII) and values were decoded as latin-1: one encode for all of them.
    text = "".join([f"{name}: {value}\r\n" for name, value in headers if name.lower() not in drop])
    out.append(text.encode("latin-1"))


# --- Responses ------------------------------------------------------------------------------------


def parse_response_head(head: bytes, *, request_method: str) -> ResponseHead:
    """Parse an upstream response head or raise BadGateway (reason upstream_bad_response)."""
    try:
        return _parse_response_head(bytes(head), request_method=request_method)
    except BadGateway:
        raise
    except OutgateError as exc:
        raise BadGateway(
            f"upstream response: {exc.message}", reason=Reason.UPSTREAM_BAD_RESPONSE
        ) from None


def _parse_response_head(head: bytes, *, request_method: str) -> ResponseHead:
    fast = _FAST_RESPONSE.fullmatch(head.decode("latin-1"))
    if fast is not None:
        version, status_text, reason_text, block = fast.groups()
        status = int(status_text)
        reason = reason_text or ""
        headers, index = _fast_fields(block)
    else:
        lines = _split_head_lines(head)
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise BadRequest(f"invalid status line {_excerpt(lines[0])}")
        version = match.group(1).decode("ascii")
        status = int(match.group(2))
        reason = (match.group(3) or b"").decode("latin-1")
        headers = _parse_fields(lines[1:])
        index = _index(headers)
    tokens = _connection_tokens(index)
    framing, content_length, codings = _response_framing(
        index, version=version, status=status, request_method=request_method
    )
    return new_response_head(
        version=version,
        status=status,
        reason=reason,
        headers=headers,
        framing=framing,
        content_length=content_length,
        keep_alive=_keep_alive(version, tokens) and framing is not BodyFraming.UNTIL_CLOSE,
        connection_tokens=tokens,
        transfer_codings=codings,
    )


def _response_framing(
    index: FieldIndex, *, version: str, status: int, request_method: str
) -> tuple[BodyFraming, int | None, tuple[str, ...]]:
    """RFC 9112 section 6.3, steps numbered as there."""
    lengths = index.get("content-length", _NO_VALUES)
    codings = index.get("transfer-encoding", _NO_VALUES)
    # 1. HEAD, 1xx, 204, 304: no body, whatever the fields say. Content-Length is not framing
    #    here, so an unusable value is dropped rather than failing the response.
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        no_length = status < 200 or status == 204  # RFC 9110 section 8.6: MUST NOT be sent.
        length = None if no_length else _response_content_length(lengths, lenient=True)
        return BodyFraming.NONE, length, ()
    # 2. A 2xx to CONNECT switches to a tunnel (we never send CONNECT upstream; kept for rule 1).
    if request_method == "CONNECT" and status < 300:
        return BodyFraming.NONE, None, ()
    # 3. Transfer-Encoding. Together with Content-Length the RFC lets TE win; we refuse.
    if codings:
        if lengths:
            raise BadRequest("both Content-Length and Transfer-Encoding")
        if version == "HTTP/1.0":
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 response (RFC 9112 section 6.1)")
        elements = _list_elements(codings)
        names = [_coding_name(element) for element in elements]
        if not names:
            raise BadRequest("empty Transfer-Encoding")
        if names.count("chunked") > 1:
            raise BadRequest("chunked applied more than once (RFC 9112 section 7)")
        if names[-1] == "chunked":
            return BodyFraming.CHUNKED, None, tuple(elements[:-1])
        return BodyFraming.UNTIL_CLOSE, None, tuple(elements)
    # 5. Content-Length.
    if lengths:
        length = _response_content_length(lengths, lenient=False)
        return BodyFraming.LENGTH, length, ()
    # 7. Otherwise the body runs until the upstream closes.
    return BodyFraming.UNTIL_CLOSE, None, ()


def _coding_name(element: str) -> str:
    """transfer-coding = token *( OWS ";" OWS transfer-parameter ) -> lowercased token."""
    name = element.split(";", 1)[0].strip(" \t")
    if not _TOKEN_STR.fullmatch(name):
        raise BadRequest(f"invalid transfer coding {element[:32]!r}")
    return name.lower()


def _response_content_length(lengths: list[str], *, lenient: bool) -> int | None:
    """Repeated identical values (`42, 42` or two lines) are accepted: RFC 9110 section 8.6 allows
    it, CDNs send it, and we re-render one canonical Content-Length so nobody downstream sees the
    repetition. Differing or non-numeric values are refused, or dropped when `lenient`."""
    if not lengths:
        return None
    if len(lengths) == 1:  # the usual case, without the list-splitting below
        only = lengths[0]
        if only.isascii() and only.isdigit() and len(only) <= MAX_CONTENT_LENGTH_DIGITS:
            return int(only)
    elements = [item.strip(" \t") for value in lengths for item in value.split(",")]
    if all(_DIGITS.fullmatch(item) for item in elements) and len({int(i) for i in elements}) == 1:
        return int(elements[0])
    if lenient:
        return None
    raise BadRequest(f"invalid or conflicting Content-Length {', '.join(lengths)[:64]!r}")


def render_response_head(
    resp: ResponseHead, *, keep_alive: bool, switch_to: str | None = None
) -> bytes:
    """The response head to send the client.

    Hop-by-hop fields (and those named in Connection) are dropped, the framing field is rendered
    from `resp.framing`, and `Connection: close` is added when the client connection will close.
    A body that runs until close always closes the connection (the client has no other way to
    find its end). 1xx interim responses get neither a framing field nor Connection, except a
    101 (`switch_to`, from `check_switch`): `Connection: upgrade` and its Upgrade field.
    """
    out = [b"HTTP/1.1 %d %s\r\n" % (resp.status, resp.reason.encode("latin-1"))]
    _render_fields(out, resp.headers, _NOT_FORWARDED | resp.connection_tokens)
    if resp.status < 200:
        if switch_to is not None:
            out.append(b"Connection: upgrade\r\nUpgrade: %s\r\n" % switch_to.encode("latin-1"))
        out.append(_CRLF)
        return b"".join(out)
    if resp.framing is BodyFraming.LENGTH or (
        resp.framing is BodyFraming.NONE and resp.content_length is not None
    ):
        out.append(b"Content-Length: %d\r\n" % (resp.content_length or 0))
    elif resp.framing is BodyFraming.CHUNKED:
        codings = ", ".join((*resp.transfer_codings, "chunked"))
        out.append(b"Transfer-Encoding: %s\r\n" % codings.encode("latin-1"))
    elif resp.framing is BodyFraming.UNTIL_CLOSE and resp.transfer_codings:
        codings = ", ".join(resp.transfer_codings)
        out.append(b"Transfer-Encoding: %s\r\n" % codings.encode("latin-1"))
    if not keep_alive or resp.framing is BodyFraming.UNTIL_CLOSE:
        out.append(b"Connection: close\r\n")
    out.append(_CRLF)
    return b"".join(out)


# --- Chunked bodies -------------------------------------------------------------------------------


class _ChunkState(Enum):
    SIZE_LINE = "size_line"
    DATA = "data"
    DATA_CR = "data_cr"
    DATA_LF = "data_lf"
    TRAILER = "trailer"
    DONE = "done"
    FAILED = "failed"


class ChunkedDecoder:
    """Incremental, sans-I/O decoder of the chunked transfer coding (RFC 9112 section 7.1).

    `feed` returns the chunk payloads decoded so far; only an incomplete chunk-size or trailer
    line is ever buffered (bounded), never payload. Work is O(n) over any split of the input.
    Errors are BadRequest (bad_chunk), or BadGateway (upstream_bad_response) with
    `upstream=True`. After an error every further `feed` raises again.
    """

    __slots__ = ("_error", "_line", "_remaining", "_state", "_tail", "_trailer_bytes")

    def __init__(self, *, upstream: bool = False) -> None:
        self._error: Callable[[str], OutgateError] = (
            _upstream_chunk_error if upstream else _client_chunk_error
        )
        self._state = _ChunkState.SIZE_LINE
        self._line = bytearray()
        self._remaining = 0
        self._trailer_bytes = 0
        self._tail = bytearray()

    @property
    def done(self) -> bool:
        """True once the last-chunk and the trailer section have been read."""
        return self._state is _ChunkState.DONE

    # The rest of proxy.core.bodies' BodyReader, here and not in a subclass there: this class
    # is compiled (proxy/native.py), and Python classes cannot inherit from compiled ones.
    @property
    def want(self) -> None:
        """No cap on a read: the decoder keeps what follows the last chunk as `tail`."""
        return None

    @property
    def ends_at_eof(self) -> bool:
        return False

    def tail(self) -> bytes:
        """Bytes fed after the end of the message: the start of the next pipelined message."""
        return bytes(self._tail)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        buf = data if isinstance(data, bytes) else bytes(data)
        if self._state is _ChunkState.FAILED:
            raise self._error("chunked body already failed to decode")
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end:
            state = self._state
            if state is _ChunkState.DATA:
                take = min(self._remaining, end - pos)
                out.append(buf if take == end else buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _ChunkState.DATA_CR
            elif state is _ChunkState.DATA_CR:
                if buf[pos] != 0x0D:
                    raise self._fail("chunk data is not followed by CRLF")
                pos += 1
                self._state = _ChunkState.DATA_LF
            elif state is _ChunkState.DATA_LF:
                if buf[pos] != 0x0A:
                    raise self._fail("chunk data is not followed by CRLF")
                pos += 1
                self._state = _ChunkState.SIZE_LINE
            elif state is _ChunkState.DONE:
                self._tail += buf[pos:]
                pos = end
            else:
                pos = self._feed_line(buf, pos)
        return out

    def _feed_line(self, buf: bytes, pos: int) -> int:
        """Collect a size or trailer line; handle it when complete. Returns the new position."""
        in_trailer = self._state is _ChunkState.TRAILER
        limit = MAX_TRAILER_BYTES - self._trailer_bytes if in_trailer else MAX_CHUNK_LINE_BYTES
        lf = buf.find(b"\n", pos)
        self._line += buf[pos:] if lf < 0 else buf[pos : lf + 1]
        if len(self._line) > limit:
            what = "trailer section" if in_trailer else "chunk-size line"
            raise self._fail(f"{what} longer than {limit} bytes")
        if lf < 0:
            return len(buf)
        line = bytes(self._line)
        self._line.clear()
        if not line.endswith(_CRLF):
            raise self._fail("bare LF in chunked framing (CRLF required)")
        content = line[:-2]
        if b"\r" in content:
            raise self._fail("bare CR in chunked framing")
        if in_trailer:
            self._trailer_line(content, len(line))
        else:
            self._size_line(content)
        return lf + 1

    def _size_line(self, content: bytes) -> None:
        match = _CHUNK_LINE.fullmatch(content)
        if match is None:
            raise self._fail(f"invalid chunk-size line {_excerpt(content)}")
        size = int(match.group(1), 16)
        if size:
            self._remaining = size
            self._state = _ChunkState.DATA
        else:
            self._state = _ChunkState.TRAILER

    def _trailer_line(self, content: bytes, size: int) -> None:
        if not content:
            self._state = _ChunkState.DONE
            return
        self._trailer_bytes += size
        try:
            _parse_field_line(content)  # checked for strictness, then discarded
        except OutgateError as exc:
            raise self._fail(f"invalid trailer field: {exc.message}") from None

    def _fail(self, message: str) -> OutgateError:
        self._state = _ChunkState.FAILED
        self._line.clear()
        return self._error(message)


def _client_chunk_error(message: str) -> OutgateError:
    return BadRequest(message, reason=Reason.BAD_CHUNK)


def _upstream_chunk_error(message: str) -> OutgateError:
    return BadGateway(f"upstream chunked body: {message}", reason=Reason.UPSTREAM_BAD_RESPONSE)


def encode_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """One chunk: hex size CRLF data CRLF. Empty data gives b"" (an empty chunk would end the body;
    send LAST_CHUNK for that)."""
    payload = bytes(data)
    if not payload:
        return b""
    return b"%x\r\n%s\r\n" % (len(payload), payload)
