"""The proxy against a real kube-apiserver, installed from the project's own manifests and run
with its ServiceAccount's token: it syncs with the shipped RBAC and uses nothing beyond it, and
pods given addresses as a kubelet gives them are the sources of its audit records."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

from proxy.control.kube.access import CLUSTER_GRANTS, LEASE_GRANTS
from tests.realkube.conftest import CRDS, PROXY_ACCOUNT, PROXY_NAMESPACE
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI
from tests.support.proxyproc import ProxyProcess, get_from, ready
from tests.support.realkube import RealKube, api_errors_in, cluster_policy
from tests.support.waiting import wait_for

PROXY_USER = f"system:serviceaccount:{PROXY_NAMESPACE}:{PROXY_ACCOUNT}"


def test_the_project_manifests_install_and_the_proxy_runs_on_its_service_account(
    realkube: RealKube, kube_proxy: Callable[..., ProxyProcess]
) -> None:
    for name in CRDS:
        _, crd = realkube.api(
            "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
        )
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True", crd["status"]
        assert conditions.get("NonStructuralSchema") is None
    _, role = realkube.api("GET", "/apis/rbac.authorization.k8s.io/v1/clusterroles/outgate")
    assert role["rules"]
    _, binding = realkube.api(
        "GET", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/outgate"
    )
    assert binding["subjects"][0]["name"] == PROXY_ACCOUNT

    proxy = kube_proxy()
    wait_for(lambda: ready(proxy), what="the proxy synced with the real API server")
    assert api_errors_in(proxy) == []
    documented = {
        (g.group, g.resource, v) for g in (*CLUSTER_GRANTS, *LEASE_GRANTS) for v in g.verbs
    }
    informers = {(g, r, v) for g, r, v in documented if v in ("list", "watch")}

    def used() -> set[tuple[str, str, str]]:
        return {
            (e["objectRef"].get("apiGroup", ""), _resource(e["objectRef"]), e["verb"])
            for e in realkube.audit_events(user=PROXY_USER)
        }

    # Every informer listed and watched (the Event grant is used only for an invalid policy).
    # The server audits a watch on an idle resource only when its stream ends: stop the proxy.
    assert proxy.stop() == 0
    wait_for(lambda: informers <= used(), what="every informer's list and watch, audited")
    assert used() <= documented, f"verbs beyond docs/kubernetes.md: {used() - documented}"
    refused = [
        e
        for e in realkube.audit_events(user=PROXY_USER)
        if e.get("responseStatus", {}).get("code") in (401, 403)
    ]
    assert refused == []


def test_pods_are_attributed_deleted_pods_lose_their_tunnels_and_a_reused_ip_is_the_new_pod(
    realkube: RealKube,
    kube_proxy: Callable[..., ProxyProcess],
    namespace_name: Callable[[str], str],
    pod_ip: Callable[[], str],
    origin: OriginServer,
    tls_origin: OriginServer,
    pki: OriginPKI,
    dns_server: ScriptedDNSServer,
) -> None:
    payments, billing = namespace_name("payments"), namespace_name("billing")
    realkube.create_namespace(payments, {"outgate.dev/test-namespace": payments})
    realkube.create_namespace(billing, {"outgate.dev/test-namespace": billing})
    realkube.apply(cluster_policy(namespace_name("payments-egress"), payments, "origin.test"))
    dns_server.addresses("origin.test", "127.0.0.1")
    ip = pod_ip()
    labels = {"app": "api", "pod-template-hash": "5f7c9"}
    created = realkube.create_pod(
        payments, "api-5f7c9-abcde", ip, labels=labels, owner=("ReplicaSet", "api-5f7c9")
    )
    proxy = kube_proxy(nameserver=dns_server.nameserver)
    wait_for(lambda: ready(proxy))

    # Attributed: namespace, pod and owner, from the real informer's view of the pod.
    status, _, _ = get_from(proxy, ip, f"http://127.0.0.1:{origin.port}/hello")
    assert status == 200
    decision, _ = proxy.records_by_path("/hello")
    assert decision["kubernetes"]["namespace"] == payments
    assert decision["kubernetes"]["pod"]["name"] == "api-5f7c9-abcde"
    assert decision["kubernetes"]["pod"]["uid"] == created["metadata"]["uid"]
    assert decision["outgate"]["workload"] == "Deployment/api"
    assert decision["outgate"]["decision"] == "allow"

    # Deleted: an open tunnel of the pod is closed by the proxy with reason source_gone.
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10, source_address=(ip, 0))
    target = f"origin.test:{tls_origin.port}"
    raw.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    with pki.client_context().wrap_socket(raw, server_hostname="origin.test") as tls:
        tls.sendall(b"GET /hello HTTP/1.1\r\nHost: origin.test\r\n\r\n")
        assert b"hello from origin" in tls.recv(4096)
        realkube.delete(f"/api/v1/namespaces/{payments}/pods/api-5f7c9-abcde")
        tls.settimeout(15)
        try:
            leftover = tls.recv(4096)
        except (ConnectionResetError, ssl.SSLError):
            leftover = b""
        assert leftover == b""
    close = proxy.wait_records(
        lambda r: r["event"]["action"] == "close" and r["outgate"]["connection"] == "tunnel"
    )[0]
    assert close["outgate"]["reason"] == "source_gone"
    assert close["kubernetes"]["pod"]["name"] == "api-5f7c9-abcde"

    # Reused: the address now belongs to a pod of another namespace, which no policy allows.
    realkube.create_pod(billing, "batch-runner", ip, labels={"app": "batch"})

    def attributed_to_new_pod() -> dict[str, Any] | None:
        status, _, _ = get_from(proxy, ip, f"http://127.0.0.1:{origin.port}/reused")
        decisions = [
            r
            for r in proxy.records
            if r.get("url", {}).get("path") == "/reused" and r["event"]["action"] == "decision"
        ]
        last = decisions[-1] if decisions else None
        if last and last.get("kubernetes", {}).get("pod", {}).get("name") == "batch-runner":
            return {"status": status, **last}
        return None

    reused = wait_for(attributed_to_new_pod, what="the reused address attributed to the new pod")
    assert reused["kubernetes"]["namespace"] == billing
    assert reused["outgate"]["decision"] == "deny"
    assert reused["status"] == 403
    assert api_errors_in(proxy) == []


def _resource(ref: dict[str, str]) -> str:
    """As RBAC names it: a subresource is `resource/subresource` (egresspolicies/status)."""
    sub = ref.get("subresource")
    return f"{ref['resource']}/{sub}" if sub else ref["resource"]
