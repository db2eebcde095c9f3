"""Policy status on a real API server (issue 18, item 5): `kubectl get` shows whether each policy
is accepted, with the validator's message in the condition; two proxies with different
ServiceAccounts run, and the API server's audit log shows that only the Lease holder patches
status; stopping the holder (cleanly, or by freezing it) lets the other take over and write.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from proxy.control.kube.policies import policy_from_object
from proxy.control.kube.status import FAIL_CLOSED_NOTE
from proxy.core.policy.model import PolicyKind
from tests.realkube.conftest import PROXY_ACCOUNT, PROXY_NAMESPACE
from tests.support.proxyproc import ProxyProcess
from tests.support.realkube import RealKube
from tests.support.waiting import wait_for

LEASE_PATH = (
    f"/apis/coordination.k8s.io/v1/namespaces/{PROXY_NAMESPACE}/leases/outgate-policy-status"
)
POLICIES = "/apis/outgate.dev/v1alpha1"
# The project's ServiceAccount, and a second one bound to the same ClusterRole and Role: the
# audit log names the user of every request, so it tells the two proxies apart.
FIRST, SECOND = PROXY_ACCOUNT, "outgate-status-b"
# client-go's leader election, as the proxy keeps it: 15 s lease, renewed every 5 s.
LEASE_SECONDS = 15


def egress(namespace: str, name: str, fqdn: str, *, mode: str = "enforce") -> dict[str, Any]:
    return {
        "apiVersion": "outgate.dev/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"mode": mode, "rules": [{"name": "r", "action": "Allow", "to": [{"fqdn": fqdn}]}]},
    }


def kubectl_get(kube: RealKube, resource: str, *args: str) -> list[dict[str, str]]:
    """`kubectl get` as a person types it: the printed table, as rows keyed by column."""
    kubectl = Path(sys.executable).with_name("kubectl")
    result = subprocess.run(
        [str(kubectl), "--kubeconfig", str(kube.admin_kubeconfig), "get", resource, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    header, *lines = result.stdout.splitlines()
    # Columns are aligned under their headers; a cell may be empty (no status yet).
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    return [{header[a:b].strip(): line[a:b].strip() for a, b in bounds} for line in lines]


def accepted_column(kube: RealKube, namespace: str) -> dict[str, str]:
    rows = kubectl_get(kube, "egresspolicies", "-n", namespace)
    return {row["NAME"]: row["ACCEPTED"] for row in rows}


def condition(kube: RealKube, namespace: str, name: str) -> dict[str, Any] | None:
    _, obj = kube.api("GET", f"{POLICIES}/namespaces/{namespace}/egresspolicies/{name}")
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Accepted"), None)


def status_patches(kube: RealKube, namespace: str, since: str) -> list[tuple[str, str]]:
    """(user, object name) of each status patch in `namespace`, from the API server's audit
    log: every attempt, whatever its answer."""
    return [
        (event["user"]["username"], event["objectRef"]["name"])
        for event in kube.audit_events()
        if event["verb"] == "patch"
        and event["objectRef"].get("subresource") == "status"
        and event["objectRef"].get("namespace") == namespace
        and event["requestReceivedTimestamp"] >= since
    ]


def user(account: str) -> str:
    return f"system:serviceaccount:{PROXY_NAMESPACE}:{account}"


def lease_holder(kube: RealKube) -> str:
    status, lease = kube.api("GET", LEASE_PATH, raw=True)
    return str(lease["spec"].get("holderIdentity") or "") if status == 200 else ""


def holder_of(proxy: ProxyProcess) -> str:
    acquired = [e for e in proxy.logs if e.get("event") == "lease_acquired"]
    return str(acquired[-1]["identity"]) if acquired else ""


def utc_now() -> str:
    """As the audit log writes requestReceivedTimestamp, so that strings compare as times."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture(scope="module")
def second_account(realkube: RealKube) -> str:
    """A second ServiceAccount bound to the shipped ClusterRole and Role, as a second replica
    would be if it ran under its own account: the audit log names each request's user."""
    realkube.apply(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": SECOND, "namespace": PROXY_NAMESPACE},
        }
    )
    subjects = [{"kind": "ServiceAccount", "name": SECOND, "namespace": PROXY_NAMESPACE}]
    for kind, name, metadata in (
        ("ClusterRole", "outgate", {"name": SECOND}),
        ("Role", "outgate-policy-status", {"name": SECOND, "namespace": PROXY_NAMESPACE}),
    ):
        realkube.apply(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": f"{kind}Binding",
                "metadata": metadata,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
                "subjects": subjects,
            }
        )
    return SECOND


@pytest.fixture
def two_proxies(
    realkube: RealKube, kube_proxy: Callable[..., ProxyProcess], second_account: str
) -> Iterator[dict[str, ProxyProcess]]:
    # A Lease left by an earlier test's proxy (one stopped hard) would only delay this test.
    realkube.delete(LEASE_PATH, missing_ok=True)
    proxies = {
        account: kube_proxy(name=account, account=account) for account in (FIRST, second_account)
    }
    yield proxies
    for proxy in proxies.values():  # a frozen one must thaw to stop
        if proxy.proc is not None and proxy.proc.poll() is None:
            proxy.signal(signal.SIGCONT)


def the_holder(kube: RealKube, proxies: dict[str, ProxyProcess]) -> tuple[str, str]:
    """(holder's account, the other's account), once one of them holds the Lease."""

    def holding() -> str | None:
        identity = lease_holder(kube)
        return next((a for a, p in proxies.items() if identity and holder_of(p) == identity), None)

    account = wait_for(holding, timeout=20)
    return account, next(a for a in proxies if a != account)


@pytest.fixture
def team(realkube: RealKube, namespace_name: Callable[[str], str]) -> str:
    name = namespace_name("policy-status")
    realkube.create_namespace(name)
    return name


def test_kubectl_shows_whether_each_policy_is_accepted_and_only_the_holder_writes(
    realkube: RealKube, two_proxies: dict[str, ProxyProcess], team: str
) -> None:
    since = utc_now()
    # Accepted by the CRD schema (a wildcard is a string), refused by the validator.
    realkube.apply(egress(team, "too-wide", "*.com"))
    realkube.apply(egress(team, "payments", "api.stripe.com", mode="audit"))
    expected = {"too-wide": "False", "payments": "True"}
    wait_for(lambda: accepted_column(realkube, team) == expected, timeout=20)
    rows = {row["NAME"]: row for row in kubectl_get(realkube, "egresspolicies", "-n", team)}
    assert list(rows["payments"]) == ["NAME", "MODE", "ACCEPTED", "AGE"]
    assert rows["payments"]["MODE"] == "audit"

    refused = condition(realkube, team, "too-wide")
    assert refused is not None and refused["reason"] == "InvalidPolicy"
    _, stored = realkube.api("GET", f"{POLICIES}/namespaces/{team}/egresspolicies/too-wide")
    _, issues = policy_from_object(PolicyKind.NAMESPACED, stored)
    assert refused["message"] == "\n".join(
        [FAIL_CLOSED_NOTE, *(issue.render() for issue in issues)]
    )
    assert "spec.rules[0].to[0].fqdn" in refused["message"]
    assert refused["observedGeneration"] == stored["metadata"]["generation"]
    assert stored["status"]["observedGeneration"] == stored["metadata"]["generation"]
    valid = condition(realkube, team, "payments")
    assert valid is not None and valid["reason"] == "Valid"

    holder, _ = the_holder(realkube, two_proxies)
    writers = {account for account, _ in status_patches(realkube, team, since)}
    assert writers == {user(holder)}

    # The cluster kind: its columns, Accepted among them. Selects only this test's namespace.
    cluster = {
        "apiVersion": "outgate.dev/v1alpha1",
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": team},
        "spec": {
            "tier": "baseline",
            "priority": 500,
            "subject": {"namespaceSelector": {"matchLabels": {"outgate.dev/test-namespace": team}}},
            "rules": [{"name": "r", "action": "Deny", "to": [{"fqdn": "*.example.com"}]}],
        },
    }
    realkube.apply(cluster)

    def cluster_row() -> dict[str, str] | None:
        rows = kubectl_get(realkube, "clusteregresspolicies", team)
        return rows[0] if rows and rows[0]["ACCEPTED"] else None

    row = wait_for(cluster_row, timeout=20)
    assert row == {
        "NAME": team,
        "TIER": "baseline",
        "PRIORITY": "500",
        "MODE": "",
        "ACCEPTED": "True",
        "AGE": row["AGE"],
    }


def test_stopping_the_holder_lets_the_other_take_over_and_write(
    realkube: RealKube, two_proxies: dict[str, ProxyProcess], team: str
) -> None:
    realkube.apply(egress(team, "before", "*.org"))
    holder, other = the_holder(realkube, two_proxies)
    wait_for(lambda: accepted_column(realkube, team).get("before") == "False", timeout=20)
    assert two_proxies[holder].stop() == 0  # SIGTERM: drains and releases the Lease
    since = utc_now()
    wait_for(lambda: lease_holder(realkube) == holder_of(two_proxies[other]), timeout=15)
    realkube.apply(egress(team, "after", "*.net"))
    wait_for(lambda: accepted_column(realkube, team).get("after") == "False", timeout=20)
    assert {account for account, _ in status_patches(realkube, team, since)} == {user(other)}


def test_a_frozen_holder_is_taken_over_and_does_not_write_when_it_thaws(
    realkube: RealKube, two_proxies: dict[str, ProxyProcess], team: str
) -> None:
    holder, other = the_holder(realkube, two_proxies)
    frozen = two_proxies[holder]
    frozen.signal(signal.SIGSTOP)  # a hung process: it neither renews nor releases
    stopped_at = time.monotonic()
    since = utc_now()
    wait_for(
        lambda: lease_holder(realkube) == holder_of(two_proxies[other]),
        timeout=LEASE_SECONDS + 10,
    )
    # Not before the Lease ran out: its last renewal was at most one renew period (5 s) before
    # the freeze, and the other waited a whole lease duration after it.
    assert time.monotonic() - stopped_at >= LEASE_SECONDS - 5.5
    realkube.apply(egress(team, "while-frozen", "*.io"))
    wait_for(lambda: accepted_column(realkube, team).get("while-frozen") == "False", timeout=20)
    frozen.signal(signal.SIGCONT)
    frozen.wait_log(lambda e: e.get("event") == "lease_lost", timeout=15)
    realkube.apply(egress(team, "after-thaw", "*.dev"))
    wait_for(lambda: accepted_column(realkube, team).get("after-thaw") == "False", timeout=20)
    assert {account for account, _ in status_patches(realkube, team, since)} == {user(other)}
