"""Policy status against the fake API server: the Accepted condition on each object, written
only by the holder of the Lease, only when out of date, through the status subresource; and
the protocol's edge cases a real server will not produce on demand (a Lease update that
conflicts, a status patch for an object deleted or changed since it was read)."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.control.kube.client import KubeClient
from proxy.control.kube.config import load_kubeconfig
from proxy.control.kube.lease import LeaseElector, LeaseTiming
from proxy.control.kube.policies import policy_from_object
from proxy.control.kube.runtime import StatusWriting
from proxy.control.kube.status import ACCEPTED, FAIL_CLOSED_NOTE
from proxy.control.policy_source import FILE_SOURCE
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import PolicyKind
from tests.kube.conftest import FAST_LEASE, Informers, metric
from tests.support.fakekube import FakeKube
from tests.support.waiting import eventually

LEASE_NAMESPACE = "outgate-system"
LEASE_NAME = "outgate-policy-status"


def writing(identity: str, writes_per_second: float = 50.0) -> StatusWriting:
    return StatusWriting(
        lease_namespace=LEASE_NAMESPACE,
        lease_name=LEASE_NAME,
        identity=identity,
        writes_per_second=writes_per_second,
    )


def egress(name: str, fqdn: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "tests"},
        "spec": {"rules": [{"name": "r", "action": "Allow", "to": [{"fqdn": fqdn}]}]},
    }


def condition(fake: FakeKube, name: str) -> dict[str, Any] | None:
    obj = fake.get("egresspolicies", "tests", name)
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == ACCEPTED), None)


def accepted(fake: FakeKube, name: str) -> str | None:
    found = condition(fake, name)
    return None if found is None else found["status"]


def status_patches(fake: FakeKube, name: str | None = None) -> list[Any]:
    return [
        r
        for r in fake.requests_for("egresspolicies", "patch")
        if r.subresource == "status" and (name is None or r.name == name)
    ]


def lease_holder(fake: FakeKube) -> str | None:
    leases = fake.objects("leases")
    return leases[0]["spec"]["holderIdentity"] if leases else None


async def test_an_invalid_policy_is_accepted_false_with_the_validators_message(
    fake: FakeKube,
) -> None:
    fake.create("egresspolicies", egress("good", "api.example.com"))
    fake.create("egresspolicies", egress("too-wide", "*.com"))  # the CRD schema lets it in
    async with Informers(fake, identity=False, policies=True, status=writing("a")):
        await eventually(lambda: accepted(fake, "too-wide") == "False")
        await eventually(lambda: accepted(fake, "good") == "True")
        stored = fake.get("egresspolicies", "tests", "too-wide")
        _, issues = policy_from_object(PolicyKind.NAMESPACED, stored)
        refused = condition(fake, "too-wide")
        assert refused is not None
        assert refused["reason"] == "InvalidPolicy"
        assert refused["message"] == "\n".join(
            [FAIL_CLOSED_NOTE, *(issue.render() for issue in issues)]
        )
        assert "spec.rules[0].to[0].fqdn" in refused["message"]
        assert refused["observedGeneration"] == stored["metadata"]["generation"]
        assert stored["status"]["observedGeneration"] == stored["metadata"]["generation"]
        good = condition(fake, "good")
        assert good is not None and good["reason"] == "Valid"
        # Status only, through the subresource: the proxy never writes a policy itself.
        writes = [
            r
            for resource in ("egresspolicies", "clusteregresspolicies")
            for r in fake.requests_for(resource)
            if r.verb not in ("list", "watch")
        ]
        assert writes and all(r.verb == "patch" and r.subresource == "status" for r in writes)


async def test_status_is_written_only_when_out_of_date_and_keeps_its_transition_time(
    fake: FakeKube,
) -> None:
    fake.create("egresspolicies", egress("web", "api.example.com"))
    async with Informers(fake, identity=False, policies=True, status=writing("a")):
        await eventually(lambda: accepted(fake, "web") == "True")
        first = condition(fake, "web")
        assert first is not None
        # A label change, a relist: the status already says it all, so nothing is written.
        fake.patch(
            "egresspolicies", "tests", "web", lambda o: o["metadata"].update(labels={"a": "b"})
        )
        fake.compact()
        fake.abort_watches("egresspolicies")
        # A later object is written after the earlier ones were looked at (one queue, in order).
        fake.create("egresspolicies", egress("later", "b.example.com"))
        await eventually(lambda: accepted(fake, "later") == "True")
        assert len(status_patches(fake, "web")) == 1
        # A new generation, still valid: observedGeneration moves, lastTransitionTime stays.
        fake.patch(
            "egresspolicies",
            "tests",
            "web",
            lambda o: o["spec"]["rules"][0]["to"].append({"fqdn": "c.example.com"}),
        )
        await eventually(lambda: (condition(fake, "web") or {}).get("observedGeneration") == 2)
        second = condition(fake, "web")
        assert second is not None
        assert second["lastTransitionTime"] == first["lastTransitionTime"]
        # Made invalid: Accepted turns False with the new finding.
        fake.patch(
            "egresspolicies", "tests", "web", lambda o: o["spec"]["rules"][0].update(name="Bad!")
        )
        await eventually(lambda: accepted(fake, "web") == "False")
        assert len(status_patches(fake, "web")) == 3


async def test_someone_elses_change_to_the_status_is_put_right(fake: FakeKube) -> None:
    fake.create("egresspolicies", egress("web", "api.example.com"))
    async with Informers(fake, identity=False, policies=True, status=writing("a")):
        await eventually(lambda: accepted(fake, "web") == "True")
        fake.patch("egresspolicies", "tests", "web", lambda o: o.update(status={}))
        await eventually(lambda: accepted(fake, "web") == "True")
        assert len(status_patches(fake, "web")) == 2


async def test_only_the_lease_holder_writes_and_the_other_takes_over_when_it_stops(
    fake: FakeKube,
) -> None:
    fake.add_token("token-b", "proxy-b")
    first = Informers(fake, identity=False, policies=True, status=writing("proxy-a"))
    second = Informers(
        fake,
        identity=False,
        policies=True,
        status=writing("proxy-b"),
        kubeconfig=fake.kubeconfig(token="token-b", name="kubeconfig-b"),
    )
    users = {"proxy-a": "tester", "proxy-b": "proxy-b"}
    await first.__aenter__()
    await second.__aenter__()
    try:
        await eventually(lambda: lease_holder(fake) in users)
        holder, other = (first, second) if lease_holder(fake) == "proxy-a" else (second, first)
        assert holder.plane.elector is not None and other.plane.elector is not None
        await eventually(lambda: holder.plane.elector.holding)  # type: ignore[union-attr]
        assert not other.plane.elector.holding
        assert metric("outgate_policy_status_leader") == 1  # one process's gauge is 1
        fake.create("egresspolicies", egress("one", "*.com"))
        await eventually(lambda: accepted(fake, "one") == "False")
        holder_user = users[holder.plane.elector.identity]
        assert {r.user for r in status_patches(fake)} == {holder_user}
        # The holder stops cleanly: it releases the Lease; the other takes over and writes.
        await holder.__aexit__(None, None, None)
        await eventually(lambda: other.plane.elector.holding, timeout=5)  # type: ignore[union-attr]
        assert lease_holder(fake) == other.plane.elector.identity
        fake.create("egresspolicies", egress("two", "*.org"))
        await eventually(lambda: accepted(fake, "two") == "False")
        assert status_patches(fake, "two")[-1].user == users[other.plane.elector.identity]
        assert fake.objects("leases")[0]["spec"]["leaseTransitions"] >= 1
    finally:
        await first.__aexit__(None, None, None)
        await second.__aexit__(None, None, None)


async def test_a_holder_that_vanished_is_taken_over_after_a_whole_lease_duration(
    fake: FakeKube,
) -> None:
    fake.add_token("token-b", "proxy-b")
    first = Informers(fake, identity=False, policies=True, status=writing("proxy-a"))
    second = Informers(
        fake,
        identity=False,
        policies=True,
        status=writing("proxy-b"),
        kubeconfig=fake.kubeconfig(token="token-b", name="kubeconfig-b"),
    )
    await first.__aenter__()
    await eventually(lambda: lease_holder(fake) == "proxy-a")
    await second.__aenter__()
    try:
        await second.watching("egresspolicies")
        # proxy-a stops without releasing (killed): its tasks end, the Lease stays as it was.
        await first.tasks.cancel_all()
        await eventually(lambda: lease_holder(fake) == "proxy-b", timeout=10)
        updates = [r for r in fake.requests_for("leases") if r.status in (200, 201)]
        updates = [r for r in updates if r.verb in ("create", "update")]
        last_renewal = max(r.at for r in updates if r.user == "tester")
        take_over = min(r.at for r in updates if r.user == "proxy-b")
        assert take_over - last_renewal >= FAST_LEASE.duration_seconds
    finally:
        await first.__aexit__(None, None, None)
        await second.__aexit__(None, None, None)


async def test_two_replicas_taking_over_at_once_leave_one_holder(fake: FakeKube) -> None:
    lease = {
        "metadata": {"name": LEASE_NAME, "namespace": LEASE_NAMESPACE},
        "spec": {"holderIdentity": "", "leaseDurationSeconds": 15, "leaseTransitions": 3},
    }
    fake.create("leases", lease)
    clients = [KubeClient(load_kubeconfig(fake.kubeconfig())) for _ in range(2)]
    electors = [
        LeaseElector(
            client, namespace=LEASE_NAMESPACE, name=LEASE_NAME, identity=name, timing=FAST_LEASE
        )
        for client, name in zip(clients, ("a", "b"), strict=True)
    ]
    try:
        for _ in range(3):  # each round: both read, both write with what they read
            await asyncio.gather(*(elector.attempt() for elector in electors))
            assert sum(elector.holding for elector in electors) == 1
        stored = fake.objects("leases")[0]["spec"]
        assert stored["leaseTransitions"] == 4
        assert stored["holderIdentity"] in ("a", "b")
    finally:
        for client in clients:
            await client.close()


async def test_a_holder_paused_past_its_renew_deadline_may_not_act_until_it_renews(
    fake: FakeKube,
) -> None:
    now = [100.0]
    client = KubeClient(load_kubeconfig(fake.kubeconfig()))
    elector = LeaseElector(
        client,
        namespace=LEASE_NAMESPACE,
        name=LEASE_NAME,
        identity="a",
        clock=lambda: now[0],
        timing=LeaseTiming(duration_seconds=15, renew_deadline=10.0, renew_period=5.0),
    )
    try:
        assert not elector.may_act()
        await elector.attempt()  # creates the Lease, holding it
        assert elector.holding and elector.may_act()
        now[0] += 10.5  # a SIGSTOP, a starved node: another replica may hold it by now
        assert elector.holding and not elector.may_act()
        await elector.attempt()  # renewed: ours again
        assert elector.may_act()
    finally:
        await client.close()


async def test_a_conflicting_lease_renewal_keeps_the_holder_until_its_deadline(
    fake: FakeKube,
) -> None:
    async with Informers(fake, identity=False, policies=True, status=writing("a")) as informers:
        elector = informers.plane.elector
        assert elector is not None
        await eventually(lambda: elector.holding)
        renewals = len(fake.requests_for("leases", "update"))
        fake.fail("leases", "update", 409)
        await eventually(lambda: len(fake.requests_for("leases", "update")) >= renewals + 2)
        conflicted, renewed = fake.requests_for("leases", "update")[renewals : renewals + 2]
        assert (conflicted.status, renewed.status) == (409, 200)
        assert elector.holding


def _ghost_lease(holder: str) -> dict[str, Any]:
    return {
        "metadata": {"name": LEASE_NAME, "namespace": LEASE_NAMESPACE},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3600, "leaseTransitions": 0},
    }


async def test_a_new_holder_writes_what_is_out_of_date_and_skips_deleted_or_changed_objects(
    fake: FakeKube,
) -> None:
    fake.create("leases", _ghost_lease("another-replica"))
    for name in ("deleted", "changed", "kept"):
        fake.create("egresspolicies", egress(name, "*.com"))
    async with Informers(fake, identity=False, policies=True, status=writing("a")) as informers:
        await informers.synced()
        # Behind the informer's back: one object is gone, one has a newer version.
        fake.delete("egresspolicies", "tests", "deleted", silent=True)
        fake.patch(
            "egresspolicies", "tests", "changed", lambda o: o.update(spec=o["spec"]), silent=True
        )
        gone = metric("outgate_policy_status_writes_total", result="gone")
        conflicts = metric("outgate_policy_status_writes_total", result="conflict")
        fake.update("leases", _ghost_lease(""))  # the other replica released the Lease
        await eventually(lambda: accepted(fake, "kept") == "False")
        await eventually(lambda: len(status_patches(fake, "changed")) == 1)
        await eventually(lambda: len(status_patches(fake, "deleted")) == 1)
        assert [r.status for r in status_patches(fake)] and {
            r.name: r.status for r in status_patches(fake)
        } == {"deleted": 404, "changed": 409, "kept": 200}
        assert metric("outgate_policy_status_writes_total", result="gone") == gone + 1
        assert metric("outgate_policy_status_writes_total", result="conflict") == conflicts + 1
        # The newer version reaches the informer: written from it.
        fake.patch("egresspolicies", "tests", "changed", lambda o: o["metadata"].update(labels={}))
        await eventually(lambda: accepted(fake, "changed") == "False")


async def test_status_writes_are_paced(fake: FakeKube) -> None:
    for index in range(5):
        fake.create("egresspolicies", egress(f"p{index}", "*.com"))
    async with Informers(fake, identity=False, policies=True, status=writing("a", 10.0)):
        await eventually(lambda: len(status_patches(fake)) == 5)
        times = [r.at for r in status_patches(fake)]
        # 10 a second: the fifth is sent 0.4 s after the first (arrival times jitter a little;
        # unpaced, all five arrive within a few milliseconds).
        assert times[-1] - times[0] >= 0.3


async def test_a_policy_file_of_the_same_name_makes_the_object_a_name_conflict_until_removed(
    fake: FakeKube,
) -> None:
    fake.create("egresspolicies", egress("web", "api.example.com"))
    async with Informers(fake, identity=False, policies=True, status=writing("a")) as informers:
        await eventually(lambda: accepted(fake, "web") == "True")
        same_name = load_text(
            "apiVersion: outgate.dev/v1alpha1\nkind: EgressPolicy\n"
            "metadata: {name: web, namespace: tests}\n"
            "spec: {rules: [{name: r, action: Deny, to: [{fqdn: a.example}]}]}\n",
            file="/etc/outgate/policies/web.yaml",
        )
        # As the file watcher does, from its own thread.
        await asyncio.to_thread(informers.store.set_source, FILE_SOURCE, same_name)
        await eventually(lambda: accepted(fake, "web") == "False")
        conflict = condition(fake, "web")
        assert conflict is not None and conflict["reason"] == "NameConflict"
        assert "already defined in /etc/outgate/policies/web.yaml" in conflict["message"]
        await asyncio.to_thread(informers.store.set_source, FILE_SOURCE, [])
        await eventually(lambda: accepted(fake, "web") == "True")


async def test_many_objects_are_each_written_once_and_a_relist_writes_none_again(
    fake: FakeKube,
) -> None:
    count = 200
    for index in range(count):
        fake.create("egresspolicies", egress(f"p{index}", "*.com" if index % 2 else "a.example"))
    async with Informers(fake, identity=False, policies=True, status=writing("a", 1000.0)):
        await eventually(lambda: len(status_patches(fake)) == count, timeout=30)
        # The whole set again, as after an API-server restart: nothing is out of date.
        fake.compact()
        fake.abort_watches("egresspolicies")
        fake.create("egresspolicies", egress("last", "b.example"))
        await eventually(lambda: accepted(fake, "last") == "True")
        assert len(status_patches(fake)) == count + 1
        assert len({r.name for r in status_patches(fake)}) == count + 1
