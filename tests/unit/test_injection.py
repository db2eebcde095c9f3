"""The mutating webhook's pure part: what each container of a pod gets, what it keeps, and that
re-admitting an injected pod adds nothing (proxy.core.injection)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from typing import Any

import pytest

from proxy.core.injection import (
    CA_VOLUME,
    INJECTED_ANNOTATION,
    CaBundle,
    Injection,
    java_non_proxy_hosts,
    mutate_pod,
    no_proxy_entries,
)
from tests.support.jsonpatch import apply_patch

SETTINGS = Injection(
    proxy_host="outgate.outgate-system.svc.cluster.local",
    proxy_port=3128,
    own_namespace="outgate-system",
    cluster_domain="cluster.local",
    cluster_cidrs=(ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("10.244.0.0/16")),
    kubernetes_service_ip=ipaddress.ip_address("10.96.0.1"),
)
PROXY = "http://outgate.outgate-system.svc.cluster.local:3128"
BUNDLE = CaBundle(kind="configMap", name="outgate-ca", key="ca.crt", java_trust_store_key="ca.p12")


def pod(*containers: dict[str, Any], init: tuple[dict[str, Any], ...] = (), **meta: Any) -> Any:
    spec: dict[str, Any] = {"containers": list(containers)}
    if init:
        spec["initContainers"] = list(init)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **meta}, "spec": spec}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item.get("value", "<valueFrom>") for item in container.get("env", [])}


def admit(obj: Any, settings: Injection = SETTINGS, namespace: str = "shop") -> Any:
    return apply_patch(obj, mutate_pod(obj, namespace, settings).patch)


def test_every_container_and_init_container_gets_the_proxy_for_each_runtime() -> None:
    patched = admit(pod({"name": "app", "image": "x"}, init=({"name": "setup", "image": "y"},)))
    for container in patched["spec"]["containers"] + patched["spec"]["initContainers"]:
        env = env_of(container)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            assert env[name] == PROXY
        assert env["NO_PROXY"] == env["no_proxy"]
        no_proxy = env["NO_PROXY"].split(",")
        cluster = [".svc", ".svc.cluster.local", ".cluster.local", "kubernetes.default.svc"]
        ranges = ["10.96.0.1", "10.96.0.0/12", "10.244.0.0/16", "localhost", "127.0.0.1"]
        for entry in cluster + ranges:
            assert entry in no_proxy
        assert env["NODE_USE_ENV_PROXY"] == "1"
        java = env["JAVA_TOOL_OPTIONS"].split(" ")
        assert "-Dhttp.proxyHost=outgate.outgate-system.svc.cluster.local" in java
        assert "-Dhttps.proxyHost=outgate.outgate-system.svc.cluster.local" in java
        assert "-Dhttp.proxyPort=3128" in java and "-Dhttps.proxyPort=3128" in java
        non_proxy = next(f for f in java if f.startswith("-Dhttp.nonProxyHosts="))
        assert "*.svc|*.svc.cluster.local|*.cluster.local" in non_proxy
        assert "SSL_CERT_FILE" not in env  # no bundle configured
    record = json.loads(patched["metadata"]["annotations"][INJECTED_ANNOTATION])
    assert "HTTPS_PROXY" in record["containers"]["app"]
    assert "JAVA_TOOL_OPTIONS" in record["initContainers"]["setup"]


def test_values_the_pod_sets_are_kept_and_a_pair_of_spellings_is_one_setting() -> None:
    own = {"name": "https_proxy", "value": "http://mine:8080"}
    secret = {"name": "NO_PROXY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}
    java = {"name": "JAVA_TOOL_OPTIONS", "value": "-Xmx1g -Dhttps.proxyHost=mine"}
    patched = admit(pod({"name": "app", "env": [own, secret, java]}))
    env = env_of(patched["spec"]["containers"][0])
    assert env["https_proxy"] == "http://mine:8080"
    assert "HTTPS_PROXY" not in env  # would override the pod's choice for clients preferring it
    assert env["NO_PROXY"] == "<valueFrom>" and "no_proxy" not in env
    assert env["HTTP_PROXY"] == PROXY
    flags = env["JAVA_TOOL_OPTIONS"].split(" ")
    assert flags[:2] == ["-Xmx1g", "-Dhttps.proxyHost=mine"]
    assert "-Dhttp.proxyHost=outgate.outgate-system.svc.cluster.local" in flags
    assert not any(f.startswith("-Dhttps.proxyHost=outgate") for f in flags)


def test_a_java_tool_options_from_value_from_is_left_alone() -> None:
    source = {"configMapKeyRef": {"name": "c", "key": "k"}}
    java = {"name": "JAVA_TOOL_OPTIONS", "valueFrom": source}
    patched = admit(pod({"name": "app", "env": [java]}))
    assert patched["spec"]["containers"][0]["env"][0] == java


@pytest.mark.parametrize(
    ("namespace", "meta"),
    [
        ("outgate-system", {}),
        ("kube-system", {}),
        ("shop", {"annotations": {"outgate.dev/inject": "disabled"}}),
        ("shop", {"labels": {"outgate.dev/inject": "disabled"}}),
    ],
)
def test_excluded_namespaces_and_opted_out_pods_are_untouched(
    namespace: str, meta: dict[str, Any]
) -> None:
    mutation = mutate_pod(pod({"name": "app"}, **meta), namespace, SETTINGS)
    assert mutation.patch == () and mutation.skipped


def test_re_admitting_an_injected_pod_yields_no_patch() -> None:
    settings = replace(SETTINGS, ca_bundle=BUNDLE)
    first = admit(
        pod({"name": "app", "env": [{"name": "JAVA_TOOL_OPTIONS", "value": "-Xmx1g"}]},
            init=({"name": "setup"},)),
        settings,
    )  # fmt: skip
    assert mutate_pod(first, "shop", settings).patch == ()


def test_a_new_container_in_an_injected_pod_is_added_to_the_record() -> None:
    first = admit(pod({"name": "app"}))
    first["spec"]["containers"].append({"name": "sidecar"})
    second = admit(first)
    record = json.loads(second["metadata"]["annotations"][INJECTED_ANNOTATION])
    assert set(record["containers"]) == {"app", "sidecar"}
    assert env_of(second["spec"]["containers"][1])["HTTPS_PROXY"] == PROXY


def test_the_ca_bundle_is_mounted_read_only_and_every_runtime_is_pointed_at_it() -> None:
    settings = replace(SETTINGS, ca_bundle=BUNDLE)
    patched = admit(
        pod({"name": "app", "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            init=({"name": "setup"},), annotations={"team": "shop"}),
        settings,
    )  # fmt: skip
    assert patched["spec"]["volumes"] == [{"name": CA_VOLUME, "configMap": {"name": "outgate-ca"}}]
    assert patched["metadata"]["annotations"]["team"] == "shop"
    for container in patched["spec"]["containers"] + patched["spec"]["initContainers"]:
        assert {"name": CA_VOLUME, "mountPath": "/etc/outgate/ca", "readOnly": True} in container[
            "volumeMounts"
        ]
        env = env_of(container)
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
            assert env[name] == "/etc/outgate/ca/ca.crt"
        java = env["JAVA_TOOL_OPTIONS"].split(" ")
        assert "-Djavax.net.ssl.trustStore=/etc/outgate/ca/ca.p12" in java
        assert "-Djavax.net.ssl.trustStoreType=PKCS12" in java
    secret = CaBundle(kind="secret", name="ca", key="bundle.pem", mount_path="/ca")
    patched = admit(pod({"name": "app"}), replace(SETTINGS, ca_bundle=secret))
    assert patched["spec"]["volumes"] == [{"name": CA_VOLUME, "secret": {"secretName": "ca"}}]
    assert env_of(patched["spec"]["containers"][0])["SSL_CERT_FILE"] == "/ca/bundle.pem"


@pytest.mark.parametrize(
    ("cidrs", "expected"),
    [
        (["10.0.0.0/8"], ["10.*"]),
        (["10.244.0.0/16"], ["10.244.*"]),
        (["192.168.7.0/24"], ["192.168.7.*"]),
        (["10.96.0.0/12"], [f"10.{n}.*" for n in range(96, 112)]),
        (["172.16.0.0/12"], [f"172.{n}.*" for n in range(16, 32)]),
        (["10.1.2.3/32"], ["10.1.2.3"]),
        # /4 would be 2**4 octets at /8: fine; /1 likewise; 0.0.0.0/0 is everything.
        (["0.0.0.0/0"], ["*"]),
        (["fd00::/8"], []),  # no JVM syntax for an IPv6 range
    ],
)
def test_cidrs_become_jvm_octet_wildcards(cidrs: list[str], expected: list[str]) -> None:
    settings = Injection(
        proxy_host="p", proxy_port=1, own_namespace="o",
        cluster_cidrs=tuple(ipaddress.ip_network(c) for c in cidrs),
    )  # fmt: skip
    patterns = java_non_proxy_hosts(settings).split("|")
    base = java_non_proxy_hosts(Injection(proxy_host="p", proxy_port=1, own_namespace="o"))
    assert [p for p in patterns if p not in base.split("|")] == expected
    assert "[::1]" in base.split("|") and "127.0.0.1" in base.split("|")


def test_extra_no_proxy_entries_are_kept_and_translated_for_the_jvm() -> None:
    settings = Injection(
        proxy_host="p", proxy_port=1, own_namespace="o", no_proxy=(".corp.example", "db.internal")
    )
    assert no_proxy_entries(settings)[-2:] == [".corp.example", "db.internal"]
    assert java_non_proxy_hosts(settings).split("|")[-2:] == ["*.corp.example", "db.internal"]
