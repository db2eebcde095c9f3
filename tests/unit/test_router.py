"""The Router (decide, resolve, decide per address, guard -> Route) with a fake resolver.

A table of (policies, workload, destination, DNS answer) and the Route expected of it, then the
memo: replayed only while the policy revision, the workload and the DNS answer are the same.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest

from proxy.core.addresses import AddressClass, AddressGuard
from proxy.core.hosts import IPAddress, parse_host
from proxy.core.identity import UNKNOWN_WORKLOAD, Workload, WorkloadKind
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action
from proxy.dataplane.router import Route, Router
from proxy.errors import BadGateway, OutgateError, Reason
from tests.support.inprocess import FakeResolver

CLIENT = Workload(
    kind=WorkloadKind.POD, namespace="tests", name="client-1", labels={"app": "client"}
)
OTHER = Workload(kind=WorkloadKind.POD, namespace="tests", name="other-1", labels={"app": "other"})


def policy(*rules: str) -> str:
    body = "\n".join(f"    - {rule}" for rule in rules)
    return f"""
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {{name: tests, namespace: tests}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  rules:
{body}
"""


ALLOW_API = "{name: api, action: Allow, to: [{fqdn: api.example.com}]}"
ALLOW_WILD = "{name: wild, action: Allow, to: [{fqdn: '*.example.com'}]}"
DENY_NET = "{name: no-net, action: Deny, to: [{cidr: 203.0.113.0/24}]}"
ALLOW_INTERNAL = (
    "{name: internal, action: Allow, to: [{fqdn: db.corp.example}, {cidr: 10.20.0.0/16}]}"
)
ALLOW_VICTIM = "{name: victim, action: Allow, to: [{fqdn: victim.example}]}"
ALLOW_ANY_IP = "{name: any-ip, action: Allow, to: [{cidr: 0.0.0.0/0}]}"
ALLOW_TEN = "{name: ten, action: Allow, to: [{fqdn: svc.corp.example}, {cidr: 10.0.0.0/8}]}"


@dataclass
class Store:
    engine: Engine


def ips(*texts: str) -> tuple[IPAddress, ...]:
    return tuple(ipaddress.ip_address(t) for t in texts)


def engine(text: str, revision: int = 1) -> Engine:
    return Engine.compile(
        load_text(text, file="test.yaml"), default_action=Action.DENY, revision=revision
    )


def router_for(
    text: str, answers: dict[str, tuple[IPAddress, ...] | OutgateError], **guard: object
) -> tuple[Router, FakeResolver, Store]:
    resolver = FakeResolver(answers=dict(answers))
    store = Store(engine(text))
    return Router(policy=store, resolver=resolver, guard=AddressGuard(**guard)), resolver, store  # type: ignore[arg-type]


async def route(router: Router, target: str, port: int = 443, who: Workload = CLIENT) -> Route:
    return await router.route(who, parse_host(target), port)


@dataclass(frozen=True)
class Row:
    name: str
    rules: tuple[str, ...]
    target: str
    answer: tuple[IPAddress, ...] | OutgateError | None
    permitted: tuple[IPAddress, ...]
    refusal: Reason | None
    dropped: tuple[AddressClass, ...] = ()
    queried: bool = True
    who: Workload = CLIENT
    cluster: tuple[str, ...] = ()


TABLE = [
    Row("public answer", (ALLOW_API,), "api.example.com", ips("93.184.216.34"),
        ips("93.184.216.34"), None),
    Row("denied name: no DNS query", (ALLOW_API,), "pastebin.com", ips("93.184.216.34"),
        (), Reason.NAMESPACE_ISOLATION, queried=False),
    Row("unknown source: default deny, no query", (ALLOW_API,), "api.example.com",
        ips("93.184.216.34"), (), Reason.DEFAULT_DENY, queried=False, who=UNKNOWN_WORKLOAD),
    Row("private answer", (ALLOW_API,), "api.example.com", ips("10.0.0.5"),
        (), Reason.GUARDED_ADDRESS, (AddressClass.PRIVATE,)),
    Row("loopback answer", (ALLOW_API,), "api.example.com", ips("127.0.0.1"),
        (), Reason.GUARDED_ADDRESS, (AddressClass.LOOPBACK,)),
    Row("mixed answer keeps only the public address", (ALLOW_API,), "api.example.com",
        ips("169.254.169.254", "93.184.216.34", "fd00:ec2::254"), ips("93.184.216.34"), None,
        (AddressClass.METADATA, AddressClass.METADATA)),
    Row("IPv4-mapped IPv6 judged by the embedded address", (ALLOW_API,), "api.example.com",
        ips("::ffff:10.1.2.3"), (), Reason.GUARDED_ADDRESS, (AddressClass.PRIVATE,)),
    Row("CGNAT answer", (ALLOW_WILD,), "x.example.com", ips("100.64.0.9"),
        (), Reason.GUARDED_ADDRESS, (AddressClass.CGNAT,)),
    Row("cidr Deny catches a resolved address", (DENY_NET, ALLOW_API), "api.example.com",
        ips("203.0.113.7"), (), Reason.RULE_DENY),
    Row("cidr Deny drops one address of two", (DENY_NET, ALLOW_API), "api.example.com",
        ips("203.0.113.7", "93.184.216.34"), ips("93.184.216.34"), None),
    Row("the allowing rule's cidr opens its guarded block", (ALLOW_INTERNAL,),
        "db.corp.example", ips("10.20.1.1"), ips("10.20.1.1"), None),
    Row("the allowing rule's cidr opens only its block", (ALLOW_INTERNAL,),
        "db.corp.example", ips("10.30.1.1"), (), Reason.GUARDED_ADDRESS,
        (AddressClass.PRIVATE,)),
    Row("a rule for another name cannot open guarded space", (ALLOW_INTERNAL, ALLOW_VICTIM),
        "victim.example", ips("10.20.1.1"), (), Reason.GUARDED_ADDRESS,
        (AddressClass.PRIVATE,)),
    Row("a cluster range inside the rule's cidr stays closed", (ALLOW_TEN,),
        "svc.corp.example", ips("10.96.0.10", "10.1.0.1"), ips("10.1.0.1"), None,
        (AddressClass.CLUSTER,), cluster=("10.96.0.0/12",)),
    Row("IP literal: no DNS query", (ALLOW_ANY_IP,), "93.184.216.34", None,
        ips("93.184.216.34"), None, queried=False),
    Row("0.0.0.0/0 never opens metadata", (ALLOW_ANY_IP,), "169.254.169.254", None,
        (), Reason.GUARDED_ADDRESS, (AddressClass.METADATA,), queried=False),
    Row("IP literal denied by cidr", (DENY_NET, ALLOW_ANY_IP), "203.0.113.9", None,
        (), Reason.RULE_DENY, queried=False),
    Row("DNS failure is the route's refusal", (ALLOW_API,), "api.example.com",
        BadGateway("no such name", reason=Reason.DNS_NXDOMAIN), (), Reason.DNS_NXDOMAIN),
]  # fmt: skip


@pytest.mark.parametrize("row", TABLE, ids=[row.name for row in TABLE])
async def test_route_table(row: Row) -> None:
    answers = {} if row.answer is None else {parse_host(row.target).name: row.answer}
    router, resolver, _ = router_for(
        policy(*row.rules),
        answers,
        cluster_cidrs=[ipaddress.ip_network(c) for c in row.cluster],
    )
    got = await route(router, row.target, who=row.who)
    assert got.permitted == row.permitted
    refusal = got.refusal()
    assert (None if refusal is None else refusal.reason) == row.refusal
    assert tuple(check.guarded for check in got.dropped) == row.dropped
    assert bool(resolver.asked) == row.queried
    if row.permitted:
        assert got.allowed and got.deciding.allowed


async def test_cidr_deny_is_the_recorded_decision() -> None:
    router, _, _ = router_for(policy(DENY_NET, ALLOW_API), {"api.example.com": ips("203.0.113.7")})
    got = await route(router, "api.example.com")
    assert got.decision.allowed and got.decision.rule == "api"
    assert not got.deciding.allowed and got.deciding.rule == "no-net"


async def test_pinned_route_permits_one_address() -> None:
    answer = ips("93.184.216.34", "93.184.216.35")
    router, _, _ = router_for(policy(ALLOW_API), {"api.example.com": answer})
    got = await route(router, "api.example.com")
    assert got.pinned(answer[1]).permitted == answer[1:]
    with pytest.raises(ValueError):
        got.pinned(ipaddress.ip_address("10.0.0.1"))


# -- memo --------------------------------------------------------------------------------------


async def test_memo_replays_the_same_route_while_nothing_changed() -> None:
    router, resolver, _ = router_for(policy(ALLOW_API), {"api.example.com": ips("93.184.216.34")})
    first = await route(router, "api.example.com")
    again = await route(router, "api.example.com")
    assert again is first
    assert resolver.asked == ["api.example.com", "api.example.com"]  # DNS is asked every time


async def test_memo_is_invalidated_by_a_new_policy_revision() -> None:
    router, _, store = router_for(policy(ALLOW_API), {"api.example.com": ips("93.184.216.34")})
    assert (await route(router, "api.example.com")).allowed
    store.engine = engine(policy(ALLOW_WILD.replace("Allow", "Deny")), revision=2)
    after = await route(router, "api.example.com")
    assert not after.allowed
    assert after.decision.revision == 2 and after.decision.reason is Reason.RULE_DENY


async def test_memo_is_invalidated_by_a_new_dns_answer() -> None:
    router, resolver, _ = router_for(policy(ALLOW_API), {"api.example.com": ips("93.184.216.34")})
    assert (await route(router, "api.example.com")).permitted == ips("93.184.216.34")
    resolver.answers["api.example.com"] = ips("10.0.0.7")  # a rebinding answer
    rebound = await route(router, "api.example.com")
    assert rebound.permitted == ()
    assert rebound.refusal() is not None
    assert rebound.refusal().reason is Reason.GUARDED_ADDRESS  # type: ignore[union-attr]


async def test_memo_is_invalidated_by_a_new_workload_object() -> None:
    router, _, _ = router_for(policy(ALLOW_API), {"api.example.com": ips("93.184.216.34")})
    assert (await route(router, "api.example.com")).allowed
    # The informer replaced the pod (same name, new labels): the old answer must not be reused.
    relabelled = Workload(
        kind=WorkloadKind.POD, namespace="tests", name="client-1", labels={"app": "other"}
    )
    assert not (await route(router, "api.example.com", who=relabelled)).allowed
    assert not (await route(router, "api.example.com", who=OTHER)).allowed


async def test_explain_route_is_not_memoised_and_carries_steps() -> None:
    router, _, _ = router_for(policy(ALLOW_API), {"api.example.com": ips("93.184.216.34")})
    plain = await route(router, "api.example.com")
    explained = await router.route(CLIENT, parse_host("api.example.com"), 443, explain=True)
    assert explained is not plain and explained.decision.steps
    assert explained.permitted == plain.permitted
    assert explained.decision.verdict == plain.decision.verdict


async def test_recheck_keeps_the_route_until_the_policy_changes_and_asks_no_dns() -> None:
    router, resolver, store = router_for(
        policy(ALLOW_INTERNAL), {"db.corp.example": ips("10.20.1.1", "10.20.1.2")}
    )
    first = (await route(router, "db.corp.example")).pinned(ipaddress.ip_address("10.20.1.2"))
    assert router.recheck(first) is first
    asked = len(resolver.asked)
    # A new revision whose rule no longer names the guarded block: the pinned address is refused.
    store.engine = engine(
        policy(ALLOW_INTERNAL.replace("{cidr: 10.20.0.0/16}", "{cidr: 10.9.0.0/16}")), 2
    )
    again = router.recheck(first)
    assert again.permitted == () and again.refusal().reason is Reason.GUARDED_ADDRESS  # type: ignore[union-attr]
    assert [check.ip for check in again.checks] == [ipaddress.ip_address("10.20.1.2")]
    store.engine = engine(policy(DENY_NET), 3)
    assert router.recheck(first).refusal().reason is Reason.NAMESPACE_ISOLATION  # type: ignore[union-attr]
    assert len(resolver.asked) == asked
