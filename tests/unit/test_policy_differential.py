"""What is explained is what is enforced: over generated policy sets, workloads and destinations,
`decide` and `decide(..., explain=True)` give the same decision, the explanation's last step names
what decided, and a warmed engine (memo and selection cache full) answers as a fresh one does.

Policies are written as the YAML documents an operator writes and read by the real loader, from
small pools of names, labels, addresses and ports so that rules, subjects and tiers collide often.
The default run is short (`make test`); HYPOTHESIS_PROFILE=fuzz runs many more examples.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from proxy.control.policy_source import PolicyStore
from proxy.core.addresses import AddressGuard
from proxy.core.hosts import parse_host
from proxy.core.identity import UNKNOWN_WORKLOAD, Workload, WorkloadKind
from proxy.core.policy.engine import Decision, Engine, Outcome, Step, Verdict
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import API_VERSION, Action, Destination, Mode, Policy, Rule
from proxy.dataplane.router import Router
from proxy.errors import Reason
from proxy.explainer import explain_route
from tests.support.budget import budget
from tests.support.inprocess import FakeResolver

# Most of an example's time is the loader's pure-Python YAML parse (milliseconds a policy set),
# so `make test` runs few; the fuzz profile (as tests/fuzz/test_properties.py) runs many.


# --------------------------------------------------------------------------------------------
# Pools: few enough that generated rules, subjects and requests meet
# --------------------------------------------------------------------------------------------

NAMESPACES = ("payments", "web")
APPS = ("api", "worker")
TEAMS = ("pay", "core")
SERVICE_ACCOUNTS = ("default", "api")
OWNERS = (("Deployment", "api"), ("Deployment", "worker"), ("StatefulSet", "db"))
NAMES = ("example.com", "a.example.com", "b.a.example.com", "api.stripe.com", "x.corp.example")
SUFFIXES = ("example.com", "a.example.com", "stripe.com", "corp.example")
# Names no rule lists, next to listed ones: a label boundary (evilexample.com), an apex.
OTHER_NAMES = ("evilexample.com", "stripe.com", "deep.b.a.example.com", "nowhere.test")
CIDRS = ("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "192.0.2.0/24", "2001:db8::/32")
ADDRESSES = ("10.1.2.3", "10.1.9.9", "10.200.0.1", "192.0.2.7", "198.51.100.1", "2001:db8::1")
PORT_ITEMS: tuple[object, ...] = (
    443,
    80,
    8080,
    {"port": 8000, "endPort": 8100},
    {"port": 1, "endPort": 65535},  # spans more than the engine's port-set limit
)
PORTS = (443, 443, 80, 8080, 8050, 22)  # mostly the default ports a rule covers
PRIORITIES = (0, 10, 10, 500)  # repeated: priority ties are broken by name


# --------------------------------------------------------------------------------------------
# Policy documents
# --------------------------------------------------------------------------------------------


@st.composite
def destinations_to(draw: st.DrawFn, action: str) -> list[dict[str, str]]:
    fqdn = st.sampled_from(NAMES).map(lambda name: {"fqdn": name})
    wildcard = st.sampled_from(SUFFIXES).map(lambda suffix: {"fqdn": f"*.{suffix}"})
    cidr = st.sampled_from(CIDRS).map(lambda cidr: {"cidr": cidr})
    entries: list[dict[str, str]] = draw(
        st.lists(st.one_of(fqdn, wildcard, cidr), min_size=1, max_size=3)
    )
    if action == "Deny" and draw(st.booleans()):
        entries.append({"fqdn": "*.test"})  # a whole top-level domain: refused for Allow only
    return entries


@st.composite
def rules(draw: st.DrawFn, actions: tuple[str, ...]) -> list[dict[str, Any]]:
    found = []
    for index in range(draw(st.integers(min_value=1, max_value=3))):
        action = draw(st.sampled_from(actions))
        rule: dict[str, Any] = {
            "name": f"r{index}",
            "action": action,
            "to": draw(destinations_to(action)),
        }
        if draw(st.booleans()):
            rule["ports"] = draw(st.lists(st.sampled_from(PORT_ITEMS), min_size=1, max_size=3))
        found.append(rule)
    return found


def match_labels(key: str, values: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    return st.sampled_from(values).map(lambda value: {"matchLabels": {key: value}})


def match_expression(key: str, values: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    with_values = st.builds(
        lambda operator, chosen: {
            "matchExpressions": [{"key": key, "operator": operator, "values": chosen}]
        },
        st.sampled_from(("In", "NotIn")),
        st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True),
    )
    without = st.sampled_from(("Exists", "DoesNotExist")).map(
        lambda operator: {"matchExpressions": [{"key": key, "operator": operator}]}
    )
    return st.one_of(with_values, without)


@st.composite
def subjects(draw: st.DrawFn) -> dict[str, Any]:
    subject: dict[str, Any] = {}
    if draw(st.booleans()):
        subject["namespaceSelector"] = draw(
            st.one_of(
                match_labels("team", TEAMS),
                match_labels("kubernetes.io/metadata.name", NAMESPACES),
            )
        )
    if draw(st.booleans()):
        subject["podSelector"] = draw(
            st.one_of(match_labels("app", APPS), match_expression("app", APPS))
        )
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        subject["serviceAccounts"] = [draw(st.sampled_from(SERVICE_ACCOUNTS))]
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        kind, name = draw(st.sampled_from(OWNERS))
        subject["owners"] = [{"kind": kind, "name": name}]
    return subject


@st.composite
def cluster_policy(draw: st.DrawFn, index: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "tier": draw(st.sampled_from(("admin", "baseline"))),
        "priority": draw(st.sampled_from(PRIORITIES)),
        "mode": draw(st.sampled_from(("enforce", "enforce", "audit"))),
        "rules": draw(rules(("Allow", "Deny", "Pass"))),
    }
    if draw(st.booleans()):
        spec["subject"] = draw(subjects())  # omitted: every workload, unknown sources too
    return {
        "apiVersion": API_VERSION,
        "kind": "ClusterEgressPolicy",
        # Names sort against generation order, so (priority, name) order is not index order.
        "metadata": {"name": f"{draw(st.sampled_from('abc'))}-c{index}"},
        "spec": spec,
    }


@st.composite
def namespace_policy(draw: st.DrawFn, index: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "mode": draw(st.sampled_from(("enforce", "enforce", "audit"))),
        "rules": draw(rules(("Allow", "Deny"))),  # Pass is refused in an EgressPolicy
    }
    if draw(st.booleans()):
        spec["podSelector"] = draw(
            st.one_of(
                st.just({}),
                match_labels("app", APPS),
                match_expression("app", APPS),
                match_expression("tier", ("front", "back")),
            )
        )
    return {
        "apiVersion": API_VERSION,
        "kind": "EgressPolicy",
        "metadata": {
            "name": f"{draw(st.sampled_from('abc'))}-n{index}",
            "namespace": draw(st.sampled_from(NAMESPACES)),
        },
        "spec": spec,
    }


@st.composite
def policy_sets(draw: st.DrawFn) -> list[Policy]:
    documents = [
        draw(cluster_policy(index)) for index in range(draw(st.integers(min_value=0, max_value=4)))
    ]
    documents += [
        draw(namespace_policy(index))
        for index in range(draw(st.integers(min_value=0, max_value=3)))
    ]
    text = yaml.safe_dump_all(draw(st.permutations(documents)), sort_keys=False)
    return load_text(text, file="generated.yaml")


# --------------------------------------------------------------------------------------------
# Workloads and destinations
# --------------------------------------------------------------------------------------------


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    choice = draw(st.integers(min_value=0, max_value=5))
    if choice == 0:
        return UNKNOWN_WORKLOAD
    labels = {"app": draw(st.sampled_from(APPS))}
    if draw(st.booleans()):
        labels["tier"] = draw(st.sampled_from(("front", "back")))
    owner_kind, owner_name = draw(st.sampled_from(OWNERS))
    namespace = draw(st.sampled_from(NAMESPACES))
    return Workload(
        kind=WorkloadKind.STATIC if choice == 1 else WorkloadKind.POD,
        namespace=namespace,
        name=f"{labels['app']}-1",
        labels=labels,
        namespace_labels={"team": draw(st.sampled_from(TEAMS))} if draw(st.booleans()) else {},
        service_account=draw(st.sampled_from(SERVICE_ACCOUNTS)),
        owner_kind=owner_kind,
        owner_name=owner_name,
    )


@st.composite
def requests(draw: st.DrawFn) -> list[Destination]:
    """Destinations in families that differ only in port, or only in the resolved address of one
    name, so a decision memo keyed on too little would hand one member's answer to another."""
    found: list[Destination] = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        ports = draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=2, unique=True))
        if draw(st.integers(min_value=0, max_value=3)) == 0:  # an IP literal: its address only
            address = draw(st.sampled_from(ADDRESSES))
            host = parse_host(f"[{address}]" if ":" in address else address)
            found += [Destination(host=host, port=port, ip=host.ip) for port in ports]
            continue
        # Listed names twice as often as the others.
        host = parse_host(draw(st.sampled_from(NAMES + NAMES + OTHER_NAMES)))
        resolved = draw(st.lists(st.sampled_from(ADDRESSES), max_size=2, unique=True))
        found += [
            Destination(host=host, port=port, ip=ipaddress.ip_address(ip) if ip else None)
            for port in ports
            for ip in [None, *resolved]  # by name, then per resolved address
        ]
    return found


# --------------------------------------------------------------------------------------------
# What an explanation must say about the decision it explains
# --------------------------------------------------------------------------------------------

TIER_ORDER = {"admin": 0, "namespace": 1, "baseline": 2, "default": 3}
DEFAULT_OUTCOME = {Action.ALLOW: Outcome.ALLOW, Action.DENY: Outcome.DENY}


def assert_steps_explain(steps: list[Step], verdict: Verdict) -> None:
    """The last step names what decided; the steps walk the tiers in evaluation order."""
    assert steps, "an explanation has at least one step"
    ranks = [TIER_ORDER[step.tier] for step in steps]
    assert ranks == sorted(ranks), steps
    last = steps[-1]
    if verdict.reason in (Reason.DEFAULT_ALLOW, Reason.DEFAULT_DENY):
        assert (last.tier, last.ruleset, last.rule) == ("default", None, None)
        assert last.result == f"no tier decided -> default {verdict.action}"
    elif verdict.reason is Reason.NAMESPACE_ISOLATION:
        assert (last.tier, last.ruleset, last.rule) == ("namespace", verdict.ruleset, None)
        assert last.result == "selected and nothing matched -> deny (namespace isolation)"
    else:
        assert verdict.reason in (Reason.RULE_ALLOW, Reason.RULE_DENY)
        assert (last.tier, last.ruleset, last.rule) == (
            str(verdict.tier),
            verdict.ruleset,
            verdict.rule,
        )
        assert last.result.endswith(f"-> {verdict.action}"), last


def rule_matches(rule: Rule, destination: Destination) -> bool:
    """DESIGN section 3, Destinations, read literally: the reference the trace is checked by."""
    if not any(ports.start <= destination.port <= ports.end for ports in rule.ports):
        return False
    name = destination.host.name
    if destination.host.ip is None and (
        name in rule.fqdns or any(name.endswith("." + suffix) for suffix in rule.wildcard_suffixes)
    ):
        return True
    return destination.ip is not None and any(destination.ip in cidr for cidr in rule.cidrs)


def assert_explains(
    decision: Decision,
    policies: list[Policy],
    workload: Workload,
    destination: Destination,
    default: Action,
) -> None:
    enforced = [step for step in decision.steps if not step.shadow]
    shadowed = [step for step in decision.steps if step.shadow]
    assert_steps_explain(enforced, decision.verdict)
    # Each rule is one step of an evaluation: the deciding one is not listed twice.
    for steps in (enforced, shadowed):
        named = [(step.ruleset, step.rule) for step in steps if step.rule is not None]
        assert len(named) == len(set(named)), steps
    # The shadow evaluation runs (and is traced) exactly when an audit-mode policy selects.
    selecting = {policy.ruleset: policy for policy in policies if policy.selects(workload)}
    if any(policy.mode is Mode.AUDIT for policy in selecting.values()):
        assert_steps_explain(shadowed, decision.shadow or decision.verdict)
    else:
        assert shadowed == []
        assert decision.shadow is None
    # A step names only policies that select the workload (enforced steps only enforce-mode
    # ones), and what it says of their rules is so: checked by a matcher written from DESIGN.
    for step in decision.steps:
        if step.ruleset is None:
            continue
        assert step.ruleset in selecting, step
        policy = selecting[step.ruleset]
        assert step.shadow or policy.mode is Mode.ENFORCE, step
        matching = [rule.name for rule in policy.rules if rule_matches(rule, destination)]
        if step.result == "selects the workload; no rule matches":
            assert matching == [], step
        elif step.rule is not None and step.tier != "namespace":
            assert matching[:1] == [step.rule], step  # the first matching rule of its policy
        elif step.rule is not None:
            assert step.rule in matching, step
    if decision.verdict.reason in (Reason.DEFAULT_ALLOW, Reason.DEFAULT_DENY):
        assert decision.verdict.action == DEFAULT_OUTCOME[default]


# --------------------------------------------------------------------------------------------
# The properties
# --------------------------------------------------------------------------------------------


@budget(60)
@given(
    policy_sets(),
    st.sampled_from((Action.ALLOW, Action.DENY)),
    st.lists(workloads(), min_size=1, max_size=4),
    requests(),
)
def test_the_enforced_decision_is_the_explained_one(
    policies: list[Policy],
    default: Action,
    sources: list[Workload],
    requests: list[Destination],
) -> None:
    engine = Engine.compile(policies, default_action=default, revision=7)
    for workload in sources:
        for destination in requests:
            enforced = engine.decide(workload, destination)
            explained = engine.decide(workload, destination, explain=True)
            assert enforced.steps == ()
            assert explained.verdict == enforced.verdict
            assert explained.shadow == enforced.shadow
            assert explained.revision == enforced.revision == 7
            assert_explains(explained, policies, workload, destination, default)


@budget(30)
@given(
    policy_sets(),
    st.sampled_from((Action.ALLOW, Action.DENY)),
    st.lists(workloads(), min_size=1, max_size=4),
    requests(),
)
def test_a_warmed_engine_decides_as_a_fresh_one(
    policies: list[Policy],
    default: Action,
    sources: list[Workload],
    requests: list[Destination],
) -> None:
    warm = Engine.compile(policies, default_action=default, revision=1)
    pairs = [(workload, destination) for workload in sources for destination in requests]
    for workload, destination in pairs:  # fill the selection cache and the decision memo
        warm.decide(workload, destination)
    for workload, destination in reversed(pairs):
        fresh = Engine.compile(policies, default_action=default, revision=1)
        assert warm.decide(workload, destination) == fresh.decide(workload, destination)
        assert warm.decide(workload, destination, explain=True) == fresh.decide(
            workload, destination, explain=True
        )


@budget(30)
@given(
    policy_sets(),
    st.sampled_from((Action.ALLOW, Action.DENY)),
    st.lists(workloads(), min_size=1, max_size=3),
    requests(),
    st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=3, unique=True),
)
def test_the_routed_outcome_is_the_explained_one(
    policies: list[Policy],
    default: Action,
    sources: list[Workload],
    requests: list[Destination],
    answer: list[str],
) -> None:
    """The same through the Router, DNS answer and address guard included: the route the data
    plane enforces equals the one `explain --resolve` reports (proxy.explainer)."""
    store = PolicyStore()
    store.install(Engine.compile(policies, default_action=default, revision=3))
    addresses = tuple(ipaddress.ip_address(ip) for ip in answer)
    names = {d.host.name: addresses for d in requests if d.host.ip is None}
    router = Router(policy=store, resolver=FakeResolver(answers=dict(names)), guard=AddressGuard())
    identity = OneWorkload()

    async def compare() -> None:
        for workload in sources:
            identity.workload = workload
            for destination in requests:
                host, port = destination.host, destination.port
                enforced = await router.route(workload, host, port)
                explained = await router.route(workload, host, port, explain=True)
                assert explained.decision.verdict == enforced.decision.verdict
                assert explained.permitted == enforced.permitted
                assert [(c.ip, c.guarded) for c in explained.checks] == [
                    (c.ip, c.guarded) for c in enforced.checks
                ]
                assert explained.deciding.verdict == enforced.deciding.verdict
                refusal = enforced.refusal()
                url = f"https://{'[' + host.name + ']' if ':' in host.name else host.name}:{port}/"
                _, report = await explain_route(router, identity, source="192.0.2.1", url=url)
                assert report["route"]["permitted"] == [str(ip) for ip in enforced.permitted]
                assert report["route"]["reason"] == (None if refusal is None else refusal.reason)
                assert report["decision"]["action"] == str(enforced.decision.action)

    asyncio.run(compare())


class OneWorkload:
    """An identity lookup that maps every source to the workload under test."""

    workload: Workload = UNKNOWN_WORKLOAD

    def lookup(self, ip: object) -> Workload:
        return self.workload
