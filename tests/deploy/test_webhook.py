"""The webhook component (manifests/components/webhook, with cert-manager in overlays/webhook):
the Deployment runs `outgate webhook` with a settings file it loads, the configurations call the
Service at the paths the server serves, with the documented failure policies and exclusions, the
cert-manager pieces fit together, and the openssl script's certificate is served and trusted."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.webhook.config import webhook_settings_from_mapping
from proxy.webhook.server import WebhookServer
from tests.deploy import kube
from tests.support.pki import OriginPKI
from tests.support.webhook import WebhookProcess

OVERLAY = "overlays/webhook"
SELECTOR = {"app.kubernetes.io/name": "outgate", "app.kubernetes.io/component": "webhook"}
SCRIPT = kube.MANIFESTS / "components" / "webhook" / "webhook-certs.sh"


@pytest.fixture(scope="module")
def objects() -> list[kube.Obj]:
    return kube.render(OVERLAY)


def pod_spec(objects: list[kube.Obj]) -> dict[str, Any]:
    spec: dict[str, Any] = kube.one(objects, "Deployment", "outgate-webhook")["spec"]["template"][
        "spec"
    ]
    return spec


def test_the_deployment_runs_the_webhook_with_settings_it_loads(
    objects: list[kube.Obj], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = pod_spec(objects)
    (container,) = spec["containers"]
    assert container["args"] == ["webhook", "--config", "/etc/outgate/webhook.yaml"]
    config_map = kube.config_map_named(objects, "outgate-webhook-config")
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    raw = yaml.safe_load(config_map["data"]["webhook.yaml"])
    # Its own namespace (never mutated) is the pod's, from the downward API.
    (namespace_env,) = [e for e in container["env"] if e["name"] == "POD_NAMESPACE"]
    assert namespace_env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert "namespace" not in raw["inject"]
    monkeypatch.setenv("POD_NAMESPACE", "outgate-system")
    settings = webhook_settings_from_mapping(raw, file="webhook.yaml", base_dir=tmp_path)
    # The files it reads are where the Secret is mounted, as a directory (a subPath mount
    # would never see a renewed certificate).
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert "subPath" not in mounts["tls"]
    assert settings.cert_file.parent == Path(mounts["tls"]["mountPath"])
    assert volumes["tls"]["secret"]["secretName"] == "outgate-webhook-tls"
    (port,) = container["ports"]
    assert port["containerPort"] == settings.listen.port == 8443
    assert settings.injection is not None
    assert settings.injection.own_namespace == "outgate-system"
    proxy_service = kube.one(objects, "Service", "outgate")
    assert settings.injection.proxy_host.startswith("outgate.outgate-system.svc")
    assert settings.injection.proxy_port == proxy_service["spec"]["ports"][0]["port"]


def test_the_webhook_never_shares_a_port_or_a_service_with_the_proxy(
    objects: list[kube.Obj],
) -> None:
    service = kube.one(objects, "Service", "outgate-webhook")
    assert service["spec"]["selector"] == SELECTOR
    proxy = kube.one(objects, "Deployment", "outgate")["spec"]["template"]["spec"]
    proxy_ports = {p["containerPort"] for c in proxy["containers"] for p in c["ports"]}
    webhook_ports = {
        p["containerPort"] for c in pod_spec(objects)["containers"] for p in c["ports"]
    }
    assert proxy_ports.isdisjoint(webhook_ports)
    for other in kube.find(objects, "Service"):
        if other["metadata"]["name"] != "outgate-webhook":
            assert other["spec"]["selector"] != SELECTOR


def test_the_webhook_pod_is_locked_down_and_has_no_api_token(objects: list[kube.Obj]) -> None:
    spec = pod_spec(objects)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {
            "path": "/healthz",
            "port": "webhook",
            "scheme": "HTTPS",
        }
    policy = kube.one(objects, "NetworkPolicy", "outgate-webhook")
    assert policy["spec"]["podSelector"]["matchLabels"] == SELECTOR
    assert policy["spec"]["egress"] == []
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8443}]}]
    budget = kube.one(objects, "PodDisruptionBudget", "outgate-webhook")
    assert budget["spec"]["selector"]["matchLabels"] == SELECTOR


def _webhooks(objects: list[kube.Obj]) -> dict[str, dict[str, Any]]:
    found = {}
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        for configuration in kube.find(objects, kind):
            for hook in configuration["webhooks"]:
                found[hook["name"]] = {**hook, "configuration": configuration}
    return found


def test_the_configurations_call_the_service_at_the_paths_the_server_serves(
    objects: list[kube.Obj], tmp_path: Path
) -> None:
    hooks = _webhooks(objects)
    assert set(hooks) == {
        "policies.outgate.dev",
        "namespace.inject.outgate.dev",
        "pod.inject.outgate.dev",
    }
    served = set(WebhookServer.PATHS)
    service = kube.one(objects, "Service", "outgate-webhook")
    for hook in hooks.values():
        target = hook["clientConfig"]["service"]
        assert (target["name"], target["namespace"]) == ("outgate-webhook", "outgate-system")
        assert target["port"] == service["spec"]["ports"][0]["port"]
        assert target["path"] in served
        assert hook["admissionReviewVersions"] == ["v1"]
        assert hook["sideEffects"] == "None"
        assert hook["timeoutSeconds"] <= 5


def test_failure_policies_and_exclusions_are_the_documented_ones(objects: list[kube.Obj]) -> None:
    hooks = _webhooks(objects)
    policies = hooks["policies.outgate.dev"]
    assert policies["failurePolicy"] == "Fail"
    (rule,) = policies["rules"]
    crds = kube.find(objects, "CustomResourceDefinition")
    assert sorted(rule["resources"]) == sorted(c["spec"]["names"]["plural"] for c in crds)
    assert rule["apiGroups"] == ["outgate.dev"]
    assert "DELETE" not in rule["operations"]  # a policy can always be removed
    for name in ("namespace.inject.outgate.dev", "pod.inject.outgate.dev"):
        hook = hooks[name]
        assert hook["failurePolicy"] == "Ignore"
        assert hook["rules"][0]["resources"] == ["pods"]
        assert hook["rules"][0]["operations"] == ["CREATE"]
        expressions = hook["namespaceSelector"]["matchExpressions"]
        assert {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["outgate-system", "kube-system"],
        } in expressions
    # Namespace opt-in and pod opt-in never both match one pod: it is admitted once.
    namespace_in = hooks["namespace.inject.outgate.dev"]["namespaceSelector"]["matchExpressions"]
    pod_in = hooks["pod.inject.outgate.dev"]["namespaceSelector"]["matchExpressions"]
    assert {"key": "outgate.dev/inject", "operator": "In", "values": ["enabled"]} in namespace_in
    assert {"key": "outgate.dev/inject", "operator": "NotIn", "values": ["enabled"]} in pod_in
    assert hooks["pod.inject.outgate.dev"]["objectSelector"] == {
        "matchLabels": {"outgate.dev/inject": "enabled"}
    }


def test_cert_manager_issues_the_served_secret_and_injects_its_ca(objects: list[kube.Obj]) -> None:
    certificate = kube.one(objects, "Certificate", "outgate-webhook")
    assert certificate["spec"]["secretName"] == "outgate-webhook-tls"
    assert "outgate-webhook.outgate-system.svc" in certificate["spec"]["dnsNames"]
    issuers = {i["metadata"]["name"]: i for i in kube.find(objects, "Issuer")}
    assert certificate["spec"]["issuerRef"]["name"] in issuers
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        for configuration in kube.find(objects, kind):
            annotation = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
            assert annotation == "outgate-system/outgate-webhook"


def test_the_component_alone_renders_without_cert_manager(tmp_path: Path) -> None:
    # The no-cert-manager path: base plus the webhook component, no Certificate or Issuer; the
    # caBundle is the script's to write.
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(kube.MANIFESTS / "base", tmp_path)],
                "components": [
                    os.path.relpath(kube.MANIFESTS / "components" / "webhook", tmp_path)
                ],
            }
        )
    )
    result = subprocess.run(
        [str(kube.kubectl()), "kustomize", "--load-restrictor", "LoadRestrictionsNone",
         str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    kinds = {o["kind"] for o in objects}
    assert not {"Certificate", "Issuer"} & kinds
    assert {"ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"} <= kinds
    for hook in _webhooks(objects).values():
        assert "caBundle" not in hook["clientConfig"]
    for obj in objects:
        if not kube.all_crd_schemas().knows(obj):
            kube.validate_builtin(obj)


def test_the_openssl_script_makes_a_certificate_the_webhook_serves_and_the_ca_trusts(
    tmp_path: Path,
) -> None:
    certs = tmp_path / "certs"
    result = subprocess.run(
        ["sh", str(SCRIPT), "--dir", str(certs), "--days", "2"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (certs / "tls.key").stat().st_mode & 0o077 == 0
    pki = OriginPKI(ca_pem=certs / "ca.crt", cert_pem=certs / "tls.crt", key_pem=certs / "tls.key")
    with WebhookProcess(tmp_path / "webhook", pki=pki) as webhook:
        # As the API server dials the Service by name, trusting the CA the script put in caBundle.
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        raw = socket.create_connection(("127.0.0.1", webhook.port), timeout=10)
        with raw, context.wrap_socket(raw, server_hostname="outgate-webhook.outgate-system.svc"):
            pass
