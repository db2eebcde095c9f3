"""The policy engine: every evaluation step of DESIGN section 3, destinations, subjects, audit
mode, explain output, and a 10,000-rule compiled engine against a naive reference evaluator."""

from __future__ import annotations

import ipaddress
import json
import random
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from proxy.core.hosts import Host, normalize_name, parse_host
from proxy.core.identity import (
    MATCH_ALL,
    UNKNOWN_WORKLOAD,
    LabelRequirement,
    LabelSelector,
    SelectorOperator,
    Workload,
    WorkloadKind,
)
from proxy.core.policy.engine import SELECTION_CACHE_SIZE, Decision, Engine, Outcome, Verdict
from proxy.core.policy.explain import decision_as_dict, render_explanation
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import (
    Action,
    Destination,
    Inspect,
    Mode,
    Policy,
    PolicyKind,
    PortRange,
    Rule,
    Subject,
    Tier,
    TunnelProtocol,
)
from proxy.errors import Reason

# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def R(
    name: str,
    action: str = "Allow",
    *to: str,
    ports: Sequence[int | tuple[int, int]] | None = None,
    protocol: TunnelProtocol | None = None,
    inspect: Inspect | None = None,
) -> Rule:
    """`to` entries: "name", "*.suffix" or "cidr/len"."""
    extra: dict[str, Any] = {}
    if ports is not None:
        extra["ports"] = tuple(
            PortRange(start=p, end=p) if isinstance(p, int) else PortRange(start=p[0], end=p[1])
            for p in ports
        )
    return Rule(
        name=name,
        action=Action(action),
        fqdns=tuple(normalize_name(t) for t in to if "/" not in t and not t.startswith("*.")),
        wildcard_suffixes=tuple(normalize_name(t[2:]) for t in to if t.startswith("*.")),
        cidrs=tuple(ipaddress.ip_network(t) for t in to if "/" in t),
        protocol=protocol,
        inspect=inspect,
        **extra,
    )


def cluster(
    name: str,
    *rules: Rule,
    tier: Tier = Tier.ADMIN,
    priority: int = 500,
    subject: Subject | None = None,
    mode: Mode = Mode.ENFORCE,
) -> Policy:
    return Policy(
        kind=PolicyKind.CLUSTER,
        name=name,
        tier=tier,
        priority=priority,
        subject=subject,
        mode=mode,
        rules=rules,
    )


def egress(
    namespace: str,
    name: str,
    *rules: Rule,
    selector: LabelSelector = MATCH_ALL,
    mode: Mode = Mode.ENFORCE,
) -> Policy:
    return Policy(
        kind=PolicyKind.NAMESPACED,
        name=name,
        namespace=namespace,
        tier=Tier.NAMESPACE,
        pod_selector=selector,
        mode=mode,
        rules=rules,
    )


def labels(**pairs: str) -> LabelSelector:
    return LabelSelector(match_labels=tuple(sorted(pairs.items())))


def expr(key: str, operator: str, *values: str) -> LabelSelector:
    return LabelSelector(
        match_expressions=(
            LabelRequirement(key=key, operator=SelectorOperator(operator), values=values),
        )
    )


def pod(
    namespace: str = "payments",
    *,
    app: str = "api",
    extra: dict[str, str] | None = None,
    namespace_labels: dict[str, str] | None = None,
    service_account: str = "default",
    owner: tuple[str, str] = ("Deployment", "api"),
) -> Workload:
    return Workload(
        kind=WorkloadKind.POD,
        namespace=namespace,
        name=f"{app}-1",
        labels={"app": app, **(extra or {})},
        namespace_labels=namespace_labels or {},
        service_account=service_account,
        owner_kind=owner[0],
        owner_name=owner[1],
    )


def dest(host: str, port: int = 443, ip: str | None = None) -> Destination:
    return Destination(
        host=parse_host(host), port=port, ip=ipaddress.ip_address(ip) if ip is not None else None
    )


def outcome(decision: Decision | Verdict | None) -> tuple[str, str, str | None, str | None] | None:
    if decision is None:
        return None
    return (str(decision.action), str(decision.reason), decision.ruleset, decision.rule)


# --------------------------------------------------------------------------------------------
# The tiers, step by step
# --------------------------------------------------------------------------------------------

TIERED_POLICIES = [
    # 1. Admin tier: by (priority, name), rules in order.
    cluster(
        "a-first",
        R("deny-blocked", "Deny", "blocked.example"),
        R("allow-blocked", "Allow", "blocked.example"),
        priority=10,
    ),
    cluster("z-early", R("allow-order", "Allow", "order.example"), priority=5),
    cluster("a-late", R("deny-order", "Deny", "order.example"), priority=50),
    cluster("b-tie", R("deny-tie", "Deny", "tie.example"), priority=20),
    cluster("a-tie", R("allow-tie", "Allow", "tie.example"), priority=20),
    cluster("pass-corp", R("corp-to-namespace", "Pass", "*.corp.example"), priority=30),
    # 2. Namespace tier.
    egress(
        "payments",
        "api",
        R("stripe", "Allow", "api.stripe.com", ports=[443]),
        R("corp", "Allow", "*.corp.example"),
        selector=labels(app="api"),
    ),
    egress(
        "payments", "deny-legacy", R("legacy", "Deny", "legacy.corp.example"), selector=MATCH_ALL
    ),
    # 3. Baseline tier.
    cluster("b-pass", R("skip-to-default", "Pass", "skip.example"), tier=Tier.BASELINE, priority=1),
    cluster("b-allow", R("skip-allowed", "Allow", "skip.example"), tier=Tier.BASELINE, priority=2),
    cluster(
        "os-updates", R("debian", "Allow", "deb.debian.org", "*.corp.example"), tier=Tier.BASELINE
    ),
]

API, WORKER, FREE = pod(app="api"), pod(app="worker"), pod("free", app="web")

TIER_CASES: list[tuple[str, Workload, Destination, tuple[str, str, str | None, str | None]]] = [
    (
        "admin: the first matching rule in a policy decides",
        API,
        dest("blocked.example"),
        ("deny", "rule_deny", "a-first", "deny-blocked"),
    ),
    (
        "admin: lower priority number first, whatever the name",
        API,
        dest("order.example"),
        ("allow", "rule_allow", "z-early", "allow-order"),
    ),
    (
        "admin: equal priority is ordered by name",
        API,
        dest("tie.example"),
        ("allow", "rule_allow", "a-tie", "allow-tie"),
    ),
    (
        "admin Pass falls to the namespace tier, which allows",
        API,
        dest("x.corp.example"),
        ("allow", "rule_allow", "payments/api", "corp"),
    ),
    (
        "namespace: a matching Deny wins over a matching Allow",
        API,
        dest("legacy.corp.example"),
        ("deny", "rule_deny", "payments/deny-legacy", "legacy"),
    ),
    (
        "namespace: an allow in the selecting policy",
        API,
        dest("api.stripe.com"),
        ("allow", "rule_allow", "payments/api", "stripe"),
    ),
    (
        "namespace isolation: selected, port does not match",
        API,
        dest("api.stripe.com", 80),
        ("deny", "namespace_isolation", "payments/api", None),
    ),
    (
        "namespace isolation is decided before the baseline tier",
        WORKER,
        dest("deb.debian.org"),
        ("deny", "namespace_isolation", "payments/deny-legacy", None),
    ),
    (
        "baseline applies when no EgressPolicy selects the workload",
        FREE,
        dest("deb.debian.org"),
        ("allow", "rule_allow", "os-updates", "debian"),
    ),
    (
        "admin Pass with no namespace policy continues to baseline",
        FREE,
        dest("x.corp.example"),
        ("allow", "rule_allow", "os-updates", "debian"),
    ),
    (
        "baseline Pass goes to the default action, skipping later baseline rules",
        FREE,
        dest("skip.example"),
        ("deny", "default_deny", None, None),
    ),
    (
        "default deny when no tier decides",
        FREE,
        dest("nothing.example"),
        ("deny", "default_deny", None, None),
    ),
    (
        "an unknown source is decided by subject-less policies",
        UNKNOWN_WORKLOAD,
        dest("blocked.example"),
        ("deny", "rule_deny", "a-first", "deny-blocked"),
    ),
    (
        "an unknown source reaches the subject-less baseline",
        UNKNOWN_WORKLOAD,
        dest("deb.debian.org"),
        ("allow", "rule_allow", "os-updates", "debian"),
    ),
    (
        "an unknown source is never isolated by a namespace",
        UNKNOWN_WORKLOAD,
        dest("api.stripe.com"),
        ("deny", "default_deny", None, None),
    ),
]


@pytest.mark.parametrize(
    ("case", "workload", "destination", "expected"), TIER_CASES, ids=[c[0] for c in TIER_CASES]
)
def test_evaluation_follows_the_design_steps(
    case: str,
    workload: Workload,
    destination: Destination,
    expected: tuple[str, str, str | None, str | None],
) -> None:
    engine = Engine.compile(TIERED_POLICIES, default_action=Action.DENY, revision=3)
    decision = engine.decide(workload, destination)
    assert outcome(decision) == expected
    assert decision.revision == 3
    assert decision.shadow is None
    assert decision.steps == ()


def test_default_allow_when_configured_carries_no_rule_and_no_protocol() -> None:
    engine = Engine.compile(TIERED_POLICIES, default_action=Action.ALLOW, revision=1)
    decision = engine.decide(FREE, dest("nothing.example"))
    assert outcome(decision) == ("allow", "default_allow", None, None)
    assert decision.allowed_cidrs == ()
    assert decision.protocol is None  # TLS or plain HTTP, as a rule without protocol
    assert decision.tier is None


def test_an_empty_policy_set_decides_the_default() -> None:
    engine = Engine.compile([], default_action=Action.DENY, revision=0)
    assert engine.rule_count == 0
    assert engine.decide(API, dest("a.example")).reason is Reason.DEFAULT_DENY


def test_pass_as_the_default_action_is_refused() -> None:
    with pytest.raises(ValueError, match="Allow or Deny"):
        Engine.compile([], default_action=Action.PASS, revision=0)


def test_duplicate_policies_are_refused_at_compile() -> None:
    policy = cluster("same", R("r", "Allow", "a.example"))
    with pytest.raises(ValueError, match="duplicate"):
        Engine.compile([policy, policy], default_action=Action.DENY, revision=0)


def test_engine_exposes_revision_rule_count_and_policies_in_evaluation_order() -> None:
    engine = Engine.compile(TIERED_POLICIES, default_action=Action.DENY, revision=9)
    assert engine.revision == 9
    assert engine.rule_count == sum(len(p.rules) for p in TIERED_POLICIES)
    assert [p.ruleset for p in engine.policies] == [
        "z-early",
        "a-first",
        "a-tie",
        "b-tie",
        "pass-corp",
        "a-late",
        "payments/api",
        "payments/deny-legacy",
        "b-pass",
        "b-allow",
        "os-updates",
    ]


# --------------------------------------------------------------------------------------------
# Subjects
# --------------------------------------------------------------------------------------------

PAYMENTS_NS = {"team": "payments"}
SUBJECT_CASES: list[tuple[str, Subject | None, Workload, bool]] = [
    ("no subject selects a pod", None, pod(), True),
    ("no subject selects an unknown source", None, UNKNOWN_WORKLOAD, True),
    ("an empty subject selects a pod", Subject(), pod(), True),
    ("a present subject never selects an unknown source", Subject(), UNKNOWN_WORKLOAD, False),
    (
        "namespaceSelector on namespace labels",
        Subject(namespace_selector=labels(team="payments")),
        pod(namespace_labels=PAYMENTS_NS),
        True,
    ),
    (
        "namespaceSelector misses another team",
        Subject(namespace_selector=labels(team="payments")),
        pod(namespace_labels={"team": "web"}),
        False,
    ),
    (
        "namespaceSelector by kubernetes.io/metadata.name",
        Subject(namespace_selector=labels(**{"kubernetes.io/metadata.name": "payments"})),
        pod(),
        True,
    ),
    ("podSelector matchLabels", Subject(pod_selector=labels(app="api")), pod(app="api"), True),
    (
        "podSelector matchLabels misses",
        Subject(pod_selector=labels(app="api")),
        pod(app="db"),
        False,
    ),
    ("podSelector In", Subject(pod_selector=expr("app", "In", "api", "web")), pod(app="web"), True),
    (
        "podSelector NotIn matches an absent key",
        Subject(pod_selector=expr("track", "NotIn", "canary")),
        pod(),
        True,
    ),
    (
        "podSelector NotIn misses the value",
        Subject(pod_selector=expr("track", "NotIn", "canary")),
        pod(extra={"track": "canary"}),
        False,
    ),
    (
        "podSelector Exists",
        Subject(pod_selector=expr("track", "Exists")),
        pod(extra={"track": "x"}),
        True,
    ),
    (
        "podSelector DoesNotExist misses",
        Subject(pod_selector=expr("track", "DoesNotExist")),
        pod(extra={"track": "x"}),
        False,
    ),
    (
        "serviceAccounts contains it",
        Subject(service_accounts=("api", "batch")),
        pod(service_account="api"),
        True,
    ),
    (
        "serviceAccounts does not",
        Subject(service_accounts=("batch",)),
        pod(service_account="api"),
        False,
    ),
    ("owners contains it", Subject(owners=(("Deployment", "api"),)), pod(), True),
    ("owners: kind must match too", Subject(owners=(("StatefulSet", "api"),)), pod(), False),
    (
        "every present part must match (one misses)",
        Subject(
            namespace_selector=labels(team="payments"),
            pod_selector=labels(app="api"),
            service_accounts=("x",),
        ),
        pod(namespace_labels=PAYMENTS_NS),
        False,
    ),
    (
        "every present part matches",
        Subject(
            namespace_selector=labels(team="payments"),
            pod_selector=labels(app="api"),
            service_accounts=("default",),
            owners=(("Deployment", "api"),),
        ),
        pod(namespace_labels=PAYMENTS_NS),
        True,
    ),
]


@pytest.mark.parametrize(
    ("case", "subject", "workload", "selected"), SUBJECT_CASES, ids=[c[0] for c in SUBJECT_CASES]
)
def test_cluster_policy_subject_selection(
    case: str, subject: Subject | None, workload: Workload, selected: bool
) -> None:
    engine = Engine.compile(
        [cluster("subject", R("allow", "Allow", "s.example"), subject=subject)],
        default_action=Action.DENY,
        revision=1,
    )
    decision = engine.decide(workload, dest("s.example"))
    assert decision.allowed is selected
    assert decision.reason is (Reason.RULE_ALLOW if selected else Reason.DEFAULT_DENY)


def test_static_workloads_are_selected_by_namespaced_policies_of_their_virtual_namespace() -> None:
    static = Workload(
        kind=WorkloadKind.STATIC, namespace="legacy", name="vm", labels={"app": "billing"}
    )
    engine = Engine.compile(
        [egress("legacy", "vms", R("ok", "Allow", "a.example"), selector=labels(app="billing"))],
        default_action=Action.DENY,
        revision=1,
    )
    assert outcome(engine.decide(static, dest("a.example"))) == (
        "allow",
        "rule_allow",
        "legacy/vms",
        "ok",
    )
    assert engine.decide(static, dest("b.example")).reason is Reason.NAMESPACE_ISOLATION


def test_egress_policies_select_only_pods_of_their_own_namespace() -> None:
    engine = Engine.compile(
        [egress("payments", "all", R("ok", "Allow", "a.example"))],
        default_action=Action.DENY,
        revision=1,
    )
    assert engine.decide(pod("payments"), dest("b.example")).reason is Reason.NAMESPACE_ISOLATION
    assert engine.decide(pod("other"), dest("a.example")).reason is Reason.DEFAULT_DENY


def test_selection_cache_is_bounded_and_answers_stay_right_after_eviction() -> None:
    engine = Engine.compile(
        [
            cluster(
                "even",
                R("ok", "Allow", "a.example"),
                subject=Subject(pod_selector=labels(parity="even")),
            )
        ],
        default_action=Action.DENY,
        revision=1,
    )
    for round_ in range(2):
        for index in range(SELECTION_CACHE_SIZE + 50):
            parity = "even" if index % 2 == 0 else "odd"
            workload = pod(extra={"parity": parity, "n": str(index)})
            assert engine.decide(workload, dest("a.example")).allowed is (parity == "even"), (
                round_,
                index,
            )
    assert len(engine._cache) == SELECTION_CACHE_SIZE


# --------------------------------------------------------------------------------------------
# Destinations: names, wildcards, CIDRs, ports
# --------------------------------------------------------------------------------------------

DESTINATION_POLICY = cluster(
    "destinations",
    R("exact", "Allow", "api.example.com"),
    R("wild", "Allow", "*.stripe.com"),
    R("idn", "Allow", "Bücher.Example."),
    R("net", "Allow", "10.20.0.0/16", "2001:db8::/32", ports=[5432]),
    R("ranged", "Allow", "ranged.example", ports=[(8000, 8100)]),
)
DESTINATION_CASES: list[tuple[str, Destination, str | None]] = [
    ("exact name", dest("api.example.com"), "exact"),
    ("exact name does not cover a subdomain", dest("x.api.example.com"), None),
    ("case and trailing dot are normalised", dest("API.Example.COM."), "exact"),
    (
        "a hand-built Host is normalised too",
        Destination(host=Host(name="API.EXAMPLE.com."), port=443),
        "exact",
    ),
    ("wildcard one level", dest("api.stripe.com"), "wild"),
    ("wildcard any depth", dest("a.b.c.stripe.com"), "wild"),
    ("wildcard never the apex", dest("stripe.com"), None),
    ("wildcard no partial label (evilstripe.com)", dest("evilstripe.com"), None),
    ("wildcard not as a prefix (stripe.com.evil.net)", dest("stripe.com.evil.net"), None),
    ("IDN request in Unicode and upper case", dest("BÜCHER.example"), "idn"),
    ("IDN request in punycode", dest("xn--bcher-kva.example"), "idn"),
    ("cidr: IPv4 literal", dest("10.20.3.4", 5432), "net"),
    ("cidr: IPv6 literal", dest("[2001:db8::7]", 5432), "net"),
    ("cidr: IPv4-mapped IPv6 literal is judged as IPv4", dest("[::ffff:10.20.3.4]", 5432), "net"),
    (
        "cidr: a name with a resolved address inside",
        dest("ledger.internal", 5432, ip="10.20.9.9"),
        "net",
    ),
    ("cidr: a name before resolution", dest("ledger.internal", 5432), None),
    ("cidr: address outside", dest("10.21.0.1", 5432), None),
    ("cidr: wrong port", dest("10.20.3.4", 443), None),
    ("default ports: 80", dest("api.example.com", 80), "exact"),
    ("default ports: 443", dest("api.example.com", 443), "exact"),
    ("default ports: not 8443", dest("api.example.com", 8443), None),
    ("range start", dest("ranged.example", 8000), "ranged"),
    ("range end", dest("ranged.example", 8100), "ranged"),
    ("past the range", dest("ranged.example", 8101), None),
]


@pytest.mark.parametrize(
    ("case", "destination", "rule"), DESTINATION_CASES, ids=[c[0] for c in DESTINATION_CASES]
)
def test_destination_matching(case: str, destination: Destination, rule: str | None) -> None:
    engine = Engine.compile([DESTINATION_POLICY], default_action=Action.DENY, revision=1)
    decision = engine.decide(pod(), destination)
    assert decision.rule == rule
    assert DESTINATION_POLICY.rules[0].matches(destination) is (
        rule == "exact"
    )  # the reference agrees


def test_fqdn_entries_never_match_an_ip_literal() -> None:
    rule = Rule(name="odd", action=Action.ALLOW, fqdns=("192.0.2.1",))  # the loader refuses this
    engine = Engine.compile([cluster("p", rule)], default_action=Action.DENY, revision=1)
    assert engine.decide(pod(), dest("192.0.2.1")).reason is Reason.DEFAULT_DENY


def test_names_in_loaded_rules_and_requests_meet_in_one_form() -> None:
    (policy,) = load_text(
        "apiVersion: outgate.dev/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {name: p}\n"
        "spec:\n  tier: admin\n  rules:\n"
        "    - name: r\n      action: Allow\n"
        '      to: [{fqdn: "MÜNCHEN.Example."}, {fqdn: "*.Ünï.EXAMPLE"}]\n',
        file="p.yaml",
    )
    engine = Engine.compile([policy], default_action=Action.DENY, revision=1)
    for host in (
        "münchen.example",
        "xn--mnchen-3ya.example",
        "MÜNCHEN.EXAMPLE.",
        "a.ünï.example",
        "A.XN--N-NGA1B.example",
    ):
        assert engine.decide(pod(), dest(host)).rule == "r", host


def test_an_allow_carries_its_rules_cidrs_protocol_and_inspect() -> None:
    inspect = Inspect(methods=("GET",), paths=("/v2/*",), dlp=("private-key",))
    engine = Engine.compile(
        [
            cluster(
                "p",
                R(
                    "db",
                    "Allow",
                    "db.corp.example",
                    "10.20.0.0/16",
                    ports=[5432],
                    protocol=TunnelProtocol.POSTGRES,
                ),
                R("partner", "Allow", "partner.example", inspect=inspect),
                R("no", "Deny", "10.30.0.0/16"),
            )
        ],
        default_action=Action.DENY,
        revision=1,
    )
    db = engine.decide(pod(), dest("db.corp.example", 5432))
    assert db.allowed_cidrs == (ipaddress.ip_network("10.20.0.0/16"),)
    assert db.protocol is TunnelProtocol.POSTGRES
    assert (db.tier, db.mode) == (Tier.ADMIN, Mode.ENFORCE)
    partner = engine.decide(pod(), dest("partner.example"))
    assert partner.inspect == inspect
    assert partner.protocol is None  # not written: an inspected tunnel is TLS
    denied = engine.decide(pod(), dest("10.30.0.1"))
    assert (denied.allowed_cidrs, denied.protocol, denied.inspect) == ((), None, None)


# --------------------------------------------------------------------------------------------
# Audit mode
# --------------------------------------------------------------------------------------------


def test_audit_policy_never_changes_the_decision_but_gives_a_shadow() -> None:
    engine = Engine.compile(
        [
            cluster("trial-deny", R("no-stripe", "Deny", "api.stripe.com"), mode=Mode.AUDIT),
            egress("payments", "api", R("stripe", "Allow", "api.stripe.com")),
        ],
        default_action=Action.DENY,
        revision=1,
    )
    decision = engine.decide(pod(), dest("api.stripe.com"))
    assert outcome(decision) == ("allow", "rule_allow", "payments/api", "stripe")
    assert outcome(decision.shadow) == ("deny", "rule_deny", "trial-deny", "no-stripe")
    assert decision.shadow is not None and decision.shadow.mode is Mode.AUDIT


def test_shadow_is_absent_when_audit_policies_would_decide_the_same() -> None:
    engine = Engine.compile(
        [
            cluster("trial", R("other", "Deny", "other.example"), mode=Mode.AUDIT),
            cluster("live", R("stripe", "Allow", "api.stripe.com")),
        ],
        default_action=Action.DENY,
        revision=1,
    )
    assert engine.decide(pod(), dest("api.stripe.com")).shadow is None
    assert engine.decide(pod(), dest("other.example")).shadow is not None


def test_shadow_is_kept_when_only_the_deciding_rule_differs() -> None:
    engine = Engine.compile(
        [
            cluster("trial", R("same-action", "Allow", "api.stripe.com"), mode=Mode.AUDIT),
            cluster("live", R("stripe", "Allow", "api.stripe.com"), tier=Tier.BASELINE),
        ],
        default_action=Action.DENY,
        revision=1,
    )
    decision = engine.decide(pod(), dest("api.stripe.com"))
    assert outcome(decision) == ("allow", "rule_allow", "live", "stripe")
    assert outcome(decision.shadow) == ("allow", "rule_allow", "trial", "same-action")


def test_an_audit_egress_policy_does_not_isolate_but_its_shadow_does() -> None:
    engine = Engine.compile(
        [
            egress(
                "payments", "trial", R("only-stripe", "Allow", "api.stripe.com"), mode=Mode.AUDIT
            ),
            cluster("base", R("debian", "Allow", "deb.debian.org"), tier=Tier.BASELINE),
        ],
        default_action=Action.DENY,
        revision=1,
    )
    decision = engine.decide(pod(), dest("deb.debian.org"))
    assert outcome(decision) == ("allow", "rule_allow", "base", "debian")
    assert outcome(decision.shadow) == ("deny", "namespace_isolation", "payments/trial", None)


# --------------------------------------------------------------------------------------------
# Explain
# --------------------------------------------------------------------------------------------


def test_explain_lists_every_step_of_the_enforced_and_the_shadow_evaluation() -> None:
    engine = Engine.compile(
        [
            *TIERED_POLICIES,
            cluster("trial", R("no-stripe", "Deny", "api.stripe.com"), mode=Mode.AUDIT),
        ],
        default_action=Action.DENY,
        revision=4,
    )
    decision = engine.decide(API, dest("api.stripe.com"), explain=True)
    enforced = [(s.tier, s.ruleset, s.rule, s.result) for s in decision.steps if not s.shadow]
    assert enforced == [
        ("admin", "z-early", None, "selects the workload; no rule matches"),
        ("admin", "a-first", None, "selects the workload; no rule matches"),
        ("admin", "a-tie", None, "selects the workload; no rule matches"),
        ("admin", "b-tie", None, "selects the workload; no rule matches"),
        ("admin", "pass-corp", None, "selects the workload; no rule matches"),
        ("admin", "a-late", None, "selects the workload; no rule matches"),
        # The deciding rule once, as the conclusion (issue 14, defect 6).
        ("namespace", "payments/deny-legacy", None, "selects the workload; no rule matches"),
        ("namespace", "payments/api", "stripe", "Allow -> allow"),
    ]
    shadow = [(s.tier, s.ruleset, s.rule, s.result) for s in decision.steps if s.shadow]
    assert ("admin", "trial", "no-stripe", "Deny matches -> deny") in shadow

    text = render_explanation(API, dest("api.stripe.com"), decision)
    assert "workload:    payments/Deployment/api (pod api-1) serviceAccount=default" in text
    assert "destination: api.stripe.com:443" in text
    assert "policy revision: 4" in text
    assert "decision:    allow (rule_allow) by payments/api rule stripe" in text
    assert "shadow:      deny (rule_deny) by trial rule no-stripe" in text

    data = decision_as_dict(API, dest("api.stripe.com"), decision)
    assert json.loads(json.dumps(data)) == data
    assert data["decision"] == {
        "action": "allow",
        "reason": "rule_allow",
        "rule": "stripe",
        "ruleset": "payments/api",
        "tier": "namespace",
        "mode": "enforce",
        "allowedCidrs": [],
        "protocol": None,  # the rule names none: TLS or plain HTTP
        "inspect": None,
    }
    assert isinstance(data["shadow"], dict) and data["shadow"]["action"] == "deny"


def test_a_forwarded_request_is_explained_without_the_tunnel_protocol() -> None:
    """`protocol` holds a CONNECT tunnel; a forwarded http:// request is not held to it, so its
    explanation does not show it (issue 14, defect 6). `inspect` holds both."""
    engine = Engine.compile(TIERED_POLICIES, default_action=Action.DENY, revision=1)
    decision = engine.decide(API, dest("api.stripe.com"), explain=True)
    forward = decision_as_dict(API, dest("api.stripe.com"), decision, tunnel=False)
    tunnel = decision_as_dict(API, dest("api.stripe.com"), decision, tunnel=True)
    assert (forward["connection"], tunnel["connection"]) == ("forward", "tunnel")
    assert isinstance(forward["decision"], dict) and isinstance(tunnel["decision"], dict)
    # The rule names no protocol: a tunnel takes TLS or plain HTTP, a forward is not held.
    assert (forward["decision"]["protocol"], tunnel["decision"]["protocol"]) == (None, None)
    text = render_explanation(API, dest("api.stripe.com"), decision, tunnel=False)
    assert "protocol" not in text


def test_explain_records_pass_isolation_and_default() -> None:
    engine = Engine.compile(TIERED_POLICIES, default_action=Action.DENY, revision=1)
    corp = engine.decide(API, dest("x.corp.example"), explain=True)
    assert ("admin", "pass-corp", "corp-to-namespace", "Pass matches -> namespace tier") in [
        (s.tier, s.ruleset, s.rule, s.result) for s in corp.steps
    ]
    isolated = engine.decide(WORKER, dest("nowhere.example"), explain=True)
    assert isolated.steps[-1].result == "selected and nothing matched -> deny (namespace isolation)"
    default = engine.decide(FREE, dest("nowhere.example"), explain=True)
    assert (default.steps[-1].tier, default.steps[-1].result) == (
        "default",
        "no tier decided -> default deny",
    )
    assert "no policy selects the workload" in [
        s.result for s in default.steps if s.tier == "namespace"
    ]
    unknown = render_explanation(UNKNOWN_WORKLOAD, dest("nowhere.example"), default)
    assert "unknown source" in unknown


# --------------------------------------------------------------------------------------------
# 10,000 rules: the compiled engine against a naive reference evaluator
# --------------------------------------------------------------------------------------------

Outcome4 = tuple[str, str, str | None, str | None]


def _reference_selects(policy: Policy, workload: Workload) -> bool:
    if policy.kind is PolicyKind.NAMESPACED:
        return (
            workload.kind is not WorkloadKind.UNKNOWN
            and workload.namespace == policy.namespace
            and policy.pod_selector.matches(workload.labels)
        )
    subject = policy.subject
    if subject is None:
        return True
    if workload.kind is WorkloadKind.UNKNOWN:
        return False
    return (
        subject.namespace_selector.matches(workload.namespace_labels)
        and subject.pod_selector.matches(workload.labels)
        and (not subject.service_accounts or workload.service_account in subject.service_accounts)
        and (not subject.owners or (workload.owner_kind, workload.owner_name) in subject.owners)
    )


def _reference_matches(rule: Rule, destination: Destination) -> bool:
    if not any(r.start <= destination.port <= r.end for r in rule.ports):
        return False
    if destination.host.ip is None:
        name = destination.host.name
        if name in rule.fqdns:
            return True
        for suffix in rule.wildcard_suffixes:
            if name.endswith("." + suffix):
                return True
    return destination.ip is not None and any(destination.ip in cidr for cidr in rule.cidrs)


def _reference(
    policies: list[Policy],
    default: Action,
    workload: Workload,
    destination: Destination,
    *,
    audit: bool,
) -> Outcome4:
    live = [
        p for p in policies if (audit or p.mode is Mode.ENFORCE) and _reference_selects(p, workload)
    ]

    def ordered_tier(tier: Tier) -> Outcome4 | str | None:
        for policy in sorted(
            (p for p in live if p.tier is tier), key=lambda p: (p.priority, p.name)
        ):
            for rule in policy.rules:
                if _reference_matches(rule, destination):
                    if rule.action is Action.PASS:
                        return "pass"
                    verdict = "allow" if rule.action is Action.ALLOW else "deny"
                    return (verdict, f"rule_{verdict}", policy.ruleset, rule.name)
        return None

    admin = ordered_tier(Tier.ADMIN)
    if isinstance(admin, tuple):
        return admin
    namespace = sorted((p for p in live if p.tier is Tier.NAMESPACE), key=lambda p: p.name)
    matches = [(p, r) for p in namespace for r in p.rules if _reference_matches(r, destination)]
    for wanted in (Action.DENY, Action.ALLOW):
        for policy, rule in matches:
            if rule.action is wanted:
                verdict = "allow" if wanted is Action.ALLOW else "deny"
                return (verdict, f"rule_{verdict}", policy.ruleset, rule.name)
    if namespace:
        return ("deny", "namespace_isolation", namespace[0].ruleset, None)
    baseline = ordered_tier(Tier.BASELINE)
    if isinstance(baseline, tuple):
        return baseline
    verdict = "allow" if default is Action.ALLOW else "deny"
    return (verdict, f"default_{verdict}", None, None)


def _random_policies(rng: random.Random, rule_total: int) -> list[Policy]:
    domains = [f"d{i}.example" for i in range(150)]
    teams = ["payments", "web", "data"]
    namespaces = ["payments", "web", "data", "batch"]
    apps = ["api", "worker", "db", "ui"]

    def target() -> str:
        kind = rng.random()
        if kind < 0.45:
            return rng.choice(["", "api.", "x.y."]) + rng.choice(domains)
        if kind < 0.75:
            return "*." + rng.choice(["", "api."]) + rng.choice(domains)
        prefix = rng.choice([8, 16, 24, 32])
        network = ipaddress.ip_network(
            f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(4)}/{prefix}", strict=False
        )
        return str(network)

    def ports() -> Sequence[int | tuple[int, int]] | None:
        return rng.choice([None, None, [443], [80], [(8000, 8100)], [22, 443]])

    def selector(pool: list[str], key: str) -> LabelSelector:
        choice = rng.random()
        if choice < 0.4:
            return MATCH_ALL
        if choice < 0.7:
            return labels(**{key: rng.choice(pool)})
        operator = rng.choice(["In", "NotIn", "Exists", "DoesNotExist"])
        values = tuple(rng.sample(pool, 2)) if operator in ("In", "NotIn") else ()
        return LabelSelector(
            match_expressions=(
                LabelRequirement(key=key, operator=SelectorOperator(operator), values=values),
            )
        )

    policies: list[Policy] = []
    made = 0
    index = 0
    while made < rule_total:
        count = min(rng.randint(1, 60), rule_total - made)
        namespaced = rng.random() < 0.4
        actions = ["Allow", "Deny"] if namespaced else ["Allow", "Deny", "Pass"]
        rules = tuple(
            R(
                f"r{n}",
                rng.choice(actions),
                *[target() for _ in range(rng.randint(1, 3))],
                ports=ports(),
            )
            for n in range(count)
        )
        mode = Mode.AUDIT if rng.random() < 0.15 else Mode.ENFORCE
        if namespaced:
            policies.append(
                egress(
                    rng.choice(namespaces),
                    f"p{index}",
                    *rules,
                    selector=selector(apps, "app"),
                    mode=mode,
                )
            )
        else:
            subject = rng.choice(
                [
                    None,
                    None,
                    Subject(namespace_selector=selector(teams, "team")),
                    Subject(
                        pod_selector=selector(apps, "app"),
                        service_accounts=rng.choice([(), ("sa1",)]),
                    ),
                    Subject(owners=(("Deployment", rng.choice(apps)),)),
                ]
            )
            policies.append(
                cluster(
                    f"p{index}",
                    *rules,
                    tier=rng.choice([Tier.ADMIN, Tier.BASELINE]),
                    priority=rng.choice([0, 10, 10, 500, 1000]),
                    subject=subject,
                    mode=mode,
                )
            )
        made += count
        index += 1
    return policies


def test_a_compiled_engine_with_10000_rules_decides_like_a_naive_reference() -> None:
    rng = random.Random(20240611)
    policies = _random_policies(rng, 10_000)
    assert sum(len(p.rules) for p in policies) == 10_000
    workloads = [UNKNOWN_WORKLOAD] + [
        pod(
            rng.choice(["payments", "web", "data", "batch", "none"]),
            app=rng.choice(["api", "worker", "db", "ui", "other"]),
            namespace_labels={"team": rng.choice(["payments", "web", "data"])},
            service_account=rng.choice(["sa1", "sa2"]),
            owner=("Deployment", rng.choice(["api", "worker", "db", "ui"])),
        )
        for _ in range(40)
    ]
    for default in (Action.DENY, Action.ALLOW):
        engine = Engine.compile(policies, default_action=default, revision=1)
        assert engine.rule_count == 10_000
        for _ in range(250):
            workload = rng.choice(workloads)
            choice = rng.random()
            port = rng.choice([80, 443, 8050, 22, 9999])
            if choice < 0.6:
                name = (
                    rng.choice(["", "api.", "x.y.", "deep.x.y."]) + f"d{rng.randrange(160)}.example"
                )
                ip = (
                    f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(256)}"
                    if rng.random() < 0.3
                    else None
                )
                destination = dest(name, port, ip=ip)
            else:
                destination = dest(
                    f"10.{rng.randrange(3)}.{rng.randrange(4)}.{rng.randrange(256)}", port
                )
            decision = engine.decide(workload, destination)
            expected = _reference(policies, default, workload, destination, audit=False)
            assert outcome(decision) == expected, (workload, destination)
            every = _reference(policies, default, workload, destination, audit=True)
            expected_shadow = (
                None
                if (every[0], every[2], every[3]) == (expected[0], expected[2], expected[3])
                else every
            )
            assert outcome(decision.shadow) == expected_shadow, (workload, destination)
            assert decision.action is Outcome(expected[0])


DIGEST_POLICIES = """
apiVersion: outgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: guard}
spec:
  tier: admin
  subject: {namespaceSelector: {matchLabels: {team: a, env: prod}}}
  rules:
    - {name: no-paste, action: Deny, to: [{fqdn: "*.pastebin.example"}]}
---
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In, values: [web, api, cron]}]}
  rules:
    - {name: api, action: Allow, to: [{fqdn: api.example.com}, {cidr: 10.0.0.0/8}], ports: [443]}
"""


def test_the_policy_digest_is_the_content_not_the_order_origin_or_revision() -> None:
    policies = load_text(DIGEST_POLICIES, file="/etc/outgate/policies/a.yaml")
    elsewhere = load_text(DIGEST_POLICIES, file="EgressPolicy shop/web")
    first = Engine.compile(policies, default_action=Action.DENY, revision=1)
    assert Engine.compile(reversed(elsewhere), default_action=Action.DENY, revision=9).digest == (
        first.digest
    )
    assert Engine.compile(policies, default_action=Action.ALLOW, revision=1).digest != first.digest
    edited = load_text(DIGEST_POLICIES.replace("ports: [443]", "ports: [8443]"), file="a.yaml")
    assert Engine.compile(edited, default_action=Action.DENY, revision=1).digest != first.digest
    assert len(first.digest) == 16 and int(first.digest, 16) >= 0


def test_the_policy_digest_is_the_same_in_every_process() -> None:
    """Replicas are separate processes with their own string-hash seeds: a digest that depended
    on set or dict order would differ between them."""
    script = (
        "from proxy.core.policy.loader import load_text\n"
        "from proxy.core.policy.engine import Engine\n"
        "from proxy.core.policy.model import Action\n"
        "import sys\n"
        "engine = Engine.compile(load_text(sys.stdin.read(), file='p.yaml'),"
        " default_action=Action.DENY, revision=1)\n"
        "print(engine.digest)\n"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            input=DIGEST_POLICIES,
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin:/bin"},
        ).stdout.strip()
        for seed in (1, 2, 3, 4)
    }
    assert len(digests) == 1, digests
