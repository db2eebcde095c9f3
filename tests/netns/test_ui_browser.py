"""The admin page (issue 15) in a real headless browser, after real traffic through a running
proxy: the overview's numbers against the audit records, a workload's destinations, the
suggested policy (loaded into the engine: it allows what was observed and nothing else), the
explain form's result, and a screenshot. Then a request carrying `<script>` and quotes in its
Host, path and User-Agent is shown escaped, and the browser runs no script from it.

Inside the network namespace: the browser's own background traffic reaches nothing real.
"""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path
from urllib.parse import urlencode

import pytest

from proxy.core.hosts import parse_host
from proxy.core.identity import Workload, WorkloadKind
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action, Destination
from tests.support.browser import Dom, dump_dom, screenshot
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.origin import OriginServer
from tests.support.proxyproc import ProxyProcess, ResponseReader, get_from, read_response

POLICIES = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: client, namespace: tests}
spec:
  podSelector: {matchLabels: {app: client}}
  rules:
    - name: origins
      action: Allow
      to: [{fqdn: origin.test}, {fqdn: api.origin.test}, {cidr: 127.0.0.0/8}]
      ports: [PORT]
---
apiVersion: outgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: trial-no-api}
spec:
  tier: admin
  priority: 5
  mode: audit
  rules:
    - name: no-api
      action: Deny
      to: [{fqdn: api.origin.test}]
      ports: [PORT]
"""

CLIENT = Workload(
    kind=WorkloadKind.STATIC,
    namespace="tests",
    name="test-client",
    labels={"app": "client"},
    owner_kind="Static",
    owner_name="test-client",
)


@pytest.fixture
def proxy(start_proxy: object, dns_server: ScriptedDNSServer, origin: OriginServer) -> ProxyProcess:
    for name in ("origin.test", "api.origin.test", "denied.test"):
        dns_server.addresses(name, "127.0.0.1")
    start = start_proxy
    assert callable(start)
    proxy: ProxyProcess = start(
        POLICIES.replace("PORT", str(origin.port)), nameserver=dns_server.nameserver
    )
    return proxy


def _connect(proxy: ProxyProcess, authority: str) -> bytes:
    with proxy.connect() as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        sock.settimeout(10)
        return sock.recv(200)


def _decisions(proxy: ProxyProcess, count: int) -> list[dict[str, object]]:
    closes = proxy.wait_records(lambda r: r["event"]["action"] == "close", count)
    assert len(closes) == count
    return [r for r in proxy.records if r["event"]["action"] == "decision"]


def test_the_page_shows_what_the_audit_records_say_and_proposes_a_fitting_policy(
    proxy: ProxyProcess, origin: OriginServer, tmp_path: Path
) -> None:
    port = origin.port
    for _ in range(3):
        assert get_from(proxy, "127.0.0.1", f"http://origin.test:{port}/hello")[0] == 200
    for _ in range(2):
        assert get_from(proxy, "127.0.0.1", f"http://api.origin.test:{port}/hello")[0] == 200
    assert get_from(proxy, "127.0.0.1", f"http://denied.test:{port}/x")[0] == 403
    assert _connect(proxy, f"denied.test:{port}").startswith(b"HTTP/1.1 403")
    # An allowed tunnel carrying a plain HTTP request (a tunnel's default protocol admits it,
    # checked request by request): two decisions, the tunnel's and the request's.
    with proxy.connect() as sock:
        authority = f"origin.test:{port}"
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        reader = ResponseReader(sock)
        assert reader.next()[0] == 200
        sock.sendall(f"GET /hello HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        assert reader.next()[0] == 200
    decisions = _decisions(proxy, 9)
    outcomes = Counter(str(r["outgate"]["decision"]) for r in decisions)  # type: ignore[index]
    assert outcomes == {"allow": 7, "deny": 2}
    shadow = sum(1 for r in decisions if "shadow_decision" in r["outgate"])  # type: ignore[operator]
    assert shadow == 2

    base = f"http://127.0.0.1:{proxy.admin_port}"
    profile = tmp_path / "chromium"
    page = Dom(dump_dom(f"{base}/ui", profile))
    assert page.text_by_id["allowed-total"] == str(outcomes["allow"])
    assert page.text_by_id["denied-total"] == str(outcomes["deny"])
    assert page.text_by_id["decisions-total"] == str(len(decisions))
    assert page.text_by_id["shadow-total"] == str(shadow)
    assert page.text_by_id["health-ready"] == "yes"
    assert page.text_by_id["health-revision"] == "1"
    assert page.has("svg") and page.has("rect")  # the chart has this minute's bars
    top_denied = page.rows("top-denied")
    assert [row[1:3] for row in top_denied] == [[f"denied.test:{port}", "2"]]
    (workload_row,) = page.rows("workloads")
    assert workload_row[:4] == ["tests/Static/test-client", "9", "2", "7/2"]  # 7/2: last hour

    query = urlencode({"ns": "tests", "kind": "Static", "name": "test-client"})
    workload = Dom(dump_dom(f"{base}/ui/workload?{query}", profile))
    assert workload.has("rect")  # its own chart of the last hour
    table = {row[0]: row for row in workload.rows("destinations")}
    denied = table[f"denied {f'denied.test:{port}'}"]
    assert denied[1:4] == ["0", "2", "0/1"]  # allowed, denied, tunnels (allowed/denied)
    assert denied[7] == "namespace_isolation"
    would = table[f"would be denied api.origin.test:{port}"]
    assert would[1:3] == ["2", "0"] and would[6] == "tests/client/origins"
    assert would[8] == "deny (trial-no-api/no-api)"
    allowed = table[f"origin.test:{port}"]
    assert allowed[1:4] == ["5", "0", "1/0"] and allowed[6] == "tests/client/origins"
    assert list(table) == [  # denials first, then what an audit-mode policy would deny
        f"denied denied.test:{port}",
        f"would be denied api.origin.test:{port}",
        f"origin.test:{port}",
    ]

    suggested = workload.text_by_id["suggested-policy"]
    assert "mode: audit" in suggested
    (policy,) = load_text(suggested.replace("mode: audit", "mode: enforce"), file="page")
    engine = Engine.compile([policy], default_action=Action.DENY, revision=1)

    def allowed_by_suggestion(name: str, to_port: int) -> bool:
        host = parse_host(name)
        return engine.decide(CLIENT, Destination(host=host, port=to_port, ip=host.ip)).allowed

    assert allowed_by_suggestion("origin.test", port)
    assert allowed_by_suggestion("api.origin.test", port)
    assert not allowed_by_suggestion("denied.test", port)  # refused traffic is left out
    assert not allowed_by_suggestion("origin.test", port + 1)  # no port it was not seen on
    assert not allowed_by_suggestion("other.test", port)

    form = Dom(dump_dom(f"{base}/ui/explain", profile))
    fields = {attrs.get("name") for tag, attrs in form.tags if tag == "input"}
    assert {"source", "url", "resolve"} <= fields  # what the form submits, asked below
    assert ("form", {"method": "get", "action": "/ui/explain"}) in form.tags
    explained = Dom(
        dump_dom(
            f"{base}/ui/explain?"
            + urlencode({"source": "127.0.0.1", "url": f"http://api.origin.test:{port}/"}),
            profile,
        )
    ).text_by_id["explanation"]
    assert "workload:    tests/Static/test-client" in explained
    assert "steps:" in explained and "origins" in explained
    assert "decision:    allow" in explained
    assert "shadow:      deny" in explained and "no-api" in explained

    # Test artefacts (tests/support/browser.py copies them to build/test-artifacts/ui/).
    screenshot(f"{base}/ui", tmp_path / "ui-overview.png", profile)
    screenshot(f"{base}/ui/workload?{query}", tmp_path / "ui-workload.png", profile)


HOSTILE = "<script>document.title='pwned'</script>\"'"


def test_client_strings_are_shown_escaped_and_the_browser_runs_none_of_them(
    proxy: ProxyProcess, origin: OriginServer, tmp_path: Path
) -> None:
    port = origin.port
    # A well-formed target whose path, Host and User-Agent carry markup and quotes: the proxy
    # refuses it (the Host is no host name), and the page lists it under recent refusals.
    path = "/<script>document.title='pwned'</script>\"'"
    with proxy.connect() as sock:
        sock.sendall(
            f"GET http://denied.test:{port}{path} HTTP/1.1\r\nHost: {HOSTILE}\r\n"
            f"User-Agent: {HOSTILE}\r\nConnection: close\r\n\r\n".encode()
        )
        assert read_response(sock)[0] == 400
    # And one that parses (the Host names the target) but is denied by policy.
    with proxy.connect() as sock:
        sock.sendall(
            f"GET http://denied.test:{port}{path} HTTP/1.1\r\nHost: denied.test:{port}\r\n"
            f"User-Agent: {HOSTILE}\r\nConnection: close\r\n\r\n".encode()
        )
        assert read_response(sock)[0] == 403
    _decisions(proxy, 2)

    markup = dump_dom(f"http://127.0.0.1:{proxy.admin_port}/ui", tmp_path / "chromium")
    page = Dom(markup)
    assert not page.has("script"), "a <script> element reached the page"
    assert "<title>Overview - Outgate</title>" in markup  # no script renamed the document
    refusals = page.rows("refusals")
    assert len(refusals) == 2
    by_reason = {row[3]: row for row in refusals}
    malformed, denied = by_reason["malformed_request"], by_reason["namespace_isolation"]
    assert malformed[7] == HOSTILE  # Host, shown as text
    assert malformed[8] == HOSTILE  # User-Agent
    assert malformed[6].endswith(path)  # the target as sent
    assert denied[6] == f"http://denied.test:{port}{path}"
    assert denied[8] == HOSTILE
    # The raw markup holds them only escaped.
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in markup


def test_the_page_can_require_a_bearer_token(start_proxy: object, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    start = start_proxy
    assert callable(start)
    proxy: ProxyProcess = start("", config={"ui": {"tokenFile": str(token)}})
    with socket.create_connection(("127.0.0.1", proxy.admin_port)) as sock:
        sock.sendall(b"GET /ui HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        assert read_response(sock)[0] == 401
    # The browser, which sends no token, is refused too.
    dom = dump_dom(f"http://127.0.0.1:{proxy.admin_port}/ui", tmp_path / "chromium")
    assert "a bearer token is required" in dom
