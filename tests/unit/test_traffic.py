"""The live traffic aggregate (proxy.traffic, issue 15): bounded memory whatever the traffic,
top destinations with an `other` row, a bounded metric label, and the same suggestion
`outgate suggest` makes from the audit records of the same exchanges."""

from __future__ import annotations

import gc
import json
import os
import tracemalloc
from pathlib import Path

from proxy import metrics
from proxy.adoption.suggest import SuggestOptions, suggest
from proxy.audit import AuditSink, Exchange
from proxy.core.hosts import parse_host
from proxy.core.identity import StaticIdentityIndex, Workload, WorkloadKind
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action, Destination
from proxy.dataplane.exchange_log import ExchangeLog
from proxy.errors import PolicyDenied, Reason
from proxy.traffic import (
    FIXED_BYTES,
    OTHER,
    OTHER_WORKLOADS_KEY,
    TrafficAggregate,
    workload_key,
)

POLICY = """
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  rules:
    - {name: example, action: Allow, to: [{fqdn: "*.example.com"}], ports: [443]}
---
apiVersion: outgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: trial}
spec:
  tier: admin
  mode: audit
  rules:
    - {name: no-beta, action: Deny, to: [{fqdn: beta.example.com}], ports: [443]}
"""
ENGINE = Engine.compile(load_text(POLICY, file="test"), default_action=Action.DENY, revision=1)


def pod(owner: str = "api", namespace: str = "shop") -> Workload:
    return Workload(
        kind=WorkloadKind.POD,
        namespace=namespace,
        name=f"{owner}-5c9d",
        labels={"app": owner},
        owner_kind="Deployment",
        owner_name=owner,
    )


API = pod()


def exchange(
    name: str, port: int = 443, workload: Workload = API, kind: str = "tunnel"
) -> Exchange:
    host = parse_host(name)
    ex = Exchange(kind=kind, source_ip="10.0.0.9", source_port=40000, workload=workload)
    ex.destination_domain, ex.destination_port = name, port
    ex.decision = ENGINE.decide(workload, Destination(host=host, port=port, ip=None))
    ex.reason = ex.decision.reason
    return ex


def feed(traffic: TrafficAggregate, ex: Exchange, *, sent: int = 0, received: int = 0) -> None:
    allowed = ex.decision is not None and ex.decision.allowed
    if allowed:
        ex.destination_ip = "93.184.216.34"
    else:
        ex.status = 403
    traffic.decided(ex, allowed=allowed)
    ex.source_bytes, ex.destination_bytes = sent, received
    traffic.closed(ex, Reason.COMPLETED)


def test_100000_distinct_names_from_one_workload_stay_within_the_documented_bound() -> None:
    traffic = TrafficAggregate(top=50)
    # Decided before measuring: the engine's own memo is not the aggregate's.
    decisions = [
        ENGINE.decide(API, Destination(host=parse_host(name), port=443, ip=None))
        for name in ("denied.test", "alpha.example.com")
    ]
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for number in range(100_000):
            # Long names (as a scanner or a DNS-tunnelling client sends): the bound holds for
            # names of any length the parser admits. Half allowed, half denied.
            name = f"n{number}-{'x' * 50}.{'y' * 60}.example.com"
            ex = Exchange(kind="tunnel", source_ip="10.0.0.9", source_port=1, workload=API)
            ex.destination_domain, ex.destination_port = name, 443
            ex.decision = decisions[number % 2]
            ex.reason = ex.decision.reason
            feed(traffic, ex, sent=100, received=1000)
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    (entry,) = traffic.workloads.values()
    assert len(entry.rows) <= 2 * traffic.top
    assert entry.requests == 100_000 and entry.denied == 50_000
    assert len(traffic.refusals) == 50  # the last refusals only
    held = sum(row.requests for row in entry.rows.values()) + entry.other.requests
    assert held == 100_000  # folded rows keep their counts in `other`
    assert entry.other.bytes_in + sum(r.bytes_in for r in entry.rows.values()) == 100_000_000
    grown = after - before
    bound = FIXED_BYTES + traffic.workload_bound_bytes()  # one workload's share, documented
    print(f"grown {grown} bytes for {len(entry.rows) + 1} rows; bound {bound}")
    assert grown <= bound, f"the aggregate grew by {grown} bytes, over its bound of {bound}"


def test_a_busy_destination_that_arrives_late_gets_its_own_row() -> None:
    traffic = TrafficAggregate(top=5)
    for number in range(10):
        feed(traffic, exchange(f"once{number}.example.com"))
    for _ in range(20):
        feed(traffic, exchange("late.example.com"))
    for number in range(10, 20):  # enough new names to fold twice
        feed(traffic, exchange(f"once{number}.example.com"))
    entry = traffic.workloads[workload_key(API)]
    assert len(entry.rows) <= 10
    shown = traffic.shown_rows(entry)
    assert shown[0].host == "late.example.com" and shown[0].allowed == 20
    assert shown[-1] is entry.other and entry.other.requests > 0
    assert sum(row.requests for row in entry.rows.values()) + entry.other.requests == 40


def test_denials_come_first_then_what_an_audit_mode_policy_would_deny() -> None:
    traffic = TrafficAggregate()
    for _ in range(5):
        feed(traffic, exchange("alpha.example.com"))
    for _ in range(3):
        feed(traffic, exchange("beta.example.com"))
    feed(traffic, exchange("gamma.example.com", port=80))
    entry = traffic.workloads[workload_key(API)]
    rows = traffic.shown_rows(entry)
    assert [row.host for row in rows] == [
        "gamma.example.com",
        "beta.example.com",
        "alpha.example.com",
    ]
    gamma, beta, alpha = rows
    assert gamma.denied == 1 and gamma.last_reason == "namespace_isolation"
    assert beta.would_be_denied and beta.shadow_rule == "trial/no-beta"
    assert beta.shadow_differences == 3 and traffic.shadow_differences == 3
    assert alpha.rule == "shop/api/example" and not alpha.would_be_denied
    assert traffic.allowed == 8 and traffic.denied == 1
    minute = traffic.minutes()[-1]
    assert (minute.allowed, minute.denied, minute.shadow_differences) == (8, 1, 3)
    assert len(traffic.minutes()) == 60 and sum(m.allowed for m in traffic.minutes()) == 8
    own = traffic.minutes(workload=entry)[-1]
    assert (own.allowed, own.denied, own.shadow_differences) == (8, 1, 3)
    assert traffic.minutes(workload=traffic.workloads[workload_key(API)])[-2].allowed == 0


def test_the_destination_label_is_bounded_per_workload() -> None:
    traffic = TrafficAggregate(metric_destinations=3)
    workload = pod("labels-bounded", namespace="metrics-test")
    for number in range(40):
        feed(traffic, exchange(f"d{number}.example.com", workload=workload), received=10)
    samples = [
        sample
        for family in metrics.DESTINATION_REQUESTS.collect()
        for sample in family.samples
        if sample.labels.get("workload") == "Deployment/labels-bounded"
    ]
    destinations = {sample.labels["destination"] for sample in samples}
    assert destinations == {"d0.example.com:443", "d1.example.com:443", "d2.example.com:443", OTHER}
    other = [s for s in samples if s.labels["destination"] == OTHER and s.name.endswith("_total")]
    assert sum(s.value for s in other) == 37


def test_workloads_past_the_cap_are_counted_together() -> None:
    traffic = TrafficAggregate(max_workloads=2)
    for owner in ("one", "two", "three", "four"):
        feed(traffic, exchange("alpha.example.com", workload=pod(owner)))
    assert set(traffic.workloads) == {
        workload_key(pod("one")),
        workload_key(pod("two")),
        OTHER_WORKLOADS_KEY,
    }
    assert traffic.workloads[OTHER_WORKLOADS_KEY].requests == 2
    assert traffic.suggestion(OTHER_WORKLOADS_KEY, SuggestOptions()) is None


def test_requests_inside_a_tunnel_do_not_count_its_bytes_twice() -> None:
    traffic = TrafficAggregate()
    tunnel = exchange("alpha.example.com")
    feed(traffic, tunnel, sent=500, received=5000)
    inner = exchange("alpha.example.com", kind="intercept")
    inner.tunnel_id = tunnel.id
    feed(traffic, inner, sent=100, received=1000)
    row = traffic.workloads[workload_key(API)].rows[("alpha.example.com", 443)]
    assert (row.bytes_out, row.bytes_in) == (500, 5000)
    assert row.allowed == 2 and row.tunnels_allowed == 1


class _Client:
    """The client side of a refused exchange: the reply is dropped."""

    close_reason = None

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_suggestion_is_the_one_suggest_makes_from_the_audit_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    audit = AuditSink(fd)
    traffic = TrafficAggregate()
    log = ExchangeLog(audit=audit, identity=StaticIdentityIndex(()), traffic=traffic)
    for name, port in [
        ("alpha.example.com", 443),
        ("alpha.example.com", 443),
        ("beta.example.com", 443),
        *((f"shard{n}.cdn.example.com", 443) for n in range(6)),
    ]:
        ex = exchange(name, port)
        ex.destination_ip = "93.184.216.34"
        log.allowed(ex)
        log.close(ex, Reason.COMPLETED)
    refused = exchange("other.test", 443)
    log.refuse(
        _Client(), refused, PolicyDenied("no", reason=Reason.NAMESPACE_ISOLATION), keep_alive=False
    )  # type: ignore[arg-type]
    audit.flush_and_stop()
    os.close(fd)
    records = path.read_bytes().splitlines()
    assert sum(1 for r in records if json.loads(r)["event"]["action"] == "decision") == 10

    from_records = suggest(records).workloads
    from_page = traffic.suggestion(workload_key(API), SuggestOptions())
    assert from_page is not None
    (expected,) = from_records
    (got,) = from_page.workloads
    assert got.rules == expected.rules
    assert got.denied == expected.denied == (("other.test", 443, "namespace_isolation", 1),)
    assert got.pod_selector == expected.pod_selector and got.policy_name == expected.policy_name
    assert got.requests == expected.requests == 10
    assert "*.cdn.example.com" in got.rules[0].fqdns  # the wildcard collapsing, as suggest does


def test_bytes_of_an_exchange_closed_after_its_row_was_folded_go_to_other() -> None:
    traffic = TrafficAggregate(top=2)
    long_lived = exchange("slow.example.com")
    long_lived.destination_ip = "93.184.216.34"
    traffic.decided(long_lived, allowed=True)  # a tunnel that stays open
    for _ in range(3):
        feed(traffic, exchange("busy.example.com"))
        feed(traffic, exchange("busier.example.com"))
    feed(traffic, exchange("third.example.com"))
    feed(traffic, exchange("fourth.example.com"))  # the table is full: the least used fold
    entry = traffic.workloads[workload_key(API)]
    assert ("slow.example.com", 443) not in entry.rows
    long_lived.source_bytes, long_lived.destination_bytes = 700, 7000
    traffic.closed(long_lived, Reason.COMPLETED)
    assert (entry.other.bytes_out, entry.other.bytes_in) == (700, 7000)
