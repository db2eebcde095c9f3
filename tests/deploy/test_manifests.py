"""Every kustomization renders, every object is valid, and the proxy's objects say what the design
needs: high availability, probes on the admin endpoints, a drain that fits the grace period, a
locked-down security context, least-privilege RBAC and a config the proxy loads."""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import Settings, parse_duration, settings_from_mapping
from proxy.control.kube.access import (
    CLUSTER_GRANTS,
    INFORMER_VERBS,
    LEASE_GRANTS,
    STATUS_LEASE_NAME,
)
from proxy.control.kube.config import load_kubeconfig
from proxy.control.kube.runtime import KubeControlPlane
from proxy.control.policy_source import PolicyStore
from proxy.core.identity import StaticIdentityIndex
from proxy.core.policy.loader import load_paths
from tests.deploy import kube
from tests.deploy.kube import REPO

PROXY_OVERLAYS = ["base", *(f"overlays/{o}" for o in kube.OVERLAYS)]
SELECTOR = {"app.kubernetes.io/name": "outgate", "app.kubernetes.io/component": "proxy"}
# The preStop hook, less its last argument (the seconds): the image's interpreter sleeps, so the
# hook needs no shell or /bin/sleep in the image (tests/image/ runs it in the built image).
PRE_STOP_SLEEP = (
    "/opt/outgate/bin/python",
    "-c",
    "import sys, time; time.sleep(float(sys.argv[1]))",
)


@pytest.fixture(scope="module")
def crd_schemas() -> kube.CustomResourceSchemas:
    return kube.all_crd_schemas()


def test_there_is_something_to_render() -> None:
    assert {"production", "monitoring", "interception"} <= set(kube.OVERLAYS)
    assert {"workload", "fluent-bit"} <= set(kube.EXAMPLES)


@pytest.mark.parametrize("kustomization", kube.RENDERABLE)
def test_every_rendered_object_is_valid(
    kustomization: str, crd_schemas: kube.CustomResourceSchemas
) -> None:
    objects = kube.render(kustomization)
    assert objects
    for obj in objects:
        if crd_schemas.knows(obj):
            assert crd_schemas.errors(obj) == [], kube.describe(obj)
        else:
            kube.validate_builtin(obj)


def test_the_schema_check_is_strict() -> None:
    deployment = copy.deepcopy(kube.one(kube.render("base"), "Deployment", "outgate"))
    deployment["spec"]["replica"] = 2
    with pytest.raises(AssertionError, match="replica"):
        kube.validate_builtin(deployment)


def _deployment(objects: list[kube.Obj]) -> kube.Obj:
    return kube.one(objects, "Deployment", "outgate")


def _container(objects: list[kube.Obj]) -> dict[str, Any]:
    (container,) = _deployment(objects)["spec"]["template"]["spec"]["containers"]
    return container


def _config(objects: list[kube.Obj]) -> dict[str, Any]:
    data = kube.config_map_named(objects, "outgate-config")["data"]["config.yaml"]
    return yaml.safe_load(data)


@pytest.mark.parametrize("overlay", PROXY_OVERLAYS)
def test_the_proxy_objects_live_in_outgate_system(overlay: str) -> None:
    for obj in kube.render(overlay):
        if obj["kind"] not in (
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "ValidatingWebhookConfiguration",
            "MutatingWebhookConfiguration",
        ):
            if (obj["kind"], obj["metadata"]["name"]) == ("ConfigMap", "outgate-coredns-steering"):
                # components/transparent: CoreDNS's own namespace, where its config lives.
                assert obj["metadata"]["namespace"] == "kube-system"
                continue
            assert obj["metadata"].get("namespace") == "outgate-system", kube.describe(obj)


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_cluster_role_grants_exactly_what_the_code_declares() -> None:
    role = kube.one(kube.render("base"), "ClusterRole", "outgate")
    declared = {(g.group, g.resource, v) for g in CLUSTER_GRANTS for v in g.verbs}
    assert _grants(role["rules"]) == declared
    assert not any(rule.get("resourceNames") for rule in role["rules"])
    binding = kube.one(kube.render("base"), "ClusterRoleBinding", "outgate")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "outgate", "namespace": "outgate-system"}
    ]
    assert binding["roleRef"]["name"] == "outgate"


def test_every_reflector_the_proxy_can_run_is_granted_list_and_watch_and_nothing_more(
    tmp_path: Path,
) -> None:
    """Built from the code: a control plane with every informer on. A new informer without a
    grant (or a grant no informer uses) fails here, not in a cluster."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    plane = KubeControlPlane(
        load_kubeconfig(kubeconfig),
        identity=True,
        policies=True,
        static=StaticIdentityIndex([]),
        store=PolicyStore(),
        on_source_gone=lambda ip, pod: None,
        watch_jobs=True,
    )
    watched = set()
    for reflector in plane.reflectors:
        path = reflector.resource.path
        group = "" if path.startswith("/api/v1/") else path.split("/")[2]
        watched |= {(group, path.rsplit("/", 1)[1], verb) for verb in INFORMER_VERBS}
    declared = {(g.group, g.resource, v) for g in CLUSTER_GRANTS for v in g.verbs}
    assert declared - watched == {
        ("", "events", "create"),
        # The status writer's merge patches (proxy.control.kube.status).
        ("outgate.dev", "clusteregresspolicies/status", "patch"),
        ("outgate.dev", "egresspolicies/status", "patch"),
    }
    assert watched <= declared


def test_the_docs_give_every_grant_and_its_reason() -> None:
    text = (REPO / "docs" / "kubernetes.md").read_text()
    for grant in (*CLUSTER_GRANTS, *LEASE_GRANTS):
        row = f"| `{grant.group or 'core'}` | `{grant.resource}` | {', '.join(grant.verbs)} |"
        assert row in text, f"docs/kubernetes.md lacks the row {row}"
        assert grant.why in text


def test_the_lease_role_grants_one_lease_in_the_proxys_namespace() -> None:
    objects = kube.render("base")
    (role,) = kube.find(objects, "Role")
    assert role["metadata"]["namespace"] == "outgate-system"
    grants = {
        (group, resource, verb, tuple(rule.get("resourceNames", ())))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert grants == {(g.group, g.resource, v, g.names) for g in LEASE_GRANTS for v in g.verbs}
    # The name the Role allows is the Lease the proxy uses, as configured in the manifests.
    lease = settings_from_mapping(
        _config(objects), file="config.yaml", base_dir=Path()
    ).policy_status_lease_name
    assert lease == STATUS_LEASE_NAME == Settings().policy_status_lease_name
    assert {name for g in LEASE_GRANTS for name in g.names} == {lease}
    (binding,) = kube.find(objects, "RoleBinding")
    assert binding["metadata"]["namespace"] == "outgate-system"
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "outgate", "namespace": "outgate-system"}
    ]


def test_the_proxy_knows_its_pod_name_and_namespace_for_the_lease() -> None:
    env = {e["name"]: e for e in _container(kube.render("base")).get("env", [])}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


@pytest.mark.parametrize("overlay", PROXY_OVERLAYS)
def test_the_deployment_is_highly_available(overlay: str) -> None:
    objects = kube.render(overlay)
    deployment = _deployment(objects)
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    assert spec["selector"]["matchLabels"] == SELECTOR
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spread = spec["template"]["spec"]["topologySpreadConstraints"]
    by_node = [c for c in spread if c["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node and by_node[0]["labelSelector"]["matchLabels"] == SELECTOR
    pdb = kube.one(objects, "PodDisruptionBudget", "outgate")
    assert pdb["spec"]["selector"]["matchLabels"] == SELECTOR
    assert (
        pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"]["minAvailable"] < spec["replicas"]
    )


def test_the_production_overlay_autoscales_the_deployment_on_cpu() -> None:
    """Validated against the autoscaling/v2 schema with every rendered object; here, what it
    means: it scales the proxy's Deployment, never below what the PodDisruptionBudget needs,
    on an absolute CPU value under one worker's core, and scales in one drained pod at a time."""
    objects = kube.render("overlays/production")
    hpa = kube.one(objects, "HorizontalPodAutoscaler", "outgate")
    assert hpa["apiVersion"] == "autoscaling/v2"
    deployment = _deployment(objects)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    pdb = kube.one(objects, "PodDisruptionBudget", "outgate")
    assert hpa["spec"]["minReplicas"] >= 2 + pdb["spec"].get("maxUnavailable", 1) - 1
    assert hpa["spec"]["minReplicas"] <= deployment["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    target = metric["resource"]["target"]
    assert target["type"] == "AverageValue"
    millicores = int(target["averageValue"].removesuffix("m"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert millicores < 1000  # one worker process uses at most one core
    assert millicores > parse_cpu(container["resources"]["requests"]["cpu"])
    (scale_down,) = hpa["spec"]["behavior"]["scaleDown"]["policies"]
    assert (scale_down["type"], scale_down["value"]) == ("Pods", 1)


def parse_cpu(quantity: str) -> int:
    """Millicores of a CPU quantity ("250m", "2")."""
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


@pytest.mark.parametrize("overlay", PROXY_OVERLAYS)
def test_the_container_is_locked_down(overlay: str) -> None:
    objects = kube.render(overlay)
    pod = _deployment(objects)["spec"]["template"]["spec"]
    container = _container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "add" not in security["capabilities"]
    assert not pod.get("hostNetwork")
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
        resources["limits"]
    )


@pytest.mark.parametrize("overlay", PROXY_OVERLAYS)
def test_probes_use_the_admin_endpoints(overlay: str) -> None:
    container = _container(kube.render(overlay))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"proxy": 3128, "admin": 9090} | TRANSPARENT_PORTS.get(overlay, {})
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}


@pytest.mark.parametrize("overlay", PROXY_OVERLAYS)
def test_the_grace_period_covers_pre_stop_and_drain(overlay: str) -> None:
    objects = kube.render(overlay)
    pod = _deployment(objects)["spec"]["template"]["spec"]
    command = _container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:-1] == list(PRE_STOP_SLEEP)
    pre_stop = float(command[-1])
    drain = parse_duration(_config(objects)["timeouts"]["drain"])
    grace = pod["terminationGracePeriodSeconds"]
    # Enough for the endpoints to drop the pod, the drain, and the flush; not so much more that
    # a stuck pod lingers long after its drain ended.
    assert pre_stop + drain + 5 <= grace <= pre_stop + drain + 20


@pytest.mark.parametrize("overlay", PROXY_OVERLAYS)
def test_the_services_keep_the_client_address(overlay: str) -> None:
    objects = kube.render(overlay)
    proxy = kube.one(objects, "Service", "outgate")["spec"]
    assert proxy["type"] == "ClusterIP"  # no NodePort/LoadBalancer hop that could SNAT
    assert "externalTrafficPolicy" not in proxy
    assert proxy["selector"] == SELECTOR
    assert [(p["port"], p["targetPort"]) for p in proxy["ports"]] == [(3128, "proxy")]
    admin = kube.one(objects, "Service", "outgate-admin")["spec"]
    assert [(p["port"], p["targetPort"]) for p in admin["ports"]] == [(9090, "admin")]


def _mounted_config(objects: list[kube.Obj], tmp_path: Path) -> tuple[dict[str, Any], list[Path]]:
    """The rendered config with its mount paths mapped onto files written from the ConfigMaps."""
    raw = _config(objects)
    container = _container(objects)
    volumes = {v["name"]: v for v in _deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    paths = []
    for path in raw["policies"]["paths"]:
        volume = mounts[path.rstrip("/")]
        data = kube.config_map_named(objects, volume["configMap"]["name"])["data"]
        directory = tmp_path / "policies"
        directory.mkdir()
        for name, text in data.items():
            (directory / name).write_text(text)
        paths.append(directory)
    return raw, paths


@pytest.mark.parametrize("overlay", PROXY_OVERLAYS)
def test_the_rendered_config_loads_with_its_policies(overlay: str, tmp_path: Path) -> None:
    objects = kube.render(overlay)
    raw, policy_dirs = _mounted_config(objects, tmp_path)
    settings = settings_from_mapping(raw, file=f"{overlay} config.yaml", base_dir=tmp_path)
    assert settings.identity_kubernetes and settings.policy_kubernetes
    assert settings.listen.port == 3128 and settings.admin.port == 9090
    assert settings.listen.host == settings.admin.host == "0.0.0.0"
    assert load_paths(policy_dirs), "the starter policies load"
    for network in settings.cluster_cidrs:
        assert ipaddress.ip_network(network)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}.{key}" if prefix else key)
        return out
    return {prefix: node}


# What each overlay may change in the base config; anything else is drift.
CONFIG_CHANGES = {
    "overlays/production": {"guard.clusterCIDRs"},
    "overlays/interception": {"tls.caCert", "tls.caKey"},
    "overlays/transparent": {
        "transparent.tls",
        "transparent.tlsPort",
        "transparent.http",
        "transparent.httpPort",
        "transparent.ports",
    },
}
# Container ports an overlay adds to the proxy's two (components/transparent).
TRANSPARENT_PORTS = {
    "overlays/transparent": {
        "transparent-tls": 8443,
        "transparent-http": 8080,
        "pm-ledger-db": 15432,
    }
}


@pytest.mark.parametrize("overlay", [f"overlays/{o}" for o in kube.OVERLAYS])
def test_overlay_configs_differ_from_the_base_only_where_they_mean_to(overlay: str) -> None:
    base = _flatten(_config(kube.render("base")))
    mine = _flatten(_config(kube.render(overlay)))
    changed = {key for key in base.keys() | mine.keys() if base.get(key) != mine.get(key)}
    assert changed == CONFIG_CHANGES.get(overlay, set())


@pytest.mark.parametrize("overlay", PROXY_OVERLAYS)
def test_the_ca_secret_is_mounted_exactly_when_interception_is_on(overlay: str) -> None:
    objects = kube.render(overlay)
    tls = _config(objects)["tls"]
    volumes = {v["name"]: v for v in _deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    secret_mounts = {
        m["mountPath"]: volumes[m["name"]]["secret"]
        for m in _container(objects)["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }
    if tls["caCert"] is None:
        assert tls["caKey"] is None and secret_mounts == {}
        return
    for path in (tls["caCert"], tls["caKey"]):
        directory, _, file = path.rpartition("/")
        secret = secret_mounts[directory]
        assert secret["secretName"] == "outgate-ca"
        assert file in {item["path"] for item in secret["items"]}


def test_the_example_workload_uses_the_proxy_service() -> None:
    objects = kube.render("examples/workload")
    (container,) = kube.one(objects, "Deployment", "demo-client")["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    service = "http://outgate.outgate-system.svc.cluster.local:3128"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[name] == service
    for name in ("NO_PROXY", "no_proxy"):
        entries = env[name].split(",")
        assert {".cluster.local", ".svc"} <= set(entries)
        assert any("/" in e and ipaddress.ip_network(e) for e in entries), "the service CIDR"
    namespace = kube.one(objects, "Namespace", "demo")
    assert namespace["metadata"]["labels"]["outgate.dev/use-proxy"] == "true"


def test_the_fluent_bit_example_forwards_only_the_audit_stream() -> None:
    objects = kube.render("examples/fluent-bit")
    config = kube.config_map_named(objects, "fluent-bit-outgate")["data"]["fluent-bit.conf"]
    assert "/var/log/containers/outgate-*_outgate-system_outgate-*.log" in config
    assert "Regex             stream ^stdout$" in config
    assert "multiline.parser  cri" in config
    daemonset = kube.one(objects, "DaemonSet", "fluent-bit-outgate")
    mounts = daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"mountPath": "/var/log", "name": "varlog", "readOnly": True} in mounts
