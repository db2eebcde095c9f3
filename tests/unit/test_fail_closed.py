"""Invalid stored objects fail closed (issue 19): the stand-in `fail_closed_policy` builds for an
object the validator refuses, and how the engine places and explains it."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.core.hosts import parse_host
from proxy.core.identity import MATCH_ALL, Workload, WorkloadKind
from proxy.core.policy.engine import Engine
from proxy.core.policy.explain import render_explanation
from proxy.core.policy.loader import fail_closed_policy, load_text
from proxy.core.policy.model import (
    FAIL_CLOSED_RULE,
    Action,
    Destination,
    Mode,
    Origin,
    Policy,
    PolicyKind,
    Tier,
)
from proxy.errors import ConfigError, ConfigIssue

ISSUE = ConfigIssue(
    file="ClusterEgressPolicy x",
    document=None,
    path="spec.rules[0].to[0].fqdn",
    message="'a*.com' has * inside a label",
    fix="list each name",
)
POD = Workload(
    kind=WorkloadKind.POD,
    namespace="payments",
    name="api-1",
    labels={"app": "api"},
    namespace_labels={"kubernetes.io/metadata.name": "payments", "team": "payments"},
)


def stand_in(kind: PolicyKind, spec: Any, namespace: str = "") -> Policy:
    return fail_closed_policy(
        kind,
        spec,
        name="x",
        namespace=namespace,
        issues=[ISSUE],
        origin=Origin(file="ClusterEgressPolicy x", document=1),
    )


VALID_SUBJECT = {"namespaceSelector": {"matchLabels": {"team": "payments"}}}


@pytest.mark.parametrize(
    ("spec", "tier", "priority", "mode", "selects_shop"),
    [
        # The parts that read correctly are kept: the stand-in sits where the object meant to.
        ({"tier": "baseline", "priority": 7, "subject": VALID_SUBJECT}, Tier.BASELINE, 7,
         Mode.ENFORCE, False),
        ({"tier": "admin", "mode": "audit", "subject": VALID_SUBJECT}, Tier.ADMIN, 500,
         Mode.AUDIT, False),
        # A part that is itself invalid takes its strictest value.
        ({"tier": "adnim", "subject": VALID_SUBJECT}, Tier.ADMIN, 500, Mode.ENFORCE, False),
        ({"tier": "baseline", "priority": "high"}, Tier.BASELINE, 0, Mode.ENFORCE, True),
        ({"tier": "admin", "mode": "enforcing"}, Tier.ADMIN, 500, Mode.ENFORCE, True),
        ({"tier": "admin", "subject": {"namespaceSelector": {"matchLabels": {"team": 5}}}},
         Tier.ADMIN, 500, Mode.ENFORCE, True),
        ({"tier": "admin", "subject": {**VALID_SUBJECT, "serviceAcounts": ["a"]}},
         Tier.ADMIN, 500, Mode.ENFORCE, True),
        ("not a mapping", Tier.ADMIN, 0, Mode.ENFORCE, True),
        (None, Tier.ADMIN, 0, Mode.ENFORCE, True),
    ],
)  # fmt: skip
def test_a_cluster_policy_stand_in_keeps_valid_parts_and_takes_the_strictest_for_the_rest(
    spec: Any, tier: Tier, priority: int, mode: Mode, selects_shop: bool
) -> None:
    policy = stand_in(PolicyKind.CLUSTER, spec)
    shop = Workload(
        kind=WorkloadKind.POD,
        namespace="shop",
        name="w",
        namespace_labels={"kubernetes.io/metadata.name": "shop", "team": "shop"},
    )
    assert (policy.tier, policy.priority, policy.mode) == (tier, priority, mode)
    assert policy.selects(POD)
    assert policy.selects(shop) is selects_shop
    assert policy.rules == (FAIL_CLOSED_RULE,)
    assert policy.invalid_issues == (
        "spec.rules[0].to[0].fqdn: 'a*.com' has * inside a label -- fix: list each name",
    )


@pytest.mark.parametrize(
    ("spec", "selects_other_pods"),
    [
        ({"podSelector": {"matchLabels": {"app": "api"}}}, False),
        ({"podSelector": {"matchLabels": {"app": ["api"]}}}, True),
        ({"podSelector": {"matchExpressions": [{"key": "app", "operator": "Is"}]}}, True),
        ({}, True),
    ],
)
def test_a_namespace_policy_stand_in_selects_its_pods_or_every_pod_of_the_namespace(
    spec: Any, selects_other_pods: bool
) -> None:
    policy = stand_in(PolicyKind.NAMESPACED, spec, namespace="payments")
    other = Workload(
        kind=WorkloadKind.POD,
        namespace="payments",
        name="w",
        labels={"app": "worker"},
        namespace_labels=POD.namespace_labels,
    )
    elsewhere = Workload(kind=WorkloadKind.POD, namespace="shop", name="w", labels={"app": "api"})
    assert policy.tier is Tier.NAMESPACE
    assert policy.selects(POD)
    assert policy.selects(other) is selects_other_pods
    assert not policy.selects(elsewhere)
    if not selects_other_pods:
        assert policy.pod_selector != MATCH_ALL


def test_only_a_stand_in_holds_the_any_destination_rule() -> None:
    with pytest.raises(ValueError, match="only a stand-in"):
        Policy(kind=PolicyKind.CLUSTER, name="x", tier=Tier.ADMIN, rules=(FAIL_CLOSED_RULE,))
    # No document can write it either: there is no key for "any destination".
    with pytest.raises(ConfigError):
        load_text(
            "apiVersion: outgate.dev/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {name: x}\n"
            "spec: {tier: admin, rules: [{name: r, action: Deny, to: [{fqdn: '*'}]}]}\n",
            file="f",
        )


POLICIES = """\
apiVersion: outgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: first}
spec:
  tier: admin
  priority: 5
  rules: [{name: metrics, action: Allow, to: [{fqdn: metrics.example.com}]}]
---
apiVersion: outgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: open}
spec:
  tier: baseline
  rules: [{name: web, action: Allow, to: [{fqdn: "*.example.com"}]}]
"""


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        # An admin policy ordered before the stand-in still decides first...
        ("metrics.example.com", 443, ("allow", "rule_allow", "first")),
        # ...everything after its place is denied: names, single labels, IP literals, any port.
        ("www.example.com", 443, ("deny", "policy_invalid", "broken")),
        ("localhost", 8080, ("deny", "policy_invalid", "broken")),
        ("203.0.113.9", 22, ("deny", "policy_invalid", "broken")),
        ("[2001:db8::1]", 65535, ("deny", "policy_invalid", "broken")),
    ],
)
def test_the_stand_in_denies_everything_that_reaches_its_place(
    host: str, port: int, expected: tuple[str, str, str]
) -> None:
    broken = fail_closed_policy(
        PolicyKind.CLUSTER,
        {"tier": "admin", "priority": 10},
        name="broken",
        namespace="",
        issues=[ISSUE],
        origin=Origin(file="ClusterEgressPolicy broken", document=1),
    )
    engine = Engine.compile(
        [*load_text(POLICIES, file="p.yaml"), broken], default_action=Action.ALLOW, revision=1
    )
    destination = Destination(host=parse_host(host), port=port)
    for explain in (False, True):
        decision = engine.decide(POD, destination, explain=explain)
        assert (str(decision.action), str(decision.reason), decision.ruleset) == expected


def test_the_explanation_names_the_invalid_policy_and_its_first_issue() -> None:
    broken = stand_in(PolicyKind.NAMESPACED, {}, namespace="payments")
    engine = Engine.compile([broken], default_action=Action.ALLOW, revision=3)
    destination = Destination(host=parse_host("api.example.com"), port=443)
    decision = engine.decide(POD, destination, explain=True)
    text = render_explanation(POD, destination, decision)
    assert "payments/x" in text
    assert "the policy is invalid, so it denies until it is fixed (fail closed)" in text
    assert "spec.rules[0].to[0].fqdn" in text
    assert decision.rule == "fail-closed"
