"""Issue 19 on a real API server: the API server itself calls `outgate webhook` (registered with
the component's own webhook configurations, pointed at the test process by `url` + `caBundle`),
so what is shown is what `kubectl apply` and pod creation do in a cluster. And, with the webhook
off, an invalid edit of an admin-tier deny keeps its destination denied on two proxy replicas."""

from __future__ import annotations

import base64
import copy
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.tls.ca import init_ca
from tests.deploy import kube as manifests
from tests.support.dnsserver import ScriptedDNSServer
from tests.support.fixtures import allow_rule, client_policy
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI
from tests.support.proxyproc import ProxyProcess
from tests.support.realkube import RealKube
from tests.support.waiting import wait_for
from tests.support.webhook import WebhookProcess

CONFIGURATIONS = manifests.MANIFESTS / "components" / "webhook" / "webhooks.yaml"
PROXY_SERVICE = "outgate.outgate-system.svc.cluster.local:3128"
INJECT = {
    "proxy": PROXY_SERVICE,
    "namespace": "outgate-system",
    "clusterDomain": "cluster.local",
    "clusterCIDRs": ["10.96.0.0/12", "10.244.0.0/16"],
    "kubernetesServiceIP": "10.96.0.1",
}
ADMISSION = "/apis/admissionregistration.k8s.io/v1"
POLICIES = "/apis/outgate.dev/v1alpha1"
ORIGIN_PORTS = [{"port": 1024, "endPort": 65535}]


def kubectl(
    kube: RealKube, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl as a user runs it, with the admin credentials of the tier."""
    binary = Path(sys.executable).with_name("kubectl")
    return subprocess.run(
        [str(binary), "--kubeconfig", str(kube.admin_kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def register(
    kube: RealKube, webhook: WebhookProcess, *, kinds: tuple[str, ...]
) -> Callable[[], None]:
    """Create the component's own configurations of `kinds`, each webhook's service reference
    replaced by the test process's URL and CA (the API server here has no cluster network).
    Returns the cleanup, which deletes them: a registration left behind would send every later
    test's pods and policies to a webhook that is gone."""
    bundle = base64.b64encode(webhook.pki.ca_pem.read_bytes()).decode()
    created: list[str] = []
    for configuration in yaml.safe_load_all(CONFIGURATIONS.read_text()):
        if configuration["kind"] not in kinds:
            continue
        configuration = copy.deepcopy(configuration)
        configuration["metadata"].pop("annotations", None)  # no cert-manager here
        for hook in configuration["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{webhook.url}{path}", "caBundle": bundle}
        plural = configuration["kind"].lower() + "s"
        kube.api("POST", f"{ADMISSION}/{plural}", configuration)
        created.append(f"{ADMISSION}/{plural}/{configuration['metadata']['name']}")

    def cleanup() -> None:
        for path in created:
            kube.delete(path, missing_ok=True)

    return cleanup


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[WebhookProcess]:
    with WebhookProcess(tmp_path / "webhook", inject=INJECT) as process:
        yield process


@pytest.fixture
def validating(realkube: RealKube, webhook: WebhookProcess) -> Iterator[WebhookProcess]:
    cleanup = register(realkube, webhook, kinds=("ValidatingWebhookConfiguration",))
    try:
        yield webhook
    finally:
        cleanup()


@pytest.fixture
def mutating(realkube: RealKube, webhook: WebhookProcess) -> Iterator[WebhookProcess]:
    cleanup = register(realkube, webhook, kinds=("MutatingWebhookConfiguration",))
    try:
        yield webhook
    finally:
        cleanup()


def egress_policy(namespace: str, name: str, fqdn: str) -> dict[str, Any]:
    return {
        "apiVersion": "outgate.dev/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"rules": [{"name": "r", "action": "Allow", "to": [{"fqdn": fqdn}]}]},
    }


# -- validation --------------------------------------------------------------------------------


def test_kubectl_apply_of_a_bad_wildcard_is_refused_with_the_validators_path_and_fix(
    realkube: RealKube, validating: WebhookProcess, namespace_name: Callable[[str], str]
) -> None:
    namespace = namespace_name("wh-validate")
    realkube.create_namespace(namespace)
    # "*.com" passes the CRD's schema; the validator refuses allowing a whole top-level domain.
    bad = egress_policy(namespace, "web", "*.com")
    refused = kubectl(realkube, "apply", "-f", "-", stdin=json.dumps(bad))
    assert refused.returncode == 1
    assert 'admission webhook "policies.outgate.dev" denied the request' in refused.stderr
    assert (
        f"EgressPolicy {namespace}/web: spec.rules[0].to[0].fqdn: '*.com' would allow every name "
        "under the top-level domain 'com' -- fix: name a registered domain, e.g. "
        '"*.example.com"'
    ) in refused.stderr
    path = f"{POLICIES}/namespaces/{namespace}/egresspolicies/web"
    assert realkube.api("GET", path, raw=True)[0] == 404
    good = egress_policy(namespace, "web", "*.example.com")
    accepted = kubectl(realkube, "apply", "-f", "-", stdin=json.dumps(good))
    assert accepted.returncode == 0, accepted.stderr
    assert realkube.api("GET", path)[1]["spec"] == good["spec"]
    # An invalid edit of a stored policy is refused too.
    edited = kubectl(
        realkube, "apply", "-f", "-", stdin=json.dumps(egress_policy(namespace, "web", "*.io"))
    )
    assert edited.returncode == 1 and "spec.rules[0].to[0].fqdn" in edited.stderr


def test_with_the_webhook_stopped_policy_writes_fail_and_deletes_and_pods_go_through(
    realkube: RealKube, webhook: WebhookProcess, namespace_name: Callable[[str], str]
) -> None:
    namespace = namespace_name("wh-down")
    cleanup = register(
        realkube,
        webhook,
        kinds=("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"),
    )
    try:
        realkube.create_namespace(namespace, labels={"outgate.dev/inject": "enabled"})
        good = egress_policy(namespace, "kept", "*.example.com")
        assert kubectl(realkube, "apply", "-f", "-", stdin=json.dumps(good)).returncode == 0
        assert webhook.stop() == 0
        # Policies: failurePolicy Fail. A write is refused, even a valid one...
        other = egress_policy(namespace, "new", "*.example.com")
        refused = kubectl(realkube, "apply", "-f", "-", stdin=json.dumps(other))
        assert refused.returncode == 1
        assert 'failed calling webhook "policies.outgate.dev"' in refused.stderr
        # ...and a delete still goes through (DELETE is not intercepted).
        deleted = kubectl(realkube, "delete", "egresspolicy", "-n", namespace, "kept")
        assert deleted.returncode == 0, deleted.stderr
        # Pods: failurePolicy Ignore. Created, without the settings.
        pod = create_pod(realkube, namespace, pod_body("p"))
        assert "env" not in pod["spec"]["containers"][0]
        assert "outgate.dev/injected" not in pod["metadata"].get("annotations", {})
    finally:
        cleanup()


# -- fail closed with the webhook off ----------------------------------------------------------


def send_from(source: str, proxy: ProxyProcess, url: str) -> tuple[int, str]:
    """One plain-HTTP request through `proxy` from the address `source` (a pod's IP on lo)."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", proxy.port))
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    status = int(head.split(" ", 2)[1])
    reason = next(
        (line.split(":", 1)[1].strip() for line in head.split("\r\n")
         if line.lower().startswith("x-outgate-reason:")),
        "",
    )  # fmt: skip
    return status, reason


def cluster_policy(name: str, tier: str, rule: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "outgate.dev/v1alpha1",
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": name},
        "spec": {"tier": tier, "rules": [rule], **spec},
    }


def test_with_the_webhook_off_an_invalid_edit_of_an_admin_deny_keeps_its_subjects_denied(
    realkube: RealKube,
    kube_proxy: Callable[..., ProxyProcess],
    origin: OriginServer,
    namespace_name: Callable[[str], str],
    pod_ip: Callable[[], str],
) -> None:
    payments, shop = namespace_name("wh-payments"), namespace_name("wh-shop")
    realkube.create_namespace(payments, labels={"team": payments})
    realkube.create_namespace(shop, labels={"team": shop})
    paying, shopping = pod_ip(), pod_ip()
    realkube.create_pod(payments, "api", paying, labels={"app": "api"})
    realkube.create_pod(shop, "web", shopping, labels={"app": "web"})
    deny = {"name": "paste", "action": "Deny", "to": [{"cidr": "127.0.0.1/32"}],
            "ports": ORIGIN_PORTS}  # fmt: skip
    subject = {"namespaceSelector": {"matchLabels": {"team": payments}}}
    no_paste = namespace_name("wh-no-paste")
    admin = cluster_policy(no_paste, "admin", deny, priority=1, subject=subject)
    baseline = cluster_policy(
        namespace_name("wh-open-loopback"),
        "baseline",
        {"name": "loopback", "action": "Allow", "to": [{"cidr": "127.0.0.0/8"}],
         "ports": ORIGIN_PORTS},
        priority=1000,
        subject={"namespaceSelector": {"matchExpressions": [
            {"key": "team", "operator": "In", "values": [payments, shop]}]}},
    )  # fmt: skip
    for policy in (admin, baseline):
        realkube.apply(policy)
    # Two replicas, as the Deployment runs them (ServiceAccount token, shipped RBAC).
    replicas = [kube_proxy(name="one"), kube_proxy(name="two")]
    url = f"http://127.0.0.1:{origin.port}/hello"
    try:
        for proxy in replicas:
            wait_for(lambda p=proxy: send_from(paying, p, url) == (403, "rule_deny"))
            assert send_from(shopping, proxy, url)[0] == 200
        # The edit the validating webhook would refuse (a CIDR with host bits set), stored while
        # no webhook is registered: the CRD schema accepts it.
        broken = copy.deepcopy(admin)
        broken["spec"]["rules"][0]["to"] = [{"cidr": "127.0.0.1/8"}]
        realkube.apply(broken)
        for proxy in replicas:
            wait_for(lambda p=proxy: send_from(paying, p, url) == (403, "policy_invalid"))
            # Its subjects only: the shop pod is still allowed by the baseline.
            assert send_from(shopping, proxy, url)[0] == 200
            record = proxy.wait_records(
                lambda r: (
                    r["event"]["action"] == "decision"
                    and r["outgate"]["reason"] == "policy_invalid"
                )
            )[0]
            assert record["rule"]["ruleset"] == no_paste
            assert record["kubernetes"]["namespace"] == payments

        # Why, on the object: its status (written by the replica holding the Lease) and the
        # Warning Event.
        def accepted_false() -> bool:
            _, stored = realkube.api("GET", realkube.object_path(admin))
            conditions = (stored.get("status") or {}).get("conditions") or []
            return any(
                c["type"] == "Accepted"
                and c["status"] == "False"
                and c["reason"] == "InvalidPolicy"
                and "spec.rules[0].to[0].cidr" in c["message"]
                and c["observedGeneration"] == stored["metadata"]["generation"]
                for c in conditions
            )

        wait_for(accepted_false)

        def invalid_event() -> bool:
            _, events = realkube.api("GET", "/api/v1/namespaces/default/events")
            return any(
                e["reason"] == "InvalidPolicy"
                and e["involvedObject"]["name"] == no_paste
                and "spec.rules[0].to[0].cidr" in e["message"]
                for e in events["items"]
            )

        wait_for(invalid_event)
    finally:
        for policy in (admin, baseline):
            realkube.delete(realkube.object_path(policy), missing_ok=True)


# -- injection ---------------------------------------------------------------------------------


def pod_body(name: str, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **metadata},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def create_pod(
    kube: RealKube, namespace: str, body: dict[str, Any], **query: str
) -> dict[str, Any]:
    _, pod = kube.api("POST", f"/api/v1/namespaces/{namespace}/pods", body, query=query or None)
    created: dict[str, Any] = pod
    return created


def test_pods_get_the_settings_in_every_container_and_keep_their_own(
    realkube: RealKube, mutating: WebhookProcess, namespace_name: Callable[[str], str]
) -> None:
    namespace = namespace_name("wh-inject")
    realkube.create_namespace(namespace, labels={"outgate.dev/inject": "enabled"})
    body = pod_body("api")
    body["spec"]["containers"].append(
        {"name": "sidecar", "image": "s",
         "env": [{"name": "HTTPS_PROXY", "value": "http://own-proxy:8080"},
                 {"name": "JAVA_TOOL_OPTIONS", "value": "-Xmx256m"}]}
    )  # fmt: skip
    body["spec"]["initContainers"] = [{"name": "setup", "image": "i"}]
    pod = create_pod(realkube, namespace, body)
    spec = pod["spec"]
    for container in spec["containers"] + spec["initContainers"]:
        env = env_of(container)
        assert env["HTTP_PROXY"] == env["http_proxy"] == f"http://{PROXY_SERVICE}"
        no_proxy = env["NO_PROXY"].split(",")
        assert env["no_proxy"] == env["NO_PROXY"]
        for entry in (".svc", ".svc.cluster.local", ".cluster.local", "kubernetes.default.svc",
                      "10.96.0.1", "10.96.0.0/12", "10.244.0.0/16"):  # fmt: skip
            assert entry in no_proxy, entry
        assert env["NODE_USE_ENV_PROXY"] == "1"
        java = env["JAVA_TOOL_OPTIONS"].split(" ")
        assert "-Dhttps.proxyHost=outgate.outgate-system.svc.cluster.local" in java
        assert "-Dhttps.proxyPort=3128" in java
        non_proxy = next(flag for flag in java if flag.startswith("-Dhttp.nonProxyHosts="))
        patterns = non_proxy.split("=", 1)[1].split("|")
        assert {"*.svc", "*.cluster.local", "10.244.*", "10.96.*", "10.111.*"} <= set(patterns)
    app, sidecar = spec["containers"]
    assert env_of(app)["HTTPS_PROXY"] == f"http://{PROXY_SERVICE}"
    assert env_of(sidecar)["HTTPS_PROXY"] == "http://own-proxy:8080"
    assert "https_proxy" not in env_of(sidecar)
    assert env_of(sidecar)["JAVA_TOOL_OPTIONS"].startswith("-Xmx256m -Dhttp.proxyHost=")
    record = json.loads(pod["metadata"]["annotations"]["outgate.dev/injected"])
    assert set(record["containers"]) == {"app", "sidecar"}
    assert "HTTPS_PROXY" not in record["containers"]["sidecar"]
    assert set(record["initContainers"]) == {"setup"}


def test_opted_out_and_not_opted_in_pods_are_untouched_and_a_pod_can_opt_in(
    realkube: RealKube, mutating: WebhookProcess, namespace_name: Callable[[str], str]
) -> None:
    optout, plain = namespace_name("wh-optout"), namespace_name("wh-plain")
    realkube.create_namespace(optout, labels={"outgate.dev/inject": "enabled"})
    realkube.create_namespace(plain)
    opted_out = create_pod(
        realkube, optout,
        pod_body("quiet", annotations={"outgate.dev/inject": "disabled"}),
    )  # fmt: skip
    elsewhere = create_pod(realkube, plain, pod_body("plain"))
    own = create_pod(
        realkube,
        "outgate-system",  # the webhook's own namespace (INJECT["namespace"])
        pod_body(namespace_name("own"), labels={"outgate.dev/inject": "enabled"}),
    )
    for pod in (opted_out, elsewhere, own):
        assert "env" not in pod["spec"]["containers"][0], pod["metadata"]["name"]
        assert "outgate.dev/injected" not in (pod["metadata"].get("annotations") or {})
    opted_in = create_pod(
        realkube, plain, pod_body("chosen", labels={"outgate.dev/inject": "enabled"})
    )
    assert env_of(opted_in["spec"]["containers"][0])["HTTPS_PROXY"] == f"http://{PROXY_SERVICE}"


def test_re_admitting_an_injected_pod_yields_no_second_patch(
    realkube: RealKube, mutating: WebhookProcess, namespace_name: Callable[[str], str]
) -> None:
    namespace = namespace_name("wh-again")
    realkube.create_namespace(namespace, labels={"outgate.dev/inject": "enabled"})
    first = create_pod(realkube, namespace, pod_body("once"))
    # The same spec (with what the first admission added) created again, as a server-side dry
    # run: the webhook is called and answers with no patch, so nothing changes.
    again_body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "twice", "annotations": first["metadata"]["annotations"]},
        "spec": {"containers": first["spec"]["containers"]},
    }
    again = create_pod(realkube, namespace, again_body, dryRun="All")
    assert again["spec"]["containers"][0]["env"] == first["spec"]["containers"][0]["env"]
    assert again["metadata"]["annotations"] == first["metadata"]["annotations"]
    reviewed = mutating.wait_log(
        lambda e: e.get("event") == "webhook_pod" and e.get("name") == "twice"
    )
    assert (reviewed["dry_run"], reviewed["operations"]) == (True, 0)


# -- the interception CA bundle ----------------------------------------------------------------


def test_with_inspection_the_ca_bundle_is_mounted_and_a_python_client_trusts_the_proxys_leaf(
    realkube: RealKube,
    tmp_path: Path,
    start_proxy: Callable[..., ProxyProcess],
    pki: OriginPKI,
    tls_origin: OriginServer,
    dns_server: ScriptedDNSServer,
    namespace_name: Callable[[str], str],
) -> None:
    ca_cert, ca_key = init_ca(tmp_path / "outgate-ca")
    namespace = namespace_name("wh-inspect")
    realkube.create_namespace(namespace, labels={"outgate.dev/inject": "enabled"})
    bundle = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "outgate-ca-bundle", "namespace": namespace},
        "data": {"ca.crt": ca_cert.read_text()},  # the proxy's signing CA, never its key
    }
    realkube.apply(bundle)
    inject = {**INJECT, "caBundle": {"configMap": "outgate-ca-bundle", "key": "ca.crt"}}
    with WebhookProcess(tmp_path / "webhook", inject=inject) as webhook:
        cleanup = register(realkube, webhook, kinds=("MutatingWebhookConfiguration",))
        try:
            pod = create_pod(realkube, namespace, pod_body("client"))
        finally:
            cleanup()
    (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == "outgate-ca-bundle"]
    assert volume["configMap"]["name"] == "outgate-ca-bundle"
    (container,) = pod["spec"]["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "outgate-ca-bundle")
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/outgate/ca", True)
    env = env_of(container)
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert env[name] == "/etc/outgate/ca/ca.crt"

    # The proxy intercepts origin.test with the CA whose certificate the bundle holds.
    dns_server.addresses("origin.test", "127.0.0.1")
    policy = client_policy("inspected", allow_rule("origin", "origin.test", extra="inspect: {}"))
    proxy = start_proxy(
        policy,
        nameserver=dns_server.nameserver,
        config={"tls": {"caCert": str(ca_cert), "caKey": str(ca_key),
                        "upstreamCABundle": str(pki.ca_pem)}},
    )  # fmt: skip
    # What the container would read at the mounted path: the ConfigMap's data, as the kubelet
    # writes it, under a stand-in for /etc/outgate/ca.
    _, mounted = realkube.api("GET", realkube.object_path(bundle))
    root = tmp_path / "pod-root"
    (root / "etc/outgate/ca").mkdir(parents=True)
    (root / "etc/outgate/ca/ca.crt").write_text(mounted["data"]["ca.crt"])
    client_env = {
        key: str(root) + value if value.startswith("/etc/outgate/ca/") else value
        for key, value in env.items()
    }
    # The Service name resolves only in a cluster; here the proxy is on loopback.
    for key in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        client_env[key] = f"http://127.0.0.1:{proxy.port}"
    script = (
        "import requests, sys\n"
        f"r = requests.get('https://origin.test:{tls_origin.port}/hello', timeout=10)\n"
        "print(r.status_code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={"PATH": os.environ.get("PATH", ""), **client_env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "200"), result.stderr[-2000:]
    # Intercepted (the record carries the inner request): the leaf was the proxy's.
    proxy.wait_records(
        lambda r: (
            r["event"]["action"] == "close"
            and r.get("url", {}).get("path") == "/hello"
            and r.get("destination", {}).get("domain") == "origin.test"
        )
    )


# -- bad clients -------------------------------------------------------------------------------


def test_malformed_oversized_and_slow_clients_get_clear_errors_and_the_api_server_is_served(
    realkube: RealKube, validating: WebhookProcess, namespace_name: Callable[[str], str]
) -> None:
    namespace = namespace_name("wh-abuse")
    realkube.create_namespace(namespace)
    context = validating.client_context()

    def exchange(data: bytes) -> bytes:
        raw = socket.create_connection(("127.0.0.1", validating.port), timeout=30)
        with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(data)
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
            return reply

    def post(body: bytes, length: int | None = None) -> bytes:
        return (
            "POST /validate-policies HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n"
        ).encode() + body

    malformed = exchange(post(b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}'))
    assert malformed.startswith(b"HTTP/1.1 400 ")
    assert b"request is missing or not an object" in malformed
    oversized = exchange(post(b"", length=5 * 1024 * 1024))
    assert oversized.startswith(b"HTTP/1.1 413 ") and b"the limit is 1048576" in oversized
    raw = socket.create_connection(("127.0.0.1", validating.port), timeout=30)
    with raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as slow:
        slow.sendall(post(b"{}")[:20])  # and then nothing
        # While it hangs, the API server's own calls are answered.
        refused = kubectl(
            realkube, "apply", "-f", "-", stdin=json.dumps(egress_policy(namespace, "w", "*.com"))
        )
        assert "spec.rules[0].to[0].fqdn" in refused.stderr
        timed_out = slow.recv(65536)  # requestTimeout (10 s) after the first byte
    assert timed_out.startswith(b"HTTP/1.1 408 ")
    assert validating.proc is not None and validating.proc.poll() is None
    accepted = kubectl(
        realkube, "apply", "-f", "-",
        stdin=json.dumps(egress_policy(namespace, "w", "*.example.com")),
    )  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr
