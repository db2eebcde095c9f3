"""iptables REDIRECT in front of the transparent TLS listener (issue 13): the kernel sends the
client's connection to the listener, and SO_ORIGINAL_DST tells the proxy the port the client
dialled, so the request is decided on that port. The address the client dialled is never used:
the proxy dials what it resolved for the SNI's name."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI, make_pki
from tests.support.proxyproc import ProxyProcess, read_response
from tests.support.tools import tool
from tests.support.transparent import CANARY, CANARY_V6, ORIGIN, https_via, steered_identity

pytestmark = pytest.mark.netns

LISTEN_PORT = 9443  # REDIRECT in OUTPUT sends locally made connections to 127.0.0.1:this
HTTP_LISTEN_PORT = 9080

POLICIES = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: redirected, namespace: tests}
spec:
  podSelector: {}
  rules:
    - name: api-on-8443
      action: Allow
      to: [{fqdn: api.allowed.example}]
      ports: [8443, 8080]
"""


@dataclass
class Redirected:
    proxy: ProxyProcess
    dns: ScriptedDNSServer
    pki: OriginPKI
    origin: OriginServer
    http_origin: OriginServer  # api.allowed.example:8080
    canaries: list[OriginServer]


def _nat(action: str, port: int, to_port: int = LISTEN_PORT) -> None:
    subprocess.run(
        [tool("iptables"), "-t", "nat", action, "OUTPUT", "-p", "tcp", "-d", CANARY,
         "--dport", str(port), "-j", "REDIRECT", "--to-ports", str(to_port)],
        check=True,
        capture_output=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def redirected(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redirected]:
    workdir = tmp_path_factory.mktemp("redirect")
    pki = make_pki(workdir / "pki", ["api.allowed.example"])
    with contextlib.ExitStack() as stack:
        dns = stack.enter_context(ScriptedDNSServer())
        dns.addresses("api.allowed.example", ORIGIN, ttl=0)
        origin = stack.enter_context(
            OriginServer(host=ORIGIN, port=8443, ssl_context=pki.server_context())
        )
        canaries = [
            stack.enter_context(
                OriginServer(host=CANARY, port=port, ssl_context=pki.server_context())
            )
            for port in (443, 8443)
        ]
        canaries.append(stack.enter_context(OriginServer(host=CANARY, port=8080)))
        http_origin = stack.enter_context(OriginServer(host=ORIGIN, port=8080))
        proxy = stack.enter_context(
            ProxyProcess(
                workdir / "proxy",
                policies=POLICIES,
                nameserver=dns.nameserver,
                config={
                    "identity": steered_identity("redirected-client"),
                    "transparent": {
                        "tls": f"127.0.0.1:{LISTEN_PORT}",
                        "tlsPort": 443,
                        "http": f"127.0.0.1:{HTTP_LISTEN_PORT}",
                        "httpPort": 80,
                    },
                },
            )
        )
        for port in (443, 8443):
            _nat("-A", port)
            stack.callback(_nat, "-D", port)
        _nat("-A", 8080, HTTP_LISTEN_PORT)
        stack.callback(_nat, "-D", 8080, HTTP_LISTEN_PORT)
        yield Redirected(
            proxy=proxy,
            dns=dns,
            pki=pki,
            origin=origin,
            http_origin=http_origin,
            canaries=canaries,
        )


def _get(redirected: Redirected, port: int) -> subprocess.CompletedProcess[str]:
    return https_via("api.allowed.example", CANARY, redirected.pki.ca_pem, port=port)


def test_redirected_request_is_decided_on_the_port_the_client_dialled(
    redirected: Redirected,
) -> None:
    result = _get(redirected, 8443)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from origin\n"
    assert redirected.origin.paths_seen() == ["/hello"]
    decision, close = redirected.proxy.wait_records(
        lambda r: (
            r["outgate"]["connection"] == "transparent-tls" and r["destination"]["port"] == 8443
        ),
        2,
    )
    assert decision["outgate"]["decision"] == "allow"
    assert decision["rule"]["name"] == "api-on-8443"
    assert close["destination"]["ip"] == ORIGIN  # what it resolved, not the dialled canary
    for canary in redirected.canaries:
        assert canary.seen == []


def test_redirected_port_the_rule_does_not_allow_is_refused(redirected: Redirected) -> None:
    """The same name dialled on 443: the rule allows 8443 only, so the original port decides."""
    result = _get(redirected, 443)
    assert result.returncode != 0
    decision, close = redirected.proxy.wait_records(
        lambda r: (
            r["outgate"]["connection"] == "transparent-tls" and r["destination"]["port"] == 443
        ),
        2,
    )
    assert decision["outgate"]["decision"] == "deny"
    assert decision["outgate"]["reason"] == "namespace_isolation"
    assert close["event"]["id"] == decision["event"]["id"]
    for canary in redirected.canaries:
        assert canary.seen == []


def test_redirected_plain_http_without_a_port_in_host_is_decided_on_the_dialled_port(
    redirected: Redirected,
) -> None:
    """`Host: api.allowed.example` names no port: the kernel's original destination (8080)
    decides, not `httpPort` (80, which the rule does not allow)."""
    with socket.create_connection((CANARY, 8080), timeout=10) as sock:
        sock.sendall(
            b"GET /hello HTTP/1.1\r\nHost: api.allowed.example\r\nConnection: close\r\n\r\n"
        )
        status, _, body = read_response(sock)
    assert (status, body) == (200, b"hello from origin\n")
    assert redirected.http_origin.paths_seen() == ["/hello"]
    decision = redirected.proxy.wait_records(
        lambda r: (
            r["outgate"]["connection"] == "transparent-http" and r["event"]["action"] == "decision"
        )
    )[0]
    assert decision["destination"] == {"domain": "api.allowed.example", "ip": ORIGIN, "port": 8080}
    for canary in redirected.canaries:
        assert canary.seen == []


# -- IPv6: SO_ORIGINAL_DST at the IPv6 level (a sockaddr_in6) ------------------------------------
V6_LISTEN_PORT = 9444


def _nat6(action: str) -> None:
    subprocess.run(
        [tool("ip6tables"), "-t", "nat", action, "OUTPUT", "-p", "tcp", "-d", CANARY_V6,
         "--dport", "8443", "-j", "REDIRECT", "--to-ports", str(V6_LISTEN_PORT)],
        check=True,
        capture_output=True,
    )  # fmt: skip


@pytest.fixture
def redirected_v6(
    redirected: Redirected, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy whose TLS listener is IPv6 ([::1], where REDIRECT sends IPv6 connections), with
    the module's DNS, origins and canaries."""
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(
            ProxyProcess(
                tmp_path_factory.mktemp("redirect-v6"),
                policies=POLICIES,
                nameserver=redirected.dns.nameserver,
                config={
                    "identity": steered_identity("redirected-client"),
                    "transparent": {"tls": f"[::1]:{V6_LISTEN_PORT}"},
                },
            )
        )
        _nat6("-A")
        stack.callback(_nat6, "-D")
        yield proxy


def test_an_ipv6_redirected_request_is_decided_on_the_port_the_client_dialled(
    redirected: Redirected, redirected_v6: ProxyProcess
) -> None:
    result = https_via("api.allowed.example", CANARY_V6, redirected.pki.ca_pem, port=8443)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello from origin\n"
    decision, close = redirected_v6.wait_records(
        lambda r: r["outgate"]["connection"] == "transparent-tls", 2
    )
    assert decision["source"]["ip"] == CANARY_V6
    assert decision["destination"]["port"] == 8443  # not tlsPort (443): the rule allows 8443 only
    assert decision["outgate"]["decision"] == "allow"
    assert close["destination"]["ip"] == ORIGIN
