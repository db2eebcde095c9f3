"""DNS and upstream failures map to the statuses of DESIGN section 6, with their reasons."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from tests.support.dnsserver import DROP, NXDOMAIN, SERVFAIL, ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.proxyproc import ProxyProcess, read_response

StartProxy = Callable[..., ProxyProcess]


@pytest.fixture
def proxy(start_proxy: StartProxy, dns_server: ScriptedDNSServer) -> ProxyProcess:
    return start_proxy(
        policy_allowing("*.fail.test"),
        nameserver=dns_server.nameserver,
        config={"dns": {"timeout": "500ms"}, "timeouts": {"connect": "1s"}},
    )


def _closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(proxy: ProxyProcess, target: str) -> tuple[int, dict[str, str]]:
    host = target.split("/")[2]
    with proxy.connect() as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        status, headers, _ = read_response(sock)
    return status, headers


def test_nxdomain_gets_502(proxy: ProxyProcess, dns_server: ScriptedDNSServer) -> None:
    dns_server.answer("gone.fail.test", "A", NXDOMAIN)
    dns_server.answer("gone.fail.test", "AAAA", NXDOMAIN)
    status, headers = _get(proxy, "http://gone.fail.test/")
    assert status == 502
    assert headers["x-outgate-reason"] == "dns_nxdomain"


def test_servfail_gets_502(proxy: ProxyProcess, dns_server: ScriptedDNSServer) -> None:
    dns_server.answer("broken.fail.test", "A", SERVFAIL)
    dns_server.answer("broken.fail.test", "AAAA", SERVFAIL)
    status, headers = _get(proxy, "http://broken.fail.test/")
    assert (status, headers["x-outgate-reason"]) == (502, "dns_servfail")


def test_name_without_addresses_gets_502(
    proxy: ProxyProcess, dns_server: ScriptedDNSServer
) -> None:
    dns_server.answer("empty.fail.test", "A")
    dns_server.answer("empty.fail.test", "AAAA")
    status, headers = _get(proxy, "http://empty.fail.test/")
    assert (status, headers["x-outgate-reason"]) == (502, "dns_no_answer")


def test_dns_timeout_gets_504(proxy: ProxyProcess, dns_server: ScriptedDNSServer) -> None:
    dns_server.answer("slow.fail.test", "A", DROP)
    dns_server.answer("slow.fail.test", "AAAA", DROP)
    status, headers = _get(proxy, "http://slow.fail.test/")
    assert (status, headers["x-outgate-reason"]) == (504, "dns_timeout")
    _decision, close = proxy.records_by_path("/")
    assert close["http"]["response"]["status_code"] == 504


def test_refused_upstream_gets_502(proxy: ProxyProcess, dns_server: ScriptedDNSServer) -> None:
    dns_server.addresses("closed.fail.test", "127.0.0.1")
    port = _closed_port()
    status, headers = _get(proxy, f"http://closed.fail.test:{port}/")
    assert (status, headers["x-outgate-reason"]) == (502, "upstream_refused")
    with proxy.connect() as sock:
        sock.sendall(f"CONNECT closed.fail.test:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, _ = read_response(sock)
    assert (status, headers["x-outgate-reason"]) == (502, "upstream_refused")
    _, metrics = proxy.admin("/metrics")
    assert 'outgate_upstream_connect_errors_total{kind="refused"} 2.0' in metrics


def test_dns_failure_metrics_are_exported(
    proxy: ProxyProcess, dns_server: ScriptedDNSServer
) -> None:
    dns_server.answer("gone.fail.test", "A", NXDOMAIN)
    dns_server.answer("gone.fail.test", "AAAA", NXDOMAIN)
    _get(proxy, "http://gone.fail.test/")
    _, metrics = proxy.admin("/metrics")
    assert 'outgate_dns_lookups_total{result="nxdomain"}' in metrics
    assert "outgate_dns_lookup_seconds_count" in metrics
    decisions = [
        line for line in metrics.splitlines() if line.startswith("outgate_decisions_total{")
    ]
    assert 'outgate_decisions_total{action="deny",namespace="tests",reason="dns_nxdomain"} 1.0' in (
        decisions
    ), decisions
