"""PodIndex and pod decoding (pure): tables of pods in, attribution out."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from proxy.core.identity import FrozenLabels, WorkloadKind
from proxy.core.podindex import (
    LookupResult,
    PodDecodeError,
    PodIndex,
    PodRecord,
    controller_owner,
    pod_from_object,
)
from tests.support.fakekube import pod


def record(name: str, ip: str | None, *, uid: str | None = None, **kwargs: Any) -> PodRecord:
    obj = pod(name, ip, uid=uid or f"uid-{name}", **kwargs)
    return pod_from_object(obj)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def attributed(index: PodIndex, address: str) -> str:
    result, workload = index.resolve(ip(address))
    if result is LookupResult.MISS:
        return "-"
    if result is LookupResult.AMBIGUOUS:
        return f"ambiguous:{workload.name}"
    return workload.name


# -- decoding ---------------------------------------------------------------------------------

DECODE_CASES = [
    ("running pod", {}, ("10.0.0.1",), True),
    ("pending with an IP (init containers dial out)", {"phase": "Pending"}, ("10.0.0.1",), True),
    ("pending without an IP", {"phase": "Pending", "ip": None}, (), False),
    ("succeeded", {"phase": "Succeeded"}, ("10.0.0.1",), False),
    ("failed", {"phase": "Failed"}, ("10.0.0.1",), False),
    ("unknown phase (node lost) stays", {"phase": "Unknown"}, ("10.0.0.1",), True),
    ("hostNetwork", {"host_network": True}, ("10.0.0.1",), False),
    ("dual stack", {"ips": ["10.0.0.1", "fd00::1"]}, ("10.0.0.1", "fd00::1"), True),
    ("mapped address unwrapped", {"ip": "::ffff:10.0.0.9"}, ("10.0.0.9",), True),
]


@pytest.mark.parametrize(
    ("case", "changes", "ips", "indexable"), DECODE_CASES, ids=[c[0] for c in DECODE_CASES]
)
def test_decoding_keeps_ips_and_decides_indexability(
    case: str, changes: dict[str, Any], ips: tuple[str, ...], indexable: bool
) -> None:
    address = changes.pop("ip", "10.0.0.1")
    decoded = record("p", address, **changes)
    assert decoded.ips == tuple(ip(a) for a in ips)
    assert decoded.indexable is indexable


def test_decoding_keeps_only_what_decisions_need() -> None:
    obj = pod(
        "api-1",
        "10.0.0.1",
        namespace="payments",
        labels={"app": "api"},
        uid="u1",
        service_account="api-sa",
        node="node-7",
        terminating=True,
        owner=("StatefulSet", "db"),
        annotations={"big": "x" * 1000},
    )
    decoded = pod_from_object(obj)
    assert decoded == PodRecord(
        namespace="payments",
        name="api-1",
        uid="u1",
        labels=FrozenLabels({"app": "api"}),
        service_account="api-sa",
        owner_kind="StatefulSet",
        owner_name="db",
        node="node-7",
        phase="Running",
        terminating=True,
        host_network=False,
        ips=(ip("10.0.0.1"),),
        created=decoded.created,
    )


def test_pod_ips_prefers_pod_ips_and_skips_garbage() -> None:
    obj = pod("p", "10.0.0.1", uid="u")
    obj["status"]["podIPs"] = [{"ip": "not-an-ip"}, {"ip": "10.0.0.2"}, "junk"]
    assert pod_from_object(obj).ips == (ip("10.0.0.2"),)
    obj["status"]["podIPs"] = []
    assert pod_from_object(obj).ips == (ip("10.0.0.1"),)


@pytest.mark.parametrize("broken", [{}, {"metadata": {"name": "x"}}, {"metadata": {"uid": "u"}}])
def test_a_pod_without_uid_or_name_is_refused(broken: dict[str, Any]) -> None:
    with pytest.raises(PodDecodeError):
        pod_from_object(broken)


OWNER_CASES = [
    ("replicaset of a deployment", ("ReplicaSet", "api-7d9f"), {"pod-template-hash": "7d9f"},
     ("Deployment", "api")),
    ("replicaset without the hash label", ("ReplicaSet", "api-7d9f"), {},
     ("ReplicaSet", "api-7d9f")),
    ("hash that is not the suffix", ("ReplicaSet", "api-7d9f"), {"pod-template-hash": "zz"},
     ("ReplicaSet", "api-7d9f")),
    ("statefulset", ("StatefulSet", "db"), {}, ("StatefulSet", "db")),
    ("daemonset", ("DaemonSet", "agent"), {}, ("DaemonSet", "agent")),
    ("job (cronjob joined at lookup)", ("Job", "backup-28000"), {}, ("Job", "backup-28000")),
    ("bare pod", None, {}, ("", "")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "owner", "labels", "expected"), OWNER_CASES, ids=[c[0] for c in OWNER_CASES]
)
def test_owner_is_the_controller_with_replicaset_resolved_to_deployment(
    case: str, owner: tuple[str, str] | None, labels: dict[str, str], expected: tuple[str, str]
) -> None:
    decoded = record("p", "10.0.0.1", owner=owner, labels=labels)
    assert (decoded.owner_kind, decoded.owner_name) == expected


def test_an_owner_reference_that_is_not_the_controller_is_ignored() -> None:
    refs = [{"kind": "ReplicaSet", "name": "x", "controller": False}]
    assert controller_owner(refs, {}) == ("", "")


# -- attribution --------------------------------------------------------------------------------


def test_never_indexed_pods_are_never_attributed() -> None:
    index = PodIndex()
    index.upsert(record("host", "10.0.0.1", host_network=True))
    index.upsert(record("done", "10.0.0.2", phase="Succeeded"))
    index.upsert(record("waiting", None, phase="Pending"))
    assert len(index) == 0
    assert attributed(index, "10.0.0.1") == "-"
    assert attributed(index, "10.0.0.2") == "-"


def test_dual_stack_pod_is_found_by_either_address_and_by_a_mapped_one() -> None:
    index = PodIndex()
    index.upsert(record("ds", "10.0.0.1", ips=["10.0.0.1", "fd00::1"]))
    assert attributed(index, "10.0.0.1") == "ds"
    assert attributed(index, "fd00::1") == "ds"
    assert attributed(index, "::ffff:10.0.0.1") == "ds"
    assert attributed(index, "::a00:1") == "-"  # IPv4-compatible is not the same address


def test_ip_reuse_after_the_pod_completes_and_its_late_delete() -> None:
    index = PodIndex()
    index.upsert(record("job-a", "10.0.0.1", uid="a"))
    change = index.upsert(record("job-a", "10.0.0.1", uid="a", phase="Succeeded"))
    assert [i for i, _ in change.released] == [ip("10.0.0.1")]
    assert attributed(index, "10.0.0.1") == "-"
    assert not index.upsert(record("web-b", "10.0.0.1", uid="b")).released
    assert attributed(index, "10.0.0.1") == "web-b"
    late = index.remove("a")  # the completed pod's DELETE arrives last
    assert not late
    assert attributed(index, "10.0.0.1") == "web-b"


def test_ip_reuse_while_the_old_pod_is_terminating() -> None:
    index = PodIndex()
    index.upsert(record("old", "10.0.0.1", uid="a"))
    index.upsert(record("old", "10.0.0.1", uid="a", terminating=True))
    assert attributed(index, "10.0.0.1") == "old"  # alone, a terminating pod still counts
    change = index.upsert(record("new", "10.0.0.1", uid="b"))
    assert [(i, p.name) for i, p in change.released] == [(ip("10.0.0.1"), "old")]
    assert change.superseded == (ip("10.0.0.1"),)
    assert not change.conflicts
    assert attributed(index, "10.0.0.1") == "new"
    assert not index.remove("a")  # the old pod's DELETE changes nothing
    assert attributed(index, "10.0.0.1") == "new"


def test_two_live_pods_on_one_ip_are_ambiguous_until_one_goes() -> None:
    index = PodIndex()
    index.upsert(record("one", "10.0.0.1", uid="a"))
    change = index.upsert(record("two", "10.0.0.1", uid="b"))
    assert change.conflicts == (ip("10.0.0.1"),)
    assert [i for i, _ in change.released] == [ip("10.0.0.1")]
    result, workload = index.resolve(ip("10.0.0.1"))
    assert result is LookupResult.AMBIGUOUS
    assert workload.kind is WorkloadKind.AMBIGUOUS
    assert (workload.namespace, workload.name, dict(workload.labels)) == ("default", "one,two", {})
    assert index.ambiguous_ip_count == 1
    # Both terminating: still two candidates of the same standing, still ambiguous.
    index.upsert(record("one", "10.0.0.1", uid="a", terminating=True))
    assert attributed(index, "10.0.0.1") == "two"
    index.upsert(record("two", "10.0.0.1", uid="b", terminating=True))
    assert attributed(index, "10.0.0.1") == "ambiguous:one,two"
    assert not index.remove("b").released  # ambiguous -> one pod: nothing was attributed
    assert attributed(index, "10.0.0.1") == "one"
    assert index.ambiguous_ip_count == 0


def test_a_statefulset_pod_recreated_under_its_name_is_a_new_pod() -> None:
    index = PodIndex()
    index.upsert(record("db-0", "10.0.0.1", uid="first"))
    index.upsert(record("db-0", "10.0.0.2", uid="second"))  # ADDED before the old DELETED
    assert [i for i, _ in index.remove("first").released] == [ip("10.0.0.1")]
    assert attributed(index, "10.0.0.2") == "db-0"
    assert index.resolve(ip("10.0.0.2"))[1].uid == "second"


def test_a_pod_moving_to_another_ip_releases_the_old_one() -> None:
    index = PodIndex()
    index.upsert(record("p", "10.0.0.1", uid="a"))
    change = index.upsert(record("p", "10.0.0.2", uid="a"))
    assert [i for i, _ in change.released] == [ip("10.0.0.1")]
    assert attributed(index, "10.0.0.1") == "-"
    assert attributed(index, "10.0.0.2") == "p"


def test_re_applying_the_same_pod_changes_nothing() -> None:
    index = PodIndex()
    first = record("p", "10.0.0.1", labels={"app": "x"})
    index.upsert(first)
    workload = index.lookup(ip("10.0.0.1"))
    again = record("p", "10.0.0.1", labels={"app": "x"})
    assert not index.upsert(again)
    assert index.lookup(ip("10.0.0.1")) is workload  # cached, not rebuilt


def test_label_change_is_seen_and_releases_nothing() -> None:
    index = PodIndex()
    index.upsert(record("p", "10.0.0.1", labels={"app": "x"}))
    assert not index.upsert(record("p", "10.0.0.1", labels={"app": "y"}))
    assert index.lookup(ip("10.0.0.1")).labels == {"app": "y"}


def test_namespace_labels_are_joined_at_lookup() -> None:
    index = PodIndex()
    index.upsert(record("p", "10.0.0.1", namespace="payments"))
    assert index.lookup(ip("10.0.0.1")).namespace_labels == {
        "kubernetes.io/metadata.name": "payments"
    }
    assert index.set_namespace("payments", {"team": "pay"})
    assert index.lookup(ip("10.0.0.1")).namespace_labels == {
        "team": "pay",
        "kubernetes.io/metadata.name": "payments",
    }
    assert not index.set_namespace("payments", {"team": "pay"})
    index.set_namespace("payments", {"team": "other"})
    assert index.lookup(ip("10.0.0.1")).namespace_labels["team"] == "other"
    index.remove_namespace("payments")
    assert "team" not in index.lookup(ip("10.0.0.1")).namespace_labels


def test_job_owner_resolves_to_its_cronjob_once_the_job_is_known() -> None:
    index = PodIndex()
    index.upsert(record("backup-1-x", "10.0.0.1", namespace="ops", owner=("Job", "backup-1")))
    owner = index.lookup(ip("10.0.0.1"))
    assert (owner.owner_kind, owner.owner_name) == ("Job", "backup-1")
    index.set_job("ops", "backup-1", "backup")
    owner = index.lookup(ip("10.0.0.1"))
    assert (owner.owner_kind, owner.owner_name) == ("CronJob", "backup")
    index.remove_job("ops", "backup-1")
    assert index.lookup(ip("10.0.0.1")).owner_kind == "Job"


def test_pods_of_one_replicaset_share_one_label_set_freed_with_the_last_pod() -> None:
    index = PodIndex()
    for n in range(10):
        index.upsert(record(f"p{n}", f"10.0.0.{n + 1}", labels={"app": "x", "h": "1"}))
    index.upsert(record("other", "10.0.1.1", labels={"app": "y"}))
    assert index.label_set_count == 2
    first, second = index.pod("uid-p0"), index.pod("uid-p9")
    assert first is not None and second is not None and first.labels is second.labels
    for n in range(10):
        index.remove(f"uid-p{n}")
    assert index.label_set_count == 1
