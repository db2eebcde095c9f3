"""What the mutating webhook adds to a pod: proxy settings for each runtime, as a JSONPatch.

Pure: a pod (the JSON object the API server sends) and the `Injection` settings in, the RFC 6902
operations out. The webhook server (proxy.webhook.server) only carries them.

The rules (docs/webhooks.md):
  1. A pod in the webhook's own namespace or an excluded one (kube-system), or one that opts out
     (annotation or label `outgate.dev/inject: disabled`), gets nothing.
  2. Every container and init container gets each setting it does not set itself. A pair of
     spellings (`HTTPS_PROXY`/`https_proxy`) is one setting: a pod that sets either keeps its
     value and gets neither, since clients disagree on which spelling wins (curl prefers the
     lowercase one), and adding the other would override the pod's own choice for some of them.
  3. `JAVA_TOOL_OPTIONS` is appended to: each `-Dname=` flag the value does not already carry
     is added, so a pod's own `-Dhttps.proxyHost` is kept. A value from `valueFrom` cannot be
     read here and is left alone.
  4. With a CA bundle configured, its ConfigMap or Secret is mounted read-only in every
     container, and the variables that point clients at it are set as in rule 2.
  5. The pod is annotated with what was added (`outgate.dev/injected`). Re-admitting an
     injected pod finds everything set and yields no operation at all (idempotent).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.core.hosts import IPAddress
from proxy.core.identity import IPNetwork

INJECT_KEY: Final = "outgate.dev/inject"  # label (opt in, or out) and annotation (opt out)
INJECTED_ANNOTATION: Final = "outgate.dev/injected"
ENABLED: Final = "enabled"
DISABLED: Final = "disabled"
CA_VOLUME: Final = "outgate-ca-bundle"
JAVA_OPTIONS: Final = "JAVA_TOOL_OPTIONS"
# Never mutated whatever the configuration says: the control plane's own pods must start even
# when the proxy is down.
ALWAYS_EXCLUDED_NAMESPACES: Final = frozenset({"kube-system"})
# A CIDR is written for the JVM as wildcards over whole octets ("10.20.*"); a prefix that is not
# a multiple of 8 is expanded into the octets it covers, up to this many entries, beyond which
# the next shorter octet boundary is used (it covers more addresses, which then go direct: a
# NetworkPolicy still stops them; the proxy is never bypassed for less).
MAX_JVM_WILDCARDS_PER_CIDR: Final = 256
CLASSES = ("containers", "initContainers")


@dataclass(frozen=True, slots=True, kw_only=True)
class CaBundle:
    """The interception CA bundle (the proxy's signing CA, usually with the public roots beside
    it, as trust-manager writes it) in a ConfigMap or Secret of every opted-in namespace."""

    kind: str  # "configMap" | "secret"
    name: str
    key: str = "ca.crt"
    mount_path: str = "/etc/outgate/ca"
    # A PKCS#12 trust store in the same object, for the JVM (it reads no PEM bundle).
    java_trust_store_key: str | None = None
    # The JVM's well-known default: a trust store holds public certificates only.
    java_trust_store_password: str = "changeit"  # noqa: S105

    def __post_init__(self) -> None:
        if self.kind not in ("configMap", "secret"):
            raise ValueError("a CA bundle comes from a configMap or a secret")

    @property
    def file(self) -> str:
        return f"{self.mount_path.rstrip('/')}/{self.key}"

    def volume(self) -> dict[str, Any]:
        source: dict[str, Any]
        if self.kind == "configMap":
            source = {"configMap": {"name": self.name}}
        else:
            source = {"secret": {"secretName": self.name}}
        return {"name": CA_VOLUME, **source}


@dataclass(frozen=True, slots=True, kw_only=True)
class Injection:
    proxy_host: str  # the proxy Service's name, e.g. outgate.outgate-system.svc.cluster.local
    proxy_port: int
    own_namespace: str
    cluster_domain: str = "cluster.local"
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    kubernetes_service_ip: IPAddress | None = None
    no_proxy: tuple[str, ...] = ()  # more entries, written as for NO_PROXY (".corp", "10.1.2.3")
    excluded_namespaces: frozenset[str] = field(default=ALWAYS_EXCLUDED_NAMESPACES)
    ca_bundle: CaBundle | None = None

    @property
    def proxy_url(self) -> str:
        return f"http://{self.proxy_host}:{self.proxy_port}"


# -- what is injected -------------------------------------------------------------------------


def no_proxy_entries(settings: Injection) -> list[str]:
    """The NO_PROXY list: loopback, the cluster's names, the API service, the cluster CIDRs and
    the extra entries. Names as suffixes with a leading dot (curl, Go, Python, Node all read
    ".svc" as "any name ending in .svc"); CIDRs as written, for the clients that read them."""
    domain = settings.cluster_domain.strip(".")
    entries = [
        "localhost",
        "127.0.0.1",
        "::1",
        ".svc",
        f".svc.{domain}",
        f".{domain}",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        f"kubernetes.default.svc.{domain}",
    ]
    if settings.kubernetes_service_ip is not None:
        entries.append(str(settings.kubernetes_service_ip))
    entries.extend(str(cidr) for cidr in settings.cluster_cidrs)
    entries.extend(settings.no_proxy)
    return list(dict.fromkeys(entries))


def java_non_proxy_hosts(settings: Injection) -> str:
    """`-Dhttp.nonProxyHosts`: the JVM's `|`-separated patterns with `*` at either end. The JVM
    reads no CIDR, so IPv4 ones become octet wildcards; IPv6 ranges cannot be written and are
    left out (a JVM reaching a pod by IPv6 literal goes to the proxy, which refuses it)."""
    patterns: list[str] = []
    for entry in no_proxy_entries(settings):
        patterns.extend(_jvm_patterns(entry))
    return "|".join(dict.fromkeys(patterns))


def _jvm_patterns(entry: str) -> list[str]:
    if entry.startswith("."):
        return [f"*{entry}"]
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return [entry]
    if network.version == 6:
        if network.num_addresses == 1:
            return [f"[{network.network_address}]"]
        return []
    assert isinstance(network, ipaddress.IPv4Network)
    if network.prefixlen == 32:
        return [str(network.network_address)]
    octets = -(-network.prefixlen // 8)  # whole octets the wildcard keeps, rounded up
    while octets > 0 and 2 ** (octets * 8 - network.prefixlen) > MAX_JVM_WILDCARDS_PER_CIDR:
        octets -= 1
    if octets == 0:
        return ["*"]  # 0.0.0.0/0 and the like: everything IPv4 is "the cluster"
    widened = network.supernet(new_prefix=min(network.prefixlen, octets * 8))
    return [
        ".".join(str(subnet.network_address).split(".")[:octets]) + ".*"
        for subnet in widened.subnets(new_prefix=octets * 8)
    ]


def java_flags(settings: Injection) -> list[tuple[str, str]]:
    """(`-Dname`, value) pairs appended to JAVA_TOOL_OPTIONS, in order."""
    port = str(settings.proxy_port)
    flags = [
        ("-Dhttp.proxyHost", settings.proxy_host),
        ("-Dhttp.proxyPort", port),
        ("-Dhttps.proxyHost", settings.proxy_host),
        ("-Dhttps.proxyPort", port),
        # https uses http.nonProxyHosts too (there is no https.nonProxyHosts).
        ("-Dhttp.nonProxyHosts", java_non_proxy_hosts(settings)),
    ]
    bundle = settings.ca_bundle
    if bundle is not None and bundle.java_trust_store_key is not None:
        store = f"{bundle.mount_path.rstrip('/')}/{bundle.java_trust_store_key}"
        flags += [
            ("-Djavax.net.ssl.trustStore", store),
            ("-Djavax.net.ssl.trustStoreType", "PKCS12"),
            ("-Djavax.net.ssl.trustStorePassword", bundle.java_trust_store_password),
        ]
    return flags


def settings_env(settings: Injection) -> list[tuple[str, ...]]:
    """The variables as groups of spellings of one setting, each with its value last."""
    proxy = settings.proxy_url
    no_proxy = ",".join(no_proxy_entries(settings))
    groups: list[tuple[str, ...]] = [
        ("HTTP_PROXY", "http_proxy", proxy),
        ("HTTPS_PROXY", "https_proxy", proxy),
        ("NO_PROXY", "no_proxy", no_proxy),
        # Node 24 (and 22.21+) honours the variables only with this set.
        ("NODE_USE_ENV_PROXY", "1"),
    ]
    bundle = settings.ca_bundle
    if bundle is not None:
        groups += [
            ("SSL_CERT_FILE", bundle.file),  # OpenSSL: curl, Python ssl, Ruby, Go on Linux
            ("REQUESTS_CA_BUNDLE", bundle.file),  # Python requests (it ignores SSL_CERT_FILE)
            ("NODE_EXTRA_CA_CERTS", bundle.file),  # Node: added to its built-in roots
        ]
    return groups


# -- the patch ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Mutation:
    """The operations for one pod (empty: nothing to add), what they add (the annotation's
    record), or why the pod was left alone."""

    patch: tuple[dict[str, Any], ...] = ()
    injected: Mapping[str, Any] = field(default_factory=dict)
    skipped: str | None = None


def skip_reason(pod: Mapping[str, Any], namespace: str, settings: Injection) -> str | None:
    if namespace == settings.own_namespace:
        return "the webhook's own namespace"
    if namespace in settings.excluded_namespaces or namespace in ALWAYS_EXCLUDED_NAMESPACES:
        return f"namespace {namespace} is excluded"
    metadata = _mapping(pod.get("metadata"))
    if _mapping(metadata.get("annotations")).get(INJECT_KEY) == DISABLED:
        return f"annotation {INJECT_KEY}: {DISABLED}"
    if _mapping(metadata.get("labels")).get(INJECT_KEY) == DISABLED:
        return f"label {INJECT_KEY}: {DISABLED}"
    return None


def mutate_pod(pod: Mapping[str, Any], namespace: str, settings: Injection) -> Mutation:
    """Rules 1-5 of the module docstring."""
    skipped = skip_reason(pod, namespace, settings)
    if skipped is not None:
        return Mutation(skipped=skipped)
    spec = _mapping(pod.get("spec"))
    ops: list[dict[str, Any]] = []
    record: dict[str, Any] = {}
    bundle = settings.ca_bundle
    if bundle is not None and not any(
        _mapping(volume).get("name") == CA_VOLUME for volume in _list(spec.get("volumes"))
    ):
        _append(ops, "/spec/volumes", spec.get("volumes"), bundle.volume())
        record["volumes"] = [CA_VOLUME]
    groups = settings_env(settings)
    flags = java_flags(settings)
    for kind in CLASSES:
        for index, raw in enumerate(_list(spec.get(kind))):
            container = _mapping(raw)
            base = f"/spec/{kind}/{index}"
            added = _container_env(ops, base, container, groups, flags)
            if bundle is not None and _mount_ca(ops, base, container, bundle):
                added.append(f"volumeMount:{bundle.mount_path}")
            if added:
                record.setdefault(kind, {})[str(container.get("name", index))] = added
    if not ops:
        return Mutation()
    metadata = _mapping(pod.get("metadata"))
    annotations = metadata.get("annotations")
    previous = _mapping(annotations).get(INJECTED_ANNOTATION)
    value = json.dumps(_merge_records(previous, record), sort_keys=True, separators=(",", ":"))
    if not isinstance(annotations, Mapping):
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    ops.append(
        {
            "op": "replace" if previous is not None else "add",
            "path": f"/metadata/annotations/{_pointer(INJECTED_ANNOTATION)}",
            "value": value,
        }
    )
    return Mutation(patch=tuple(ops), injected=record)


def _container_env(
    ops: list[dict[str, Any]],
    base: str,
    container: Mapping[str, Any],
    groups: Sequence[tuple[str, ...]],
    flags: Sequence[tuple[str, str]],
) -> list[str]:
    env = [_mapping(item) for item in _list(container.get("env"))]
    names = {item.get("name") for item in env}
    new: list[dict[str, Any]] = []
    added: list[str] = []
    for group in groups:
        *spellings, value = group
        if any(name in names for name in spellings):
            continue  # the pod's own value stays (rule 2)
        for name in spellings:
            new.append({"name": name, "value": value})
            added.append(name)
    java = next((i for i, item in enumerate(env) if item.get("name") == JAVA_OPTIONS), None)
    if java is None:
        new.append({"name": JAVA_OPTIONS, "value": " ".join(f"{k}={v}" for k, v in flags)})
        added.append(JAVA_OPTIONS)
    elif isinstance(env[java].get("value"), str) or "valueFrom" not in env[java]:
        current = str(env[java].get("value") or "")
        missing = [f"{k}={v}" for k, v in flags if f"{k}=" not in current]
        if missing:
            appended = " ".join([current, *missing]) if current else " ".join(missing)
            ops.append({"op": "replace" if "value" in env[java] else "add",
                        "path": f"{base}/env/{java}/value", "value": appended})  # fmt: skip
            added.append(JAVA_OPTIONS)
    for item in new:
        _append(ops, f"{base}/env", container.get("env"), item)
    return added


def _mount_ca(
    ops: list[dict[str, Any]], base: str, container: Mapping[str, Any], bundle: CaBundle
) -> bool:
    mounts = [_mapping(item) for item in _list(container.get("volumeMounts"))]
    if any(m.get("name") == CA_VOLUME or m.get("mountPath") == bundle.mount_path for m in mounts):
        return False
    mount = {"name": CA_VOLUME, "mountPath": bundle.mount_path, "readOnly": True}
    _append(ops, f"{base}/volumeMounts", container.get("volumeMounts"), mount)
    return True


def _append(ops: list[dict[str, Any]], path: str, current: object, value: object) -> None:
    """Add `value` to the list at `path`: create the list when the pod has none (and this
    patch has not created it already)."""
    created = any(op["op"] == "add" and op["path"] == path for op in ops)
    if (isinstance(current, list) and current) or created:
        ops.append({"op": "add", "path": f"{path}/-", "value": value})
    else:
        ops.append({"op": "add", "path": path, "value": [value]})


def _merge_records(previous: object, record: Mapping[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    if isinstance(previous, str):
        try:
            loaded = json.loads(previous)
        except ValueError:
            loaded = None
        if isinstance(loaded, dict):
            merged.update(loaded)
    for key, value in record.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _pointer(key: str) -> str:
    """RFC 6901 section 3: '~' and '/' in a reference token are escaped."""
    return key.replace("~", "~0").replace("/", "~1")


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> Iterable[Any]:
    return value if isinstance(value, list) else ()
