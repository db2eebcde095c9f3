"""Transparent mode (issue 13): clients with no proxy setting, steered to the TLS listener (routed
by SNI) and the plain-HTTP listener (routed by Host) by their DNS answer, as DNS steering does.

In this namespace (tests/netns/enter.sh) the origin of `api.allowed.example` is 11.0.0.1, the
proxy's transparent listeners are on 11.0.0.4, and 11.0.0.5 is a canary: an address a client
may "mean" but the proxy must never reach, because it always dials what it resolved itself.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from proxy.tls.ca import init_ca
from tests.support.clients import curl
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.htpasswd import proxy_authorization, write_password_file
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI, make_pki
from tests.support.proxyproc import ProxyProcess, read_response
from tests.support.tlsclient import https_get
from tests.support.transparent import CANARY, LISTENER, ORIGIN, https_via, steered_identity
from tests.tls.hello import client_hello, hello_record, records

pytestmark = pytest.mark.netns

METADATA = "169.254.169.254"
ECH_EXTENSION = 0xFE0D
BALANCER = "11.0.0.3"  # a trusted load balancer's address (PROXY protocol)
LOGIN_SOURCE = "10.9.9.8"  # a source in auth.basic.sources, named by the balancer
SNI_PEEK = "2s"

POLICIES = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: transparent, namespace: tests}
spec:
  podSelector: {}
  rules:
    - name: allowed-api
      action: Allow
      to: [{fqdn: api.allowed.example}, {fqdn: meta.allowed.example}, {fqdn: self.allowed.example}]
      ports: [80, 443]
    - name: inspected
      action: Allow
      to: [{fqdn: inspect.allowed.example}]
      inspect: {methods: [GET], paths: ["/hello"]}
    - name: no-denied
      action: Deny
      to: [{fqdn: "*.denied.example"}]
"""


@dataclass
class Transparent:
    proxy: ProxyProcess
    dns: ScriptedDNSServer
    pki: OriginPKI
    outgate_ca: Path  # the interception CA's certificate, for `inspect` rules
    https: OriginServer  # api.allowed.example's real server, 11.0.0.1:443
    http: OriginServer  # and 11.0.0.1:80
    canaries: list[OriginServer]  # 11.0.0.5 and the metadata address: never reached

    def reset(self) -> None:
        self.dns.clear_queries()
        for server in (self.https, self.http, *self.canaries):
            server.seen.clear()

    def nothing_reached_a_canary(self) -> None:
        for server in self.canaries:
            assert server.seen == [], f"a request reached {server.host}:{server.port}"

    def connect_tls_listener(self) -> socket.socket:
        return socket.create_connection((LISTENER, 443), timeout=10)

    def records_of(self, sock_port: int, count: int = 2) -> list[dict[str, Any]]:
        """The decision and close records of the connection from this client port."""
        found = self.proxy.wait_records(lambda r: r["source"]["port"] == sock_port, count)
        return sorted(found, key=lambda r: r["event"]["action"] != "decision")


@pytest.fixture(scope="module")
def steered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Transparent]:
    workdir = tmp_path_factory.mktemp("transparent")
    pki = make_pki(workdir / "pki", ["api.allowed.example", "inspect.allowed.example"])
    outgate_ca = init_ca(workdir / "outgate-ca")
    with contextlib.ExitStack() as stack:
        dns = stack.enter_context(ScriptedDNSServer())
        dns.addresses("api.allowed.example", ORIGIN, ttl=0)
        dns.addresses("meta.allowed.example", METADATA, ttl=0)
        dns.addresses("inspect.allowed.example", ORIGIN, ttl=0)
        dns.addresses("x.denied.example", CANARY, ttl=0)
        dns.addresses("self.allowed.example", LISTENER, ttl=0)  # a loop back into the proxy
        https = stack.enter_context(
            OriginServer(host=ORIGIN, port=443, ssl_context=pki.server_context())
        )
        http = stack.enter_context(OriginServer(host=ORIGIN, port=80))
        canaries = [
            stack.enter_context(
                OriginServer(host=CANARY, port=443, ssl_context=pki.server_context())
            ),
            stack.enter_context(OriginServer(host=CANARY, port=80)),
            stack.enter_context(OriginServer(host=METADATA, port=80)),
        ]
        proxy = stack.enter_context(
            ProxyProcess(
                workdir / "proxy",
                policies=POLICIES,
                nameserver=dns.nameserver,
                config={
                    "identity": steered_identity("steered-client"),
                    "transparent": {"tls": f"{LISTENER}:443", "http": f"{LISTENER}:80"},
                    "timeouts": {"sniPeek": SNI_PEEK},
                    # A load balancer in front of the listeners (test_a_proxy_protocol_...).
                    "proxyProtocol": {"trustedCIDRs": [f"{BALANCER}/32"]},
                    # Sources that must log in (test_a_source_that_must_log_in_...).
                    "auth": {
                        "basic": {
                            "file": str(
                                write_password_file(workdir / "htpasswd", {"alice": "s3cret"})
                            ),
                            "sources": [f"{LOGIN_SOURCE}/32"],
                            "users": {"alice": {"identity": "steered-client"}},
                        }
                    },
                    "tls": {
                        "caCert": str(outgate_ca[0]),
                        "caKey": str(outgate_ca[1]),
                        "upstreamCABundle": str(pki.ca_pem),
                    },
                },
            )
        )
        yield Transparent(
            proxy=proxy,
            dns=dns,
            pki=pki,
            outgate_ca=outgate_ca[0],
            https=https,
            http=http,
            canaries=canaries,
        )


@pytest.fixture(autouse=True)
def _fresh(request: pytest.FixtureRequest) -> None:
    if "steered" in request.fixturenames:
        request.getfixturevalue("steered").reset()


def _closed_without_answer(sock: socket.socket) -> bool:
    """The proxy closes the connection and sends nothing (no TLS alert, no HTTP)."""
    sock.settimeout(10)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


# -- the TLS listener -----------------------------------------------------------------------------
def test_client_without_proxy_completes_https_through_the_tls_listener(
    steered: Transparent,
) -> None:
    result = https_via("api.allowed.example", LISTENER, steered.pki.ca_pem)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from origin\n"
    assert steered.https.paths_seen() == ["/hello"]
    decision, close = steered.proxy.wait_records(
        lambda r: (
            r["outgate"]["connection"] == "transparent-tls"
            and r.get("destination", {}).get("domain") == "api.allowed.example"
        ),
        2,
    )
    assert decision["event"]["action"] == "decision"
    assert decision["outgate"]["decision"] == "allow"
    assert decision["rule"]["name"] == "allowed-api"
    assert decision["destination"]["port"] == 443
    assert close["event"]["id"] == decision["event"]["id"]
    assert close["outgate"]["reason"] == "completed"
    assert close["destination"]["ip"] == ORIGIN
    assert close["tls"]["client"]["server_name"] == "api.allowed.example"
    assert close["source"]["bytes"] > 0 and close["destination"]["bytes"] > 0
    steered.nothing_reached_a_canary()


def test_denied_name_is_closed_after_the_clienthello_with_a_decision_naming_the_rule(
    steered: Transparent,
) -> None:
    with steered.connect_tls_listener() as sock:
        port = sock.getsockname()[1]
        sock.sendall(hello_record(b"x.denied.example"))
        assert _closed_without_answer(sock)
    decision, close = steered.records_of(port)
    assert decision["outgate"]["connection"] == "transparent-tls"
    assert decision["outgate"]["decision"] == "deny"
    assert decision["rule"]["name"] == "no-denied"
    assert decision["rule"]["ruleset"] == "tests/transparent"
    assert decision["destination"]["domain"] == "x.denied.example"
    assert close["event"]["id"] == decision["event"]["id"]
    assert steered.dns.count("x.denied.example") == 0  # a denied name causes no DNS query
    steered.nothing_reached_a_canary()


def test_curl_to_a_denied_name_fails_at_the_handshake(steered: Transparent) -> None:
    result = https_via("curl.denied.example", LISTENER, steered.pki.ca_pem)
    assert result.returncode == 35, result.stderr  # CURLE_SSL_CONNECT_ERROR: closed mid-handshake
    (decision,) = steered.proxy.wait_records(
        lambda r: (
            r["event"]["action"] == "decision"
            and r["destination"]["domain"] == "curl.denied.example"
            and r.get("tls", {}).get("client", {}).get("server_name") == "curl.denied.example"
        )
    )
    assert decision["rule"]["name"] == "no-denied"
    assert decision["outgate"]["connection"] == "transparent-tls"
    steered.nothing_reached_a_canary()


def test_allowed_name_resolving_to_metadata_is_closed_as_guarded(steered: Transparent) -> None:
    with steered.connect_tls_listener() as sock:
        port = sock.getsockname()[1]
        sock.sendall(hello_record(b"meta.allowed.example"))
        assert _closed_without_answer(sock)
    decision, close = steered.records_of(port)
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == "guarded_address"
    assert close["outgate"]["reason"] == "guarded_address"
    steered.nothing_reached_a_canary()


def test_forged_sni_reaches_only_the_real_server_of_the_allowed_name(
    steered: Transparent,
) -> None:
    """The client "meant" the canary (its DNS, or a REDIRECT, sent it to the listener) and names
    an allowed host in its SNI: the proxy dials what it resolved for that name, so the forged
    SNI gets the real api.allowed.example and nothing else."""
    with steered.connect_tls_listener() as sock:
        response = https_get(sock, server_hostname="api.allowed.example", cafile=steered.pki.ca_pem)
    assert response.startswith(b"HTTP/1.1 200")
    assert steered.https.paths_seen() == ["/hello"]
    steered.nothing_reached_a_canary()


def test_an_inspect_rule_intercepts_the_transparent_connection_as_it_does_a_connect(
    steered: Transparent,
) -> None:
    """The client trusts the cluster CA: each request inside is checked against the rule."""
    responses = []
    for path in ("/hello", "/headers"):
        with steered.connect_tls_listener() as sock:
            responses.append(
                https_get(
                    sock,
                    server_hostname="inspect.allowed.example",
                    cafile=steered.outgate_ca,
                    path=path,
                )
            )
    assert responses[0].startswith(b"HTTP/1.1 200")
    assert responses[0].endswith(b"hello from origin\n")
    assert responses[1].startswith(b"HTTP/1.1 403")
    assert steered.https.paths_seen() == ["/hello"]  # the refused path never left the proxy
    inner = steered.proxy.wait_records(
        lambda r: r["outgate"]["connection"] == "intercept" and r["event"]["action"] == "close",
        2,
    )
    tunnels = steered.proxy.wait_records(
        lambda r: (
            r["outgate"]["connection"] == "transparent-tls"
            and r["destination"]["domain"] == "inspect.allowed.example"
            and r["event"]["action"] == "decision"
        ),
        2,
    )
    assert {r["outgate"]["tunnel_id"] for r in inner} == {t["event"]["id"] for t in tunnels}
    assert sorted(r["http"]["response"]["status_code"] for r in inner) == [200, 403]
    steered.nothing_reached_a_canary()


def test_clienthello_one_byte_at_a_time_is_reassembled(steered: Transparent) -> None:
    with steered.connect_tls_listener() as sock:
        port = sock.getsockname()[1]
        response = https_get(
            sock,
            server_hostname="api.allowed.example",
            cafile=steered.pki.ca_pem,
            dribble_hello=True,
        )
    assert response.startswith(b"HTTP/1.1 200")
    decision, close = steered.records_of(port)
    assert decision["outgate"]["decision"] == "allow"
    assert close["outgate"]["reason"] == "completed"


def test_stalled_clienthello_is_closed_at_the_peek_timeout(steered: Transparent) -> None:
    hello = hello_record(b"api.allowed.example")
    with steered.connect_tls_listener() as sock:
        port = sock.getsockname()[1]
        sock.sendall(hello[: len(hello) // 2])
        assert _closed_without_answer(sock)
    decision, close = steered.records_of(port)
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == "clienthello_timeout"
    assert close["outgate"]["reason"] == "clienthello_timeout"
    assert close["outgate"]["protocol"]["first_bytes"].startswith("16030")
    assert steered.dns.count("api.allowed.example") == 0
    assert steered.https.seen == []


@pytest.mark.parametrize(
    ("hello", "reason"),
    [
        (hello_record(None), "sni_missing"),
        (hello_record(b"11.0.0.5"), "sni_ip_literal"),
        (
            records(client_hello(b"api.allowed.example", more=[(ECH_EXTENSION, b"\x00")])),
            "ech_denied",
        ),
    ],
    ids=["no-sni", "ip-literal-sni", "ech"],
)
def test_hello_naming_no_usable_destination_is_refused_and_audited(
    steered: Transparent, hello: bytes, reason: str
) -> None:
    with steered.connect_tls_listener() as sock:
        port = sock.getsockname()[1]
        sock.sendall(hello)
        assert _closed_without_answer(sock)
    decision, close = steered.records_of(port)
    assert decision["outgate"]["connection"] == "transparent-tls"
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == reason
    assert close["outgate"]["reason"] == reason
    assert close["event"]["id"] == decision["event"]["id"]
    assert steered.dns.queries == []
    assert steered.https.seen == []
    steered.nothing_reached_a_canary()


def test_plain_http_sent_to_the_tls_listener_is_answered_403_and_closed(
    steered: Transparent,
) -> None:
    with steered.connect_tls_listener() as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: api.allowed.example\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert _closed_without_answer(sock)
    assert status == 403
    assert headers["x-outgate-reason"] == "protocol_mismatch"
    decision, close = steered.records_of(port)
    assert decision["outgate"]["reason"] == close["outgate"]["reason"] == "protocol_mismatch"
    assert steered.dns.queries == []
    assert steered.https.seen == [] and steered.http.seen == []


def test_a_trusted_balancers_proxy_header_names_the_source_on_the_tls_listener(
    steered: Transparent,
) -> None:
    """As on the proxy listener: the client a trusted balancer names is the one decided for,
    here an unknown source (10.9.9.9), which no namespace policy selects."""
    with socket.socket() as sock:
        sock.bind((BALANCER, 0))
        sock.connect((LISTENER, 443))
        sock.sendall(b"PROXY TCP4 10.9.9.9 11.0.0.4 40000 443\r\n")
        sock.sendall(hello_record(b"api.allowed.example"))
        assert _closed_without_answer(sock)
    decision, close = steered.records_of(40000)
    assert decision["source"]["ip"] == "10.9.9.9"
    assert decision["outgate"]["proxy_protocol"]["version"] == 1
    assert decision["outgate"]["proxy_protocol"]["peer"]["ip"] == BALANCER
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == "default_deny"
    assert close["event"]["id"] == decision["event"]["id"]
    assert steered.https.seen == []


def test_a_trusted_balancer_without_a_proxy_header_is_refused(steered: Transparent) -> None:
    with socket.socket() as sock:
        sock.bind((BALANCER, 0))
        sock.connect((LISTENER, 443))
        port = sock.getsockname()[1]
        sock.sendall(hello_record(b"api.allowed.example"))
        assert _closed_without_answer(sock)
    decision, _ = steered.records_of(port)
    assert decision["outgate"]["reason"] == "proxy_protocol_missing"
    assert steered.https.seen == []


# -- the HTTP listener ----------------------------------------------------------------------------
def test_a_source_that_must_log_in_is_refused_even_with_credentials(
    steered: Transparent,
) -> None:
    """Fail closed: a transparent client cannot be asked to log in (no 407 here), and deciding
    it by its address would skip the login; credentials sent anyway change nothing."""
    with socket.socket() as sock:
        sock.bind((BALANCER, 0))
        sock.connect((LISTENER, 80))
        sock.sendall(
            f"PROXY TCP4 {LOGIN_SOURCE} {LISTENER} 40001 80\r\n"
            "GET /hello HTTP/1.1\r\nHost: api.allowed.example\r\n"
            f"{proxy_authorization('alice', 's3cret')}Connection: close\r\n\r\n".encode()
        )
        status, headers, _ = read_response(sock)
    assert status == 403
    assert headers["x-outgate-reason"] == "auth_required"
    decision, _ = steered.records_of(40001)
    assert decision["source"]["ip"] == LOGIN_SOURCE
    assert decision["outgate"]["reason"] == "auth_required"
    assert steered.http.seen == []


def test_client_without_proxy_completes_http_through_the_http_listener(
    steered: Transparent,
) -> None:
    result = curl(
        "--resolve", f"api.allowed.example:80:{LISTENER}", "http://api.allowed.example/hello"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from origin\n"
    assert steered.http.paths_seen() == ["/hello"]
    decision, close = steered.proxy.wait_records(
        lambda r: (
            r["outgate"]["connection"] == "transparent-http"
            and r.get("url", {}).get("path") == "/hello"
            and r["outgate"].get("decision") == "allow"
        ),
        2,
    )
    assert decision["outgate"]["decision"] == "allow"
    assert decision["rule"]["name"] == "allowed-api"
    assert decision["destination"] == {"domain": "api.allowed.example", "ip": ORIGIN, "port": 80}
    assert close["http"]["response"]["status_code"] == 200


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("x.denied.example", "rule_deny"),
        ("meta.allowed.example", "guarded_address"),
        (CANARY, "namespace_isolation"),
        (f"{LISTENER}:80", "namespace_isolation"),
        ("self.allowed.example", "guarded_address"),
    ],
    ids=["denied-name", "guarded-name", "canary-address", "the-listener", "name-of-the-listener"],
)
def test_host_naming_a_denied_or_guarded_destination_gets_403(
    steered: Transparent, host: str, reason: str
) -> None:
    with socket.create_connection((LISTENER, 80), timeout=10) as sock:
        port = sock.getsockname()[1]
        sock.sendall(f"GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        status, headers, _ = read_response(sock)
    assert status == 403
    decision, close = steered.records_of(port)
    assert decision["outgate"]["connection"] == "transparent-http"
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == reason
    assert headers.get("x-outgate-reason") == reason
    assert close["event"]["id"] == decision["event"]["id"]
    steered.nothing_reached_a_canary()
    assert steered.http.seen == []


def test_an_inspect_rule_checks_each_request_on_the_http_listener(steered: Transparent) -> None:
    """As on the proxy listener: a plain request under a rule with `inspect` is checked."""
    with socket.create_connection((LISTENER, 80), timeout=10) as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: inspect.allowed.example\r\n\r\n")
        allowed, _, _ = read_response(sock)
        sock.sendall(b"GET /headers HTTP/1.1\r\nHost: inspect.allowed.example\r\n\r\n")
        refused, headers, _ = read_response(sock)
    assert (allowed, refused) == (200, 403)
    assert headers["x-outgate-reason"] == "path_not_allowed"
    assert steered.http.paths_seen() == ["/hello"]


def test_every_request_on_a_kept_alive_connection_is_decided_again(
    steered: Transparent,
) -> None:
    with socket.create_connection((LISTENER, 80), timeout=10) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: api.allowed.example\r\n\r\n")
        first, _, body = read_response(sock)
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x.denied.example\r\n\r\n")
        second, _, _ = read_response(sock)
    assert (first, body, second) == (200, b"hello from origin\n", 403)
    decisions = steered.proxy.wait_records(
        lambda r: r["source"]["port"] == port and r["event"]["action"] == "decision", 2
    )
    assert [d["outgate"]["decision"] for d in decisions] == ["allow", "deny"]
    assert decisions[1]["rule"]["name"] == "no-denied"
    steered.nothing_reached_a_canary()


@pytest.mark.parametrize(
    "head",
    [
        b"GET /hello HTTP/1.0\r\n\r\n",  # no Host: nothing names a destination
        b"GET https://api.allowed.example/hello HTTP/1.1\r\nHost: api.allowed.example\r\n\r\n",
    ],
    ids=["no-host", "https-target"],
)
def test_a_request_naming_no_plain_http_destination_is_a_400(
    steered: Transparent, head: bytes
) -> None:
    with socket.create_connection((LISTENER, 80), timeout=10) as sock:
        sock.sendall(head)
        status, _, _ = read_response(sock)
    assert status == 400
    assert steered.dns.queries == []
    assert steered.https.seen == [] and steered.http.seen == []


def test_listening_line_names_the_transparent_listeners(steered: Transparent) -> None:
    listening = steered.proxy.wait_log(lambda e: e.get("event") == "listening")
    assert listening["transparent"] == {
        f"transparent-tls {LISTENER}:443": f"{LISTENER}:443",
        f"transparent-http {LISTENER}:80": f"{LISTENER}:80",
    }
