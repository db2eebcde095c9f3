"""TLS interception for rules with `inspect`, and `protocol: http` tunnels, end to end: real TLS
on both sides, curl and Python clients, origins that record what reached them."""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import curl
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, ResponseReader
from tests.tls.servers import (
    ConnectError,
    OriginCA,
    RecordingUpstream,
    open_tunnel,
    read_until_closed,
)

HOUR = 3600


def outgate_trust(outgate_ca: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(outgate_ca[0]))


def intercepted(
    proxy: ProxyProcess, outgate_ca: tuple[Path, Path], host: str, port: int
) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", proxy.port, context=outgate_trust(outgate_ca), timeout=10
    )
    conn.set_tunnel(host, port)
    return conn


def inner_records(proxy: ProxyProcess, marker: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The decision and close records of the inner request whose path contains `marker`."""
    found = proxy.wait_records(
        lambda r: (
            r["outgate"]["connection"] == "intercept"
            and marker in (r.get("url", {}).get("path") or "")
            and r["event"]["action"] == "close"
        )
    )
    decision, close = proxy.records_for(found[-1]["event"]["id"])
    return decision, close


@pytest.fixture
def origin_paths(https_origin: OriginServer) -> Iterator[list[str]]:
    before = len(https_origin.seen)
    seen: list[str] = []
    yield seen
    seen.extend(https_origin.paths_seen()[before:])


# --- the happy path ------------------------------------------------------------------------------


def test_curl_trusting_the_outgate_ca_completes_get_and_post_through_an_inspect_rule(
    tls_proxy: ProxyProcess, https_origin: OriginServer, outgate_ca: tuple[Path, Path]
) -> None:
    url = f"https://inspect.test:{https_origin.port}"
    get = curl("-x", tls_proxy.url, "--cacert", str(outgate_ca[0]), f"{url}/hello?via=curl-get")
    assert get.returncode == 0, get.stderr
    assert get.stdout == "hello from origin\n"
    post = curl(
        "-x", tls_proxy.url, "--cacert", str(outgate_ca[0]),
        "--data-binary", "posted body", f"{url}/echo?via=curl-post",
        "-H", "Proxy-Authorization: Basic c2VjcmV0", "-H", "Connection: keep-alive, X-Hop",
        "-H", "X-Hop: 1",
    )  # fmt: skip
    assert post.returncode == 0, post.stderr
    assert post.stdout == "posted body"
    seen = {r.path: r for r in https_origin.seen}
    echoed = seen["/echo?via=curl-post"]
    assert echoed.method == "POST" and echoed.body_bytes == len("posted body")
    names = {name.lower() for name, _ in echoed.headers}
    assert not names & {"proxy-authorization", "x-hop", "proxy-connection", "keep-alive"}
    assert echoed.header("Host") == f"inspect.test:{https_origin.port}"
    decision, close = inner_records(tls_proxy, "via=curl-post")
    assert decision["outgate"]["decision"] == "allow"
    assert decision["rule"]["name"] == "inspect"
    assert decision["http"]["request"]["method"] == "POST"
    assert close["http"]["response"]["status_code"] == 200
    assert close["source"]["bytes"] == len("posted body")
    tunnel = tls_proxy.records_for(close["outgate"]["tunnel_id"])
    assert [r["event"]["action"] for r in tunnel] == ["decision", "close"]
    assert tunnel[1]["outgate"]["connection"] == "tunnel"
    assert tunnel[1]["tls"]["client"]["server_name"] == "inspect.test"


def test_a_kept_alive_intercepted_connection_decides_and_audits_every_request(
    tls_proxy: ProxyProcess, https_origin: OriginServer, outgate_ca: tuple[Path, Path]
) -> None:
    conn = intercepted(tls_proxy, outgate_ca, "inspect.test", https_origin.port)
    for index in range(3):
        conn.request("GET", f"/hello?keepalive={index}")
        assert conn.getresponse().read() == b"hello from origin\n"
    conn.close()
    tunnel_ids = {
        inner_records(tls_proxy, f"keepalive={i}")[1]["outgate"]["tunnel_id"] for i in range(3)
    }
    assert len(tunnel_ids) == 1


# --- what each request is held to ----------------------------------------------------------------


def test_a_request_for_another_host_inside_the_tunnel_is_421(
    tls_proxy: ProxyProcess, https_origin: OriginServer, outgate_ca: tuple[Path, Path]
) -> None:
    conn = intercepted(tls_proxy, outgate_ca, "inspect.test", https_origin.port)
    conn.putrequest("GET", "/hello?misdirected=1", skip_host=True)
    conn.putheader("Host", "origin.test")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 421
    assert response.getheader("X-Outgate-Reason") == "misdirected_request"
    response.read()
    conn.request("GET", "/hello?after-421=1")  # the connection stays usable
    assert conn.getresponse().status == 200
    conn.close()
    decision, close = inner_records(tls_proxy, "misdirected=1")
    assert decision["outgate"]["decision"] == "deny"
    assert close["outgate"]["reason"] == "misdirected_request"
    assert "/hello?misdirected=1" not in https_origin.paths_seen()


@pytest.mark.parametrize(
    ("method", "path", "reason"),
    [
        ("DELETE", "/hello?denied=method", "method_not_allowed"),
        ("GET", "/admin?denied=path", "path_not_allowed"),
        ("GET", "/status/../admin?denied=dots", "path_not_allowed"),
    ],
)
def test_a_method_or_path_the_rule_does_not_list_is_403(
    tls_proxy: ProxyProcess,
    https_origin: OriginServer,
    outgate_ca: tuple[Path, Path],
    method: str,
    path: str,
    reason: str,
) -> None:
    conn = intercepted(tls_proxy, outgate_ca, "inspect.test", https_origin.port)
    conn.request(method, path)
    response = conn.getresponse()
    assert (response.status, response.getheader("X-Outgate-Reason")) == (403, reason)
    conn.close()
    marker = path.split("?")[1]
    _, close = inner_records(tls_proxy, marker)
    assert close["outgate"]["reason"] == reason
    assert not any(marker in seen for seen in https_origin.paths_seen())


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


SA_TOKEN = (
    b64url(b'{"alg":"RS256","kid":"k1"}')
    + "."
    + b64url(
        json.dumps(
            {
                "aud": ["https://kubernetes.default.svc.cluster.local"],
                "sub": "system:serviceaccount:tests:client",
            }
        ).encode()
    )
    + ".c2lnbmF0dXJlLXNlY3JldA"
)
GITHUB = "ghp_" + "Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2Rr1Qq0Pp9Oo8"
GITLAB = "glpat-" + "xR4nD0mT0k3nV4lu3zzz"

DLP_CASES = [
    # (id, headers, query, detector, field, secret)
    (
        "aws-access-key",
        {"X-Debug": "AKIAIOSFODNN7EXAMPLE"},
        "",
        "aws-access-key",
        "header:x-debug",
        "AKIAIOSFODNN7EXAMPLE",
    ),
    (
        "private-key",
        {},
        "pem=-----BEGIN%20EC%20PRIVATE%20KEY-----MHcCAQEEI",
        "private-key",
        "url.query",
        "MHcCAQEEI",
    ),
    (
        "service-account-token-out",
        {"Authorization": f"Bearer {SA_TOKEN}"},
        "",
        "bearer-to-other-host",
        "header:authorization",
        SA_TOKEN,
    ),
    (
        "gitlab-token-elsewhere",
        {"Authorization": "Basic " + base64.b64encode(f"ci:{GITLAB}".encode()).decode()},
        "",
        "bearer-to-other-host",
        "header:authorization",
        GITLAB,
    ),
    (
        "gcp-key",
        {
            "X-Creds": base64.b64encode(
                b'{"type": "service_account", "private_key_id": "' + b"ab12" * 10 + b'"}'
            ).decode()
        },
        "",
        "gcp-service-account-key",
        "header:x-creds",
        "ab12ab12ab12",
    ),
    ("github-token", {"X-Token": GITHUB}, "", "github-token", "header:x-token", GITHUB),
    (
        "slack-token",
        {},
        "t=xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
        "slack-token",
        "url.query",
        "AbCdEfGhIjKlMnOpQrStUvWx",
    ),
    (
        "custom-header-name",
        {"X-Internal-Trace": "1"},
        "",
        "internal-header",
        "header-name[",
        "X-Internal-Trace",
    ),
    (
        "custom-header-value",
        {"X-Ref": "TICKET-424242"},
        "",
        "ticket-ids",
        "header:x-ref",
        "TICKET-424242",
    ),
    ("custom-query", {}, "who=alice%40corp.example", "customer-email", "url.query", "alice"),
]


@pytest.mark.parametrize(
    ("headers", "query", "detector", "field", "secret"),
    [case[1:] for case in DLP_CASES],
    ids=[case[0] for case in DLP_CASES],
)
def test_each_dlp_detector_refuses_a_planted_secret_and_audits_it_without_the_secret(
    tls_proxy: ProxyProcess,
    https_origin: OriginServer,
    outgate_ca: tuple[Path, Path],
    headers: dict[str, str],
    query: str,
    detector: str,
    field: str,
    secret: str,
) -> None:
    marker = f"dlp-{detector}-{len(tls_proxy.records)}"
    path = f"/status/{marker}" + (f"?{query}" if query else "")
    conn = intercepted(tls_proxy, outgate_ca, "inspect.test", https_origin.port)
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    assert (response.status, response.getheader("X-Outgate-Reason")) == (403, "dlp_violation")
    conn.close()
    decision, close = inner_records(tls_proxy, marker)
    for record in (decision, close):
        assert record["outgate"]["dlp"]["detector"] == detector
        assert record["outgate"]["dlp"]["field"].startswith(field)
        assert record["outgate"]["reason"] == "dlp_violation"
    assert not any(marker in seen for seen in https_origin.paths_seen())
    assert not any(secret.encode() in line for line in tls_proxy.raw_stdout)
    if field.startswith("url."):
        assert decision["url"]["path"] == f"/status/{marker}?[redacted:dlp]"
    assert all(secret not in json.dumps(entry) for entry in tls_proxy.logs)
    _, metrics = tls_proxy.admin("/metrics")
    assert f'outgate_dlp_hits_total{{detector="{detector}"}}' in metrics


def test_a_pathological_pattern_and_input_do_not_stall_the_proxy_for_other_clients(
    tls_proxy: ProxyProcess, https_origin: OriginServer, outgate_ca: tuple[Path, Path]
) -> None:
    """`(a+)+$` against 64 a's and a `!` takes about 2^64 steps on Python's `re`, which would
    hold the event loop, and every connection of the replica, for good. Operator patterns run
    on RE2, linear in the input: the trap request is answered, and a second client's request,
    sent while the first is in flight, is too, each within the socket's 10 s timeout."""
    trap = intercepted(tls_proxy, outgate_ca, "inspect.test", https_origin.port)
    other = intercepted(tls_proxy, outgate_ca, "inspect.test", https_origin.port)
    trap.request("GET", "/hello?case=trap", headers={"X-Note": "a" * 64 + "!"})
    other.request("GET", "/hello?case=other")
    assert other.getresponse().status == 200
    assert trap.getresponse().status == 200
    trap.close()
    other.close()
    decision, close = inner_records(tls_proxy, "case=trap")
    assert decision["outgate"]["decision"] == "allow"
    assert close["outgate"]["reason"] == "completed"


def test_a_detector_hit_in_the_header_never_puts_the_secret_in_the_audit_line(
    tls_proxy: ProxyProcess, https_origin: OriginServer, outgate_ca: tuple[Path, Path]
) -> None:
    conn = intercepted(tls_proxy, outgate_ca, "inspect.test", https_origin.port)
    conn.request("GET", "/hello?case=secret-check", headers={"X-Debug": "AKIAZZZZZZZZZZZZZZZZ"})
    assert conn.getresponse().status == 403
    conn.close()
    inner_records(tls_proxy, "secret-check")
    assert not any(b"AKIAZZZZZZZZZZZZZZZZ" in line for line in tls_proxy.raw_stdout)


# --- failures close; nothing is ever spliced -----------------------------------------------------


@pytest.fixture(scope="module")
def bad_origins(origin_ca: OriginCA) -> Iterator[dict[str, OriginServer]]:
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    contexts = {
        "selfsigned.test": origin_ca.server_context(["selfsigned.test"], self_signed=True),
        "expired.test": origin_ca.server_context(
            ["expired.test"],
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        ),
        "wrongname.test": origin_ca.server_context(["someone-else.test"]),
    }
    servers = {name: OriginServer(ssl_context=ctx).start() for name, ctx in contexts.items()}
    yield servers
    for server in servers.values():
        server.stop()


def minted(proxy: ProxyProcess) -> float:
    _, metrics = proxy.admin("/metrics")
    match = re.search(r"^outgate_certificates_minted_total (\S+)$", metrics, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("name", ["selfsigned.test", "expired.test", "wrongname.test"])
def test_an_origin_whose_certificate_does_not_verify_gets_502_and_no_certificate_is_forged(
    tls_proxy: ProxyProcess, bad_origins: dict[str, OriginServer], name: str
) -> None:
    origin = bad_origins[name]
    before = minted(tls_proxy)
    with pytest.raises(ConnectError) as info:
        open_tunnel(tls_proxy.port, name, origin.port)
    assert info.value.status == 502
    assert info.value.headers["x-outgate-reason"] == "upstream_cert_invalid"
    assert minted(tls_proxy) == before
    close = tls_proxy.wait_records(
        lambda r: r["event"]["action"] == "close" and r["destination"]["domain"] == name
    )[-1]
    assert close["outgate"]["reason"] == "upstream_cert_invalid"
    assert close["http"]["response"]["status_code"] == 502
    assert origin.seen == []


def test_a_client_that_refuses_the_minted_certificate_is_closed_never_spliced(
    tls_proxy: ProxyProcess, https_origin: OriginServer, outgate_ca: tuple[Path, Path]
) -> None:
    before = len(https_origin.seen)
    untrusting = ssl.create_default_context()  # the system store: no Outgate CA in it
    conn = http.client.HTTPSConnection("127.0.0.1", tls_proxy.port, context=untrusting, timeout=10)
    conn.set_tunnel("open.test", https_origin.port)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/hello?refused=1")
    conn.close()
    close = tls_proxy.wait_records(
        lambda r: (
            r["event"]["action"] == "close"
            and r["destination"]["domain"] == "open.test"
            and r["outgate"]["reason"] == "intercept_handshake_failed"
        )
    )[-1]
    assert close["outgate"]["connection"] == "tunnel"
    assert len(https_origin.seen) == before
    _, metrics = tls_proxy.admin("/metrics")
    assert 'outgate_intercept_handshake_failures_total{side="client"}' in metrics


def test_a_client_that_sends_plaintext_after_a_clienthello_is_closed_never_spliced(
    tls_proxy: ProxyProcess, https_origin: OriginServer
) -> None:
    """A hello that passes the SNI check, then bytes that are not TLS: the interception handshake
    fails and the bytes go nowhere."""
    from tests.tls.hello import client_hello, records

    before = len(https_origin.seen)
    with open_tunnel(tls_proxy.port, "open.test", https_origin.port) as sock:
        sock.sendall(records(client_hello(b"open.test")))
        sock.sendall(b"GET /hello?smuggled=1 HTTP/1.1\r\nHost: open.test\r\n\r\n")
        read_until_closed(sock)
    assert len(https_origin.seen) == before


def test_an_inspect_rule_without_a_configured_ca_refuses_rather_than_splicing(
    start_proxy: Any, tls_dns: Any, https_origin: OriginServer
) -> None:
    from tests.tls.conftest import POLICY

    proxy = start_proxy(POLICY, nameserver=tls_dns.nameserver)
    with pytest.raises(ConnectError) as info:
        open_tunnel(proxy.port, "open.test", https_origin.port)
    assert (info.value.status, info.value.headers["x-outgate-reason"]) == (
        502,
        "intercept_handshake_failed",
    )


# --- protocol: http tunnels -----------------------------------------------------------------------


def test_an_http_tunnel_checks_every_requests_host(
    tls_proxy: ProxyProcess, http_origin: OriginServer
) -> None:
    with open_tunnel(tls_proxy.port, "plain.test", http_origin.port) as sock:
        reader = ResponseReader(sock)
        sock.sendall(
            f"GET /hello?plain=1 HTTP/1.1\r\nHost: plain.test:{http_origin.port}\r\n\r\n".encode()
        )
        assert reader.next()[0] == 200
        sock.sendall(b"GET /hello?plain=2 HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        status, headers, _ = reader.next()
        assert (status, headers["x-outgate-reason"]) == (421, "misdirected_request")
        sock.sendall(
            b"GET /hello?plain=3 HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n"
        )
        assert reader.next()[0] == 200
    assert "/hello?plain=1" in http_origin.paths_seen()
    assert "/hello?plain=2" not in http_origin.paths_seen()
    records = tls_proxy.wait_records(
        lambda r: r["outgate"]["connection"] == "tunnel_http" and r["event"]["action"] == "close", 3
    )
    assert {r["http"]["response"]["status_code"] for r in records[-3:]} == {200, 421}


def test_an_http_tunnel_with_inspect_applies_the_rule(
    tls_proxy: ProxyProcess, http_origin: OriginServer
) -> None:
    with open_tunnel(tls_proxy.port, "plain-inspect.test", http_origin.port) as sock:
        reader = ResponseReader(sock)
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: plain-inspect.test\r\n\r\n")
        assert reader.next()[0] == 200
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: plain-inspect.test\r\nContent-Length: 0\r\n\r\n"
        )
        status, headers, _ = reader.next()
        assert (status, headers["x-outgate-reason"]) == (403, "method_not_allowed")


def test_a_plain_tunnel_upstream_that_speaks_first_is_not_stuck(tls_proxy: ProxyProcess) -> None:
    """A `tcp` rule does not wait for the client: a server-first protocol works through it."""
    with RecordingUpstream(greeting=b"220 ready\r\n") as upstream:
        with open_tunnel(tls_proxy.port, "raw.test", upstream.port) as sock:
            sock.sendall(b"HELO\r\n")
            assert sock.recv(64) == b"220 ready\r\n"
            sock.close()
        assert upstream.connection() == b"HELO\r\n"
