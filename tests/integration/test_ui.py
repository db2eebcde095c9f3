"""The admin page's contract over real HTTP (issue 15; the browser tests are in
tests/netns/test_ui_browser.py): security headers on every answer, nothing but reads, turned
off by `ui.enabled`, a bearer token when configured, the policies with a load problem, and the
per-destination metrics after real traffic."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.ui import CONTENT_SECURITY_POLICY
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import policy_allowing
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, read_response, run_outgate

StartProxy = Callable[..., ProxyProcess]
PAGES = ("/ui", "/ui/policies", "/ui/explain", "/ui/style.css", "/ui/workload?ns=x&kind=y&name=z")

AUDIT_POLICY = """
---
apiVersion: outgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: trial}
spec:
  tier: baseline
  priority: 40
  mode: audit
  rules:
    - {name: nothing, action: Deny, to: [{fqdn: nowhere.test}]}
"""


def admin_request(
    proxy: ProxyProcess, method: str, path: str, headers: str = ""
) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=10) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: admin\r\n{headers}"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        return read_response(sock)


@pytest.fixture
def proxy(start_proxy: StartProxy, dns_server: ScriptedDNSServer) -> ProxyProcess:
    dns_server.addresses("origin.test", "127.0.0.1")
    return start_proxy(
        policy_allowing("origin.test") + AUDIT_POLICY, nameserver=dns_server.nameserver
    )


def test_every_page_sets_a_strict_content_security_policy(proxy: ProxyProcess) -> None:
    for path in PAGES:
        status, headers, _ = admin_request(proxy, "GET", path)
        assert status in (200, 404), path
        lowered = {name.lower(): value for name, value in headers.items()}
        assert lowered["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert "script-src" not in CONTENT_SECURITY_POLICY  # default-src 'none' forbids scripts
        assert lowered["x-content-type-options"] == "nosniff"
        assert lowered["x-frame-options"] == "DENY"
        assert lowered["cache-control"] == "no-store"


def test_the_page_changes_nothing_only_reads_are_answered(proxy: ProxyProcess) -> None:
    for path in PAGES:
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert admin_request(proxy, method, path)[0] == 405, (method, path)


def test_the_policies_page_lists_tier_mode_priority_and_a_load_problem(
    proxy: ProxyProcess,
) -> None:
    status, body = proxy.admin("/ui/policies")
    assert status == 200
    assert "<td>ClusterEgressPolicy</td><td>trial</td><td>baseline</td><td>audit</td>" in body
    assert "<td class='n'>40</td>" in body
    assert "<td>EgressPolicy</td><td>tests/tests</td><td>namespace</td><td>enforce</td>" in body
    assert "None: every policy loaded." in body
    (proxy.policy_dir / "broken.yaml").write_text("kind: EgressPolicy\nspec: {rules: 3}\n")
    proxy.signal(signal.SIGHUP)
    proxy.wait_log(lambda e: e.get("event") == "policy_reload_failed")
    status, body = proxy.admin("/ui/policies")
    assert "broken.yaml" in body and "None: every policy loaded." not in body
    assert "Revision 1," in body  # the last good policy stays in force
    _, overview = proxy.admin("/ui")
    assert '<td id="health-reload">failed</td>' in overview


def test_per_destination_metrics_follow_real_traffic(
    proxy: ProxyProcess, origin: OriginServer
) -> None:
    for path in ("/hello", "/hello"):
        with proxy.connect() as sock:
            sock.sendall(
                f"GET http://origin.test:{origin.port}{path} HTTP/1.1\r\n"
                "Host: origin.test\r\nConnection: close\r\n\r\n".encode()
            )
            assert read_response(sock)[0] == 200
    proxy.wait_records(lambda r: r["event"]["action"] == "close", 2)
    _, text = proxy.admin("/metrics")
    labels = (
        f'destination="origin.test:{origin.port}",namespace="tests",workload="Static/test-client"'
    )
    assert f'outgate_destination_requests_total{{action="allow",{labels}}} 2.0' in text
    ingress = [
        line
        for line in text.splitlines()
        if line.startswith("outgate_destination_bytes_total")
        and 'direction="ingress"' in line
        and f'destination="origin.test:{origin.port}"' in line
    ]
    assert len(ingress) == 1 and float(ingress[0].rsplit(" ", 1)[1]) > 0


def test_the_page_can_be_turned_off(start_proxy: StartProxy) -> None:
    proxy = start_proxy("", config={"ui": {"enabled": False}})
    assert proxy.admin("/ui")[0] == 404
    assert proxy.admin("/healthz")[0] == 200


def test_with_a_token_only_requests_that_carry_it_are_served(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    proxy = start_proxy("", config={"ui": {"tokenFile": str(tmp_path / "token")}})
    status, headers, _ = admin_request(proxy, "GET", "/ui")
    assert status == 401
    assert {k.lower(): v for k, v in headers.items()}["www-authenticate"].startswith("Bearer")
    assert admin_request(proxy, "GET", "/ui", "Authorization: Bearer wrong\r\n")[0] == 401
    ok = admin_request(proxy, "GET", "/ui", "Authorization: Bearer s3cret-token\r\n")
    assert ok[0] == 200 and b"Overview" in ok[2]
    assert proxy.admin("/metrics")[0] == 200  # the token guards the page, not the probes


def test_a_token_file_that_cannot_be_read_stops_the_start_with_its_field(tmp_path: Path) -> None:
    config = tmp_path / "outgate.yaml"
    config.write_text("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nui: {tokenFile: missing-token}\n")
    result = run_outgate("run", "--config", str(config))
    assert result.returncode != 0
    assert "ui.tokenFile" in result.stderr and "missing-token cannot be read" in result.stderr
