"""The audit record lines proxy.audit writes are the ones the builders before issue 16's rendering
work gave (tests/unit/reference_audit.py), parsed (what a SIEM reads: every field and value) and
byte for byte (the key order is kept too), for generated exchanges:
every optional field set or not, workloads of every kind (the same Workload object over several
records, as a kept-alive client sends them), decisions with and without a rule or a shadow
verdict, responses, raw client strings to cut or to escape. The clocks are held fixed, so the
timestamp and the duration are compared too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import audit
from proxy.audit import MAX_RAW_FIELD_CHARS, Exchange
from proxy.core.identity import Workload, WorkloadKind
from proxy.core.policy.engine import Decision, Outcome, Verdict
from proxy.errors import Reason
from tests.support.budget import budget
from tests.unit import reference_audit

WORKLOADS = [
    Workload(
        kind=WorkloadKind.POD,
        namespace="payments",
        name="api-7d9f",
        uid="6f1c2a7e-1111-2222-3333-444455556666",
        labels={"app": "api", "team": "pay"},
        service_account="api",
        owner_kind="Deployment",
        owner_name="api",
    ),
    Workload(kind=WorkloadKind.POD, namespace="web", name="bare"),  # no uid, owner or account
    Workload(kind=WorkloadKind.STATIC, namespace="ops", name="batch-host"),
    Workload(kind=WorkloadKind.UNKNOWN),
    Workload(kind=WorkloadKind.AMBIGUOUS),
]

# Raw client strings: plain, at and over the cut, with control bytes, DEL and non-ASCII (which
# the json fallback renders).
raw = st.one_of(
    st.sampled_from(["GET", "/v1/items?page=2", "x" * MAX_RAW_FIELD_CHARS, "y" * 1100]),
    st.text(max_size=30),
    st.sampled_from(["a\r\nb", "del\x7f", "caf\u00e9", "\u2028", 'q"uote\\']),
)
maybe = st.one_of(st.none(), raw)
ports = st.one_of(st.none(), st.integers(min_value=0, max_value=65535))
reasons = st.sampled_from(list(Reason))


@st.composite
def verdicts(draw: st.DrawFn) -> Verdict:
    named = draw(st.booleans())
    return Verdict(
        action=draw(st.sampled_from(list(Outcome))),
        reason=draw(reasons),
        rule=draw(raw) if named else None,
        ruleset=draw(st.sampled_from(["cluster-0", "payments/egress"])) if named else None,
    )


@st.composite
def decisions(draw: st.DrawFn) -> Decision | None:
    if draw(st.integers(0, 4)) == 0:
        return None
    shadow = draw(verdicts()) if draw(st.booleans()) else None
    return Decision(verdict=draw(verdicts()), shadow=shadow, revision=draw(st.integers(0, 9)))


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    ex = Exchange(
        kind=draw(st.sampled_from(["forward", "tunnel"])),
        source_ip=draw(st.sampled_from(["10.1.2.3", "2001:db8::7"])),
        source_port=draw(st.integers(0, 65535)),
        workload=draw(st.sampled_from(WORKLOADS)),
    )
    ex.destination_domain = draw(maybe)
    ex.destination_ip = draw(st.one_of(st.none(), st.just("10.9.8.7")))
    ex.destination_port = draw(ports)
    ex.method = draw(maybe)
    ex.path = draw(maybe)
    ex.server_name = draw(maybe)
    ex.ech = draw(st.one_of(st.none(), st.booleans()))
    ex.alpn = draw(st.one_of(st.none(), st.lists(raw, max_size=3).map(tuple)))
    ex.first_bytes_hex = draw(st.one_of(st.none(), st.just("16030100")))
    if draw(st.booleans()):
        ex.dlp_detector, ex.dlp_field = "aws_key", draw(raw)
    ex.tunnel_id = draw(st.one_of(st.none(), st.just("ab" * 16)))
    if draw(st.booleans()):
        ex.upstream = draw(st.sampled_from(["direct", "corp"]))
        ex.upstream_proxy = draw(st.one_of(st.none(), st.just("parent.corp:3128")))
        ex.upstream_resolve = draw(st.one_of(st.none(), st.sampled_from(["local", "parent"])))
        ex.upstream_status = draw(st.one_of(st.none(), st.just(407)))
    ex.upgrade = draw(st.one_of(st.none(), st.just("websocket")))
    if draw(st.booleans()):
        ex.proxy_protocol = draw(st.sampled_from([1, 2]))
        ex.proxy_peer_ip, ex.proxy_peer_port = "10.0.0.4", draw(ports)
    ex.user_name = draw(maybe)
    ex.decision = draw(decisions())
    ex.reason = draw(st.one_of(st.none(), reasons))
    ex.status = draw(st.one_of(st.none(), st.sampled_from([101, 200, 403, 502])))
    ex.source_bytes = draw(st.integers(0, 1 << 40))
    ex.destination_bytes = draw(st.integers(0, 1 << 40))
    ex.decided = draw(st.booleans())
    return ex


@contextlib.contextmanager
def fixed_clocks() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", lambda: 1_765_000_000.25)
        patch.setattr(time, "monotonic", lambda: 5_000.5)
        yield


@budget(400, fuzz_factor=100)
@given(st.lists(exchanges(), min_size=1, max_size=4), reasons)
def test_records_render_exactly_as_before(batch: list[Exchange], reason: Reason) -> None:
    for ex in batch:
        ex.started = 4_999.0
        with fixed_clocks():
            lines = [audit.decision_line(ex), audit.close_line(ex, reason)]
            expected = [
                reference_audit.render(reference_audit.decision_record(ex)),
                reference_audit.render(reference_audit.close_record(ex, reason)),
            ]
        assert [json.loads(line) for line in lines] == [json.loads(line) for line in expected]
        assert lines == expected
        # The dicts tools read are the lines parsed, and render gives the lines back.
        with fixed_clocks():
            assert audit.render(audit.decision_record(ex)) == expected[0]
            assert audit.render(audit.close_record(ex, reason)) == expected[1]


@fixed_clocks()
def test_a_workload_seen_again_gives_the_same_records() -> None:
    ex = Exchange(kind="forward", source_ip="10.1.2.3", source_port=1, workload=WORKLOADS[0])
    first = audit.decision_record(ex)
    again = audit.decision_record(ex)
    assert first == again == reference_audit.decision_record(ex)
    # Another Workload object equal to the first is its own entry, with the same content.
    twin = Exchange(
        kind="forward",
        source_ip="10.1.2.3",
        source_port=1,
        workload=dataclasses.replace(WORKLOADS[0]),
    )
    twin.id = ex.id
    assert audit.decision_record(twin) == first


@budget(400, fuzz_factor=100)
@given(exchanges(), exchanges(), reasons)
def test_a_close_after_fields_changed_shows_the_changed_fields(
    ex: Exchange, later: Exchange, reason: Reason
) -> None:
    """The data plane sets fields between the two records (the address dialled, the status, the
    SNI, the upstream...): the close record shows them, not the parts the decision rendered."""
    ex.started = 4_999.0
    ex.method = "GET"  # a request's parts are kept from the decision for its close
    with fixed_clocks():
        audit.decision_line(ex)
        for name in [f.name for f in dataclasses.fields(Exchange)]:
            if name not in ("started", "audit_parts"):
                setattr(ex, name, getattr(later, name))
        expected = reference_audit.render(reference_audit.close_record(ex, reason))
        assert audit.close_line(ex, reason) == expected


def test_only_a_request_keeps_its_parts_until_its_close() -> None:
    request = Exchange(kind="forward", source_ip="10.1.2.3", source_port=1, workload=WORKLOADS[0])
    request.method = "GET"
    tunnel = Exchange(kind="tunnel", source_ip="10.1.2.3", source_port=2, workload=WORKLOADS[0])
    tunnel.method = "CONNECT"
    transparent = Exchange(
        kind="transparent-tls", source_ip="10.1.2.3", source_port=3, workload=WORKLOADS[0]
    )
    for ex in (request, tunnel, transparent):
        audit.decision_line(ex)
    assert request.audit_parts is not None
    assert tunnel.audit_parts is None and transparent.audit_parts is None
