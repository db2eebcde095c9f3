"""`outgate explain --resolve` and `/explain?resolve=1`: the address step of the same routing the
data plane runs, against a real (scripted) DNS server on 127.0.0.1. Nothing is dialled."""

from __future__ import annotations

import ipaddress
import subprocess
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
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.inprocess import STATIC_CLIENT, FakeResolver
from tests.support.proxyproc import outgate_command

POLICY = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: tests, namespace: tests}
spec:
  podSelector: {matchLabels: {app: client}}
  rules:
    - name: api
      action: Allow
      to: [{fqdn: api.example.com}]
"""


def write_config(
    tmp_path: Path, dns: ScriptedDNSServer, *, policy: str = POLICY, extra: str = ""
) -> Path:
    """A config for `outgate explain` with `policy`; `extra` is more YAML for the config."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "tests.yaml").write_text(policy)
    config = tmp_path / "outgate.yaml"
    config.write_text(
        f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
policies: {{paths: [policies/]}}
identity:
  static: [{{name: client, namespace: tests, cidrs: [127.0.0.1/32], labels: {{app: client}}}}]
dns: {{nameservers: ["{dns.nameserver}"], timeout: 2s}}
{extra}"""
    )
    return config


def explain(config: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*outgate_command(), "explain", "--config", str(config), "--source", "127.0.0.1",
         "--url", url, *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_explain_resolve_shows_the_guarded_address_dropped_and_why(
    tmp_path: Path, dns_server: ScriptedDNSServer
) -> None:
    dns_server.addresses("api.example.com", "169.254.169.254", "93.184.216.34")
    result = explain(write_config(tmp_path, dns_server), "https://api.example.com/", "--resolve")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "api.example.com -> 169.254.169.254, 93.184.216.34" in out
    by_rule = "[allow (rule_allow) by tests/tests rule api]"
    assert f"169.254.169.254 {by_rule}: dropped by the address guard: metadata" in out
    assert f"93.184.216.34 {by_rule}: permitted" in out
    assert "outcome:     allow; dial 93.184.216.34" in out


def test_explain_resolve_into_guarded_space_only_is_a_deny(
    tmp_path: Path, dns_server: ScriptedDNSServer
) -> None:
    dns_server.addresses("api.example.com", "10.0.0.5")
    result = explain(write_config(tmp_path, dns_server), "https://api.example.com/", "--resolve")
    assert result.returncode == 0, result.stderr
    by_rule = "[allow (rule_allow) by tests/tests rule api]"
    assert f"10.0.0.5 {by_rule}: dropped by the address guard: private" in result.stdout
    assert "outcome:     deny 403 (guarded_address)" in result.stdout


def test_explain_without_resolve_asks_no_dns(tmp_path: Path, dns_server: ScriptedDNSServer) -> None:
    dns_server.addresses("api.example.com", "10.0.0.5")
    result = explain(write_config(tmp_path, dns_server), "https://api.example.com/")
    assert result.returncode == 0, result.stderr
    assert "decision:    allow (rule_allow)" in result.stdout
    assert "resolve:" not in result.stdout
    assert dns_server.queries == []


def test_explain_resolve_of_a_denied_name_makes_no_query(
    tmp_path: Path, dns_server: ScriptedDNSServer
) -> None:
    result = explain(write_config(tmp_path, dns_server), "https://pastebin.com/", "--resolve")
    assert result.returncode == 0, result.stderr
    assert "not asked (denied by name: no DNS query is made)" in result.stdout
    assert dns_server.queries == []


async def test_admin_explain_resolve_returns_the_route_as_json() -> None:
    store = PolicyStore()
    store.install(
        Engine.compile(load_text(POLICY, file="t.yaml"), default_action=Action.DENY, revision=3)
    )
    answer = (ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("93.184.216.34"))
    router = Router(
        policy=store,
        resolver=FakeResolver(answers={"api.example.com": answer}),
        guard=AddressGuard(),
    )
    identity = StaticIdentityIndex(parse_static_identities([STATIC_CLIENT], file="<test>"))
    app = build_admin_app(router=router, identity=identity, readiness=lambda: (True, {}))
    async with TestClient(TestServer(app)) as client:
        query = "source=127.0.0.1&url=https://api.example.com/&format=json"
        response = await client.get(f"/explain?{query}&resolve=1")
        assert response.status == 200
        route = (await response.json())["route"]
        assert route["permitted"] == ["93.184.216.34"]
        assert [a["guarded"] for a in route["addresses"]] == ["private", None]
        plain = await (await client.get(f"/explain?{query}")).json()
        assert "route" not in plain and plain["decision"]["action"] == "allow"
