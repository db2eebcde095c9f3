"""Strict parsing over a real socket: each smuggling or malformed input gets 400 and a close."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, read_until_close

StartProxy = Callable[..., ProxyProcess]
ORIGIN = "origin.test:{port}"

# (id, raw request with {origin} for the allowed origin's authority, expected status, reason)
CASES: list[tuple[str, str, int, str]] = [
    (
        "cl-and-te",
        "POST http://{origin}/echo HTTP/1.1\r\nHost: {origin}\r\n"
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "ambiguous_framing",
    ),
    (
        "duplicate-cl",
        "POST http://{origin}/echo HTTP/1.1\r\nHost: {origin}\r\n"
        "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
        "ambiguous_framing",
    ),
    (
        "cl-list",
        "POST http://{origin}/echo HTTP/1.1\r\nHost: {origin}\r\nContent-Length: 5, 5\r\n\r\nhello",
        400,
        "ambiguous_framing",
    ),
    (
        "cl-sign",
        "POST http://{origin}/echo HTTP/1.1\r\nHost: {origin}\r\nContent-Length: +5\r\n\r\nhello",
        400,
        "ambiguous_framing",
    ),
    (
        "te-not-chunked-last",
        "POST http://{origin}/echo HTTP/1.1\r\nHost: {origin}\r\n"
        "Transfer-Encoding: chunked, gzip\r\n\r\n",
        400,
        "ambiguous_framing",
    ),
    (
        "te-unknown",
        "POST http://{origin}/echo HTTP/1.1\r\nHost: {origin}\r\n"
        "Transfer-Encoding: xchunked\r\n\r\n",
        400,
        "ambiguous_framing",
    ),
    (
        "obs-fold",
        "GET http://{origin}/hello HTTP/1.1\r\nHost: {origin}\r\nX-A: one\r\n two\r\n\r\n",
        400,
        "malformed_request",
    ),
    (
        "bare-cr",
        "GET http://{origin}/hello HTTP/1.1\r\nHost: {origin}\r\nX-A: a\rb\r\n\r\n",
        400,
        "malformed_request",
    ),
    (
        "bare-lf",
        "GET http://{origin}/hello HTTP/1.1\r\nHost: {origin}\nX-A: a\r\n\r\n",
        400,
        "malformed_request",
    ),
    (
        "bare-lf-head-end",
        "GET http://{origin}/hello HTTP/1.1\nHost: {origin}\n\n",
        400,
        "malformed_request",
    ),
    (
        "space-before-colon",
        "GET http://{origin}/hello HTTP/1.1\r\nHost : {origin}\r\n\r\n",
        400,
        "malformed_request",
    ),
    (
        "nul-in-value",
        "GET http://{origin}/hello HTTP/1.1\r\nHost: {origin}\r\nX-A: a\x00b\r\n\r\n",
        400,
        "malformed_request",
    ),
    (
        "control-in-value",
        "GET http://{origin}/hello HTTP/1.1\r\nHost: {origin}\r\nX-A: a\x01b\r\n\r\n",
        400,
        "malformed_request",
    ),
    (
        "bad-chunk-size",
        "POST http://{origin}/echo HTTP/1.1\r\nHost: {origin}\r\n"
        "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
        "bad_chunk",
    ),
    (
        "chunk-line-bare-lf",
        "POST http://{origin}/echo HTTP/1.1\r\nHost: {origin}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        400,
        "bad_chunk",
    ),
    ("origin-form", "GET /hello HTTP/1.1\r\nHost: {origin}\r\n\r\n", 400, "bad_target"),
    ("options-star", "OPTIONS * HTTP/1.1\r\nHost: {origin}\r\n\r\n", 400, "bad_target"),
    (
        "userinfo",
        "GET http://user:pw@{origin}/hello HTTP/1.1\r\nHost: {origin}\r\n\r\n",
        400,
        "bad_target",
    ),
    (
        "bracketed-name",
        "GET http://[origin.test]/hello HTTP/1.1\r\nHost: origin.test\r\n\r\n",
        400,
        "bad_target",
    ),
    (
        "port-zero",
        "GET http://origin.test:0/ HTTP/1.1\r\nHost: origin.test\r\n\r\n",
        400,
        "bad_port",
    ),
    (
        "port-too-big",
        "GET http://origin.test:65536/ HTTP/1.1\r\nHost: origin.test\r\n\r\n",
        400,
        "bad_port",
    ),
    (
        "port-sign",
        "GET http://origin.test:+80/ HTTP/1.1\r\nHost: origin.test\r\n\r\n",
        400,
        "bad_port",
    ),
    (
        "port-leading-zero",
        "GET http://origin.test:080/ HTTP/1.1\r\nHost: origin.test\r\n\r\n",
        400,
        "bad_port",
    ),
    (
        "port-junk",
        "GET http://origin.test:80a/ HTTP/1.1\r\nHost: origin.test\r\n\r\n",
        400,
        "bad_port",
    ),
    (
        "connect-port-missing",
        "CONNECT origin.test HTTP/1.1\r\nHost: origin.test\r\n\r\n",
        400,
        "bad_port",
    ),
    (
        "scheme-ftp",
        "GET ftp://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n",
        400,
        "unsupported_scheme",
    ),
    (
        "scheme-https-absolute",
        "GET https://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n\r\n",
        400,
        "unsupported_scheme",
    ),
    ("octal-ip", "GET http://0177.0.0.1/ HTTP/1.1\r\nHost: 0177.0.0.1\r\n\r\n", 400, "bad_target"),
    (
        "decimal-ip",
        "GET http://2130706433/ HTTP/1.1\r\nHost: 2130706433\r\n\r\n",
        400,
        "bad_target",
    ),
    ("hex-ip", "GET http://0x7f.0.0.1/ HTTP/1.1\r\nHost: 0x7f.0.0.1\r\n\r\n", 400, "bad_target"),
    ("short-ip", "GET http://127.1/ HTTP/1.1\r\nHost: 127.1\r\n\r\n", 400, "bad_target"),
]


@pytest.fixture
def proxy(start_proxy: StartProxy, dns_server: ScriptedDNSServer) -> ProxyProcess:
    dns_server.addresses("origin.test", "127.0.0.1")
    return start_proxy(
        policy_allowing("origin.test"),
        nameserver=dns_server.nameserver,
        config={"timeouts": {"header": "1s"}, "limits": {"maxHeaderBytes": 4096}},
    )


@pytest.mark.parametrize(
    ("raw", "status", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_request_is_refused_and_the_connection_closed(
    proxy: ProxyProcess, origin: OriginServer, raw: str, status: int, reason: str
) -> None:
    with proxy.connect() as sock:
        sock.sendall(raw.format(origin=ORIGIN.format(port=origin.port)).encode("latin-1"))
        data = read_until_close(sock)
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:200]
    assert f"X-Outgate-Reason: {reason}".encode() in data
    closes = proxy.wait_records(lambda r: r["event"]["action"] == "close")
    assert closes[0]["outgate"]["reason"] == reason
    # A bad chunk is found after the head went upstream; the upstream is cut off before it
    # has a complete request, so it never handles one.
    assert origin.paths_seen() == []


def test_request_target_over_the_limit_gets_414(proxy: ProxyProcess) -> None:
    with proxy.connect() as sock:
        sock.sendall(f"GET http://origin.test/{'a' * 9000} HTTP/1.1\r\n".encode())
        data = read_until_close(sock)
    assert data.startswith(b"HTTP/1.1 414 ")


def test_headers_over_the_limit_get_431(proxy: ProxyProcess) -> None:
    with proxy.connect() as sock:
        sock.sendall(b"GET http://origin.test/ HTTP/1.1\r\nHost: origin.test\r\n")
        sock.sendall(b"X-Big: " + b"b" * 5000 + b"\r\n\r\n")
        data = read_until_close(sock)
    assert data.startswith(b"HTTP/1.1 431 ")


def test_slow_request_head_gets_408_at_the_header_deadline(proxy: ProxyProcess) -> None:
    with proxy.connect() as sock:
        sock.sendall(b"GET http://origin.test/ HTTP/1.1\r\nHost: orig")
        started = time.monotonic()
        data = read_until_close(sock)
    assert data.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 5
    closes = proxy.wait_records(lambda r: r["event"]["action"] == "close")
    assert closes[0]["outgate"]["reason"] == "header_timeout"


def test_client_that_connects_and_sends_nothing_gets_408(proxy: ProxyProcess) -> None:
    with proxy.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        data = read_until_close(sock)
    assert data.startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize(
    ("target", "domain", "port", "path"),
    [
        ("https://origin.test/account?id=7", "origin.test", 443, "/account?id=7"),
        ("ftp://origin.test:2121/pub", "origin.test", 2121, "/pub"),
        ("wss://[2001:db8::1]/live", None, 443, "/live"),
    ],
)
def test_an_unsupported_scheme_is_refused_naming_what_was_asked(
    proxy: ProxyProcess, target: str, domain: str | None, port: int, path: str
) -> None:
    """Issue 14, defect 4: the 400 body and both records carry destination, method and path."""
    with proxy.connect() as sock:
        sock.sendall(f"POST {target} HTTP/1.1\r\nHost: origin.test\r\n\r\n".encode())
        data = read_until_close(sock)
    assert data.startswith(b"HTTP/1.1 400 ")
    shown = domain if domain is not None else "2001:db8::1"
    assert f"\ndestination: {shown}:{port}\n".encode() in data, data
    records = proxy.records_for(proxy.wait_records(lambda r: True)[0]["event"]["id"])
    for record in records:
        assert record["outgate"]["reason"] == "unsupported_scheme"
        assert record["destination"]["domain"] == domain
        assert record["destination"]["port"] == port
        assert record["http"]["request"]["method"] == "POST"
        assert record["url"]["path"] == path
    assert records[0]["destination"]["ip"] == (None if domain else "2001:db8::1")
