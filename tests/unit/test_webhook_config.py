"""The webhook's settings file (proxy.webhook.config): defaults, and every mistake named by its
field with the fix."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ConfigError
from proxy.webhook.config import (
    DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    webhook_settings_from_mapping,
)

TLS = {"certFile": "tls.crt", "keyFile": "tls.key"}


def load(raw: Any) -> Any:
    return webhook_settings_from_mapping(raw, file="webhook.yaml", base_dir=Path("/etc/w"))


def test_defaults_and_relative_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "egress")
    settings = load({"tls": TLS, "inject": {"proxy": "outgate.egress.svc:3128"}})
    assert (settings.listen.host, settings.listen.port) == ("0.0.0.0", 8443)
    assert settings.cert_file == Path("/etc/w/tls.crt")
    assert settings.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    assert settings.request_timeout == DEFAULT_REQUEST_TIMEOUT
    injection = settings.injection
    assert injection is not None
    assert (injection.proxy_host, injection.proxy_port) == ("outgate.egress.svc", 3128)
    assert injection.own_namespace == "egress"
    assert "kube-system" in injection.excluded_namespaces
    assert injection.ca_bundle is None
    assert load({"tls": TLS}).injection is None


def test_everything_written_is_read() -> None:
    settings = load(
        {
            "listen": "127.0.0.1:9443",
            "tls": TLS,
            "limits": {"maxRequestBytes": 2048, "requestTimeout": "3s"},
            "inject": {
                "proxy": "p.example:8080",
                "namespace": "outgate",
                "excludeNamespaces": ["monitoring"],
                "clusterDomain": "corp.local.",
                "clusterCIDRs": ["10.0.0.0/8"],
                "kubernetesServiceIP": "10.0.0.1",
                "noProxy": [".corp"],
                "caBundle": {"secret": "ca", "key": "b.pem", "mountPath": "/ca",
                             "javaTrustStore": {"key": "t.p12", "password": ""}},
            },
        }
    )  # fmt: skip
    assert (settings.max_request_bytes, settings.request_timeout) == (2048, 3.0)
    injection = settings.injection
    assert injection is not None
    assert injection.cluster_domain == "corp.local"
    assert injection.cluster_cidrs == (ipaddress.ip_network("10.0.0.0/8"),)
    assert injection.kubernetes_service_ip == ipaddress.ip_address("10.0.0.1")
    assert injection.excluded_namespaces >= {"monitoring", "kube-system"}
    bundle = injection.ca_bundle
    assert bundle is not None
    assert (bundle.kind, bundle.name, bundle.file) == ("secret", "ca", "/ca/b.pem")
    assert (bundle.java_trust_store_key, bundle.java_trust_store_password) == ("t.p12", "")


@pytest.mark.parametrize(
    ("raw", "path", "fix"),
    [
        ({}, "tls.certFile", "Secret"),
        ({"tls": TLS, "listen": "localhost:8443"}, "listen", "address:port"),
        ({"tls": TLS, "limits": {"maxRequestBytes": 10}}, "limits.maxRequestBytes", "write e.g."),
        ({"tls": TLS, "limits": {"requestTimeout": "soon"}}, "limits.requestTimeout", "duration"),
        ({"tls": TLS, "inject": {"proxy": "http://p:3128"}}, "inject.proxy", "proxy Service"),
        ({"tls": TLS, "inject": {"proxy": "p:99999"}}, "inject.proxy", "proxy Service"),
        ({"tls": TLS, "inject": {"proxy": "p:1", "clusterCIDRs": ["10.0.0.1/8"]}},
         "inject.clusterCIDRs[0]", ""),
        ({"tls": TLS, "inject": {"proxy": "p:1", "kubernetesServiceIP": "api"}},
         "inject.kubernetesServiceIP", "ClusterIP"),
        ({"tls": TLS, "inject": {"proxy": "p:1", "caBundle": {"key": "ca.crt"}}},
         "inject.caBundle", "configMap"),
        ({"tls": TLS, "inject": {"proxy": "p:1", "caBundle": {"configMap": "c",
          "mountPath": "ca"}}}, "inject.caBundle.mountPath", "mountPath: /etc"),
        ({"tls": TLS, "inject": {"proxy": "p:1", "namespace": "Outgate"}}, "inject.namespace",
         "own namespace"),
        ({"tls": TLS, "injekt": {}}, "injekt", "did you mean 'inject'"),
        ({"tls": {**TLS, "cert": "x"}}, "tls.cert", "did you mean"),
    ],
)  # fmt: skip
def test_each_mistake_names_its_field_and_the_fix(raw: Any, path: str, fix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(raw)
    assert any(i.path == path and fix in i.fix for i in caught.value.issues), [
        i.render() for i in caught.value.issues
    ]
