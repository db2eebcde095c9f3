"""The admin listener: health, readiness, metrics after real traffic, and /explain."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, read_response

StartProxy = Callable[..., ProxyProcess]


@pytest.fixture
def proxy(start_proxy: StartProxy, dns_server: ScriptedDNSServer) -> ProxyProcess:
    dns_server.addresses("origin.test", "127.0.0.1")
    return start_proxy(policy_allowing("origin.test"), nameserver=dns_server.nameserver)


def test_healthz_and_readyz_answer_when_policy_is_loaded(proxy: ProxyProcess) -> None:
    assert proxy.admin("/healthz") == (200, "ok\n")
    status, body = proxy.admin("/readyz")
    assert status == 200
    detail = json.loads(body)
    assert detail["ready"] is True
    assert detail["policy_loaded"] is True
    assert detail["policy_revision"] == 1
    assert detail["last_policy_error"] is None


def test_metrics_count_decisions_bytes_and_dns_after_real_traffic(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    with proxy.connect() as sock:
        sock.sendall(
            f"GET http://origin.test:{origin.port}/hello HTTP/1.1\r\n"
            "Host: origin.test\r\nConnection: close\r\n\r\n".encode()
        )
        assert read_response(sock)[0] == 200
    proxy.wait_records(lambda r: r["event"]["action"] == "close")
    _, text = proxy.admin("/metrics")
    lines = text.splitlines()
    assert 'outgate_decisions_total{action="allow",namespace="tests",reason="rule_allow"} 1.0' in (
        lines
    )
    assert 'outgate_bytes_total{direction="ingress"} 18.0' in lines
    assert 'outgate_dns_lookups_total{result="ok"} 1.0' in lines
    assert "outgate_policy_revision 1.0" in lines
    assert "outgate_policy_last_reload_success 1.0" in lines
    assert 'outgate_audit_records_total{action="decision"} 1.0' in lines
    assert "outgate_connections_accepted_total 1.0" in lines
    assert any(line.startswith('outgate_active_connections{kind="client"}') for line in lines)


def test_explain_endpoint_shows_the_decision_for_a_source_and_url(proxy: ProxyProcess) -> None:
    status, text = proxy.admin("/explain?source=127.0.0.1&url=http://origin.test:8080/")
    assert status == 200
    assert "tests/Static/test-client" in text and "allow-origins" in text
    status, body = proxy.admin("/explain?source=127.0.0.1&url=https://other.test/&format=json")
    assert status == 200
    data = json.loads(body)
    assert "deny" in json.dumps(data)
    assert "namespace_isolation" in json.dumps(data)
    status, _ = proxy.admin("/explain?source=not-an-ip&url=https://other.test/")
    assert status == 400
