"""The rule's `tls: {sni: required|optional, ech: allow|deny}`: loaded, validated, and carried by
the engine's decision to the tunnel."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from proxy.core.hosts import Host
from proxy.core.identity import UNKNOWN_WORKLOAD
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import (
    DEFAULT_TLS,
    Action,
    Destination,
    EchMode,
    SniMode,
    TlsOptions,
)
from proxy.errors import ConfigError


def policy(**rule: Any) -> str:
    body = {"name": "r", "action": "Allow", "to": [{"fqdn": "api.example.com"}], **rule}
    doc = {
        "apiVersion": "outgate.dev/v1alpha1",
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": "p"},
        "spec": {"tier": "admin", "rules": [body]},
    }
    return yaml.safe_dump(doc)


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        (None, DEFAULT_TLS),
        ({}, DEFAULT_TLS),
        ({"sni": "optional"}, TlsOptions(sni=SniMode.OPTIONAL)),
        ({"ech": "deny"}, TlsOptions(ech=EchMode.DENY)),
        ({"sni": "required", "ech": "allow"}, DEFAULT_TLS),
    ],
)
def test_tls_options_load(tls: dict[str, str] | None, expected: TlsOptions) -> None:
    rule = {} if tls is None else {"tls": tls}
    (loaded,) = load_text(policy(**rule), file="p.yaml")
    assert loaded.rules[0].tls == expected


@pytest.mark.parametrize(
    ("rule", "path", "fix"),
    [
        ({"tls": {"sni": "maybe"}}, "spec.rules[0].tls.sni", "use one of required, optional"),
        ({"tls": {"ech": "block"}}, "spec.rules[0].tls.ech", "use one of allow, deny"),
        ({"tls": {"snii": "optional"}}, "spec.rules[0].tls.snii", "did you mean 'sni'?"),
        ({"tls": "optional"}, "spec.rules[0].tls", ""),
        ({"tls": {"sni": "optional"}, "protocol": "ssh"}, "spec.rules[0].tls", "use protocol: tls"),
        ({"tls": {"ech": "deny"}, "action": "Deny"}, "spec.rules[0].tls", "action: Allow"),
    ],
)
def test_bad_tls_options_are_refused_with_path_and_fix(
    rule: dict[str, Any], path: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(policy(**rule), file="p.yaml")
    issues = [issue for issue in info.value.issues if issue.path == path]
    assert issues, info.value.issues
    assert fix in issues[0].fix


def test_the_decision_carries_the_deciding_rules_tls_options() -> None:
    policies = load_text(policy(tls={"sni": "optional", "ech": "deny"}), file="p.yaml")
    engine = Engine.compile(policies, default_action=Action.DENY, revision=1)
    decision = engine.decide(
        UNKNOWN_WORKLOAD,
        Destination(host=Host(name="api.example.com"), port=443),
    )
    assert decision.allowed
    assert decision.tls == TlsOptions(sni=SniMode.OPTIONAL, ech=EchMode.DENY)
