"""Forwarding and tunnelling through a proxy started as the CLI starts it, to real origins."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.request
from collections.abc import Callable

import pytest

from tests.support.clients import curl
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI
from tests.support.proxyproc import ProxyProcess, ResponseReader, read_response, read_until_close

StartProxy = Callable[..., ProxyProcess]


@pytest.fixture
def proxy(start_proxy: StartProxy, dns_server: ScriptedDNSServer) -> ProxyProcess:
    dns_server.addresses("origin.test", "127.0.0.1")
    return start_proxy(policy_allowing("origin.test"), nameserver=dns_server.nameserver)


def test_allowed_http_get_with_curl_returns_the_origin_body_and_two_audit_records(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    result = curl("-x", proxy.url, "-i", f"http://origin.test:{origin.port}/hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/1.1 200")
    assert result.stdout.endswith("hello from origin\n")
    decision, close = proxy.records_by_path("/hello")
    assert decision["event"]["action"] == "decision"
    assert decision["outgate"]["decision"] == "allow"
    assert decision["outgate"]["reason"] == "rule_allow"
    assert decision["rule"] == {"name": "allow-origins", "ruleset": "tests/tests"}
    assert decision["destination"] == {
        "domain": "origin.test",
        "ip": "127.0.0.1",
        "port": origin.port,
    }
    assert decision["source"]["ip"] == "127.0.0.1"
    assert decision["kubernetes"]["namespace"] == "tests"
    assert decision["kubernetes"]["pod"]["name"] == "test-client"
    assert decision["http"]["request"]["method"] == "GET"
    assert isinstance(decision["outgate"]["policy_revision"], int)
    assert "@timestamp" in decision
    assert close["event"]["action"] == "close"
    assert close["event"]["id"] == decision["event"]["id"]
    assert close["http"]["response"]["status_code"] == 200
    assert close["destination"]["bytes"] == len("hello from origin\n")
    assert close["source"]["bytes"] == 0
    assert close["event"]["duration"] > 0
    assert close["outgate"]["reason"] == "completed"


def test_allowed_http_get_and_post_with_a_python_client(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
    with opener.open(f"http://origin.test:{origin.port}/hello", timeout=10) as response:
        assert response.status == 200
        assert response.read() == b"hello from origin\n"
    payload = b"some body \x00\xff" * 1000
    request = urllib.request.Request(
        f"http://origin.test:{origin.port}/echo", data=payload, method="POST"
    )
    with opener.open(request, timeout=10) as response:
        assert response.read() == payload
    _, close = proxy.records_by_path("/echo")
    assert close["source"]["bytes"] == len(payload)
    assert close["http"]["request"]["method"] == "POST"


def test_allowed_https_through_connect_with_curl(
    proxy: ProxyProcess, tls_origin: OriginServer, pki: OriginPKI
) -> None:
    result = curl(
        "-x", proxy.url, "--cacert", str(pki.ca_pem), f"https://origin.test:{tls_origin.port}/hello"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from origin\n"
    records = proxy.wait_records(lambda r: r["outgate"]["connection"] == "tunnel", count=2)
    decision, close = proxy.records_for(records[0]["event"]["id"])
    assert decision["outgate"]["decision"] == "allow"
    assert decision["destination"]["domain"] == "origin.test"
    assert decision["destination"]["port"] == tls_origin.port
    assert close["outgate"]["reason"] == "completed"
    assert close["source"]["bytes"] > 0 and close["destination"]["bytes"] > 0


def test_allowed_https_through_connect_with_a_python_client(
    proxy: ProxyProcess, tls_origin: OriginServer, pki: OriginPKI
) -> None:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", proxy.port, context=pki.client_context(), timeout=10
    )
    conn.set_tunnel("origin.test", tls_origin.port)
    conn.request("GET", "/hello")
    response = conn.getresponse()
    assert response.status == 200
    assert response.read() == b"hello from origin\n"
    conn.request("GET", "/hello")  # the tunnel stays up for more requests
    assert conn.getresponse().read() == b"hello from origin\n"
    conn.close()


def test_a_refusal_names_the_workload_as_its_records_and_explain_do(proxy: ProxyProcess) -> None:
    """Issue 14, defect 7: one spelling, `namespace/Kind/name`, which the records carry as
    kubernetes.namespace and outgate.workload, and which explain prints."""
    body = curl("-x", proxy.url, "http://forbidden.test/named").stdout
    (named,) = [line for line in body.splitlines() if line.startswith("workload: ")]
    for record in proxy.records_by_path("/named"):
        spelled = f"{record['kubernetes']['namespace']}/{record['outgate']['workload']}"
        assert named == f"workload: {spelled}" == "workload: tests/Static/test-client"
    _, explained = proxy.admin("/explain?source=127.0.0.1&url=http://forbidden.test/")
    assert explained.startswith("workload:    tests/Static/test-client (static test-client) ")


def test_denied_request_gets_403_with_reason_header_and_two_records(
    proxy: ProxyProcess, dns_server: ScriptedDNSServer
) -> None:
    result = curl("-x", proxy.url, "-i", "http://forbidden.test/secret")
    assert result.stdout.startswith("HTTP/1.1 403")
    assert "X-Outgate-Reason: namespace_isolation" in result.stdout
    assert "tests/Static/test-client" in result.stdout
    decision, close = proxy.records_by_path("/secret")
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == "namespace_isolation"
    assert decision["event"]["outcome"] == "failure"
    assert close["http"]["response"]["status_code"] == 403
    assert dns_server.count("forbidden.test") == 0, "a denied name must cause no DNS query"


def test_denied_connect_gets_403_and_no_tunnel(proxy: ProxyProcess) -> None:
    with proxy.connect() as sock:
        sock.sendall(b"CONNECT forbidden.test:443 HTTP/1.1\r\nHost: forbidden.test:443\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 403
    assert headers["x-outgate-reason"] == "namespace_isolation"
    assert b"forbidden.test:443" in body


def test_hop_by_hop_and_proxy_headers_are_not_forwarded(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    with proxy.connect() as sock:
        sock.sendall(
            f"GET http://origin.test:{origin.port}/headers HTTP/1.1\r\n"
            f"Host: origin.test:{origin.port}\r\n"
            "Connection: keep-alive, X-Secret-Hop\r\n"
            "X-Secret-Hop: drop me\r\n"
            "Keep-Alive: timeout=5\r\n"
            "Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
            "Proxy-Connection: keep-alive\r\n"
            "TE: trailers\r\n"
            "Upgrade: websocket\r\n"
            "X-End-To-End: keep me\r\n"
            "\r\n".encode()
        )
        status, _, body = read_response(sock)
    assert status == 200
    seen = {name.lower(): value for name, value in json.loads(body)}
    for dropped in (
        "connection",
        "x-secret-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "upgrade",
        "x-forwarded-for",
        "forwarded",
        "via",
    ):
        assert dropped not in seen, dropped
    assert seen["x-end-to-end"] == "keep me"


def test_target_decides_when_host_header_disagrees_and_host_is_rewritten(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    with proxy.connect() as sock:
        sock.sendall(
            f"GET http://origin.test:{origin.port}/headers HTTP/1.1\r\n"
            "Host: forbidden.test\r\n\r\n".encode()
        )
        status, _, body = read_response(sock)
    assert status == 200
    seen = {name.lower(): value for name, value in json.loads(body)}
    assert seen["host"] == f"origin.test:{origin.port}"
    decision, _ = proxy.records_by_path("/headers")
    assert decision["destination"]["domain"] == "origin.test"


def test_keep_alive_connection_decides_every_request_again(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    with proxy.connect() as sock:
        reader = ResponseReader(sock)
        statuses = []
        for target in (
            f"http://origin.test:{origin.port}/hello",
            "http://forbidden.test/hello",
            f"http://origin.test:{origin.port}/hello",
        ):
            host = target.split("/")[2]
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            statuses.append(reader.next()[0])
    assert statuses == [200, 403, 200]
    assert origin.paths_seen() == ["/hello", "/hello"]
    decisions = proxy.wait_records(lambda r: r["event"]["action"] == "decision", count=3)
    assert [d["outgate"]["decision"] for d in decisions] == ["allow", "deny", "allow"]


def test_chunked_request_and_response_bodies_are_streamed(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    with proxy.connect() as sock:
        reader = ResponseReader(sock)
        sock.sendall(
            f"POST http://origin.test:{origin.port}/echo HTTP/1.1\r\n"
            f"Host: origin.test:{origin.port}\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n".encode()
        )
        status, _, body = reader.next()
        assert (status, body) == (200, b"hello world")
        sock.sendall(
            f"GET http://origin.test:{origin.port}/bytes/100000?chunked=1 HTTP/1.1\r\n"
            f"Host: origin.test:{origin.port}\r\n\r\n".encode()
        )
        status, headers, body = reader.next()
    assert status == 200
    assert headers["transfer-encoding"] == "chunked"
    assert body == b"x" * 100000


def test_chunked_response_to_an_http_1_0_client_is_sent_raw_and_ends_with_close(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    with proxy.connect() as sock:
        sock.sendall(
            f"GET http://origin.test:{origin.port}/bytes/5000?chunked=1 HTTP/1.0\r\n"
            f"Host: origin.test:{origin.port}\r\n\r\n".encode()
        )
        data = read_until_close(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    assert b"Connection: close" in head
    assert body == b"x" * 5000


def test_head_204_and_304_responses_have_no_body_and_keep_the_connection(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    base = f"http://origin.test:{origin.port}"
    host = f"Host: origin.test:{origin.port}\r\n\r\n"
    with proxy.connect() as sock:
        reader = ResponseReader(sock)
        sock.sendall(f"HEAD {base}/hello HTTP/1.1\r\n{host}".encode())
        status, headers, body = reader.next(head_request=True)
        assert status == 200 and body == b""
        assert headers["content-length"] == str(len("hello from origin\n"))
        for code in (204, 304):
            sock.sendall(f"GET {base}/status/{code} HTTP/1.1\r\n{host}".encode())
            status, _, body = reader.next()
            assert (status, body) == (code, b"")
        sock.sendall(f"GET {base}/hello HTTP/1.1\r\n{host}".encode())
        assert reader.next()[2] == b"hello from origin\n"


def test_expect_100_continue_is_relayed_before_the_body(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    with proxy.connect() as sock:
        reader = ResponseReader(sock)
        sock.sendall(
            f"POST http://origin.test:{origin.port}/echo HTTP/1.1\r\n"
            f"Host: origin.test:{origin.port}\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        status, _, _ = reader.next()
        assert status == 100
        sock.sendall(b"abcde")
        status, _, body = reader.next()
    assert (status, body) == (200, b"abcde")


def test_connect_forwards_bytes_sent_with_the_request_head(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer, origin: OriginServer
) -> None:
    # Plain HTTP inside the tunnel: the rule says `protocol: tcp` (the default, tls, refuses it).
    dns_server.addresses("origin.test", "127.0.0.1")
    proxy = start_proxy(
        policy_allowing("origin.test") + "      protocol: tcp\n", nameserver=dns_server.nameserver
    )
    with proxy.connect() as sock:
        sock.sendall(
            f"CONNECT origin.test:{origin.port} HTTP/1.1\r\nHost: origin.test:{origin.port}\r\n\r\n"
            f"GET /hello HTTP/1.1\r\nHost: origin.test\r\nConnection: close\r\n\r\n".encode()
        )
        data = read_until_close(sock)
    assert data.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200 OK")
    assert data.endswith(b"hello from origin\n")


def _half_close_server() -> tuple[socket.socket, threading.Thread, list[bytes]]:
    """A TCP server that reads until EOF, then answers how many bytes it got, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            got.append(data)
            conn.sendall(f"got {len(data)} bytes".encode())
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread, got


def test_tunnel_propagates_half_close_both_ways(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer
) -> None:
    listener, thread, got = _half_close_server()
    port = listener.getsockname()[1]
    dns_server.addresses("raw.test", "127.0.0.1")
    proxy = start_proxy(
        policy_allowing("raw.test").replace("allow-origins", "raw-tcp") + "      protocol: tcp\n",
        nameserver=dns_server.nameserver,
    )
    with proxy.connect() as sock:
        sock.sendall(f"CONNECT raw.test:{port} HTTP/1.1\r\nHost: raw.test:{port}\r\n\r\n".encode())
        assert sock.recv(1024) == b"HTTP/1.1 200 Connection established\r\n\r\n"
        sock.sendall(b"x" * 1000)
        sock.shutdown(socket.SHUT_WR)
        answer = read_until_close(sock)
    thread.join(10)
    assert got == [b"x" * 1000]
    assert answer == b"got 1000 bytes"


def test_idle_tunnel_is_closed_after_the_idle_timeout(
    start_proxy: StartProxy, dns_server: ScriptedDNSServer, origin: OriginServer
) -> None:
    dns_server.addresses("origin.test", "127.0.0.1")
    proxy = start_proxy(
        policy_allowing("origin.test"),
        nameserver=dns_server.nameserver,
        config={"timeouts": {"idle": "1s"}},
    )
    with proxy.connect() as sock:
        sock.sendall(
            f"CONNECT origin.test:{origin.port} HTTP/1.1\r\nHost: origin.test\r\n\r\n".encode()
        )
        assert read_until_close(sock, timeout=10).startswith(b"HTTP/1.1 200")
    close = proxy.wait_records(lambda r: r["event"]["action"] == "close")[0]
    assert close["outgate"]["reason"] == "idle_timeout"


@pytest.mark.slow
def test_200_megabyte_bodies_each_way_keep_proxy_memory_flat(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    size = 200 * 1024 * 1024
    baseline = proxy.rss_kib()
    with proxy.connect(timeout=60) as sock:
        sock.sendall(
            f"POST http://origin.test:{origin.port}/sink HTTP/1.1\r\n"
            f"Host: origin.test\r\nContent-Length: {size}\r\n\r\n".encode()
        )
        piece = b"y" * (1024 * 1024)
        for _ in range(size // len(piece)):
            sock.sendall(piece)
        status, _, body = ResponseReader(sock, timeout=60).next()
        assert status == 200
        assert json.loads(body)["bytes"] == size
    after_upload = proxy.rss_kib()
    with proxy.connect(timeout=60) as sock:
        sock.sendall(
            f"GET http://origin.test:{origin.port}/bytes/{size} HTTP/1.1\r\n"
            "Host: origin.test\r\nConnection: close\r\n\r\n".encode()
        )
        sock.settimeout(60)
        received = 0
        while chunk := sock.recv(1 << 20):
            received += len(chunk)
    after_download = proxy.rss_kib()
    assert received > size
    # The proxy's buffers are bounded at a few hundred KiB per direction; 32 MiB of slack
    # covers allocator noise while a copy of the body (200 MiB) could never fit.
    assert after_upload - baseline < 32 * 1024, (baseline, after_upload)
    assert after_download - baseline < 32 * 1024, (baseline, after_download)
