"""A real HAProxy with `send-proxy-v2` (and v1 `send-proxy`) in front of Outgate started as the
CLI starts it (issue 14, item 10).

The client (curl) binds 127.0.0.2 and HAProxy connects to Outgate from 127.0.0.1, so peer and
client are different addresses on loopback: the record must name the client, its workload, and
the balancer as `outgate.proxy_protocol.peer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.clients import curl
from tests.support.fixtures import policy_allowing
from tests.support.haproxy import HAProxy
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess

StartProxy = Callable[..., ProxyProcess]

CLIENT = "127.0.0.2"
# The client behind the balancer is a build VM; only it may reach the origin. The balancer's
# own address (127.0.0.1) is tests/test-client, which no rule allows.
IDENTITIES = {
    "static": [
        {"name": "test-client", "namespace": "tests", "cidrs": ["127.0.0.1/32"]},
        {"name": "build-vm", "namespace": "ci", "cidrs": [f"{CLIENT}/32", "::1/128"]},
    ]
}
POLICY = policy_allowing(name="ci", namespace="ci", pod_selector="{}")


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Callable[..., HAProxy]]:
    started: list[HAProxy] = []

    def start(backend_port: int, send_proxy: str) -> HAProxy:
        balancer = HAProxy(tmp_path, backend_port=backend_port, send_proxy=send_proxy)
        started.append(balancer)
        return balancer.start()

    yield start
    for balancer in started:
        balancer.stop()


@pytest.mark.parametrize(
    ("send_proxy", "version", "client"),
    [
        ("send-proxy-v2", 2, CLIENT),
        ("send-proxy", 1, CLIENT),
        ("send-proxy-v2", 2, "::1"),  # an INET6 header
        ("send-proxy", 1, "::1"),  # a TCP6 line
    ],
)
def test_behind_haproxy_the_record_names_the_real_client_and_its_workload(
    start_proxy: StartProxy,
    haproxy: Callable[..., HAProxy],
    origin: OriginServer,
    send_proxy: str,
    version: int,
    client: str,
) -> None:
    proxy = start_proxy(
        POLICY, config={"identity": IDENTITIES, "proxyProtocol": {"trustedCIDRs": ["127.0.0.1/32"]}}
    )
    balancer = haproxy(proxy.port, send_proxy)
    url = f"http://127.0.0.1:{origin.port}/hello"
    via = balancer.url6 if ":" in client else balancer.url
    result = curl("--interface", client, "-x", via, "-i", url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/1.1 200")
    decision, close = proxy.records_by_path("/hello")
    for record in (decision, close):
        assert record["source"]["ip"] == client
        assert record["outgate"]["workload"] == "Static/build-vm"
        assert record["kubernetes"]["namespace"] == "ci"
        assert record["outgate"]["proxy_protocol"]["version"] == version
        assert record["outgate"]["proxy_protocol"]["peer"]["ip"] == "127.0.0.1"
    assert decision["outgate"]["decision"] == "allow"
    assert decision["rule"]["name"] == "allow-origins"
    assert close["outgate"]["reason"] == "completed"
    # Straight to Outgate from the balancer's address, without a header: refused, never served
    # as the balancer.
    direct = curl("-x", proxy.url, "-i", url)
    assert direct.stdout.startswith("HTTP/1.1 400")
    assert "X-Outgate-Reason: proxy_protocol_missing" in direct.stdout


def test_a_proxy_header_from_an_untrusted_haproxy_is_refused(
    start_proxy: StartProxy, haproxy: Callable[..., HAProxy], origin: OriginServer
) -> None:
    proxy = start_proxy(
        POLICY, config={"identity": IDENTITIES, "proxyProtocol": {"trustedCIDRs": ["10.9.0.0/16"]}}
    )
    balancer = haproxy(proxy.port, "send-proxy-v2")
    result = curl(
        "--interface", CLIENT, "-x", balancer.url, "-i", f"http://127.0.0.1:{origin.port}/hello"
    )
    assert result.stdout.startswith("HTTP/1.1 400"), result
    refused = proxy.wait_records(lambda r: r["event"]["action"] == "close")
    assert all(r["outgate"]["reason"] == "malformed_request" for r in proxy.records)
    assert all(r["source"]["ip"] == "127.0.0.1" for r in proxy.records)
    assert all("proxy_protocol" not in r["outgate"] for r in refused)
    assert origin.seen == []
