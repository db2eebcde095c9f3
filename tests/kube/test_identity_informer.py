"""Source IP -> pod through the informers and the fake API server: IP reuse, conflicts, the
pods that are never attributed, owners, namespace labels, and the IPs handed back for closing."""

from __future__ import annotations

from typing import Any

from proxy.core.identity import WorkloadKind
from tests.kube.conftest import Informers, metric
from tests.support.fakekube import FakeKube, job, namespace, pod
from tests.support.waiting import eventually


def set_phase(phase: str) -> Any:
    def mutate(obj: dict[str, Any]) -> None:
        obj["status"]["phase"] = phase

    return mutate


def set_terminating(obj: dict[str, Any]) -> None:
    obj["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"


async def started(fake: FakeKube) -> Informers:
    fake.create("namespaces", namespace("default"))
    return Informers(fake)


async def test_ip_reuse_after_a_pod_completes(fake: FakeKube) -> None:
    fake.create("pods", pod("job-a", "10.2.0.1", owner=("Job", "a")))
    async with await started(fake) as informers:
        await informers.synced()
        assert informers.name_of("10.2.0.1") == "pod:default/job-a"
        fake.patch("pods", "default", "job-a", set_phase("Succeeded"))
        await eventually(lambda: informers.lookup("10.2.0.1").is_unknown)
        assert [(str(ip), name) for ip, name in informers.gone] == [("10.2.0.1", "default/job-a")]
        fake.create("pods", pod("web-b", "10.2.0.1"))
        await eventually(lambda: informers.lookup("10.2.0.1").name == "web-b")
        fake.delete("pods", "default", "job-a")  # the completed pod is cleaned up later
        fake.create("pods", pod("marker", "10.2.0.99"))
        await eventually(lambda: informers.lookup("10.2.0.99").name == "marker")
        assert informers.name_of("10.2.0.1") == "pod:default/web-b"
        assert len(informers.gone) == 1  # the late DELETE closed nothing of web-b's


async def test_ip_reuse_while_the_old_pod_is_terminating(fake: FakeKube) -> None:
    fake.create("pods", pod("old", "10.2.1.1"))
    superseded = metric("outgate_pod_ip_conflicts_total", kind="superseded")
    async with await started(fake) as informers:
        await informers.synced()
        fake.patch("pods", "default", "old", set_terminating)
        fake.create("pods", pod("new", "10.2.1.1"))
        await eventually(lambda: informers.lookup("10.2.1.1").name == "new")
        assert [(str(ip), name) for ip, name in informers.gone] == [("10.2.1.1", "default/old")]
        assert metric("outgate_pod_ip_conflicts_total", kind="superseded") == superseded + 1
        fake.delete("pods", "default", "old")  # the late DELETE of the old pod
        fake.create("pods", pod("marker", "10.2.1.99"))
        await eventually(lambda: informers.lookup("10.2.1.99").name == "marker")
        assert informers.name_of("10.2.1.1") == "pod:default/new"
        assert len(informers.gone) == 1


async def test_two_running_pods_on_one_ip_are_ambiguous(fake: FakeKube) -> None:
    fake.create("pods", pod("one", "10.2.2.1"))
    conflicts = metric("outgate_pod_ip_conflicts_total", kind="ambiguous")
    lookups = metric("outgate_identity_lookups_total", result="ambiguous")
    async with await started(fake) as informers:
        await informers.synced()
        fake.create("pods", pod("two", "10.2.2.1"))
        await eventually(lambda: informers.lookup("10.2.2.1").kind is WorkloadKind.AMBIGUOUS)
        assert informers.lookup("10.2.2.1").name == "one,two"
        assert metric("outgate_pod_ip_conflicts_total", kind="ambiguous") == conflicts + 1
        await eventually(lambda: metric("outgate_pod_ambiguous_ips") == 1)  # written each second
        assert metric("outgate_identity_lookups_total", result="ambiguous") >= lookups + 2
        assert [str(ip) for ip, _ in informers.gone] == ["10.2.2.1"]  # one's connections
        fake.delete("pods", "default", "one")
        await eventually(lambda: informers.lookup("10.2.2.1").name == "two")
        await eventually(lambda: metric("outgate_pod_ambiguous_ips") == 0)


async def test_late_delete_of_an_old_pod_never_removes_the_new_one(fake: FakeKube) -> None:
    fake.create("pods", pod("old", "10.2.3.1", uid="old-uid"))
    async with await started(fake) as informers:
        await informers.synced()
        # The kubelet reports the old pod gone from the IP (failed), a new pod gets the IP,
        # and only then does the old object's DELETE arrive.
        fake.patch("pods", "default", "old", set_phase("Failed"))
        fake.create("pods", pod("new", "10.2.3.1", uid="new-uid"))
        fake.delete("pods", "default", "old")
        fake.create("pods", pod("marker", "10.2.3.99"))
        await eventually(lambda: informers.lookup("10.2.3.99").name == "marker")
        assert informers.lookup("10.2.3.1").uid == "new-uid"


async def test_host_network_pods_are_never_attributed(fake: FakeKube) -> None:
    fake.create("pods", pod("agent", "10.0.0.10", host_network=True, owner=("DaemonSet", "a")))
    async with await started(fake) as informers:
        await informers.synced()
        assert informers.lookup("10.0.0.10").is_unknown
        fake.create("pods", pod("proxy", "10.0.0.10", host_network=True))
        fake.create("pods", pod("marker", "10.2.4.99"))
        await eventually(lambda: informers.lookup("10.2.4.99").name == "marker")
        assert informers.lookup("10.0.0.10").is_unknown  # not even ambiguous
        assert len(informers.plane.index) == 1


async def test_a_pending_pod_is_attributed_once_it_has_an_ip(fake: FakeKube) -> None:
    fake.create("pods", pod("starting", None, phase="Pending"))
    async with await started(fake) as informers:
        await informers.synced()
        assert len(informers.plane.index) == 0

        def assign_ip(obj: dict[str, Any]) -> None:
            obj["status"].update(podIP="10.2.5.1", podIPs=[{"ip": "10.2.5.1"}])

        fake.patch("pods", "default", "starting", assign_ip)  # still Pending: init containers
        await eventually(lambda: informers.lookup("10.2.5.1").name == "starting")


async def test_a_dual_stack_pod_and_an_ipv4_mapped_source(fake: FakeKube) -> None:
    fake.create("pods", pod("ds", "10.2.6.1", ips=["10.2.6.1", "fd00:10:2::6"]))
    async with await started(fake) as informers:
        await informers.synced()
        assert informers.lookup("10.2.6.1").name == "ds"
        assert informers.lookup("fd00:10:2::6").name == "ds"
        assert informers.lookup("::ffff:10.2.6.1").name == "ds"
        fake.delete("pods", "default", "ds")
        await eventually(lambda: len(informers.gone) == 2)
        assert sorted(str(ip) for ip, _ in informers.gone) == ["10.2.6.1", "fd00:10:2::6"]


async def test_a_statefulset_pod_recreated_with_its_name_and_a_new_uid(fake: FakeKube) -> None:
    fake.create("pods", pod("db-0", "10.2.7.1", uid="first", owner=("StatefulSet", "db")))
    async with await started(fake) as informers:
        await informers.synced()
        fake.delete("pods", "default", "db-0")
        fake.create("pods", pod("db-0", "10.2.7.1", uid="second", owner=("StatefulSet", "db")))
        await eventually(lambda: informers.lookup("10.2.7.1").uid == "second")
        workload = informers.lookup("10.2.7.1")
        assert (workload.owner_kind, workload.owner_name) == ("StatefulSet", "db")
        assert [(str(ip), name) for ip, name in informers.gone] == [("10.2.7.1", "default/db-0")]


async def test_namespace_label_change_is_in_the_next_lookup(fake: FakeKube) -> None:
    fake.create("namespaces", namespace("payments", {"team": "pay"}))
    fake.create("pods", pod("api", "10.2.8.1", namespace="payments"))
    async with Informers(fake) as informers:
        await informers.synced()
        assert informers.lookup("10.2.8.1").namespace_labels["team"] == "pay"
        fake.patch("namespaces", "", "payments", lambda o: o["metadata"]["labels"].update(team="x"))
        await eventually(lambda: informers.lookup("10.2.8.1").namespace_labels["team"] == "x")
        assert informers.gone == []  # a label change closes nothing


async def test_owner_resolution(fake: FakeKube) -> None:
    fake.create("namespaces", namespace("ops"))
    fake.create(
        "pods",
        pod(
            "api-7d9f-x1",
            "10.2.9.1",
            namespace="ops",
            owner=("ReplicaSet", "api-7d9f"),
            labels={"pod-template-hash": "7d9f"},
        ),
    )
    fake.create("pods", pod("agent-x", "10.2.9.2", namespace="ops", owner=("DaemonSet", "agent")))
    fake.create("pods", pod("backup-1-x", "10.2.9.3", namespace="ops", owner=("Job", "backup-1")))
    fake.create("pods", pod("oneoff-x", "10.2.9.4", namespace="ops", owner=("Job", "oneoff")))
    fake.create("jobs", job("oneoff", namespace="ops"))
    async with Informers(fake) as informers:
        await informers.synced()

        def owner(ip: str) -> tuple[str, str]:
            workload = informers.lookup(ip)
            return workload.owner_kind, workload.owner_name

        assert owner("10.2.9.1") == ("Deployment", "api")
        assert owner("10.2.9.2") == ("DaemonSet", "agent")
        assert owner("10.2.9.3") == ("Job", "backup-1")  # the Job is not known yet
        assert owner("10.2.9.4") == ("Job", "oneoff")  # known, and no CronJob owns it
        fake.create("jobs", job("backup-1", namespace="ops", cronjob="backup"))
        await eventually(lambda: owner("10.2.9.3") == ("CronJob", "backup"))


async def test_lookups_before_the_informers_sync_count_as_not_synced(fake: FakeKube) -> None:
    fake.create("pods", pod("p", "10.2.10.1"))
    fake.create("namespaces", namespace("default"))
    fake.hold_lists("namespaces")
    not_synced = metric("outgate_identity_lookups_total", result="not_synced")
    async with Informers(fake) as informers:
        await eventually(lambda: informers.pods.synced)
        assert informers.lookup("10.2.10.1").is_unknown  # pods known, namespaces not yet
        assert metric("outgate_identity_lookups_total", result="not_synced") == not_synced + 1
        fake.release_lists("namespaces")
        await informers.synced()
        assert informers.lookup("10.2.10.1").name == "p"
