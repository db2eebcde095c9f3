"""SNI and protocol checks on real tunnels, through a proxy started as the CLI starts it.

Every refusal is shown by trying it: the tunnel closes, the close record carries the reason and
the names (or first bytes) involved, and an upstream that records every byte got none."""

from __future__ import annotations

import http.client
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.clients import curl
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess
from tests.tls.hello import ECH, client_hello, handshake, hello_body, records, server_name_ext
from tests.tls.servers import (
    MemoryTLSClient,
    OriginCA,
    RecordingUpstream,
    open_tunnel,
    read_until_closed,
    send_byte_by_byte,
    send_split_across_records,
)


def close_record(proxy: ProxyProcess, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    return proxy.wait_records(
        lambda r: (
            r["event"]["action"] == "close" and r["outgate"]["connection"] == "tunnel" and pred(r)
        )
    )[-1]


def tunnel_close(proxy: ProxyProcess, port: int) -> dict[str, Any]:
    return close_record(proxy, lambda r: r["destination"]["port"] == port)


def client_context(origin_ca: OriginCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(origin_ca.ca_pem))


# --- accepted ------------------------------------------------------------------------------------


def test_curl_reaches_an_https_origin_through_a_checked_tunnel(
    tls_proxy: ProxyProcess, https_origin: OriginServer, origin_ca: OriginCA
) -> None:
    result = curl(
        "-x",
        tls_proxy.url,
        "--cacert",
        str(origin_ca.ca_pem),
        f"https://origin.test:{https_origin.port}/hello",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from origin\n"
    close = tunnel_close(tls_proxy, https_origin.port)
    assert close["outgate"]["reason"] == "completed"
    assert close["tls"]["client"]["server_name"] == "origin.test"
    assert close["outgate"]["tls"]["ech"] is False
    assert "http/1.1" in close["outgate"]["tls"]["alpn"]


def test_a_python_ssl_client_reaches_an_https_origin_through_a_checked_tunnel(
    tls_proxy: ProxyProcess, https_origin: OriginServer, origin_ca: OriginCA
) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", tls_proxy.port, context=client_context(origin_ca), timeout=10
    )
    conn.set_tunnel("origin.test", https_origin.port)
    conn.request("GET", "/hello")
    assert conn.getresponse().read() == b"hello from origin\n"
    conn.close()


@pytest.mark.parametrize(
    "send_first",
    [
        pytest.param(send_byte_by_byte, id="one-byte-at-a-time"),
        pytest.param(send_split_across_records, id="split-across-records"),
    ],
)
def test_a_clienthello_in_pieces_is_reassembled_and_accepted(
    tls_proxy: ProxyProcess,
    https_origin: OriginServer,
    origin_ca: OriginCA,
    send_first: Callable[[socket.socket, bytes], None],
) -> None:
    with open_tunnel(tls_proxy.port, "origin.test", https_origin.port) as sock:
        client = MemoryTLSClient(sock, client_context(origin_ca), "origin.test")
        client.handshake(send_first)
        response = client.request(
            b"GET /hello HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n"
        )
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"hello from origin\n")


def test_an_ssh_banner_passes_an_ssh_rule(tls_proxy: ProxyProcess) -> None:
    with RecordingUpstream(greeting=b"SSH-2.0-TestServer_1.0\r\n") as upstream:
        with open_tunnel(tls_proxy.port, "ssh.test", upstream.port) as sock:
            sock.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            assert sock.recv(64) == b"SSH-2.0-TestServer_1.0\r\n"
            sock.sendall(b"\x00\x00\x00\x0c key exchange")
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)
        assert upstream.connection() == b"SSH-2.0-OpenSSH_9.6\r\n\x00\x00\x00\x0c key exchange"


def test_a_postgres_sslrequest_passes_a_postgres_rule(tls_proxy: ProxyProcess) -> None:
    ssl_request = struct.pack(">II", 8, 80877103)
    with RecordingUpstream(greeting=b"N") as upstream:
        with open_tunnel(tls_proxy.port, "pg.test", upstream.port) as sock:
            sock.sendall(ssl_request)
            assert sock.recv(1) == b"N"
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)
        assert upstream.connection() == ssl_request
    assert tunnel_close(tls_proxy, upstream.port)["outgate"]["reason"] == "completed"


def test_a_tcp_rule_relays_anything(tls_proxy: ProxyProcess) -> None:
    with RecordingUpstream() as upstream:
        with open_tunnel(tls_proxy.port, "raw.test", upstream.port) as sock:
            sock.sendall(b"\x00\xffanything at all")
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)
        assert upstream.connection() == b"\x00\xffanything at all"


def test_sni_optional_lets_a_hello_without_sni_through(tls_proxy: ProxyProcess) -> None:
    with RecordingUpstream() as upstream:
        with open_tunnel(tls_proxy.port, "optional.test", upstream.port) as sock:
            sock.sendall(records(client_hello(None)))
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)
        assert upstream.connection().startswith(b"\x16\x03\x01")


def test_ech_is_allowed_by_default_and_audited(tls_proxy: ProxyProcess) -> None:
    with RecordingUpstream() as upstream:
        hello = records(client_hello(b"origin.test", more=[(ECH, b"\x00\x01\x02\x03")]))
        with open_tunnel(tls_proxy.port, "origin.test", upstream.port) as sock:
            sock.sendall(hello)
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)
        assert upstream.connection() == hello
    close = tunnel_close(tls_proxy, upstream.port)
    assert close["outgate"]["tls"]["ech"] is True
    assert close["tls"]["client"]["server_name"] == "origin.test"


def test_connect_to_an_ip_with_an_allowed_sni_is_accepted(
    tls_proxy: ProxyProcess, https_origin: OriginServer, origin_ca: OriginCA
) -> None:
    with open_tunnel(tls_proxy.port, "127.0.0.1", https_origin.port) as sock:
        client = MemoryTLSClient(sock, client_context(origin_ca), "origin.test")
        client.handshake()
        response = client.request(
            b"GET /hello HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n"
        )
    assert response.endswith(b"hello from origin\n")


def test_connect_to_an_ip_without_sni_is_accepted(tls_proxy: ProxyProcess) -> None:
    with RecordingUpstream() as upstream:
        with open_tunnel(tls_proxy.port, "127.0.0.1", upstream.port) as sock:
            sock.sendall(records(client_hello(None)))
            sock.shutdown(socket.SHUT_WR)
            read_until_closed(sock)
        assert upstream.connection().startswith(b"\x16")


# --- refused -------------------------------------------------------------------------------------

ECH_EXT = [(ECH, b"\x00\x01")]

REFUSALS = [
    # (id, CONNECT host, first bytes, reason)
    ("sni-mismatch", "recorder.test", records(client_hello(b"evil.example")), "sni_mismatch"),
    ("sni-parent-domain", "recorder.test", records(client_hello(b"test")), "sni_mismatch"),
    ("sni-missing", "recorder.test", records(client_hello(None)), "sni_missing"),
    ("sni-ip-literal", "recorder.test", records(client_hello(b"127.0.0.1")), "sni_ip_literal"),
    (
        "sni-ip-literal-on-optional",
        "optional.test",
        records(client_hello(b"10.0.0.1")),
        "sni_ip_literal",
    ),
    (
        "sni-mismatch-on-optional",
        "optional.test",
        records(client_hello(b"evil.example")),
        "sni_mismatch",
    ),
    (
        "ech-outer-sni-mismatch",
        "recorder.test",
        records(client_hello(b"public.example", more=ECH_EXT)),
        "sni_mismatch",
    ),
    ("ech-denied", "noech.test", records(client_hello(b"noech.test", more=ECH_EXT)), "ech_denied"),
    ("ip-connect-sni-denied", "127.0.0.1", records(client_hello(b"denied.test")), "sni_denied"),
    ("ip-connect-sni-ip", "127.0.0.1", records(client_hello(b"127.0.0.1")), "sni_ip_literal"),
    (
        "duplicate-host-names",
        "recorder.test",
        records(
            handshake(hello_body(extensions=[server_name_ext(b"recorder.test", b"evil.example")]))
        ),
        "clienthello_malformed",
    ),
    (
        "duplicate-sni-extensions",
        "recorder.test",
        records(
            handshake(
                hello_body(
                    extensions=[server_name_ext(b"recorder.test"), server_name_ext(b"evil.example")]
                )
            )
        ),
        "clienthello_malformed",
    ),
    (
        "record-over-2-14",
        "recorder.test",
        b"\x16\x03\x01\x40\x01" + b"\x01" + b"\x00" * 16384,
        "clienthello_malformed",
    ),
    (
        "hello-over-64k",
        "recorder.test",
        b"\x16\x03\x01\x40\x00\x01\x01\x00\x00" + b"\x00" * 16380,
        "clienthello_malformed",
    ),
    (
        "length-past-the-buffer",
        "recorder.test",
        records(handshake(hello_body(raw_extensions=b"\x00\x40\x00\x00"))),
        "clienthello_malformed",
    ),
    ("alert-first", "recorder.test", b"\x15\x03\x01\x00\x02\x02\x28", "clienthello_malformed"),
    ("ssh-banner-into-tls", "recorder.test", b"SSH-2.0-OpenSSH_9.6\r\n", "protocol_mismatch"),
    (
        "plaintext-http-into-tls",
        "tls-only.test",
        b"GET / HTTP/1.1\r\nHost: tls-only.test\r\n\r\n",
        "protocol_mismatch",
    ),
    ("tls-into-ssh", "ssh.test", records(client_hello(b"ssh.test")), "protocol_mismatch"),
    ("http-into-postgres", "pg.test", b"GET / HTTP/1.1\r\n\r\n", "protocol_mismatch"),
    ("tls-into-http", "plain.test", records(client_hello(b"plain.test")), "protocol_mismatch"),
]


@pytest.mark.parametrize(
    ("host", "first", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_a_tunnel_breaking_its_rule_is_closed_audited_and_sends_nothing_upstream(
    tls_proxy: ProxyProcess, host: str, first: bytes, reason: str
) -> None:
    with RecordingUpstream() as upstream:
        with open_tunnel(tls_proxy.port, host, upstream.port) as sock:
            sock.sendall(first)
            reply = read_until_closed(sock)
        assert upstream.connection() == b""
    close = tunnel_close(tls_proxy, upstream.port)
    if first.startswith(b"GET "):
        # An HTTP request is answered inside the tunnel, so the client can print why
        # (DESIGN section 6); anything else is closed without a byte.
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 ")
        assert b"\r\nX-Outgate-Reason: protocol_mismatch" in head
        assert b"\r\nConnection: close" in head
        assert b"reason: protocol_mismatch" in body
        assert f"event id: {close['event']['id']}".encode() in body
    else:
        assert reply == b""
    assert close["outgate"]["reason"] == reason
    assert close["event"]["outcome"] == "failure"
    assert close["outgate"]["protocol"]["first_bytes"] == first[:16].hex()
    assert close["destination"]["bytes"] == 0
    if reason in ("sni_mismatch", "sni_ip_literal", "sni_denied"):
        assert close["tls"]["client"]["server_name"]  # the name the client asked for
        assert close["destination"]["domain"] == (None if host == "127.0.0.1" else host)
    _, metrics = tls_proxy.admin("/metrics")
    assert f'outgate_tunnel_violations_total{{reason="{reason}"}}' in metrics


def test_a_stalled_clienthello_is_closed_at_the_peek_timeout_with_nothing_upstream(
    tls_proxy: ProxyProcess,
) -> None:
    half = records(client_hello(b"recorder.test"))[:40]
    with RecordingUpstream() as upstream:
        with open_tunnel(tls_proxy.port, "recorder.test", upstream.port) as sock:
            sock.sendall(half)
            assert read_until_closed(sock, timeout=20) == b""
        assert upstream.connection(timeout=20) == b""
    close = tunnel_close(tls_proxy, upstream.port)
    assert close["outgate"]["reason"] == "clienthello_timeout"
    assert close["outgate"]["protocol"]["first_bytes"] == half[:16].hex()
    # sniPeek is 3s in this proxy's config; the close happened at it, not at the idle timeout.
    assert 2.5e9 < close["event"]["duration"] < 25e9
