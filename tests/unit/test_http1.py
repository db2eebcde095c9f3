"""proxy.core.http1: strict head parsing, framing and rendering, as tables of input -> outcome."""

from __future__ import annotations

import ipaddress
import random

import pytest

from proxy.core.hosts import Host, parse_host
from proxy.core.http1 import (
    LAST_CHUNK,
    MAX_CHUNK_LINE_BYTES,
    MAX_HEADER_COUNT,
    MAX_LEADING_EMPTY_LINES,
    MAX_METHOD_BYTES,
    MAX_REQUEST_LINE_BYTES,
    MAX_TARGET_BYTES,
    MAX_TRAILER_BYTES,
    BodyFraming,
    ChunkedDecoder,
    RequestForm,
    RequestHead,
    ResponseHead,
    UnsupportedScheme,
    check_switch,
    encode_chunk,
    find_head_end,
    offered_upgrade,
    parse_request_head,
    parse_response_head,
    render_request_head,
    render_response_head,
    target_authority,
)
from proxy.errors import (
    BadGateway,
    BadRequest,
    HeadersTooLarge,
    OutgateError,
    Reason,
    UriTooLong,
    VersionNotSupported,
)

MAX_HEAD = 65536


def head(start_line: str, *fields: str) -> bytes:
    """A head with CRLF line endings; fields are written exactly as given."""
    return "".join(f"{line}\r\n" for line in (start_line, *fields)).encode("latin-1") + b"\r\n"


def get(target: str = "http://example.com/", *fields: str, version: str = "HTTP/1.1") -> bytes:
    return head(f"GET {target} {version}", "Host: example.com", *fields)


def post(*fields: str) -> bytes:
    return head("POST http://example.com/upload HTTP/1.1", "Host: example.com", *fields)


def connect(target: str, *fields: str) -> bytes:
    return head(f"CONNECT {target} HTTP/1.1", *fields)


# --- Requests that must be refused --------------------------------------------------------------

MALFORMED = Reason.MALFORMED_REQUEST
AMBIGUOUS = Reason.AMBIGUOUS_FRAMING
BAD_TARGET = Reason.BAD_TARGET
BAD_PORT = Reason.BAD_PORT
UNSUPPORTED = Reason.UNSUPPORTED_SCHEME

REFUSED_REQUESTS = [
    # Framing: anything two parsers could read as different body lengths.
    ("cl-and-te", post("Content-Length: 5", "Transfer-Encoding: chunked"), AMBIGUOUS),
    ("te-and-cl", post("Transfer-Encoding: chunked", "Content-Length: 5"), AMBIGUOUS),
    ("duplicate-cl-equal", post("Content-Length: 5", "Content-Length: 5"), AMBIGUOUS),
    ("duplicate-cl-differing", post("Content-Length: 5", "Content-Length: 6"), AMBIGUOUS),
    ("cl-comma-list", post("Content-Length: 5, 5"), AMBIGUOUS),
    ("cl-non-digits", post("Content-Length: 5a"), AMBIGUOUS),
    ("cl-hex", post("Content-Length: 0x5"), AMBIGUOUS),
    ("cl-plus-sign", post("Content-Length: +5"), AMBIGUOUS),
    ("cl-minus-sign", post("Content-Length: -5"), AMBIGUOUS),
    ("cl-inner-space", post("Content-Length: 5 5"), AMBIGUOUS),
    ("cl-empty", post("Content-Length:"), AMBIGUOUS),
    ("cl-huge", post("Content-Length: 1" + "0" * 18), AMBIGUOUS),
    ("cl-unicode-digit", post("Content-Length: \xb9"), AMBIGUOUS),
    ("te-gzip-chunked", post("Transfer-Encoding: gzip, chunked"), AMBIGUOUS),
    ("te-chunked-chunked", post("Transfer-Encoding: chunked, chunked"), AMBIGUOUS),
    ("te-two-lines", post("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), AMBIGUOUS),
    ("te-gzip", post("Transfer-Encoding: gzip"), AMBIGUOUS),
    ("te-identity", post("Transfer-Encoding: identity"), AMBIGUOUS),
    ("te-chunked-param", post("Transfer-Encoding: chunked;q=1"), AMBIGUOUS),
    ("te-empty", post("Transfer-Encoding:"), AMBIGUOUS),
    ("te-chunked-garbage", post("Transfer-Encoding: xchunked"), AMBIGUOUS),
    (
        "te-in-http10",
        head("POST http://example.com/ HTTP/1.0", "Transfer-Encoding: chunked"),
        AMBIGUOUS,
    ),
    ("connect-with-body-length", connect("example.com:443", "Content-Length: 5"), AMBIGUOUS),
    (
        "connect-with-chunked-body",
        connect("example.com:443", "Transfer-Encoding: chunked"),
        AMBIGUOUS,
    ),
    # Field syntax (RFC 9112 section 5).
    ("obs-fold-space", get("http://example.com/", "X-A: one", " two"), MALFORMED),
    ("obs-fold-tab", get("http://example.com/", "X-A: one", "\ttwo"), MALFORMED),
    ("space-before-colon", get("http://example.com/", "X-A : one"), MALFORMED),
    ("tab-before-colon", get("http://example.com/", "X-A\t: one"), MALFORMED),
    ("space-in-name", get("http://example.com/", "X A: one"), MALFORMED),
    ("empty-field-name", get("http://example.com/", ": one"), MALFORMED),
    ("non-token-field-name", get("http://example.com/", "X(A): one"), MALFORMED),
    ("field-without-colon", get("http://example.com/", "X-A one"), MALFORMED),
    ("nul-in-value", get("http://example.com/", "X-A: o\x00ne"), MALFORMED),
    ("control-byte-in-value", get("http://example.com/", "X-A: o\x01ne"), MALFORMED),
    ("del-in-value", get("http://example.com/", "X-A: o\x7fne"), MALFORMED),
    ("nul-in-name", get("http://example.com/", "X\x00A: one"), MALFORMED),
    ("high-byte-in-name", get("http://example.com/", "X\xe9A: one"), MALFORMED),
    # Line endings (RFC 9112 section 2.2).
    (
        "bare-cr-in-value",
        b"GET http://a.com/ HTTP/1.1\r\nHost: a.com\r\nX: a\rb\r\n\r\n",
        MALFORMED,
    ),
    ("bare-cr-line-end", b"GET http://a.com/ HTTP/1.1\r\nHost: a.com\r\nX: a\r\r\n\r\n", MALFORMED),
    ("bare-cr-in-request-line", b"GET http://a.com/\r HTTP/1.1\r\nHost: a.com\r\n\r\n", MALFORMED),
    ("bare-lf-field-line", b"GET http://a.com/ HTTP/1.1\r\nHost: a.com\nX: a\r\n\r\n", MALFORMED),
    ("bare-lf-request-line", b"GET http://a.com/ HTTP/1.1\nHost: a.com\r\n\r\n", MALFORMED),
    ("bare-lf-head-end", b"GET http://a.com/ HTTP/1.1\r\nHost: a.com\n\n", MALFORMED),
    ("bare-lf-blank-line", b"GET http://a.com/ HTTP/1.1\r\nHost: a.com\r\n\n", MALFORMED),
    ("all-bare-lf", b"GET http://a.com/ HTTP/1.1\nHost: a.com\n\n", MALFORMED),
    ("empty-line-inside-head", b"GET http://a.com/ HTTP/1.1\r\n\r\nHost: a.com\r\n\r\n", MALFORMED),
    ("too-many-leading-empty-lines", b"\r\n" * (MAX_LEADING_EMPTY_LINES + 1) + get(), MALFORMED),
    # Request line (RFC 9112 section 3).
    ("double-space-after-method", b"GET  http://a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n", MALFORMED),
    ("double-space-before-version", b"GET http://a.com/  HTTP/1.1\r\nHost: a\r\n\r\n", MALFORMED),
    ("tab-separator", b"GET\thttp://a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n", MALFORMED),
    ("leading-space", b" GET http://a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n", MALFORMED),
    ("trailing-space", b"GET http://a.com/ HTTP/1.1 \r\nHost: a.com\r\n\r\n", MALFORMED),
    ("missing-version", b"GET http://a.com/\r\nHost: a.com\r\n\r\n", MALFORMED),
    ("extra-element", b"GET http://a.com/ x HTTP/1.1\r\nHost: a.com\r\n\r\n", MALFORMED),
    ("lowercase-version", get(version="http/1.1"), MALFORMED),
    ("version-junk", get(version="HTTP/x.1"), MALFORMED),
    ("version-lowercase", get(version="http/1.1"), MALFORMED),
    ("version-without-minor", get(version="HTTP/1"), MALFORMED),
    ("non-token-method", b"GE(T http://a.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n", MALFORMED),
    (
        "method-too-long",
        head(f"{'X' * (MAX_METHOD_BYTES + 1)} http://a/ HTTP/1.1", "Host: a"),
        MALFORMED,
    ),
    (
        "connection-element-not-token",
        get("http://example.com/", "Connection: close, a@b"),
        MALFORMED,
    ),
    # Target forms (RFC 9112 section 3.2): a proxy takes absolute-form and CONNECT only.
    ("origin-form", head("GET /index.html HTTP/1.1", "Host: example.com"), BAD_TARGET),
    ("asterisk-form", head("OPTIONS * HTTP/1.1", "Host: example.com"), BAD_TARGET),
    ("authority-form-without-connect", get("example.com:80"), BAD_TARGET),
    ("scheme-without-slashes", get("http:example.com/"), BAD_TARGET),
    ("scheme-with-one-slash", get("http:/example.com/"), BAD_TARGET),
    ("absolute-form-empty-host", get("http:///path"), BAD_TARGET),
    ("https-absolute-form", get("https://example.com/"), UNSUPPORTED),
    ("ftp-absolute-form", get("ftp://example.com/file"), UNSUPPORTED),
    ("wss-absolute-form", get("wss://example.com/"), UNSUPPORTED),  # ws:// is http://
    ("userinfo", get("http://user:pw@example.com/"), BAD_TARGET),
    ("userinfo-without-password", get("http://user@example.com/"), BAD_TARGET),
    ("bracketed-name", get("http://[example.com]/"), BAD_TARGET),
    ("unbracketed-ipv6", get("http://::1/"), BAD_TARGET),
    ("ipv6-zone", get("http://[fe80::1%25eth0]/"), BAD_TARGET),
    ("octal-ipv4", get("http://0177.0.0.1/"), BAD_TARGET),
    ("decimal-ipv4", get("http://2130706433/"), BAD_TARGET),
    ("short-ipv4", get("http://127.1/"), BAD_TARGET),
    ("percent-in-host", get("http://exa%6dple.com/"), BAD_TARGET),
    ("dollar-in-host", get("http://exa$mple.com/"), BAD_TARGET),
    ("fragment", get("http://example.com/page#top"), BAD_TARGET),
    ("high-byte-in-target", get("http://example.com/caf\xe9"), BAD_TARGET),
    ("del-in-target", get("http://example.com/\x7f"), BAD_TARGET),
    ("tab-in-target", get("http://example.com/a\tb"), BAD_TARGET),
    ("port-zero", get("http://example.com:0/"), BAD_PORT),
    ("port-too-big", get("http://example.com:65536/"), BAD_PORT),
    ("port-plus-sign", get("http://example.com:+80/"), BAD_PORT),
    ("port-minus-sign", get("http://example.com:-80/"), BAD_PORT),
    ("port-leading-zero", get("http://example.com:080/"), BAD_PORT),
    ("port-junk", get("http://example.com:8o/"), BAD_PORT),
    ("port-empty", get("http://example.com:/"), BAD_PORT),
    ("port-huge", get("http://example.com:99999999999999999999/"), BAD_PORT),
    ("ipv6-port-empty", get("http://[::1]:/"), BAD_PORT),
    # CONNECT takes authority-form host:port and nothing else.
    ("connect-without-port", connect("example.com"), BAD_PORT),
    ("connect-ipv6-without-port", connect("[::1]"), BAD_PORT),
    ("connect-empty-port", connect("example.com:"), BAD_PORT),
    ("connect-port-zero", connect("example.com:0"), BAD_PORT),
    ("connect-port-too-big", connect("example.com:65536"), BAD_PORT),
    ("connect-port-leading-zero", connect("example.com:0443"), BAD_PORT),
    ("connect-port-sign", connect("example.com:+443"), BAD_PORT),
    ("connect-absolute-form", connect("http://example.com:443"), BAD_TARGET),
    ("connect-origin-form", connect("/"), BAD_TARGET),
    ("connect-with-path", connect("example.com:443/x"), BAD_TARGET),
    ("connect-with-query", connect("example.com:443?x"), BAD_TARGET),
    ("connect-userinfo", connect("user@example.com:443"), BAD_TARGET),
    ("connect-bracketed-name", connect("[example.com]:443"), BAD_TARGET),
    ("connect-unbracketed-ipv6", connect("::1:443"), BAD_TARGET),
    ("connect-non-canonical-ipv4", connect("10.1:443"), BAD_TARGET),
    # Host field (RFC 9112 section 3.2).
    ("http11-without-host", head("GET http://example.com/ HTTP/1.1"), MALFORMED),
    ("two-host-fields", get("http://example.com/", "Host: example.com"), MALFORMED),
    (
        "two-host-fields-http10",
        head("GET http://a.com/ HTTP/1.0", "Host: a.com", "Host: b.com"),
        MALFORMED,
    ),
    (
        "two-host-fields-connect",
        connect("a.com:443", "Host: a.com:443", "Host: a.com:443"),
        MALFORMED,
    ),
    ("empty-host", head("GET http://a.com/ HTTP/1.1", "Host:"), MALFORMED),
    ("host-with-space", head("GET http://a.com/ HTTP/1.1", "Host: a com"), MALFORMED),
    ("host-with-userinfo", head("GET http://a.com/ HTTP/1.1", "Host: u@a.com"), MALFORMED),
    ("host-with-bad-port", head("GET http://a.com/ HTTP/1.1", "Host: a.com:0"), MALFORMED),
    ("host-with-path", head("GET http://a.com/ HTTP/1.1", "Host: a.com/x"), MALFORMED),
    ("host-list", head("GET http://a.com/ HTTP/1.1", "Host: a.com, b.com"), MALFORMED),
]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [pytest.param(raw, reason, id=name) for name, raw, reason in REFUSED_REQUESTS],
)
def test_malformed_or_smuggling_request_is_refused_with_400_and_its_reason(
    raw: bytes, reason: Reason
) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request_head(raw)
    assert info.value.status == 400
    assert info.value.reason is reason


@pytest.mark.parametrize("version", ["HTTP/0.9", "HTTP/1.2", "HTTP/2.0", "HTTP/3.0"])
def test_a_well_formed_version_we_do_not_speak_gets_505(version: str) -> None:
    with pytest.raises(VersionNotSupported) as info:
        parse_request_head(get(version=version))
    assert info.value.status == 505
    assert info.value.reason is Reason.UNSUPPORTED_VERSION


def test_https_absolute_form_is_refused_with_a_hint_to_use_connect() -> None:
    with pytest.raises(BadRequest, match="CONNECT") as info:
        parse_request_head(get("https://example.com/"))
    assert info.value.reason is Reason.UNSUPPORTED_SCHEME


def test_target_longer_than_limit_is_414() -> None:
    target = "http://example.com/" + "a" * (MAX_TARGET_BYTES - len("http://example.com/") + 1)
    with pytest.raises(UriTooLong) as info:
        parse_request_head(get(target))
    assert info.value.status == 414


def test_target_at_limit_is_accepted() -> None:
    target = "http://example.com/" + "a" * (MAX_TARGET_BYTES - len("http://example.com/"))
    assert len(parse_request_head(get(target)).raw_target) == MAX_TARGET_BYTES


def test_more_header_fields_than_limit_is_431() -> None:
    fields = [f"X-{i}: v" for i in range(MAX_HEADER_COUNT)]  # plus Host: one too many
    with pytest.raises(HeadersTooLarge) as info:
        parse_request_head(get("http://example.com/", *fields))
    assert info.value.status == 431


def test_header_fields_up_to_limit_are_accepted() -> None:
    fields = [f"X-{i}: v" for i in range(MAX_HEADER_COUNT - 1)]
    assert len(parse_request_head(get("http://example.com/", *fields)).headers) == MAX_HEADER_COUNT


# --- Requests that must be accepted -------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"])
def test_absolute_form_request_is_parsed_with_target_host_port_and_path(method: str) -> None:
    req = parse_request_head(
        head(f"{method} http://Example.COM:8080/a/b?c=d&e HTTP/1.1", "Host: example.com:8080")
    )
    assert req.method == method
    assert req.version == "HTTP/1.1"
    assert not req.is_connect
    assert req.scheme == "http"
    assert req.host.name == "example.com"
    assert req.host.ip is None
    assert req.port == 8080
    assert req.path == "/a/b?c=d&e"
    assert req.raw_target == "http://Example.COM:8080/a/b?c=d&e"
    assert req.framing is BodyFraming.NONE
    assert req.content_length is None


@pytest.mark.parametrize(
    ("method", "target", "path"),
    [
        pytest.param("GET", "http://a.com", "/", id="no-path-is-slash"),
        pytest.param("GET", "http://a.com/", "/", id="slash"),
        pytest.param("GET", "http://a.com?q=1", "/?q=1", id="query-without-path"),
        pytest.param("GET", "http://a.com:80/x", "/x", id="explicit-default-port"),
        pytest.param("GET", "HTTP://a.com/x", "/x", id="scheme-is-case-insensitive"),
        pytest.param("GET", "http://a.com/%7Euser;p?q=a/b", "/%7Euser;p?q=a/b", id="kept-verbatim"),
        pytest.param("OPTIONS", "http://a.com", "*", id="options-without-path-is-asterisk"),
        pytest.param("OPTIONS", "http://a.com/", "/", id="options-with-slash-stays-slash"),
        pytest.param("OPTIONS", "http://a.com?x", "/?x", id="options-with-query"),
    ],
)
def test_origin_form_path_is_derived_from_the_absolute_form_target(
    method: str, target: str, path: str
) -> None:
    req = parse_request_head(head(f"{method} {target} HTTP/1.1", "Host: a.com"))
    assert req.path == path
    assert req.port == 80


@pytest.mark.parametrize(
    ("target", "name", "port", "ip"),
    [
        pytest.param("example.com:443", "example.com", 443, None, id="name"),
        pytest.param("EXAMPLE.com.:443", "example.com", 443, None, id="name-normalised"),
        pytest.param("[::1]:8443", "::1", 8443, ipaddress.IPv6Address("::1"), id="ipv6"),
        pytest.param(
            "[2001:DB8:0:0::1]:443",
            "2001:db8::1",
            443,
            ipaddress.IPv6Address("2001:db8::1"),
            id="ipv6-canonical",
        ),
        pytest.param(
            "192.0.2.7:22", "192.0.2.7", 22, ipaddress.IPv4Address("192.0.2.7"), id="ipv4"
        ),
        pytest.param("XN--BCHER-KVA.example:443", "xn--bcher-kva.example", 443, None, id="idn"),
        pytest.param("svc_name.ns.svc:5432", "svc_name.ns.svc", 5432, None, id="underscore"),
        pytest.param("example.com:65535", "example.com", 65535, None, id="max-port"),
    ],
)
def test_connect_authority_form_is_parsed_and_host_normalised(
    target: str, name: str, port: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
) -> None:
    req = parse_request_head(connect(target, f"Host: {target}"))
    assert req.is_connect
    assert req.method == "CONNECT"
    assert req.host.name == name
    assert req.host.ip == ip
    assert req.port == port
    assert req.scheme is None
    assert req.path == ""
    assert req.framing is BodyFraming.NONE


def test_connect_without_host_field_is_accepted() -> None:
    assert parse_request_head(connect("example.com:443")).port == 443


def test_connect_with_content_length_zero_has_no_body() -> None:
    req = parse_request_head(connect("example.com:443", "Content-Length: 0"))
    assert req.framing is BodyFraming.NONE


def test_idn_host_in_absolute_form_is_normalised_to_lowercase_punycode() -> None:
    req = parse_request_head(get("http://XN--Bcher-KVA.Example./"))
    assert req.host.name == "xn--bcher-kva.example"


def test_http10_request_without_host_is_accepted() -> None:
    req = parse_request_head(head("GET http://example.com/ HTTP/1.0"))
    assert req.version == "HTTP/1.0"
    assert req.host.name == "example.com"


def test_leading_empty_lines_before_request_line_are_skipped() -> None:
    req = parse_request_head(b"\r\n" * MAX_LEADING_EMPTY_LINES + get())
    assert req.method == "GET"


@pytest.mark.parametrize(
    ("fields", "framing", "length"),
    [
        pytest.param((), BodyFraming.NONE, None, id="no-body"),
        pytest.param(("Content-Length: 0",), BodyFraming.LENGTH, 0, id="length-zero"),
        pytest.param(("Content-Length: 42",), BodyFraming.LENGTH, 42, id="length"),
        pytest.param(("Content-Length: 007",), BodyFraming.LENGTH, 7, id="leading-zeros"),
        pytest.param(("Content-Length:  42 \t",), BodyFraming.LENGTH, 42, id="ows-trimmed"),
        pytest.param(
            ("Content-Length: " + "9" * 18,), BodyFraming.LENGTH, 10**18 - 1, id="18-digits"
        ),
        pytest.param(("Transfer-Encoding: chunked",), BodyFraming.CHUNKED, None, id="chunked"),
        pytest.param(("transfer-encoding: Chunked",), BodyFraming.CHUNKED, None, id="chunked-case"),
    ],
)
def test_request_body_framing(
    fields: tuple[str, ...], framing: BodyFraming, length: int | None
) -> None:
    req = parse_request_head(post(*fields))
    assert req.framing is framing
    assert req.content_length == length


@pytest.mark.parametrize(
    ("version", "fields", "keep_alive"),
    [
        pytest.param("HTTP/1.1", (), True, id="1.1-default-keeps-alive"),
        pytest.param("HTTP/1.1", ("Connection: close",), False, id="1.1-close"),
        pytest.param("HTTP/1.1", ("Connection: Keep-Alive, CLOSE",), False, id="1.1-close-in-list"),
        pytest.param(
            "HTTP/1.1", ("Connection: x-a", "Connection: close"), False, id="1.1-two-lines"
        ),
        pytest.param("HTTP/1.1", ("Connection: keep-alive",), True, id="1.1-keep-alive"),
        pytest.param(
            "HTTP/1.1", ("Proxy-Connection: close",), True, id="1.1-proxy-connection-ignored"
        ),
        pytest.param("HTTP/1.0", (), False, id="1.0-default-closes"),
        pytest.param("HTTP/1.0", ("Connection: keep-alive",), True, id="1.0-keep-alive"),
        pytest.param("HTTP/1.0", ("Connection: Keep-Alive",), True, id="1.0-keep-alive-case"),
        pytest.param("HTTP/1.0", ("Connection: keep-alive, close",), False, id="1.0-close-wins"),
        pytest.param(
            "HTTP/1.0", ("Proxy-Connection: keep-alive",), False, id="1.0-proxy-connection"
        ),
    ],
)
def test_request_keep_alive_follows_version_and_connection(
    version: str, fields: tuple[str, ...], keep_alive: bool
) -> None:
    req = parse_request_head(get("http://example.com/", *fields, version=version))
    assert req.keep_alive is keep_alive


def test_connection_tokens_are_lowercased_and_empty_elements_ignored() -> None:
    req = parse_request_head(get("http://example.com/", "Connection: X-Trace, , Keep-Alive"))
    assert req.connection_tokens == frozenset({"x-trace", "keep-alive"})


@pytest.mark.parametrize(
    ("version", "field", "expected"),
    [
        pytest.param("HTTP/1.1", "Expect: 100-continue", True, id="1.1"),
        pytest.param("HTTP/1.1", "Expect: 100-Continue", True, id="1.1-case-insensitive"),
        pytest.param("HTTP/1.1", "X-Other: 1", False, id="1.1-absent"),
        pytest.param("HTTP/1.1", "Expect: something-else", False, id="1.1-other-expectation"),
        pytest.param("HTTP/1.0", "Expect: 100-continue", False, id="1.0-ignored-per-rfc-9110"),
    ],
)
def test_expect_continue(version: str, field: str, expected: bool) -> None:
    req = parse_request_head(get("http://example.com/", field, version=version))
    assert req.expect_continue is expected


def test_field_values_are_trimmed_latin1_with_inner_tab_and_obs_text_kept() -> None:
    raw = (
        b"GET http://a.com/ HTTP/1.1\r\nHost: a.com\r\nX-A: \t caf\xe9\tau lait \t\r\nX-E:\r\n\r\n"
    )
    req = parse_request_head(raw)
    assert req.headers == (("Host", "a.com"), ("X-A", "caf\xe9\tau lait"), ("X-E", ""))


def test_header_joins_repeated_lines_and_header_values_keeps_them_apart() -> None:
    req = parse_request_head(get("http://example.com/", "Accept: a", "accept: b"))
    assert req.header("ACCEPT") == "a, b"
    assert req.header_values("accept") == ("a", "b")
    assert req.header("x-missing") is None


def test_host_field_that_disagrees_with_target_is_ignored_target_wins() -> None:
    req = parse_request_head(
        head("GET http://target.example:8080/p HTTP/1.1", "Host: other.example")
    )
    assert (req.host.name, req.port) == ("target.example", 8080)
    rendered = render_request_head(req)
    assert rendered.startswith(b"GET /p HTTP/1.1\r\nHost: target.example:8080\r\n")
    assert b"other.example" not in rendered


# --- Rendering requests upstream -----------------------------------------------------------------


def test_render_request_strips_hop_by_hop_proxy_credentials_and_connection_named_fields() -> None:
    req = parse_request_head(
        head(
            "POST http://api.example/v1/items?x=1 HTTP/1.1",
            "Host: api.example",
            "User-Agent: curl/8",
            "Connection: keep-alive, X-Trace",
            "X-Trace: secret",
            "Keep-Alive: timeout=5",
            "Proxy-Connection: keep-alive",
            "Proxy-Authorization: Basic dXNlcjpwdw==",
            "Proxy-Authenticate: Basic",
            "TE: trailers",
            "Trailer: X-Sum",
            "Upgrade: websocket",
            "Content-Length: 00011",
            "Authorization: Bearer abc",
            "Accept: */*",
        )
    )
    assert render_request_head(req) == (
        b"POST /v1/items?x=1 HTTP/1.1\r\n"
        b"Host: api.example\r\n"
        b"User-Agent: curl/8\r\n"
        b"Authorization: Bearer abc\r\n"
        b"Accept: */*\r\n"
        b"Content-Length: 11\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("target", "host_line"),
    [
        pytest.param("http://a.example/", b"Host: a.example", id="default-port-omitted"),
        pytest.param("http://a.example:80/", b"Host: a.example", id="explicit-80-omitted"),
        pytest.param("http://a.example:8080/", b"Host: a.example:8080", id="other-port-kept"),
        pytest.param("http://[::1]/", b"Host: [::1]", id="ipv6-bracketed"),
        pytest.param("http://[::1]:8080/", b"Host: [::1]:8080", id="ipv6-with-port"),
        pytest.param("http://192.0.2.1:81/", b"Host: 192.0.2.1:81", id="ipv4"),
        pytest.param("http://A.Example./", b"Host: a.example", id="normalised-name"),
    ],
)
def test_render_request_writes_host_from_the_target_first(target: str, host_line: bytes) -> None:
    req = parse_request_head(head(f"GET {target} HTTP/1.1", "Host: whatever.example"))
    lines = render_request_head(req).split(b"\r\n")
    assert lines[1] == host_line
    assert sum(line.lower().startswith(b"host:") for line in lines) == 1


def test_render_request_rechunks_chunked_body_and_always_speaks_http11() -> None:
    req = parse_request_head(
        head("PUT http://a.example/x HTTP/1.1", "Host: a.example", "Transfer-Encoding: CHUNKED")
    )
    assert render_request_head(req) == (
        b"PUT /x HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


def test_render_request_upgrades_http10_client_to_http11_without_connection_field() -> None:
    req = parse_request_head(
        head("GET http://a.example/ HTTP/1.0", "Connection: keep-alive", "Accept: */*")
    )
    assert render_request_head(req) == b"GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\n\r\n"


def test_render_request_without_framing_header_leaves_framing_to_the_caller() -> None:
    req = parse_request_head(post("Content-Length: 5"))
    assert render_request_head(req, framing_header=False) == (
        b"POST /upload HTTP/1.1\r\nHost: example.com\r\n\r\n"
    )


def test_render_request_keeps_content_length_zero_for_empty_post() -> None:
    req = parse_request_head(post("Content-Length: 0"))
    assert render_request_head(req).endswith(b"Content-Length: 0\r\n\r\n")


def test_render_request_keeps_obs_text_bytes_as_sent() -> None:
    req = parse_request_head(get("http://example.com/", "X-Name: caf\xe9"))
    assert b"X-Name: caf\xe9\r\n" in render_request_head(req)


def test_render_request_refuses_connect() -> None:
    with pytest.raises(ValueError, match="CONNECT"):
        render_request_head(parse_request_head(connect("example.com:443")))


def test_request_head_is_frozen() -> None:
    req = parse_request_head(get())
    assert isinstance(req, RequestHead)
    with pytest.raises(AttributeError):
        req.port = 1  # type: ignore[misc]


# --- ORIGIN form: where the proxy stands in for the origin server --------------------------------

TUNNEL = (parse_host("api.example.com"), 443)


def origin(raw: bytes, authority: tuple[Host, int] | None = TUNNEL) -> RequestHead:
    return parse_request_head(raw, form=RequestForm.ORIGIN, authority=authority)


@pytest.mark.parametrize(
    ("line", "path"),
    [
        pytest.param("GET / HTTP/1.1", "/", id="root"),
        pytest.param("GET /v2/items?x=1 HTTP/1.1", "/v2/items?x=1", id="path-and-query"),
        pytest.param("POST /%7Euser;p?q=a/b HTTP/1.1", "/%7Euser;p?q=a/b", id="kept-verbatim"),
        pytest.param("GET //double HTTP/1.1", "//double", id="double-slash-is-a-path"),
        pytest.param("OPTIONS * HTTP/1.1", "*", id="asterisk-for-options"),
        pytest.param("get /x HTTP/1.1", "/x", id="method-case-kept"),
    ],
)
def test_origin_form_is_accepted_for_the_given_authority(line: str, path: str) -> None:
    req = origin(head(line, "Host: api.example.com"))
    assert (req.host, req.port) == TUNNEL
    assert req.path == path
    assert req.raw_target == line.split(" ")[1]
    assert req.scheme is None
    assert not req.is_connect
    assert target_authority(req) is None


@pytest.mark.parametrize(
    ("target", "scheme", "named", "path"),
    [
        pytest.param(
            "https://api.example.com/v2", "https", ("api.example.com", 0), "/v2", id="https"
        ),
        pytest.param(
            "https://API.example.com:443/v2", "https", ("api.example.com", 443), "/v2", id="port"
        ),
        pytest.param("http://api.example.com", "http", ("api.example.com", 0), "/", id="http"),
        pytest.param(
            "HTTPS://api.example.com?q", "https", ("api.example.com", 0), "/?q", id="query"
        ),
        pytest.param("https://other.example/", "https", ("other.example", 0), "/", id="other-host"),
    ],
)
def test_absolute_form_is_accepted_in_origin_form_and_its_authority_kept_apart(
    target: str, scheme: str, named: tuple[str, int], path: str
) -> None:
    # RFC 9112 section 3.2.2: a server MUST accept absolute-form. The given authority still
    # decides where the request goes; whether the target agrees is the caller's 421.
    req = origin(head(f"GET {target} HTTP/1.1", "Host: api.example.com"))
    assert (req.host, req.port) == TUNNEL
    assert req.scheme == scheme
    assert req.path == path
    found = target_authority(req)
    assert found is not None and (found[0].name, found[1]) == named


def test_options_absolute_form_without_path_is_asterisk_in_origin_form() -> None:
    assert origin(head("OPTIONS https://api.example.com HTTP/1.1", "Host: a")).path == "*"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(head("GET * HTTP/1.1", "Host: a"), BAD_TARGET, id="asterisk-not-options"),
        pytest.param(head("POST * HTTP/1.1", "Host: a"), BAD_TARGET, id="asterisk-post"),
        pytest.param(connect("api.example.com:443"), BAD_TARGET, id="connect-authority-form"),
        pytest.param(head("CONNECT / HTTP/1.1", "Host: a"), BAD_TARGET, id="connect-origin-form"),
        pytest.param(
            head("CONNECT https://api.example.com/ HTTP/1.1", "Host: a"),
            BAD_TARGET,
            id="connect-absolute-form",
        ),
        pytest.param(get("api.example.com:443"), BAD_TARGET, id="authority-form-without-connect"),
        pytest.param(get("?x"), BAD_TARGET, id="query-only"),
        pytest.param(get("ftp://api.example.com/"), UNSUPPORTED, id="ftp"),
        pytest.param(get("wss://api.example.com/"), UNSUPPORTED, id="wss"),
        pytest.param(get("https:///x"), BAD_TARGET, id="absolute-form-empty-host"),
        pytest.param(get("https://u@api.example.com/"), BAD_TARGET, id="userinfo"),
        pytest.param(get("https://api.example.com:0/"), BAD_PORT, id="port-zero"),
        pytest.param(get("/a#b"), BAD_TARGET, id="fragment"),
        pytest.param(get("/caf\xe9"), BAD_TARGET, id="high-byte"),
    ],
)
def test_origin_form_refuses_connect_asterisk_misuse_and_bad_targets_with_400(
    raw: bytes, reason: Reason
) -> None:
    with pytest.raises(BadRequest) as info:
        origin(raw)
    assert (info.value.status, info.value.reason) == (400, reason)


# What the two forms disagree on; every other refusal is the same in both (next test).
_ACCEPTED_IN_ORIGIN_FORM = {"origin-form", "asterisk-form", "https-absolute-form"}


@pytest.mark.parametrize(
    ("name", "raw", "reason"),
    [pytest.param(name, raw, reason, id=name) for name, raw, reason in REFUSED_REQUESTS],
)
def test_origin_form_is_as_strict_as_the_proxy_form(name: str, raw: bytes, reason: Reason) -> None:
    if name in _ACCEPTED_IN_ORIGIN_FORM:
        origin(raw)
        return
    if raw.lstrip(b"\r\n").startswith(b"CONNECT "):
        reason = BAD_TARGET  # refused by its method, before its target and fields are read
    with pytest.raises(BadRequest) as info:
        origin(raw)
    assert (info.value.status, info.value.reason) == (400, reason)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(head("GET /index.html HTTP/1.1", "Host: example.com"), id="origin-form"),
        pytest.param(head("OPTIONS * HTTP/1.1", "Host: example.com"), id="asterisk-form"),
    ],
)
def test_proxy_form_refuses_origin_form_with_400_as_the_default_does(raw: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request_head(raw, form=RequestForm.PROXY)
    assert (info.value.status, info.value.reason) == (400, BAD_TARGET)


def test_origin_form_limits_and_versions_are_the_proxy_forms() -> None:
    at_limit = "/" + "a" * (MAX_TARGET_BYTES - 1)  # the limit counts the target as sent
    assert len(origin(head(f"GET {at_limit} HTTP/1.1", "Host: a")).raw_target) == MAX_TARGET_BYTES
    with pytest.raises(UriTooLong):
        origin(head(f"GET {at_limit}a HTTP/1.1", "Host: a"))
    with pytest.raises(VersionNotSupported):
        origin(head("GET / HTTP/2.0", "Host: a"))
    fields = [f"X-{i}: v" for i in range(MAX_HEADER_COUNT)]
    with pytest.raises(HeadersTooLarge):
        origin(head("GET / HTTP/1.1", "Host: a", *fields))


def test_origin_form_parses_alike_on_the_fast_and_the_line_by_line_path() -> None:
    raw = head("POST /x HTTP/1.1", "Host: api.example.com", "Content-Length: 3")
    fast, slow = origin(raw), origin(b"\r\n" + raw)  # a leading empty line takes the slow path
    assert fast == slow
    assert (fast.framing, fast.content_length) == (BodyFraming.LENGTH, 3)


@pytest.mark.parametrize(
    ("raw", "name", "port"),
    [
        pytest.param(head("GET /x HTTP/1.1", "Host: A.Example."), "a.example", 80, id="host"),
        pytest.param(head("GET /x HTTP/1.1", "Host: a.example:8080"), "a.example", 8080, id="port"),
        pytest.param(head("GET /x HTTP/1.0", "Host: [::1]:81"), "::1", 81, id="http10-ipv6"),
        pytest.param(
            head("GET http://t.example:8080/x HTTP/1.1", "Host: a.example"),
            "t.example",
            8080,
            id="absolute-form-wins-over-host",  # RFC 9112 section 3.2.2
        ),
        pytest.param(
            head("GET https://t.example/x HTTP/1.1", "Host: a.example"),
            "t.example",
            443,
            id="absolute-form-default-port-by-scheme",
        ),
        pytest.param(
            head("GET http://t.example/x HTTP/1.0"), "t.example", 80, id="absolute-form-no-host"
        ),
    ],
)
def test_origin_form_without_an_authority_takes_it_from_the_request(
    raw: bytes, name: str, port: int
) -> None:
    req = origin(raw, authority=None)
    assert (req.host.name, req.port) == (name, port)


def test_origin_form_without_an_authority_renders_the_host_it_read() -> None:
    req = origin(head("GET /x?y HTTP/1.1", "Host: A.example:8080", "Accept: */*"), authority=None)
    assert (
        render_request_head(req)
        == b"GET /x?y HTTP/1.1\r\nHost: a.example:8080\r\nAccept: */*\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(head("GET /x HTTP/1.1"), MALFORMED, id="http11-without-host"),
        pytest.param(head("GET /x HTTP/1.0"), MALFORMED, id="http10-without-host"),
        pytest.param(head("OPTIONS * HTTP/1.0"), MALFORMED, id="asterisk-without-host"),
        pytest.param(head("GET /x HTTP/1.1", "Host: a", "Host: a"), MALFORMED, id="two-hosts"),
        pytest.param(head("GET /x HTTP/1.1", "Host: a.example:0"), MALFORMED, id="bad-host"),
    ],
)
def test_origin_form_without_an_authority_or_a_usable_host_is_400(
    raw: bytes, reason: Reason
) -> None:
    with pytest.raises(BadRequest) as info:
        origin(raw, authority=None)
    assert (info.value.status, info.value.reason) == (400, reason)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(get("http://a.example/x"), ("a.example", 0), id="port-omitted-is-0"),
        pytest.param(get("http://a.example:80/x"), ("a.example", 80), id="port-given"),
        pytest.param(connect("a.example:443"), None, id="connect"),
    ],
)
def test_target_authority_in_proxy_form(raw: bytes, expected: tuple[str, int] | None) -> None:
    found = target_authority(parse_request_head(raw))
    assert ((found[0].name, found[1]) if found is not None else None) == expected


def test_an_authority_in_proxy_form_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="ORIGIN"):
        parse_request_head(get(), authority=TUNNEL)


# --- Responses ----------------------------------------------------------------------------------


def response(status_line: str, *fields: str) -> bytes:
    return head(status_line, *fields)


@pytest.mark.parametrize(
    ("method", "raw", "framing", "length"),
    [
        pytest.param("HEAD", response("HTTP/1.1 200 OK", "Content-Length: 10"),
                      BodyFraming.NONE, 10, id="head-keeps-length-no-body"),
        pytest.param("HEAD", response("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"),
                      BodyFraming.NONE, None, id="head-with-chunked"),
        pytest.param("HEAD", response("HTTP/1.1 200 OK", "Content-Length: 3",
                                      "Transfer-Encoding: chunked"),
                      BodyFraming.NONE, 3, id="head-with-cl-and-te"),
        pytest.param("HEAD", response("HTTP/1.1 200 OK", "Content-Length: nope"),
                      BodyFraming.NONE, None, id="head-with-bad-length-dropped"),
        pytest.param("GET", response("HTTP/1.1 100 Continue"),
                      BodyFraming.NONE, None, id="100"),
        pytest.param("GET", response("HTTP/1.1 103 Early Hints", "Link: </a.css>"),
                      BodyFraming.NONE, None, id="103"),
        pytest.param("GET", response("HTTP/1.1 204 No Content", "Content-Length: 0"),
                      BodyFraming.NONE, None, id="204-length-dropped"),
        pytest.param("GET", response("HTTP/1.1 304 Not Modified", "Content-Length: 50"),
                      BodyFraming.NONE, 50, id="304-keeps-length"),
        pytest.param("GET", response("HTTP/1.1 304 Not Modified", "Transfer-Encoding: chunked"),
                      BodyFraming.NONE, None, id="304-with-chunked"),
        pytest.param("GET", response("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"),
                      BodyFraming.CHUNKED, None, id="chunked"),
        pytest.param("GET", response("HTTP/1.1 200 OK", "Transfer-Encoding: gzip, Chunked"),
                      BodyFraming.CHUNKED, None, id="gzip-then-chunked"),
        pytest.param("GET", response("HTTP/1.1 200 OK", "Transfer-Encoding: gzip",
                                     "Transfer-Encoding: chunked"),
                      BodyFraming.CHUNKED, None, id="chunked-final-across-lines"),
        pytest.param("GET", response("HTTP/1.1 200 OK", "Transfer-Encoding: gzip"),
                      BodyFraming.UNTIL_CLOSE, None, id="te-not-chunked-until-close"),
        pytest.param("GET", response("HTTP/1.1 200 OK", "Transfer-Encoding: chunked, gzip"),
                      BodyFraming.UNTIL_CLOSE, None, id="chunked-not-final-until-close"),
        pytest.param("GET", response("HTTP/1.1 200 OK", "Content-Length: 10"),
                      BodyFraming.LENGTH, 10, id="length"),
        pytest.param("POST", response("HTTP/1.1 201 Created", "Content-Length: 0"),
                      BodyFraming.LENGTH, 0, id="length-zero"),
        pytest.param("GET", response("HTTP/1.1 200 OK", "Content-Length: 5, 5"),
                      BodyFraming.LENGTH, 5, id="identical-length-list"),
        pytest.param("GET", response("HTTP/1.1 200 OK", "Content-Length: 5", "Content-Length: 5"),
                      BodyFraming.LENGTH, 5, id="identical-length-lines"),
        pytest.param("GET", response("HTTP/1.1 200 OK"),
                      BodyFraming.UNTIL_CLOSE, None, id="nothing-until-close"),
        pytest.param("GET", response("HTTP/1.0 200 OK", "Content-Length: 4"),
                      BodyFraming.LENGTH, 4, id="http10-length"),
        pytest.param("GET", response("HTTP/1.1 404 Not Found", "Content-Length: 9"),
                      BodyFraming.LENGTH, 9, id="error-status-length"),
    ],
)  # fmt: skip
def test_response_framing_follows_rfc9112_section_6_3(
    method: str, raw: bytes, framing: BodyFraming, length: int | None
) -> None:
    resp = parse_response_head(raw, request_method=method)
    assert resp.framing is framing
    assert resp.content_length == length


def test_response_codings_before_chunked_are_kept() -> None:
    resp = parse_response_head(
        response("HTTP/1.1 200 OK", "Transfer-Encoding: gzip, chunked"), request_method="GET"
    )
    assert resp.transfer_codings == ("gzip",)


REFUSED_RESPONSES = [
    ("cl-and-te", response("HTTP/1.1 200 OK", "Content-Length: 5", "Transfer-Encoding: chunked")),
    ("differing-cl-lines", response("HTTP/1.1 200 OK", "Content-Length: 5", "Content-Length: 6")),
    ("differing-cl-list", response("HTTP/1.1 200 OK", "Content-Length: 5, 6")),
    ("cl-non-digits", response("HTTP/1.1 200 OK", "Content-Length: abc")),
    ("cl-sign", response("HTTP/1.1 200 OK", "Content-Length: +5")),
    ("cl-empty", response("HTTP/1.1 200 OK", "Content-Length:")),
    ("cl-huge", response("HTTP/1.1 200 OK", "Content-Length: 9" + "9" * 18)),
    ("chunked-twice", response("HTTP/1.1 200 OK", "Transfer-Encoding: chunked, chunked")),
    ("te-empty", response("HTTP/1.1 200 OK", "Transfer-Encoding: ,")),
    ("te-non-token", response("HTTP/1.1 200 OK", "Transfer-Encoding: chun ked")),
    ("te-in-http10", response("HTTP/1.0 200 OK", "Transfer-Encoding: chunked")),
    ("status-four-digits", response("HTTP/1.1 2000 OK")),
    ("status-two-digits", response("HTTP/1.1 20 OK")),
    ("status-below-100", response("HTTP/1.1 099 OK")),
    ("status-600", response("HTTP/1.1 600 OK")),
    ("status-not-digits", response("HTTP/1.1 abc OK")),
    ("version-2", response("HTTP/2 200 OK")),
    ("version-2.0", response("HTTP/2.0 200 OK")),
    ("version-lowercase", response("http/1.1 200 OK")),
    ("double-space", response("HTTP/1.1  200 OK")),
    ("no-status", response("HTTP/1.1")),
    ("not-http", response("ICY 200 OK")),
    ("obs-fold", response("HTTP/1.1 200 OK", "X-A: one", " two")),
    ("space-before-colon", response("HTTP/1.1 200 OK", "Content-Length : 5")),
    ("nul-in-value", response("HTTP/1.1 200 OK", "X-A: \x00")),
    ("control-in-reason", response("HTTP/1.1 200 O\x01K")),
    ("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n"),
    ("bare-lf-head-end", b"HTTP/1.1 200 OK\r\nContent-Length: 0\n\n"),
    ("bare-cr", b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\n\r\n"),
    ("too-many-fields", response("HTTP/1.1 200 OK", *[f"X-{i}: v" for i in range(101)])),
    ("connection-not-token", response("HTTP/1.1 200 OK", "Connection: a b")),
]


@pytest.mark.parametrize("raw", [pytest.param(raw, id=name) for name, raw in REFUSED_RESPONSES])
def test_bad_upstream_response_is_502_upstream_bad_response(raw: bytes) -> None:
    with pytest.raises(BadGateway) as info:
        parse_response_head(raw, request_method="GET")
    assert info.value.status == 502
    assert info.value.reason is Reason.UPSTREAM_BAD_RESPONSE


@pytest.mark.parametrize(
    ("raw", "version", "status", "reason"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1", 200, "OK", id="ok"),
        pytest.param(b"HTTP/1.1 204\r\n\r\n", "HTTP/1.1", 204, "", id="no-reason-no-space"),
        pytest.param(b"HTTP/1.1 204 \r\n\r\n", "HTTP/1.1", 204, "", id="empty-reason"),
        pytest.param(
            b"HTTP/1.0 404 Not  Found\r\n\r\n", "HTTP/1.0", 404, "Not  Found", id="spaces"
        ),
        pytest.param(
            b"HTTP/1.1 599 \xe9t\xe9\r\n\r\n", "HTTP/1.1", 599, "\xe9t\xe9", id="obs-text"
        ),
    ],
)
def test_status_line_is_parsed(raw: bytes, version: str, status: int, reason: str) -> None:
    resp = parse_response_head(raw, request_method="GET")
    assert (resp.version, resp.status, resp.reason) == (version, status, reason)


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        pytest.param(response("HTTP/1.1 200 OK", "Content-Length: 1"), True, id="1.1-length"),
        pytest.param(response("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"), True,
                     id="1.1-chunked"),
        pytest.param(response("HTTP/1.1 200 OK", "Content-Length: 1", "Connection: close"), False,
                     id="1.1-close"),
        pytest.param(response("HTTP/1.1 200 OK"), False, id="until-close-never-reused"),
        pytest.param(response("HTTP/1.0 200 OK", "Content-Length: 1"), False, id="1.0-default"),
        pytest.param(response("HTTP/1.0 200 OK", "Content-Length: 1", "Connection: keep-alive"),
                     True, id="1.0-keep-alive"),
    ],
)  # fmt: skip
def test_response_keep_alive_says_whether_upstream_connection_can_be_reused(
    raw: bytes, keep_alive: bool
) -> None:
    assert parse_response_head(raw, request_method="GET").keep_alive is keep_alive


# --- Rendering responses to the client ----------------------------------------------------------


def test_render_response_strips_hop_by_hop_and_rerenders_length() -> None:
    resp = parse_response_head(
        response(
            "HTTP/1.0 200 OK",
            "Content-Type: text/plain",
            "Connection: keep-alive, X-Internal",
            "X-Internal: 1",
            "Keep-Alive: timeout=5",
            "Content-Length: 005",
            "Set-Cookie: a=1",
            "Set-Cookie: b=2",
            "Upgrade: h2c",
            "Proxy-Authenticate: Basic",
        ),
        request_method="GET",
    )
    assert render_response_head(resp, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Set-Cookie: a=1\r\n"
        b"Set-Cookie: b=2\r\n"
        b"Content-Length: 5\r\n"
        b"\r\n"
    )


def test_render_response_adds_connection_close_when_client_connection_closes() -> None:
    resp = parse_response_head(
        response("HTTP/1.1 200 OK", "Content-Length: 0"), request_method="GET"
    )
    assert render_response_head(resp, keep_alive=False) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )


def test_render_response_until_close_always_closes_and_has_no_framing_field() -> None:
    resp = parse_response_head(response("HTTP/1.1 200 OK", "X-A: 1"), request_method="GET")
    assert render_response_head(resp, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: close\r\n\r\n"
    )


def test_render_response_chunked_keeps_other_codings() -> None:
    resp = parse_response_head(
        response("HTTP/1.1 200 OK", "Transfer-Encoding: gzip", "Transfer-Encoding: CHUNKED"),
        request_method="GET",
    )
    assert render_response_head(resp, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    )


def test_render_response_until_close_with_coding_keeps_its_label() -> None:
    resp = parse_response_head(
        response("HTTP/1.1 200 OK", "Transfer-Encoding: gzip"), request_method="GET"
    )
    assert render_response_head(resp, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("method", "raw", "rendered"),
    [
        pytest.param(
            "HEAD", response("HTTP/1.1 200 OK", "Content-Length: 1234"),
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", id="head-keeps-length",
        ),
        pytest.param(
            "HEAD", response("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"),
            b"HTTP/1.1 200 OK\r\n\r\n", id="head-drops-transfer-encoding",
        ),
        pytest.param(
            "GET", response("HTTP/1.1 304 Not Modified", "ETag: \"x\"", "Content-Length: 99"),
            b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 99\r\n\r\n",
            id="304-keeps-length",
        ),
        pytest.param(
            "GET", response("HTTP/1.1 204 No Content", "Content-Length: 0"),
            b"HTTP/1.1 204 No Content\r\n\r\n", id="204-drops-length",
        ),
        pytest.param(
            "GET", response("HTTP/1.1 100 Continue"),
            b"HTTP/1.1 100 Continue\r\n\r\n", id="100-interim",
        ),
        pytest.param(
            "GET", response("HTTP/1.1 103 Early Hints", "Link: </s.css>; rel=preload"),
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", id="103-interim",
        ),
    ],
)  # fmt: skip
def test_render_response_without_body(method: str, raw: bytes, rendered: bytes) -> None:
    resp = parse_response_head(raw, request_method=method)
    assert render_response_head(resp, keep_alive=True) == rendered


def test_render_interim_response_never_adds_connection_close() -> None:
    resp = parse_response_head(response("HTTP/1.1 100 Continue"), request_method="PUT")
    assert render_response_head(resp, keep_alive=False) == b"HTTP/1.1 100 Continue\r\n\r\n"


def test_response_head_built_by_hand_renders_with_default_codings() -> None:
    resp = ResponseHead(
        version="HTTP/1.1",
        status=200,
        reason="OK",
        headers=(("X-A", "1"),),
        framing=BodyFraming.CHUNKED,
        content_length=None,
        keep_alive=True,
        connection_tokens=frozenset(),
    )
    assert render_response_head(resp, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


# --- find_head_end --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("buf", "end"),
    [
        pytest.param(b"", -1, id="empty"),
        pytest.param(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n", -1, id="no-blank-line"),
        pytest.param(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r", -1, id="half-blank-line"),
        pytest.param(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 35, id="complete"),
        pytest.param(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nGET", 35, id="pipelined-rest"),
        pytest.param(b"GET http://a/ HTTP/1.0\r\n\r\n", 26, id="no-fields"),
        pytest.param(b"GET http://a/ HTTP/1.1\r\nHost: a\n\n", 33, id="bare-lf-blank-line"),
        pytest.param(b"GET http://a/ HTTP/1.1\r\nHost: a\n\r\n", 34, id="lf-crlf-blank-line"),
        pytest.param(b"GET http://a/ HTTP/1.1\nHost: a\n\n", 32, id="all-bare-lf"),
        pytest.param(b"\n\n", 2, id="only-bare-lf"),
        pytest.param(b"\r\n\r\nGET http://a/ HTTP/1.0\r\n\r\n", 30, id="leading-empty-lines"),
        pytest.param(b"\r\n\r\n", -1, id="only-empty-lines-waits"),
        pytest.param(b"\r\n\r", -1, id="partial-empty-line"),
    ],
)
def test_find_head_end(buf: bytes, end: int) -> None:
    assert find_head_end(buf, max_head_bytes=MAX_HEAD) == end


def test_find_head_end_bare_lf_head_is_found_so_the_parser_refuses_it_at_once() -> None:
    buf = b"GET http://a.com/ HTTP/1.1\nHost: a.com\n\n"
    end = find_head_end(buf, max_head_bytes=MAX_HEAD)
    assert end == len(buf)
    with pytest.raises(BadRequest) as info:
        parse_request_head(buf[:end])
    assert info.value.reason is Reason.MALFORMED_REQUEST


def test_find_head_end_refuses_too_many_leading_empty_lines() -> None:
    with pytest.raises(BadRequest):
        find_head_end(b"\r\n" * (MAX_LEADING_EMPTY_LINES + 1), max_head_bytes=MAX_HEAD)


def test_find_head_end_response_does_not_skip_leading_empty_lines() -> None:
    assert find_head_end(b"\r\n\r\n", max_head_bytes=MAX_HEAD, is_request=False) == 4


def test_find_head_end_request_line_without_end_beyond_limit_is_414() -> None:
    buf = b"GET http://a/" + b"a" * MAX_REQUEST_LINE_BYTES
    with pytest.raises(UriTooLong):
        find_head_end(buf, max_head_bytes=MAX_HEAD)


def test_find_head_end_request_line_just_under_limit_waits() -> None:
    buf = b"X" * (MAX_REQUEST_LINE_BYTES - 1)
    assert find_head_end(buf, max_head_bytes=MAX_HEAD) == -1


def test_find_head_end_longest_request_line_is_accepted() -> None:
    line = b"GET " + b"a" * (MAX_REQUEST_LINE_BYTES - len(b"GET  HTTP/1.1\r\n")) + b" HTTP/1.1\r\n"
    assert len(line) == MAX_REQUEST_LINE_BYTES
    buf = line + b"Host: a\r\n\r\n"
    assert find_head_end(buf, max_head_bytes=MAX_HEAD) == len(buf)


def test_find_head_end_request_line_longer_than_head_limit_is_414() -> None:
    with pytest.raises(UriTooLong):
        find_head_end(b"GET http://a/" + b"a" * 2000, max_head_bytes=1024)
    with pytest.raises(UriTooLong):
        find_head_end(b"GET http://a/" + b"a" * 2000 + b" HTTP/1.1\r\n", max_head_bytes=1024)


def test_find_head_end_fields_beyond_head_limit_are_431() -> None:
    buf = b"GET http://a/ HTTP/1.1\r\n" + b"X-A: " + b"v" * 2000
    with pytest.raises(HeadersTooLarge):
        find_head_end(buf, max_head_bytes=1024)


def test_find_head_end_head_of_exactly_the_limit_is_accepted_one_more_byte_is_431() -> None:
    base = b"GET http://a/ HTTP/1.1\r\nX-A: "
    exact = base + b"v" * (100 - len(base) - 4) + b"\r\n\r\n"
    assert len(exact) == 100
    assert find_head_end(exact, max_head_bytes=100) == 100
    longer = base + b"v" * (100 - len(base) - 3) + b"\r\n\r\n"
    with pytest.raises(HeadersTooLarge):
        find_head_end(longer, max_head_bytes=100)


def test_find_head_end_response_too_large_is_bad_gateway() -> None:
    with pytest.raises(BadGateway) as info:
        find_head_end(b"HTTP/1.1 200 OK\r\nX: " + b"v" * 200, max_head_bytes=100, is_request=False)
    assert info.value.reason is Reason.UPSTREAM_BAD_RESPONSE


def test_find_head_end_response_long_status_line_is_bad_gateway_not_414() -> None:
    with pytest.raises(BadGateway):
        find_head_end(b"HTTP/1.1 200 " + b"x" * 200, max_head_bytes=100, is_request=False)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(get("http://example.com/", "X-A: 1"), id="crlf"),
        pytest.param(b"GET http://a/ HTTP/1.1\r\nHost: a\n\n", id="bare-lf"),
        pytest.param(b"GET http://a/ HTTP/1.1\r\nHost: a\n\r\n", id="lf-crlf"),
        pytest.param(b"\r\n\r\nGET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", id="leading-lines"),
    ],
)
def test_find_head_end_with_start_hint_on_growing_buffer_finds_the_same_end(raw: bytes) -> None:
    expected = find_head_end(raw + b"NEXT", max_head_bytes=MAX_HEAD)
    rng = random.Random(7)
    for _ in range(50):
        buf, start, found = b"", 0, -1
        data = raw + b"NEXT"
        while found < 0:
            step = rng.randint(1, 5)
            buf, data = buf + data[:step], data[step:]
            found = find_head_end(buf, max_head_bytes=MAX_HEAD, start=start)
            start = len(buf)
        assert found == expected


def test_find_head_end_start_hint_beyond_request_line_limit_skips_the_line_check() -> None:
    line = b"GET http://a/ HTTP/1.1\r\n"
    buf = line + b"X-A: " + b"v" * MAX_REQUEST_LINE_BYTES
    assert find_head_end(buf, max_head_bytes=MAX_HEAD, start=len(buf)) == -1
    buf += b"\r\n\r\n"
    assert find_head_end(buf, max_head_bytes=MAX_HEAD, start=len(buf) - 4) == len(buf)


# --- Chunked bodies -----------------------------------------------------------------------------


def decode(raw: bytes, *, upstream: bool = False) -> tuple[bytes, ChunkedDecoder]:
    decoder = ChunkedDecoder(upstream=upstream)
    return b"".join(decoder.feed(raw)), decoder


def chunked(payload: bytes, sizes: list[int], *, ext: bytes = b"", trailer: bytes = b"") -> bytes:
    out, pos = [], 0
    for size in sizes:
        piece = payload[pos : pos + size]
        pos += size
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), ext, piece))
    assert pos == len(payload)
    return b"".join(out) + b"0" + ext + b"\r\n" + trailer + b"\r\n"


def test_chunked_round_trips_over_random_splits() -> None:
    rng = random.Random(20240611)
    for _ in range(300):
        payload = rng.randbytes(rng.randint(0, 300))
        sizes: list[int] = []
        left = len(payload)
        while left:
            sizes.append(rng.randint(1, left))
            left -= sizes[-1]
        ext = rng.choice([b"", b";a", b";a=b", b';name="q\\" v"', b" ; a = 1 ;b"])
        trailer = rng.choice([b"", b"X-Sum: abc\r\n", b"A: 1\r\nB:\t2 \r\n"])
        pipelined = rng.choice([b"", b"GET http://a/ HTTP/1.1\r\n"])
        raw = chunked(payload, sizes, ext=ext, trailer=trailer) + pipelined
        cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(0, 12))))
        decoder = ChunkedDecoder()
        out: list[bytes] = []
        for lo, hi in zip([0, *cuts], [*cuts, len(raw)], strict=True):
            out += decoder.feed(raw[lo:hi])
        assert b"".join(out) == payload
        assert decoder.done
        assert decoder.tail() == pipelined


def test_chunked_fed_byte_by_byte() -> None:
    payload = bytes(range(256)) * 4
    raw = chunked(payload, [1, 15, 16, 500, 492], ext=b";x=y", trailer=b"T: v\r\n") + b"rest"
    decoder = ChunkedDecoder()
    out = [piece for i in range(len(raw)) for piece in decoder.feed(raw[i : i + 1])]
    assert b"".join(out) == payload
    assert decoder.done
    assert decoder.tail() == b"rest"


def test_chunked_data_is_returned_as_it_arrives_not_buffered() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"a\r\nhello") == [b"hello"]
    assert decoder.feed(b"world") == [b"world"]
    assert decoder.feed(b"\r\n0\r\n") == []
    assert not decoder.done
    assert decoder.feed(b"\r\n") == []
    assert decoder.done


def test_chunked_accepts_memoryview_and_bytearray() -> None:
    decoder = ChunkedDecoder()
    raw = b"3\r\nabc\r\n0\r\n\r\n"
    assert decoder.feed(memoryview(raw)[:6]) == [b"abc"]
    assert decoder.feed(bytearray(raw[6:])) == []
    assert decoder.done


@pytest.mark.parametrize(
    ("raw", "payload"),
    [
        pytest.param(b"0\r\n\r\n", b"", id="empty-body"),
        pytest.param(b"5\r\nhello\r\n0\r\n\r\n", b"hello", id="one-chunk"),
        pytest.param(b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", id="uppercase-hex"),
        pytest.param(b"000000000000000a\r\n0123456789\r\n0\r\n\r\n", b"0123456789", id="16-digits"),
        pytest.param(b"0000\r\n\r\n", b"", id="zero-with-leading-zeros"),
        pytest.param(b"5;ext\r\nhello\r\n0\r\n\r\n", b"hello", id="extension-name"),
        pytest.param(b"5;a=b;c=d\r\nhello\r\n0;z\r\n\r\n", b"hello", id="extensions"),
        pytest.param(b'5;a="x;y\\"z"\r\nhello\r\n0\r\n\r\n', b"hello", id="quoted-extension"),
        pytest.param(b"5 ;\ta = b\r\nhello\r\n0\r\n\r\n", b"hello", id="bws-around-extension"),
        pytest.param(b"5\r\nhello\r\n0\r\nX-Sum: 1\r\nY: \xff\r\n\r\n", b"hello", id="trailers"),
    ],
)
def test_chunked_valid_forms(raw: bytes, payload: bytes) -> None:
    body, decoder = decode(raw)
    assert body == payload
    assert decoder.done
    assert decoder.tail() == b""


BAD_CHUNKS = [
    ("empty-size", b"\r\nhello\r\n0\r\n\r\n"),
    ("minus-sign", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("plus-sign", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("0x-prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("trailing-space", b"5 \r\nhello\r\n0\r\n\r\n"),
    ("trailing-tab", b"5\t\r\nhello\r\n0\r\n\r\n"),
    ("not-hex", b"g\r\nhello\r\n0\r\n\r\n"),
    ("17-digits", b"0" * 16 + b"5\r\nhello\r\n0\r\n\r\n"),
    ("underscore", b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"),
    ("empty-extension", b"5;\r\nhello\r\n0\r\n\r\n"),
    ("extension-without-value", b"5;a=\r\nhello\r\n0\r\n\r\n"),
    ("unterminated-quote", b'5;a="x\r\nhello\r\n0\r\n\r\n'),
    ("extension-junk", b"5;a b\r\nhello\r\n0\r\n\r\n"),
    ("size-bare-lf", b"5\nhello\r\n0\r\n\r\n"),
    ("size-bare-cr", b"5\rhello\r\n0\r\n\r\n"),
    ("size-cr-cr-lf", b"5\r\r\nhello\r\n0\r\n\r\n"),
    ("data-longer-than-size", b"5\r\nhelloX\r\n0\r\n\r\n"),
    ("data-bare-lf", b"5\r\nhello\n0\r\n\r\n"),
    ("data-no-crlf", b"5\r\nhello0\r\n\r\n"),
    ("data-lf-first", b"5\r\nhello\n\r0\r\n\r\n"),
    ("last-chunk-bare-lf", b"0\n\r\n"),
    ("final-blank-bare-lf", b"0\r\n\n"),
    ("trailer-bare-lf", b"0\r\nX: y\n\r\n"),
    ("trailer-bare-cr", b"0\r\nX: a\rb\r\n\r\n"),
    ("trailer-obs-fold", b"0\r\nX: y\r\n z\r\n\r\n"),
    ("trailer-space-before-colon", b"0\r\nX : y\r\n\r\n"),
    ("trailer-no-colon", b"0\r\nXy\r\n\r\n"),
    ("trailer-nul", b"0\r\nX: \x00\r\n\r\n"),
    ("size-line-too-long", b"5;a=" + b"b" * MAX_CHUNK_LINE_BYTES + b"\r\nhello\r\n0\r\n\r\n"),
    ("size-line-too-long-unterminated", b"5;a=" + b"b" * MAX_CHUNK_LINE_BYTES),
    ("trailers-too-long", b"0\r\n" + b"X: " + b"v" * MAX_TRAILER_BYTES + b"\r\n\r\n"),
    (
        "many-trailers-too-long",
        b"0\r\n"
        + b"X: vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv\r\n" * (MAX_TRAILER_BYTES // 47 + 1),
    ),
]


@pytest.mark.parametrize("raw", [pytest.param(raw, id=name) for name, raw in BAD_CHUNKS])
def test_bad_chunked_framing_from_client_is_400_bad_chunk(raw: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        decode(raw)
    assert info.value.reason is Reason.BAD_CHUNK


@pytest.mark.parametrize("raw", [pytest.param(raw, id=name) for name, raw in BAD_CHUNKS])
def test_bad_chunked_framing_fed_byte_by_byte_is_still_refused(raw: bytes) -> None:
    decoder = ChunkedDecoder()
    with pytest.raises(BadRequest):
        for i in range(len(raw)):
            decoder.feed(raw[i : i + 1])


@pytest.mark.parametrize("raw", [pytest.param(raw, id=name) for name, raw in BAD_CHUNKS[:8]])
def test_bad_chunked_framing_upstream_is_502(raw: bytes) -> None:
    with pytest.raises(BadGateway) as info:
        decode(raw, upstream=True)
    assert info.value.reason is Reason.UPSTREAM_BAD_RESPONSE


def test_chunked_decoder_keeps_failing_after_an_error() -> None:
    decoder = ChunkedDecoder()
    with pytest.raises(BadRequest):
        decoder.feed(b"zz\r\n")
    with pytest.raises(BadRequest):
        decoder.feed(b"0\r\n\r\n")
    assert not decoder.done


def test_chunked_tail_holds_the_pipelined_next_message_across_feeds() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"2\r\nhi\r\n0\r\n\r\nGET http://a/") == [b"hi"]
    assert decoder.done
    assert decoder.tail() == b"GET http://a/"
    assert decoder.feed(b" HTTP/1.1\r\n") == []
    assert decoder.tail() == b"GET http://a/ HTTP/1.1\r\n"


def test_chunked_incomplete_body_is_not_done_and_has_no_tail() -> None:
    body, decoder = decode(b"5\r\nhel")
    assert body == b"hel"
    assert not decoder.done
    assert decoder.tail() == b""


def test_chunked_large_input_byte_by_byte_stays_linear() -> None:
    # 200 KB of 1-byte chunks (6 framing bytes per payload byte) fed one byte at a time.
    payload = b"x" * 30000
    raw = b"".join(encode_chunk(payload[i : i + 1]) for i in range(len(payload))) + LAST_CHUNK
    decoder = ChunkedDecoder()
    total = 0
    for i in range(len(raw)):
        total += sum(len(p) for p in decoder.feed(raw[i : i + 1]))
    assert total == len(payload)
    assert decoder.done


# --- encode_chunk -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "encoded"),
    [
        pytest.param(b"hello", b"5\r\nhello\r\n", id="short"),
        pytest.param(b"x" * 26, b"1a\r\n" + b"x" * 26 + b"\r\n", id="lowercase-hex"),
        pytest.param(memoryview(b"abc"), b"3\r\nabc\r\n", id="memoryview"),
        pytest.param(b"", b"", id="empty-is-nothing-not-last-chunk"),
    ],
)
def test_encode_chunk(data: bytes | memoryview, encoded: bytes) -> None:
    assert encode_chunk(data) == encoded


def test_encoded_chunks_decode_to_the_same_bytes() -> None:
    pieces = [b"a", b"", b"bc" * 1000, bytes(range(256))]
    raw = b"".join(encode_chunk(p) for p in pieces) + LAST_CHUNK
    body, decoder = decode(raw)
    assert body == b"".join(pieces)
    assert decoder.done


def test_errors_carry_status_for_the_one_error_renderer() -> None:
    errors: list[OutgateError] = []
    for raw in (get("http://example.com:0/"), post("Content-Length: 1, 1")):
        with pytest.raises(OutgateError) as info:
            parse_request_head(raw)
        errors.append(info.value)
    assert [(e.status, e.reason) for e in errors] == [
        (400, Reason.BAD_PORT),
        (400, Reason.AMBIGUOUS_FRAMING),
    ]


@pytest.mark.parametrize(
    ("target", "name", "port", "path"),
    [
        ("https://Example.COM/a?b", "example.com", 443, "/a?b"),
        ("wss://example.com/chat", "example.com", 443, "/chat"),
        ("ftp://example.com/f", "example.com", 21, "/f"),
        ("gopher://example.com/x", "example.com", None, "/x"),
        ("https://0177.0.0.1/", None, None, "/"),
    ],
)
def test_an_unsupported_scheme_refusal_carries_what_was_asked(
    target: str, name: str | None, port: int | None, path: str
) -> None:
    with pytest.raises(UnsupportedScheme) as info:
        parse_request_head(get(target))
    refused = info.value
    assert (refused.status, refused.reason) == (400, Reason.UNSUPPORTED_SCHEME)
    assert refused.method == "GET"
    assert (refused.host.name if refused.host else None, refused.port) == (name, port)
    assert refused.path == path


# --- Upgrade (RFC 9110 section 7.8) ---------------------------------------------------------------

WEBSOCKET_FIELDS = ("Connection: Upgrade", "Upgrade: websocket", "Sec-WebSocket-Version: 13")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(get("http://example.com/ws", *WEBSOCKET_FIELDS), "websocket", id="websocket"),
        pytest.param(
            get("http://example.com/", "Connection: keep-alive, upgrade", "Upgrade: foo/2"),
            "foo/2",
            id="name-and-version",
        ),
        pytest.param(
            get("http://example.com/", "Upgrade: websocket"), None, id="not-in-connection"
        ),
        pytest.param(
            get("http://example.com/", "Connection: upgrade", "Upgrade: h2c"), None, id="h2c"
        ),
        pytest.param(
            get("http://example.com/", "Connection: upgrade", "Upgrade: H2C"), None, id="h2c-case"
        ),
        pytest.param(
            get("http://example.com/", "Connection: upgrade", "Upgrade: websocket, h2c"),
            None,
            id="several-protocols",
        ),
        pytest.param(
            get("http://example.com/", "Connection: upgrade", "Upgrade: a", "Upgrade: b"),
            None,
            id="two-fields",
        ),
        pytest.param(post(*WEBSOCKET_FIELDS, "Content-Length: 5"), None, id="with-a-length-body"),
        pytest.param(
            get("http://example.com/ws", *WEBSOCKET_FIELDS, "Content-Length: 0"),
            "websocket",
            id="empty-length-as-java-sends",
        ),
        pytest.param(
            post(*WEBSOCKET_FIELDS, "Transfer-Encoding: chunked"), None, id="with-a-chunked-body"
        ),
        pytest.param(
            get("http://example.com/", *WEBSOCKET_FIELDS, version="HTTP/1.0"), None, id="http10"
        ),
    ],
)
def test_offered_upgrade(raw: bytes, expected: str | None) -> None:
    assert offered_upgrade(parse_request_head(raw)) == expected


def test_an_offered_upgrade_is_rendered_with_its_connection_field_and_nothing_else_hop() -> None:
    req = parse_request_head(
        get("http://example.com/ws", *WEBSOCKET_FIELDS, "Keep-Alive: timeout=5", "TE: trailers")
    )
    assert render_request_head(req) == (
        b"GET /ws HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Connection: upgrade\r\n"
        b"Upgrade: websocket\r\n"
        b"\r\n"
    )


def test_an_upgrade_not_offered_is_dropped_from_the_rendered_request() -> None:
    req = parse_request_head(
        get("http://example.com/", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABk")
    )  # fmt: skip
    assert render_request_head(req) == b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


def switching(*fields: str) -> ResponseHead:
    return parse_response_head(
        response("HTTP/1.1 101 Switching Protocols", *fields), request_method="GET"
    )


def test_a_101_to_the_offered_protocol_is_rendered_with_its_upgrade_fields() -> None:
    resp = switching("Connection: Upgrade", "Upgrade: WebSocket", "Sec-WebSocket-Accept: x=")
    protocol = check_switch(resp, offered="websocket")
    assert render_response_head(resp, keep_alive=True, switch_to=protocol) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Sec-WebSocket-Accept: x=\r\n"
        b"Connection: upgrade\r\n"
        b"Upgrade: websocket\r\n"
        b"\r\n"
    )


@pytest.mark.parametrize(
    ("fields", "offered"),
    [
        pytest.param(("Connection: Upgrade", "Upgrade: websocket"), None, id="not-asked"),
        pytest.param(("Connection: Upgrade", "Upgrade: h2c"), "websocket", id="other-protocol"),
        pytest.param(("Connection: Upgrade",), "websocket", id="no-upgrade-field"),
        pytest.param(
            ("Connection: Upgrade", "Upgrade: websocket", "Upgrade: h2c"),
            "websocket",
            id="two-protocols",
        ),
    ],
)
def test_a_101_that_does_not_switch_to_the_offered_protocol_is_a_502(
    fields: tuple[str, ...], offered: str | None
) -> None:
    with pytest.raises(BadGateway) as info:
        check_switch(switching(*fields), offered=offered)
    assert info.value.reason is Reason.UPSTREAM_BAD_RESPONSE


def test_a_ws_target_is_the_same_as_http() -> None:
    req = parse_request_head(get("ws://example.com/chat", *WEBSOCKET_FIELDS))
    assert (req.scheme, req.host.name, req.port, req.path) == ("http", "example.com", 80, "/chat")
