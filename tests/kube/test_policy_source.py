"""Policies from the cluster, in process: validation of objects as the API serves them, merging
with file policies (files win, the object is told why), and Events posted once per finding."""

from __future__ import annotations

from typing import Any

from proxy.control.kube.policies import policy_from_object
from proxy.control.policy_source import FILE_SOURCE
from proxy.core.hosts import parse_host
from proxy.core.identity import Workload, WorkloadKind
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action, Destination, PolicyKind
from tests.kube.conftest import Informers, metric
from tests.support.fakekube import FakeKube
from tests.support.waiting import eventually

CLIENT = Workload(kind=WorkloadKind.POD, namespace="tests", name="c", labels={"app": "client"})


def egress(name: str, fqdn: str, action: str = "Allow") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "tests"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "client"}},
            "rules": [{"name": "r", "action": action, "to": [{"fqdn": fqdn}]}],
        },
    }


def decision(informers: Informers, host: str) -> tuple[str, str | None]:
    verdict = informers.store.decide(CLIENT, Destination(host=parse_host(host), port=443))
    return str(verdict.action), verdict.verdict.ruleset


def test_server_set_metadata_is_not_the_authors_and_is_not_validated() -> None:
    obj = egress("web", "api.example.com")
    obj["metadata"].update(
        uid="u1",
        resourceVersion="rv.1.x",
        generation=3,
        finalizers=["x"],
        ownerReferences=[{"kind": "Thing"}],
        managedFields=[{"manager": "kubectl"}],
        deletionTimestamp=None,
    )
    obj["status"] = {"anything": True}
    policy, issues = policy_from_object(PolicyKind.NAMESPACED, obj)
    assert issues == []
    assert policy is not None and policy.ruleset == "tests/web"


def test_issues_name_the_object_and_the_field_as_for_a_file() -> None:
    _, issues = policy_from_object(PolicyKind.NAMESPACED, egress("web", "a.*.example.com"))
    assert [(i.file, i.path) for i in issues] == [
        ("EgressPolicy tests/web", "spec.rules[0].to[0].fqdn")
    ]


async def test_a_file_policy_of_the_same_name_wins_and_the_object_is_told(fake: FakeKube) -> None:
    async with Informers(fake, identity=False, policies=True) as informers:
        file_policy = load_text(
            "apiVersion: outgate.dev/v1alpha1\nkind: EgressPolicy\n"
            "metadata: {name: web, namespace: tests}\n"
            "spec: {rules: [{name: from-file, action: Deny, to: [{fqdn: a.example}]}]}\n",
            file="/etc/outgate/web.yaml",
        )
        informers.store.set_source(FILE_SOURCE, file_policy, default_action=Action.DENY)
        await informers.synced()
        fake.create("egresspolicies", egress("web", "a.example"))
        fake.create("egresspolicies", egress("other", "b.example"))
        await eventually(lambda: decision(informers, "b.example") == ("allow", "tests/other"))
        assert decision(informers, "a.example") == ("deny", "tests/web")  # the file's
        await eventually(
            lambda: any(e["involvedObject"]["name"] == "web" for e in fake.events_posted)
        )
        event = next(e for e in fake.events_posted if e["involvedObject"]["name"] == "web")
        assert event["reason"] == "InvalidPolicy"
        assert "already defined in /etc/outgate/web.yaml" in event["message"]


async def test_one_event_per_finding_even_across_relists_and_replicas(fake: FakeKube) -> None:
    fake.create("egresspolicies", egress("bad", "a.*.b"))
    async with Informers(fake, identity=False, policies=True) as first:
        await first.synced()
        await eventually(lambda: len(fake.events_posted) == 1)
        # A relist hands the same object over again: no second Event.
        fake.compact()
        fake.abort_watches("egresspolicies")
        await eventually(lambda: len(fake.requests_for("egresspolicies", "list")) == 2)
        await first.synced()
        # A label change is not a new finding either (same generation).
        fake.patch(
            "egresspolicies", "tests", "bad", lambda o: o["metadata"].update(labels={"x": "y"})
        )
        exists = metric("outgate_kube_events_posted_total", result="exists")
        # A second replica reporting the same finding collides on the Event's name.
        async with Informers(fake, identity=False, policies=True) as second:
            await second.synced()
            await eventually(
                lambda: metric("outgate_kube_events_posted_total", result="exists") == exists + 1
            )
        assert len(fake.events_posted) == 1
        # A new generation with a new problem is a new finding.
        fake.update("egresspolicies", egress("bad", "*"))
        await eventually(lambda: len(fake.events_posted) == 2)
        assert first.plane.policy_source is not None
        assert first.plane.policy_source.invalid() == ["EgressPolicy tests/bad: 1 issue(s)"]


# -- invalid objects fail closed (issue 19) --------------------------------------------------

PAYMENTS = Workload(
    kind=WorkloadKind.POD,
    namespace="payments",
    name="api-1",
    labels={"app": "api"},
    namespace_labels={"kubernetes.io/metadata.name": "payments", "team": "payments"},
)
SHOP = Workload(
    kind=WorkloadKind.POD,
    namespace="shop",
    name="web-1",
    labels={"app": "web"},
    namespace_labels={"kubernetes.io/metadata.name": "shop", "team": "shop"},
)


def cluster_policy(
    name: str, tier: str, rules: list[dict[str, Any]], **spec: Any
) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"tier": tier, "rules": rules, **spec}}


def outcome(informers: Informers, workload: Workload, host: str) -> tuple[str, str, str | None]:
    decided = informers.store.decide(workload, Destination(host=parse_host(host), port=443))
    return str(decided.action), str(decided.reason), decided.ruleset


PASTE_DENY = cluster_policy(
    "no-paste",
    "admin",
    [{"name": "paste", "action": "Deny", "to": [{"fqdn": "*.pastebin.com"}]}],
    subject={"namespaceSelector": {"matchLabels": {"team": "payments"}}},
)


async def test_an_invalid_edit_of_an_admin_deny_keeps_its_subjects_denied_on_every_replica(
    fake: FakeKube,
) -> None:
    fake.create("clusteregresspolicies", PASTE_DENY)
    baseline = cluster_policy(
        "open-web",
        "baseline",
        [
            {
                "name": "all",
                "action": "Allow",
                "to": [{"fqdn": "*.pastebin.com"}, {"fqdn": "*.example.com"}],
            }
        ],
    )
    fake.create("clusteregresspolicies", baseline)
    async with (
        Informers(fake, identity=False, policies=True) as one,
        Informers(fake, identity=False, policies=True) as two,
    ):
        await one.synced()
        await two.synced()
        for replica in (one, two):
            await eventually(
                lambda r=replica: (
                    outcome(r, PAYMENTS, "x.pastebin.com") == ("deny", "rule_deny", "no-paste")
                )
            )
        # The edit the validating webhook would have refused, stored while it was off.
        broken = cluster_policy(
            "no-paste",
            "admin",
            [{"name": "paste", "action": "Deny", "to": [{"fqdn": "paste*.com"}]}],
            subject={"namespaceSelector": {"matchLabels": {"team": "payments"}}},
        )
        fake.update("clusteregresspolicies", broken)
        for replica in (one, two):
            await eventually(
                lambda r=replica: (
                    outcome(r, PAYMENTS, "x.pastebin.com") == ("deny", "policy_invalid", "no-paste")
                )
            )
            # Everything its subjects send is denied until it is fixed, not only paste sites...
            assert outcome(replica, PAYMENTS, "www.example.com") == (
                "deny",
                "policy_invalid",
                "no-paste",
            )
            # ...and workloads it does not select are untouched.
            assert outcome(replica, SHOP, "x.pastebin.com") == ("allow", "rule_allow", "open-web")
        fixed = cluster_policy(
            "no-paste",
            "admin",
            [{"name": "paste", "action": "Deny", "to": [{"fqdn": "*.pastebin.com"}]}],
            subject={"namespaceSelector": {"matchLabels": {"team": "payments"}}},
        )
        fake.update("clusteregresspolicies", fixed)
        for replica in (one, two):
            await eventually(
                lambda r=replica: (
                    outcome(r, PAYMENTS, "www.example.com") == ("allow", "rule_allow", "open-web")
                )
            )
            assert outcome(replica, PAYMENTS, "x.pastebin.com") == ("deny", "rule_deny", "no-paste")


async def test_an_invalid_egress_policy_isolates_the_pods_it_selects(fake: FakeKube) -> None:
    allow = {
        "metadata": {"name": "allow-all", "namespace": "payments"},
        "spec": {"rules": [{"name": "r", "action": "Allow", "to": [{"fqdn": "*.example.com"}]}]},
    }
    bad = {
        "metadata": {"name": "api-deny", "namespace": "payments"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "api"}},
            "rules": [{"name": "r", "action": "Deny", "to": [{"fqdn": "evil.*.example.com"}]}],
        },
    }
    worker = Workload(
        kind=WorkloadKind.POD,
        namespace="payments",
        name="worker-1",
        labels={"app": "worker"},
        namespace_labels=PAYMENTS.namespace_labels,
    )
    fake.create("egresspolicies", allow)
    fake.create("egresspolicies", bad)
    async with Informers(fake, identity=False, policies=True) as informers:
        await informers.synced()
        # The Deny it meant could have covered anything "allow-all" lets through: its pods are
        # denied what the namespace tier decides; other pods of the namespace are not.
        await eventually(
            lambda: (
                outcome(informers, PAYMENTS, "evil.x.example.com")
                == ("deny", "policy_invalid", "payments/api-deny")
            )
        )
        assert outcome(informers, PAYMENTS, "www.example.com") == (
            "deny",
            "policy_invalid",
            "payments/api-deny",
        )
        assert outcome(informers, worker, "www.example.com") == (
            "allow",
            "rule_allow",
            "payments/allow-all",
        )
        assert informers.plane.policy_source is not None
        assert informers.plane.policy_source.invalid() == [
            "EgressPolicy payments/api-deny: 1 issue(s)"
        ]
