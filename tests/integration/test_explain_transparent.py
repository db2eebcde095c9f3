"""`outgate explain` for transparent mode (issue 13): the listener shown with what it changes,
and the transparent listeners' own addresses in the guard explain uses, as in the data plane
(what is explained is what is enforced)."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from proxy.admin import build_admin_app
from proxy.control.policy_source import PolicyStore
from proxy.core.addresses import AddressGuard
from proxy.core.identity import StaticIdentityIndex, parse_static_identities
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action
from proxy.dataplane.router import Router
from tests.integration.test_explain_resolve import explain, write_config
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.inprocess import STATIC_CLIENT, FakeResolver

LISTENER_PORT = 18443

POLICY = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: tests, namespace: tests}
spec:
  podSelector: {matchLabels: {app: client}}
  rules:
    - name: loopback-service
      action: Allow
      to: [{fqdn: svc.example.com}, {cidr: 127.0.0.0/8}]
      ports: [443, 18443]
"""


def _config(tmp_path: Path, dns: ScriptedDNSServer) -> Path:
    extra = f"transparent: {{tls: 127.0.0.1:{LISTENER_PORT}}}\n"
    return write_config(tmp_path, dns, policy=POLICY, extra=extra)


def test_explain_refuses_a_name_that_leads_back_into_a_transparent_listener(
    tmp_path: Path, dns_server: ScriptedDNSServer
) -> None:
    dns_server.addresses("svc.example.com", "127.0.0.1")
    config = _config(tmp_path, dns_server)
    into_listener = explain(config, f"https://svc.example.com:{LISTENER_PORT}/", "--resolve")
    assert into_listener.returncode == 0, into_listener.stderr
    assert "127.0.0.1 [allow" in into_listener.stdout
    assert "dropped by the address guard: proxy_self" in into_listener.stdout
    assert "outcome:     deny 403 (guarded_address)" in into_listener.stdout
    elsewhere = explain(config, "https://svc.example.com/", "--resolve")
    assert "outcome:     allow; dial 127.0.0.1" in elsewhere.stdout


def test_explain_names_the_listener_and_what_it_changes(
    tmp_path: Path, dns_server: ScriptedDNSServer
) -> None:
    config = _config(tmp_path, dns_server)
    by_name = explain(config, "https://svc.example.com/", "--listener", "transparent-tls")
    assert by_name.returncode == 0, by_name.stderr
    assert "decision:    allow (rule_allow)" in by_name.stdout
    assert (
        "listener:    transparent-tls, decided as a CONNECT to svc.example.com:443"
        in by_name.stdout
    )
    by_address = explain(config, "https://127.0.0.1/", "--listener", "transparent-tls")
    assert "refused before any decision (sni_ip_literal)" in by_address.stdout
    http = explain(config, "http://svc.example.com/", "--listener", "transparent-http")
    assert "listener:    transparent-http, decided as a request to svc.example.com:80" in (
        http.stdout
    )
    bad = explain(config, "https://svc.example.com/", "--listener", "sidecar")
    assert bad.returncode != 0
    assert "invalid choice" in bad.stderr


async def test_admin_explain_takes_the_listener_too() -> None:
    store = PolicyStore()
    store.install(
        Engine.compile(load_text(POLICY, file="t.yaml"), default_action=Action.DENY, revision=1)
    )
    router = Router(policy=store, resolver=FakeResolver(answers={}), guard=AddressGuard())
    identity = StaticIdentityIndex(parse_static_identities([STATIC_CLIENT], file="<test>"))
    app = build_admin_app(router=router, identity=identity, readiness=lambda: (True, {}))
    async with TestClient(TestServer(app)) as client:
        query = "source=127.0.0.1&format=json&listener=transparent-tls"
        by_name = await (await client.get(f"/explain?{query}&url=https://svc.example.com/")).json()
        assert by_name["listener"] == {"kind": "transparent-tls"}
        by_ip = await (await client.get(f"/explain?{query}&url=https://127.0.0.1/")).json()
        assert by_ip["listener"] == {"kind": "transparent-tls", "refused": "sni_ip_literal"}
        unknown = await client.get("/explain?source=127.0.0.1&url=x.example:1&listener=sidecar")
        assert unknown.status == 400
        assert "unknown listener" in await unknown.text()
