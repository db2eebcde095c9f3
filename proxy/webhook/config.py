"""The webhook's own settings file (`outgate webhook --config FILE`), validated like the proxy's.

The webhook is a separate process with its own small file rather than a section of the proxy's
config: it runs in its own Deployment, needs none of the proxy's secrets, and its Pod can be
scheduled and restarted without the proxy's. Every key has a default except `inject.proxy` when
pods are mutated; unknown keys are an error; every issue names its field path and the fix.

```yaml
listen: 0.0.0.0:8443
tls: {certFile: /etc/outgate/webhook-tls/tls.crt, keyFile: /etc/outgate/webhook-tls/tls.key}
limits: {maxRequestBytes: 1048576, requestTimeout: 10s}
inject:
  proxy: outgate.outgate-system.svc.cluster.local:3128
  namespace: outgate-system          # its own: never mutated (default: $POD_NAMESPACE)
  excludeNamespaces: [kube-system]   # kube-system is excluded whatever this says
  clusterDomain: cluster.local
  clusterCIDRs: [10.96.0.0/12, 10.244.0.0/16]
  kubernetesServiceIP: 10.96.0.1
  noProxy: [.corp.example]
  caBundle: {configMap: outgate-ca, key: ca.crt, mountPath: /etc/outgate/ca,
             javaTrustStore: {key: truststore.p12, password: changeit}}
```
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from proxy.config import Endpoint, parse_duration, parse_endpoint
from proxy.core.hosts import IPAddress
from proxy.core.identity import IPNetwork, IssueCollector, is_dns1123_label, parse_network
from proxy.core.injection import ALWAYS_EXCLUDED_NAMESPACES, CaBundle, Injection
from proxy.errors import ConfigError, OutgateError

DEFAULT_LISTEN: Final = "0.0.0.0:8443"
# The API server's own bound on a webhook call is 10 s by default and 30 s at most
# (timeoutSeconds); an AdmissionReview of the largest object etcd stores (1.5 MiB) would not fit
# 1 MiB, but a Pod or a policy never comes near it. Larger bodies get 413.
DEFAULT_MAX_REQUEST_BYTES: Final = 1024 * 1024
DEFAULT_REQUEST_TIMEOUT: Final = 10.0
DEFAULT_NAMESPACE: Final = "outgate-system"

_SHAPE: Final[dict[str, Any]] = {
    "listen": None,
    "tls": {"certFile": None, "keyFile": None},
    "limits": {"maxRequestBytes": None, "requestTimeout": None},
    "inject": {
        "proxy": None,
        "namespace": None,
        "excludeNamespaces": None,
        "clusterDomain": None,
        "clusterCIDRs": None,
        "kubernetesServiceIP": None,
        "noProxy": None,
        "caBundle": {
            "configMap": None,
            "secret": None,
            "key": None,
            "mountPath": None,
            "javaTrustStore": {"key": None, "password": None},
        },
    },
}


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookSettings:
    listen: Endpoint
    cert_file: Path
    key_file: Path
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    injection: Injection | None  # None: /mutate-pods allows every pod unchanged (and says so)


def load_webhook_settings(path: Path) -> WebhookSettings:
    label = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        issues = IssueCollector(file=label)
        issues.add("", f"cannot read the file: {exc}", fix="give a readable YAML file")
        raise ConfigError(issues.issues) from None
    return webhook_settings_from_mapping(raw, file=label, base_dir=path.resolve().parent)


def webhook_settings_from_mapping(raw: object, *, file: str, base_dir: Path) -> WebhookSettings:
    issues = IssueCollector(file=file)
    body = issues.mapping(raw if raw is not None else {}, "", what="the webhook settings")
    if body is None:
        raise ConfigError(issues.issues)
    _check_keys(body, _SHAPE, "", issues)
    listen = _convert(
        body.get("listen", DEFAULT_LISTEN),
        parse_endpoint,
        issues,
        "listen",
        "write address:port, e.g. 0.0.0.0:8443",
    )
    tls = _section(body, "tls")
    cert = tls.get("certFile")
    key = tls.get("keyFile")
    for name, value in (("certFile", cert), ("keyFile", key)):
        if not isinstance(value, str) or not value:
            issues.add(
                f"tls.{name}",
                f"tls.{name} is missing",
                fix="give the mounted PEM file (a Secret written by cert-manager)",
            )
    limits = _section(body, "limits")
    max_bytes = limits.get("maxRequestBytes", DEFAULT_MAX_REQUEST_BYTES)
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1024:
        issues.add(
            "limits.maxRequestBytes",
            f"{max_bytes!r} is not a byte count of 1024 or more",
            fix=f"write e.g. {DEFAULT_MAX_REQUEST_BYTES}",
        )
        max_bytes = DEFAULT_MAX_REQUEST_BYTES
    timeout = _convert(
        limits.get("requestTimeout", DEFAULT_REQUEST_TIMEOUT),
        parse_duration,
        issues,
        "limits.requestTimeout",
        "write a duration, e.g. 10s",
    )
    injection = _injection(body.get("inject"), issues) if "inject" in body else None
    if issues.issues or listen is None or not isinstance(cert, str) or not isinstance(key, str):
        raise ConfigError(issues.issues)
    return WebhookSettings(
        listen=listen,
        cert_file=base_dir / cert,
        key_file=base_dir / key,
        max_request_bytes=max_bytes,
        request_timeout=timeout if timeout else DEFAULT_REQUEST_TIMEOUT,
        injection=injection,
    )


def _injection(raw: object, issues: IssueCollector) -> Injection | None:
    body = issues.mapping(raw, "inject", what="inject")
    if body is None:
        return None
    proxy = body.get("proxy")
    host, port = "", 0
    if isinstance(proxy, str) and ":" in proxy and "//" not in proxy:
        host, _, port_text = proxy.rpartition(":")
        port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else 0
    if not host or not port:
        issues.add(
            "inject.proxy",
            f"{proxy!r} is not host:port",
            fix="write the proxy Service, e.g. outgate.outgate-system.svc.cluster.local:3128",
        )
    namespace = body.get("namespace", os.environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE)
    if not isinstance(namespace, str) or not is_dns1123_label(namespace):
        issues.add(
            "inject.namespace",
            f"{namespace!r} is not a namespace name",
            fix="write the webhook's own namespace, e.g. outgate-system",
        )
        namespace = DEFAULT_NAMESPACE
    excluded = _strings(body.get("excludeNamespaces", []), issues, "inject.excludeNamespaces")
    domain = body.get("clusterDomain", "cluster.local")
    if not isinstance(domain, str) or not domain.strip("."):
        issues.add(
            "inject.clusterDomain",
            f"{domain!r} is not a domain",
            fix="write the cluster's DNS domain, e.g. cluster.local",
        )
        domain = "cluster.local"
    cidrs: list[IPNetwork] = []
    raw_cidrs = body.get("clusterCIDRs") or []
    for index, item in enumerate(raw_cidrs if isinstance(raw_cidrs, list) else [raw_cidrs]):
        network = parse_network(item, issues, f"inject.clusterCIDRs[{index}]")
        if network is not None:
            cidrs.append(network)
    service_ip: IPAddress | None = None
    if body.get("kubernetesServiceIP") is not None:
        try:
            service_ip = ipaddress.ip_address(str(body["kubernetesServiceIP"]))
        except ValueError:
            issues.add(
                "inject.kubernetesServiceIP",
                f"{body['kubernetesServiceIP']!r} is not an IP address",
                fix="write the ClusterIP of service kubernetes.default",
            )
    no_proxy = _strings(body.get("noProxy", []), issues, "inject.noProxy")
    bundle = _ca_bundle(body["caBundle"], issues) if body.get("caBundle") is not None else None
    if not host or not port:
        return None
    return Injection(
        proxy_host=host,
        proxy_port=port,
        own_namespace=namespace,
        cluster_domain=domain.strip("."),
        cluster_cidrs=tuple(cidrs),
        kubernetes_service_ip=service_ip,
        no_proxy=tuple(no_proxy),
        excluded_namespaces=ALWAYS_EXCLUDED_NAMESPACES | frozenset(excluded),
        ca_bundle=bundle,
    )


def _ca_bundle(raw: object, issues: IssueCollector) -> CaBundle | None:
    body = issues.mapping(raw, "inject.caBundle", what="caBundle")
    if body is None:
        return None
    sources = [kind for kind in ("configMap", "secret") if kind in body]
    if len(sources) != 1 or not isinstance(body.get(sources[0]), str):
        issues.add(
            "inject.caBundle",
            "name exactly one of configMap or secret",
            fix="write caBundle: {configMap: outgate-ca, key: ca.crt}",
        )
        return None
    key = body.get("key", "ca.crt")
    mount = body.get("mountPath", "/etc/outgate/ca")
    if not isinstance(key, str) or not key or "/" in key:
        issues.add("inject.caBundle.key", f"{key!r} is not a key", fix="write e.g. key: ca.crt")
        return None
    if not isinstance(mount, str) or not mount.startswith("/"):
        issues.add(
            "inject.caBundle.mountPath",
            f"{mount!r} is not an absolute path",
            fix="write e.g. mountPath: /etc/outgate/ca",
        )
        return None
    store = body.get("javaTrustStore")
    store_key: str | None = None
    password = "changeit"  # noqa: S105 - the JVM's default; a trust store holds no secret
    if isinstance(store, Mapping):
        store_key = store.get("key") if isinstance(store.get("key"), str) else None
        password = str(store.get("password", password))
        if store_key is None:
            issues.add(
                "inject.caBundle.javaTrustStore.key",
                "the trust store's key is missing",
                fix="write the PKCS#12 file's key, e.g. key: truststore.p12",
            )
    return CaBundle(
        kind=sources[0],
        name=str(body[sources[0]]),
        key=key,
        mount_path=mount,
        java_trust_store_key=store_key,
        java_trust_store_password=password,
    )


def _section(body: Mapping[str, object], name: str) -> Mapping[str, object]:
    value = body.get(name)
    return value if isinstance(value, Mapping) else {}


def _strings(raw: object, issues: IssueCollector, path: str) -> list[str]:
    if isinstance(raw, list) and all(isinstance(item, str) and item for item in raw):
        return list(raw)
    issues.add(path, "must be a list of strings", fix="write e.g. [a, b]")
    return []


def _convert(raw: object, convert: Any, issues: IssueCollector, path: str, fix: str) -> Any:
    try:
        return convert(raw)
    except (ValueError, TypeError, OutgateError) as exc:
        issues.add(path, f"invalid value {raw!r}: {exc}", fix=fix)
        return None


def _check_keys(
    node: object, shape: Mapping[str, Any], prefix: str, issues: IssueCollector
) -> None:
    if not isinstance(node, Mapping):
        return
    issues.check_keys(node, list(shape), prefix)
    for key, sub in shape.items():
        if isinstance(sub, dict) and isinstance(node.get(key), Mapping):
            _check_keys(node[key], sub, f"{prefix}.{key}" if prefix else key, issues)
