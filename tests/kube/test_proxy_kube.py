"""The proxy started as the CLI starts it, configured with a kubeconfig for the fake API server.
Pods are given loopback addresses (127.0.0.x); a client bound to one of them is that pod."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fakekube import FakeKube, namespace, pod
from tests.support.htpasswd import write_password_file
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI
from tests.support.proxyproc import ProxyProcess, explain, get_from, read_response, ready
from tests.support.waiting import wait_for

PORTS = "[{port: 1024, endPort: 65535}]"
PAYMENTS_POLICY = f"""
apiVersion: outgate.dev/v1alpha1
kind: ClusterEgressPolicy
metadata: {{name: payments-api}}
spec:
  tier: admin
  subject:
    namespaceSelector: {{matchLabels: {{team: payments}}}}
    podSelector: {{matchLabels: {{app: api}}}}
    serviceAccounts: [api-sa]
    owners: [{{kind: Deployment, name: api}}]
  rules:
    - name: api-egress
      action: Allow
      to: [{{fqdn: origin.test}}, {{cidr: 127.0.0.0/8}}]
      ports: {PORTS}
"""
API_LABELS = {"app": "api", "pod-template-hash": "5f7c9"}


def api_pod(name: str, ip: str, **kwargs: Any) -> dict[str, Any]:
    return pod(
        name,
        ip,
        namespace="payments",
        labels=API_LABELS,
        owner=("ReplicaSet", "api-5f7c9"),
        service_account="api-sa",
        **kwargs,
    )


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeKube]:
    with FakeKube(tmp_path / "kube") as server:
        server.create("namespaces", namespace("payments", {"team": "payments"}))
        yield server


StartProxy = Callable[..., ProxyProcess]


def start_with_kube(
    start_proxy: StartProxy,
    fake: FakeKube,
    policies: str,
    *,
    identity: bool = True,
    cluster_policies: bool = False,
    wait_ready: bool = True,
    nameserver: str | None = None,
    config: dict[str, Any] | None = None,
) -> ProxyProcess:
    proxy = start_proxy(
        policies,
        nameserver=nameserver,
        config={
            "identity": {"kubernetes": identity, "kubeconfig": str(fake.kubeconfig())},
            "policies": {"paths": ["policies"], "kubernetes": cluster_policies},
            **(config or {}),
        },
    )
    if wait_ready:
        wait_for(lambda: ready(proxy))
    return proxy


def test_identity_end_to_end_names_the_pod_in_the_decision_and_audit_record(
    start_proxy: StartProxy, fake: FakeKube, origin: OriginServer
) -> None:
    created = fake.create("pods", api_pod("api-5f7c9-abcde", "127.0.0.5"))
    fake.create("pods", pod("other", "127.0.0.6", namespace="payments", labels={"app": "api"}))
    proxy = start_with_kube(start_proxy, fake, PAYMENTS_POLICY)
    url = f"http://127.0.0.1:{origin.port}/hello"

    status, _, body = get_from(proxy, "127.0.0.5", url)
    assert (status, body) == (200, b"hello from origin\n")
    decision, close = proxy.records_by_path("/hello")
    assert decision["source"]["ip"] == "127.0.0.5"
    assert decision["outgate"]["decision"] == "allow"
    assert decision["outgate"]["source_kind"] == "pod"
    assert decision["rule"] == {"name": "api-egress", "ruleset": "payments-api"}
    assert decision["kubernetes"] == {
        "namespace": "payments",
        "pod": {
            "name": "api-5f7c9-abcde",
            "uid": created["metadata"]["uid"],
            "labels": API_LABELS,
        },
        "service_account": "api-sa",
    }
    assert decision["outgate"]["workload"] == "Deployment/api"
    assert close["outgate"]["reason"] == "completed"
    # The labels the decision selected on (pod and namespace), as /explain shows them.
    workload = explain(proxy, "127.0.0.5", url)["workload"]
    assert workload["labels"] == API_LABELS
    assert workload["namespaceLabels"]["team"] == "payments"
    assert workload["owner"] == {"kind": "Deployment", "name": "api"}

    # Same namespace and labels, another service account and no owner: not selected.
    status, headers, _ = get_from(proxy, "127.0.0.6", url)
    assert status == 403
    assert headers["x-outgate-reason"] == "default_deny"


def test_pods_keep_their_informer_identity_inside_proxy_auth_sources(
    start_proxy: StartProxy, fake: FakeKube, origin: OriginServer, tmp_path: Path
) -> None:
    fake.create("pods", api_pod("api-5f7c9-abcde", "127.0.0.5"))
    htpasswd = write_password_file(tmp_path / "htpasswd", {"alice": "a password"})
    proxy = start_with_kube(
        start_proxy,
        fake,
        PAYMENTS_POLICY,
        config={
            "auth": {
                "basic": {
                    "file": str(htpasswd),
                    "sources": ["127.0.0.0/8"],
                    "users": {"alice": {"identity": "test-client"}},
                }
            }
        },
    )
    url = f"http://127.0.0.1:{origin.port}/hello"
    status, _, _ = get_from(proxy, "127.0.0.5", url)  # the pod: no login asked
    assert status == 200
    status, headers, _ = get_from(proxy, "127.0.0.9", url)  # no pod there: log in
    assert status == 407
    assert headers["proxy-authenticate"].startswith("Basic ")
    pod_records = proxy.wait_records(lambda r: r["source"]["ip"] == "127.0.0.5", count=2)
    assert all(r["outgate"]["source_kind"] == "pod" and "user" not in r for r in pod_records)


def test_two_running_pods_on_one_ip_are_refused_as_ambiguous(
    start_proxy: StartProxy, fake: FakeKube, origin: OriginServer
) -> None:
    fake.create("pods", api_pod("api-5f7c9-one", "127.0.0.7"))
    fake.create("pods", api_pod("api-5f7c9-two", "127.0.0.7"))
    proxy = start_with_kube(start_proxy, fake, PAYMENTS_POLICY)
    status, headers, _ = get_from(proxy, "127.0.0.7", f"http://127.0.0.1:{origin.port}/x")
    assert status == 403
    assert headers["x-outgate-reason"] == "ambiguous_source"
    decision = proxy.wait_records(lambda r: r["outgate"].get("reason") == "ambiguous_source")[0]
    assert decision["outgate"]["source_kind"] == "ambiguous"
    assert decision["kubernetes"]["pod"]["name"] == "api-5f7c9-one,api-5f7c9-two"
    assert origin.paths_seen() == []
    wait_for(lambda: "outgate_pod_ambiguous_ips 1.0" in proxy.admin("/metrics")[1])
    metrics = proxy.admin("/metrics")[1]
    assert 'outgate_identity_lookups_total{result="ambiguous"}' in metrics


def test_until_pods_and_namespaces_sync_readyz_fails_and_requests_get_503(
    start_proxy: StartProxy, fake: FakeKube, origin: OriginServer
) -> None:
    fake.create("pods", api_pod("api-5f7c9-abcde", "127.0.0.8"))
    fake.hold_lists("namespaces")
    proxy = start_with_kube(start_proxy, fake, PAYMENTS_POLICY, wait_ready=False)
    wait_for(lambda: fake.requests_for("pods", "watch"))  # pods synced, namespaces held
    status, body = proxy.admin("/readyz")
    assert status == 503
    detail = json.loads(body)["kubernetes"]
    assert detail["synced"]["pods"] is True and detail["synced"]["namespaces"] is False
    status, headers, _ = get_from(proxy, "127.0.0.8", f"http://127.0.0.1:{origin.port}/hello")
    assert status == 503
    assert headers["x-outgate-reason"] == "not_ready"
    fake.release_lists("namespaces")
    wait_for(lambda: ready(proxy))
    status, _, _ = get_from(proxy, "127.0.0.8", f"http://127.0.0.1:{origin.port}/hello")
    assert status == 200


def test_a_deleted_pods_open_tunnel_is_closed_with_reason_source_gone(
    start_proxy: StartProxy,
    fake: FakeKube,
    tls_origin: OriginServer,
    pki: OriginPKI,
    dns_server: ScriptedDNSServer,
) -> None:
    dns_server.addresses("origin.test", "127.0.0.1")
    fake.create("pods", api_pod("api-5f7c9-abcde", "127.0.0.9"))
    proxy = start_with_kube(start_proxy, fake, PAYMENTS_POLICY, nameserver=dns_server.nameserver)
    raw = socket.create_connection(
        ("127.0.0.1", proxy.port), timeout=10, source_address=("127.0.0.9", 0)
    )
    target = f"origin.test:{tls_origin.port}"
    raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(1)
    assert head.startswith(b"HTTP/1.1 200")
    tls = pki.client_context().wrap_socket(raw, server_hostname="origin.test")
    with tls:
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        assert b"hello from origin" in tls.recv(4096)

        fake.delete("pods", "payments", "api-5f7c9-abcde")
        tls.settimeout(10)
        try:
            leftover = tls.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            leftover = b""
        assert leftover == b""  # closed by the proxy, not by the client or a timeout
    close = proxy.wait_records(
        lambda r: r["event"]["action"] == "close" and r["outgate"]["connection"] == "tunnel"
    )[0]
    assert close["outgate"]["reason"] == "source_gone"
    assert close["kubernetes"]["pod"]["name"] == "api-5f7c9-abcde"
    proxy.wait_log(lambda e: e.get("event") == "source_gone_connections_closed")


def test_a_namespace_label_change_is_in_the_next_decision(
    start_proxy: StartProxy, fake: FakeKube, origin: OriginServer
) -> None:
    fake.create("pods", api_pod("api-5f7c9-abcde", "127.0.0.10"))
    proxy = start_with_kube(start_proxy, fake, PAYMENTS_POLICY)
    url = f"http://127.0.0.1:{origin.port}/hello"
    assert get_from(proxy, "127.0.0.10", url)[0] == 200
    fake.patch(
        "namespaces", "", "payments", lambda o: o["metadata"]["labels"].update(team="billing")
    )
    wait_for(lambda: explain(proxy, "127.0.0.10", url)["decision"]["action"] == "deny")
    status, headers, _ = get_from(proxy, "127.0.0.10", url)
    assert (status, headers["x-outgate-reason"]) == (403, "default_deny")


# -- policies from the cluster ------------------------------------------------------------------

STATIC_CLIENT = "127.0.0.1"  # proxyproc's static identity: namespace tests, labels app=client


def egress_policy(name: str, fqdn: str, *, action: str = "Allow") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "tests"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "client"}},
            "rules": [
                {
                    "name": f"{name}-rule",
                    "action": action,
                    "to": [{"fqdn": fqdn}, {"cidr": "127.0.0.0/8"}],
                    "ports": [{"port": 1024, "endPort": 65535}],
                }
            ],
        },
    }


def decision_for(proxy: ProxyProcess, url: str) -> tuple[str, str | None]:
    verdict = explain(proxy, STATIC_CLIENT, url)["decision"]
    return verdict["action"], verdict["ruleset"]


def test_crd_policies_created_updated_and_deleted_change_decisions(
    start_proxy: StartProxy, fake: FakeKube, origin: OriginServer
) -> None:
    proxy = start_with_kube(start_proxy, fake, "", identity=False, cluster_policies=True)
    url = f"http://127.0.0.1:{origin.port}/hello"
    assert decision_for(proxy, url) == ("deny", None)

    fake.create("egresspolicies", egress_policy("web", "origin.test"))
    wait_for(lambda: decision_for(proxy, url) == ("allow", "tests/web"))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert read_response(sock)[0] == 200

    # Update: the same policy now denies what it allowed.
    fake.update("egresspolicies", egress_policy("web", "origin.test", action="Deny"))
    wait_for(lambda: decision_for(proxy, url) == ("deny", "tests/web"))

    # A cluster-scoped one in the admin tier, then deleting both.
    fake.create(
        "clusteregresspolicies",
        {
            "metadata": {"name": "admin-allow"},
            "spec": {
                "tier": "admin",
                "rules": [
                    {
                        "name": "loopback",
                        "action": "Allow",
                        "to": [{"cidr": "127.0.0.0/8"}],
                        "ports": [{"port": 1024, "endPort": 65535}],
                    }
                ],
            },
        },
    )
    wait_for(lambda: decision_for(proxy, url) == ("allow", "admin-allow"))
    fake.delete("clusteregresspolicies", "", "admin-allow")
    fake.delete("egresspolicies", "tests", "web")
    wait_for(lambda: decision_for(proxy, url) == ("deny", None))


def test_an_invalid_crd_denies_its_pods_with_a_visible_reason_until_fixed(
    start_proxy: StartProxy, fake: FakeKube, origin: OriginServer
) -> None:
    proxy = start_with_kube(start_proxy, fake, "", identity=False, cluster_policies=True)
    url = f"http://127.0.0.1:{origin.port}/hello"
    fake.create("egresspolicies", egress_policy("good", "origin.test"))
    wait_for(lambda: decision_for(proxy, url) == ("allow", "tests/good"))
    # It selects the same pods as "good": fail closed, they are denied until it is fixed, and
    # the record and the explanation say which object and why.
    bad = fake.create("egresspolicies", egress_policy("bad", "api.*.example.com"))
    wait_for(lambda: decision_for(proxy, url) == ("deny", "tests/bad"))
    explained = explain(proxy, STATIC_CLIENT, url)
    assert explained["decision"]["reason"] == "policy_invalid"
    assert any(
        step["ruleset"] == "tests/bad"
        and "the policy is invalid" in step["result"]
        and "spec.rules[0].to[0].fqdn" in step["result"]
        for step in explained["steps"]
    ), explained["steps"]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert read_response(sock)[0] == 403
    (record,) = proxy.wait_records(
        lambda e: e["event"]["action"] == "decision" and e["outgate"]["decision"] == "deny"
    )
    assert (record["outgate"]["reason"], record["rule"]["ruleset"]) == (
        "policy_invalid",
        "tests/bad",
    )

    event = wait_for(
        lambda: next((e for e in fake.events_posted if e["involvedObject"]["name"] == "bad"), None)
    )
    assert event["reason"] == "InvalidPolicy"
    assert event["type"] == "Warning"
    assert event["metadata"]["namespace"] == "tests"
    assert event["involvedObject"] == {
        "apiVersion": "outgate.dev/v1alpha1",
        "kind": "EgressPolicy",
        "name": "bad",
        "namespace": "tests",
        "uid": bad["metadata"]["uid"],
        "resourceVersion": bad["metadata"]["resourceVersion"],
    }
    assert "spec.rules[0].to[0].fqdn" in event["message"]
    assert "EgressPolicy tests/bad" in event["message"]
    detail = json.loads(proxy.admin("/readyz")[1])["kubernetes"]
    assert detail["invalid_policies"] == ["EgressPolicy tests/bad: 1 issue(s)"]
    assert 'outgate_kube_invalid_policies{kind="EgressPolicy"} 1.0' in proxy.admin("/metrics")[1]
    proxy.wait_log(lambda e: e.get("event") == "kube_policy_invalid")

    # Fixing it brings it in: it denies only api.example.com, and "good" allows again.
    fixed = egress_policy("bad", "api.example.com", action="Deny")
    fixed["spec"]["rules"][0]["to"] = [{"fqdn": "api.example.com"}]
    fake.update("egresspolicies", fixed)
    wait_for(lambda: json.loads(proxy.admin("/readyz")[1])["kubernetes"]["invalid_policies"] == [])
    wait_for(lambda: decision_for(proxy, url) == ("allow", "tests/good"))


def test_the_proxy_writes_policy_status_releases_its_lease_and_can_be_told_not_to(
    start_proxy: StartProxy, fake: FakeKube
) -> None:
    too_wide = {
        "metadata": {"name": "too-wide", "namespace": "payments"},
        "spec": {"rules": [{"name": "r", "action": "Allow", "to": [{"fqdn": "*.com"}]}]},
    }
    fake.create("egresspolicies", too_wide)

    def accepted() -> tuple[str, int] | None:
        status = fake.get("egresspolicies", "payments", "too-wide").get("status") or {}
        found = [c for c in status.get("conditions", []) if c["type"] == "Accepted"]
        return (found[0]["status"], found[0]["observedGeneration"]) if found else None

    writer = start_with_kube(start_proxy, fake, "", identity=False, cluster_policies=True)
    wait_for(lambda: accepted() == ("False", 1))
    (lease,) = fake.objects("leases")
    assert lease["metadata"]["namespace"] == "outgate-system"  # no POD_NAMESPACE here
    assert lease["spec"]["holderIdentity"].startswith(socket.gethostname() + "_")
    assert writer.stop() == 0
    (lease,) = fake.objects("leases")
    assert lease["spec"]["holderIdentity"] == ""  # released on a clean stop

    fake.patch("egresspolicies", "payments", "too-wide", lambda o: o["spec"].update(mode="audit"))
    requests = len(fake.requests)
    silent = start_with_kube(
        start_proxy,
        fake,
        "",
        identity=False,
        config={
            "policies": {"paths": ["policies"], "kubernetes": True, "status": {"write": False}}
        },
    )
    silent.wait_log(lambda e: e.get("event") == "kube_policies_installed")
    assert silent.stop() == 0
    assert accepted() == ("False", 1)  # generation 2 was never written
    later = fake.requests[requests:]
    assert not [r for r in later if r.resource == "leases" or r.verb == "patch"]
