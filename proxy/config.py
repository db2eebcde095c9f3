"""Runtime settings: one YAML file, every key defaulted, unknown keys refused, frozen once loaded.

`load_settings` collects every problem it finds into one ConfigError whose issues name the file,
the field path and the fix. Relative policy paths resolve against the config file's directory,
so the embedded default config finds its embedded default policies.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from proxy.adoption.squid_log import parse_logformat
from proxy.core.dlp import (
    CredentialHosts,
    CustomDetector,
    parse_credential_hosts,
    parse_custom_detectors,
)
from proxy.core.hosts import Host, parse_port, split_authority
from proxy.core.identity import (
    IssueCollector,
    StaticIdentity,
    describe_type,
    key_path,
    parse_static_identities,
)
from proxy.core.policy.loader import parse_destinations
from proxy.core.upstreams import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_FAIL_LIMIT,
    DEFAULT_RESPONSE_TIMEOUT,
    DEFAULT_RETRY_AFTER,
    DIRECT,
    ProxyAddress,
    ResolveMode,
    RouteRule,
    RouteTable,
    UpstreamSpec,
)
from proxy.errors import ConfigError, ConfigIssue, OutgateError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

EMBEDDED_CONFIG = "default_config.yaml"
# Where a pod's `hostAliases` land, and where Squid's `hosts_file` points by default.
DEFAULT_HOSTS_FILE = "/etc/hosts"
# Issue 15, the live traffic aggregate (proxy.traffic). Rows shown per workload (twice as many
# are held): a service's real dependencies are a few dozen names at most; past that the tail
# is noise or a scan.
DEFAULT_TOP_DESTINATIONS = 50
# Workloads tracked one by one; a cluster's egress-calling owners are usually far fewer.
DEFAULT_MAX_WORKLOADS = 100
# Destinations per workload with their own label on the per-destination metrics.
DEFAULT_METRIC_DESTINATIONS = 10
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)\Z")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    header: float = 15.0  # whole request head; slowloris bound
    connect: float = 10.0  # upstream TCP connect, all addresses together
    idle: float = 300.0  # no byte either way on a tunnel or a kept-alive connection
    sni_peek: float = 10.0  # ClientHello after a CONNECT 200 (TLS issue)
    body: float = 60.0  # longest silence inside a request body (slow-body / slowloris-POST)
    drain: float = 30.0  # SIGTERM: how long open connections may finish
    # Issue 18: a Kubernetes watch with no line for this long is renewed (see
    # proxy.control.kube.reflector.ReflectorTuning.inactivity_timeout).
    kube_watch_inactivity: float = 150.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    # 64 KiB: large enough for cookie-heavy requests, small enough to bound per-connection memory.
    max_header_bytes: int = 65536
    max_connections: int = 20000
    max_connections_per_source: int = 2000
    # Per workload (pod owner, static identity, or unknown source IP): new connections a second
    # (token bucket refilled at this rate, `new_connections_burst` deep) and open tunnels.
    new_connections_per_second: float = 200.0
    new_connections_burst: int = 400
    max_tunnels_per_workload: int = 1000
    # New connections are refused with 503 `overloaded` (Retry-After) while the event loop runs
    # this far behind: a flood is shed instead of queued. 0 turns shedding off.
    shed_loop_lag: float = 1.0
    # ... or while a listener's kernel accept queue is at least this full (a fraction of its
    # backlog) on two ticks in a row: a saturated worker keeps its loop on time while the
    # queue fills, and a full queue drops SYNs (clients retry after 1, 3, 7 s). 0 turns it off.
    shed_accept_queue: float = 0.5
    # Issue 16: opaque tunnels relayed by the kernel with splice(2) once they have moved
    # `splice_after_bytes`, at most this many at a time per worker (0 turns splicing off).
    # Each holds two 1 MiB pipes: 4 descriptors, and 512 pages of the per-user pipe allowance
    # (Linux fs.pipe-user-pages-soft, 16,384 by default), so 16 per worker keep two workers
    # inside it. Past the budget, or when descriptors run out, the Protocol relay carries on
    # (proxy.dataplane.kernel_splice).
    splice_max_tunnels: int = 16
    # 1 MiB: a TLS handshake and a few requests stay below it, so idle and chatty tunnels never
    # hold pipes; bulk transfers switch after their first MiB (0.1 % of a GiB).
    splice_after_bytes: int = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class BasicAuth:
    """`auth.basic`: sources that must authenticate, the password file, user -> identity."""

    file: Path
    realm: str
    sources: tuple[IPNetwork, ...]
    users: Mapping[str, StaticIdentity]


@dataclass(frozen=True, slots=True, kw_only=True)
class PortMap:
    """Issue 13: a transparent TCP listener whose every connection goes to one fixed
    destination (`to`), decided for the source workload like a CONNECT to it."""

    listen: Endpoint
    host: Host
    port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Transparent:
    """Issue 13: listeners for workloads that ignore HTTP_PROXY (docs/transparent-mode.md).
    Each is off (None, or no port maps) unless configured."""

    tls: Endpoint | None = None  # TLS routed by SNI
    # Destination port of the TLS and HTTP listeners when the kernel reports no original
    # destination (DNS steering; with iptables REDIRECT, SO_ORIGINAL_DST gives the port).
    tls_port: int = 443
    http: Endpoint | None = None  # plain HTTP routed by Host
    http_port: int = 80
    ports: tuple[PortMap, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    source: str = "<embedded>"
    listen: Endpoint = Endpoint(host="127.0.0.1", port=3128)
    admin: Endpoint = Endpoint(host="127.0.0.1", port=9090)
    workers: int = 1
    default_action: str = "deny"
    policy_paths: tuple[Path, ...] = ()
    policy_kubernetes: bool = False
    # Issue 18: `.status` of policy objects, written by the replica holding a Lease in
    # `policy_status_lease_namespace` (None: $POD_NAMESPACE, else outgate-system).
    policy_status_write: bool = True
    policy_status_lease_name: str = "outgate-policy-status"
    policy_status_lease_namespace: str | None = None
    policy_status_writes_per_second: float = 5.0
    identity_kubernetes: bool = False
    kubeconfig: str | None = None
    # Issue 3: watch Jobs so a CronJob's pods name the CronJob as their owner (needs list/watch
    # on batch/v1 jobs); off = such pods are owned by "Job/<name>".
    identity_watch_jobs: bool = True
    static_identities: tuple[StaticIdentity, ...] = ()
    dns_nameservers: tuple[str, ...] = ()
    dns_timeout: float = 5.0
    dns_min_ttl: float = 5.0
    dns_max_ttl: float = 300.0
    # Issue 14: names answered from this hosts file before DNS (None: DNS only).
    dns_hosts_file: str | None = DEFAULT_HOSTS_FILE
    # Issue 14: load balancers whose PROXY protocol header names the client (empty: none).
    proxy_protocol_trusted_cidrs: tuple[IPNetwork, ...] = ()
    # Issue 14: Basic proxy auth for non-pod sources (None: no source authenticates).
    auth_basic: BasicAuth | None = None
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    unsafe_allow_cidrs: tuple[IPNetwork, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    tls_ca_cert: str | None = None
    tls_ca_key: str | None = None
    tls_upstream_ca_bundle: str | None = None
    # Issue 4: leaves kept for interception (proxy.tls.certs.DEFAULT_CACHE_SIZE says why 1024).
    tls_cert_cache_size: int = 1024
    # Issue 4: DLP detectors every inspected request gets, and where known credentials may go.
    dlp_custom: tuple[CustomDetector, ...] = ()
    dlp_credential_hosts: tuple[CredentialHosts, ...] = ()
    audit_output: str = "stdout"
    # Issue 8: json (default) | squid | both; Squid lines go to squidOutput in squidLogformat.
    audit_format: str = "json"
    audit_squid_output: str = "stdout"
    audit_squid_logformat: str = "squid"
    # Issue 12: parent proxies, and which allowed destinations go through them (None: no
    # upstreams, everything direct, and records carry no `outgate.upstream`).
    upstreams: tuple[UpstreamSpec, ...] = ()
    routes: RouteTable | None = None
    transparent: Transparent = field(default_factory=Transparent)
    # Issue 15: the read-only page on the admin listener (/ui), and the bearer token it asks for
    # (a file holding it; None: no token, the admin listener's NetworkPolicy is the fence).
    ui_enabled: bool = True
    ui_token_file: str | None = None
    # Issue 15: the live traffic aggregate's bounds (proxy.traffic says why these defaults).
    traffic_top_destinations: int = DEFAULT_TOP_DESTINATIONS
    traffic_max_workloads: int = DEFAULT_MAX_WORKLOADS
    traffic_metric_destinations: int = DEFAULT_METRIC_DESTINATIONS


# The accepted shape: key -> nested shape (dict) or None for a leaf. Unknown keys are errors.
_SHAPE: dict[str, Any] = {
    "listen": None,
    "admin": None,
    "workers": None,
    "defaultAction": None,
    "policies": {
        "paths": None,
        "kubernetes": None,
        "status": {
            "write": None,
            "leaseName": None,
            "leaseNamespace": None,
            "writesPerSecond": None,
        },
    },
    "identity": {"kubernetes": None, "kubeconfig": None, "watchJobs": None, "static": None},
    "dns": {
        "nameservers": None,
        "timeout": None,
        "minTTL": None,
        "maxTTL": None,
        "hostsFile": None,
    },
    "proxyProtocol": {"trustedCIDRs": None},
    "auth": {"basic": {"file": None, "realm": None, "sources": None, "users": None}},
    "guard": {"clusterCIDRs": None, "unsafeAllowCIDRs": None},
    "timeouts": {
        "header": None,
        "connect": None,
        "idle": None,
        "sniPeek": None,
        "drain": None,
        "body": None,
        "kubeWatchInactivity": None,
    },
    "limits": {
        "maxHeaderBytes": None,
        "maxConnections": None,
        "maxConnectionsPerSource": None,
        "newConnectionsPerSecond": None,
        "newConnectionsBurst": None,
        "maxTunnelsPerWorkload": None,
        "shedLoopLag": None,
        "shedAcceptQueue": None,
        "spliceMaxTunnels": None,
        "spliceAfterBytes": None,
    },
    "tls": {"caCert": None, "caKey": None, "upstreamCABundle": None, "certCacheSize": None},
    "dlp": {"custom": None, "credentialHosts": None},
    "audit": {"output": None, "format": None, "squidOutput": None, "squidLogformat": None},
    # Lists of mappings: their keys are checked by _parse_upstreams and _parse_routes.
    "upstreams": None,
    "routes": None,
    # `ports` is a list of mappings: its keys are checked by _parse_port_maps.
    "transparent": {"tls": None, "tlsPort": None, "http": None, "httpPort": None, "ports": None},
    "ui": {"enabled": None, "tokenFile": None},
    "traffic": {"topDestinations": None, "maxWorkloads": None, "metricDestinations": None},
}


class _Reader:
    """Walks the raw mapping, converting leaves and collecting issues instead of stopping."""

    def __init__(self, raw: Mapping[str, Any], file: str) -> None:
        self.raw = raw
        self.file = file
        self.issues: list[ConfigIssue] = []

    def issue(self, path: str, message: str, fix: str) -> None:
        self.issues.append(
            ConfigIssue(file=self.file, document=None, path=path, message=message, fix=fix)
        )

    def check_keys(self, node: Any, shape: dict[str, Any], prefix: str) -> None:
        if not isinstance(node, Mapping):
            self.issue(prefix or "<root>", "expected a mapping", "write key: value pairs here")
            return
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in shape:
                close = difflib.get_close_matches(str(key), list(shape), n=1)
                fix = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(shape)}"
                self.issue(path, f"unknown key {key!r}", fix)
            elif isinstance(shape[key], dict) and value is not None:
                self.check_keys(value, shape[key], path)

    def get(self, path: str, default: T, convert: Callable[[Any], T], fix: str) -> T:
        node: Any = self.raw
        for part in path.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return default
            node = node[part]
        if node is None:
            return default
        try:
            return convert(node)
        except (ValueError, TypeError, OutgateError) as exc:
            self.issue(path, f"invalid value {node!r}: {exc}", fix)
            return default


def parse_duration(value: Any) -> float:
    """`15s`, `500ms`, `5m`, `1h`, or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError("not a duration")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("negative duration")
    return seconds


def parse_endpoint(value: Any) -> Endpoint:
    text = str(value)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected [v6]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError("expected host:port")
    ipaddress.ip_address(host)  # listeners bind to addresses, not names
    return Endpoint(host=host, port=0 if port == "0" else parse_port(port))


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number >= 1")
    return value


# Kubernetes object names: a Lease's name is a DNS subdomain, a namespace's a DNS label.
_DNS_SUBDOMAIN = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\Z"
)
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


def _object_name(value: Any) -> str:
    if not isinstance(value, str) or not _DNS_SUBDOMAIN.match(value):
        raise ValueError("not a DNS subdomain name (lowercase letters, digits, '-' and '.')")
    return value


def _namespace_name(value: Any) -> str:
    if not isinstance(value, str) or not _DNS_LABEL.match(value):
        raise ValueError("not a namespace name (a DNS label: lowercase letters, digits, '-')")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a whole number >= 0")
    return value


def _nonempty(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a path")
    return value


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError("expected a number > 0")
    return float(value)


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError("expected a number from 0 to 1")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise ValueError("expected a list of CIDRs")
    return tuple(ipaddress.ip_network(str(item), strict=True) for item in value)


def _hosts_file(reader: _Reader, base_dir: Path) -> str | None:
    """`dns.hostsFile`: a path (relative to the config file), or null / "" to answer from DNS
    only. Absent: /etc/hosts. The file itself is read, and re-read, by the resolver."""
    dns = reader.raw.get("dns")
    if not isinstance(dns, Mapping) or "hostsFile" not in dns:
        return DEFAULT_HOSTS_FILE
    value = dns["hostsFile"]
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        reader.issue("dns.hostsFile", f"invalid value {value!r}", "a path, or null for DNS only")
        return DEFAULT_HOSTS_FILE
    return str(base_dir / Path(value).expanduser())


DEFAULT_REALM = "outgate"
# RFC 9110 section 5.6.4 quoted-string, kept to printable ASCII without the characters that need
# escaping, so every client shows the realm as written.
_REALM = re.compile(r"[ !#-\[\]-~]{1,100}\Z")


def _basic_auth(
    reader: _Reader, base_dir: Path, static: tuple[StaticIdentity, ...]
) -> BasicAuth | None:
    """`auth.basic`, checked against the static identities its users map to. None when no
    source must authenticate. Also reports identities with no CIDRs that no user reaches."""
    no_cidrs = {identity for identity in static if not identity.cidrs}
    no_sources: tuple[IPNetwork, ...] = ()
    sources = reader.get(
        "auth.basic.sources", no_sources, _networks, "a list of CIDRs, e.g. [10.8.0.0/16]"
    )
    raw_users = reader.get("auth.basic.users", None, lambda v: v, "")
    users: dict[str, StaticIdentity] = {}
    if raw_users is not None and not isinstance(raw_users, Mapping):
        reader.issue("auth.basic.users", "expected a mapping", "write alice: {identity: build-vm}")
    elif raw_users is not None:
        for user, entry in raw_users.items():
            path = f"auth.basic.users.{user}"
            identity = _user_identity(reader, path, entry, static)
            if identity is not None:
                users[str(user)] = identity
                no_cidrs.discard(identity)
    for identity in no_cidrs:
        index = static.index(identity)
        reader.issue(
            f"identity.static[{index}].cidrs",
            f"{identity.namespace}/{identity.name} has no CIDRs and no auth.basic user maps to it",
            "list its source CIDRs, or map a proxy-auth user to it",
        )
    file: str | None = reader.get("auth.basic.file", None, str, "a path to an htpasswd file")
    realm = reader.get("auth.basic.realm", DEFAULT_REALM, _realm, "printable ASCII, no quotes")
    if not sources:
        if file is not None or users:
            reader.issue(
                "auth.basic.sources",
                "no source must authenticate, so the file and users are never used",
                "list the CIDRs of the sources that must authenticate, e.g. [10.8.0.0/16]",
            )
        return None
    if file is None:
        reader.issue(
            "auth.basic.file",
            "sources must authenticate, but no password file is named",
            "name an htpasswd file of bcrypt hashes (htpasswd -B -c FILE USER)",
        )
        return None
    return BasicAuth(
        file=base_dir / Path(file).expanduser(), realm=realm, sources=sources, users=users
    )


def _user_identity(
    reader: _Reader, path: str, entry: Any, static: tuple[StaticIdentity, ...]
) -> StaticIdentity | None:
    if not isinstance(entry, Mapping) or set(entry) != {"identity"}:
        reader.issue(path, "expected {identity: NAME}", "write {identity: build-vm}")
        return None
    wanted = str(entry["identity"])
    namespace, slash, name = wanted.rpartition("/")
    found = [
        identity
        for identity in static
        if identity.name == name and (not slash or identity.namespace == namespace)
    ]
    if len(found) == 1:
        return found[0]
    names = ", ".join(f"{i.namespace}/{i.name}" for i in static) or "none defined"
    problem = "names more than one" if found else "names no"
    reader.issue(
        f"{path}.identity",
        f"{wanted!r} {problem} static identity",
        f"name one of identity.static as NAME or NAMESPACE/NAME ({names})",
    )
    return None


def _realm(value: Any) -> str:
    if not isinstance(value, str) or not _REALM.match(value):
        raise ValueError("up to 100 printable ASCII characters, without '\"' or '\\'")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def _default_action(value: Any) -> str:
    text = str(value).lower()
    if text not in ("deny", "allow"):
        raise ValueError("expected deny or allow")
    return text


def _audit_output(value: Any) -> str:
    if value != "stdout":
        raise ValueError("only stdout is supported")
    return "stdout"


AUDIT_FORMATS = ("json", "squid", "both")


def _audit_format(value: Any) -> str:
    if value not in AUDIT_FORMATS:
        raise ValueError(f"expected one of {', '.join(AUDIT_FORMATS)}")
    return str(value)


def _squid_logformat(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a format name or string")
    parse_logformat(value)
    return value


def settings_from_mapping(raw: Any, *, file: str, base_dir: Path) -> Settings:
    """Validate a parsed YAML mapping into Settings; raise ConfigError with every issue."""
    settings, issues = _read_settings(raw, file=file, base_dir=base_dir)
    if issues:
        raise ConfigError(issues)
    return settings


def _read_settings(raw: Any, *, file: str, base_dir: Path) -> tuple[Settings, list[ConfigIssue]]:
    """Settings as far as `raw` gives them (a default in place of each invalid value), and every
    issue found."""
    if raw is None:
        raw = {}
    reader = _Reader(raw if isinstance(raw, Mapping) else {}, file)
    reader.check_keys(raw, _SHAPE, "")
    d = Settings()
    t, lim = d.timeouts, d.limits

    def duration(path: str, default: float) -> float:
        return reader.get(path, default, parse_duration, "write a duration such as 15s or 500ms")

    no_paths: tuple[str, ...] = ()
    paths = reader.get("policies.paths", no_paths, _strings, "a list of files or directories")
    static_raw = reader.get("identity.static", None, lambda v: v, "")
    static: tuple[StaticIdentity, ...] = ()
    if static_raw is not None:
        try:
            static = parse_static_identities(static_raw, file=file, path="identity.static")
        except ConfigError as exc:
            reader.issues.extend(exc.issues)
    settings = Settings(
        source=file,
        listen=reader.get(
            "listen", d.listen, parse_endpoint, "write address:port, e.g. 0.0.0.0:3128"
        ),
        admin=reader.get("admin", d.admin, parse_endpoint, "write address:port, e.g. 0.0.0.0:9090"),
        workers=reader.get("workers", d.workers, _positive_int, "a whole number >= 1"),
        default_action=reader.get(
            "defaultAction", d.default_action, _default_action, "deny or allow"
        ),
        policy_paths=tuple((base_dir / p) for p in paths),
        policy_kubernetes=reader.get("policies.kubernetes", False, _bool, "true or false"),
        policy_status_write=reader.get("policies.status.write", True, _bool, "true or false"),
        policy_status_lease_name=reader.get(
            "policies.status.leaseName",
            d.policy_status_lease_name,
            _object_name,
            "a Kubernetes object name, e.g. outgate-policy-status",
        ),
        policy_status_lease_namespace=reader.get(
            "policies.status.leaseNamespace",
            None,
            _namespace_name,
            "the proxy's own namespace, e.g. outgate-system (null: $POD_NAMESPACE)",
        ),
        policy_status_writes_per_second=reader.get(
            "policies.status.writesPerSecond",
            d.policy_status_writes_per_second,
            _positive_number,
            "a rate, e.g. 5",
        ),
        identity_kubernetes=reader.get("identity.kubernetes", False, _bool, "true or false"),
        kubeconfig=reader.get(
            "identity.kubeconfig",
            None,
            # A relative kubeconfig is relative to the config file, as policy paths are.
            lambda v: str(base_dir / Path(str(v)).expanduser()),
            "a path to a kubeconfig file",
        ),
        identity_watch_jobs=reader.get("identity.watchJobs", True, _bool, "true or false"),
        static_identities=static,
        dns_nameservers=reader.get(
            "dns.nameservers", no_paths, _strings, 'a list like ["10.96.0.10:53"]'
        ),
        dns_timeout=duration("dns.timeout", d.dns_timeout),
        dns_min_ttl=duration("dns.minTTL", d.dns_min_ttl),
        dns_max_ttl=duration("dns.maxTTL", d.dns_max_ttl),
        dns_hosts_file=_hosts_file(reader, base_dir),
        proxy_protocol_trusted_cidrs=reader.get(
            "proxyProtocol.trustedCIDRs",
            (),
            _networks,
            "a list of the load balancers' addresses, e.g. [10.0.0.0/24]",
        ),
        cluster_cidrs=reader.get("guard.clusterCIDRs", (), _networks, "a list like [10.0.0.0/8]"),
        unsafe_allow_cidrs=reader.get(
            "guard.unsafeAllowCIDRs", (), _networks, "a list like [10.1.2.0/24]"
        ),
        timeouts=Timeouts(
            header=duration("timeouts.header", t.header),
            connect=duration("timeouts.connect", t.connect),
            idle=duration("timeouts.idle", t.idle),
            sni_peek=duration("timeouts.sniPeek", t.sni_peek),
            drain=duration("timeouts.drain", t.drain),
            body=duration("timeouts.body", t.body),
            kube_watch_inactivity=duration("timeouts.kubeWatchInactivity", t.kube_watch_inactivity),
        ),
        limits=Limits(
            max_header_bytes=reader.get(
                "limits.maxHeaderBytes", lim.max_header_bytes, _positive_int, "a byte count"
            ),
            max_connections=reader.get(
                "limits.maxConnections", lim.max_connections, _positive_int, "a count"
            ),
            max_connections_per_source=reader.get(
                "limits.maxConnectionsPerSource",
                lim.max_connections_per_source,
                _positive_int,
                "a count",
            ),
            new_connections_per_second=reader.get(
                "limits.newConnectionsPerSecond",
                lim.new_connections_per_second,
                _positive_number,
                "a rate, e.g. 200",
            ),
            new_connections_burst=reader.get(
                "limits.newConnectionsBurst", lim.new_connections_burst, _positive_int, "a count"
            ),
            max_tunnels_per_workload=reader.get(
                "limits.maxTunnelsPerWorkload",
                lim.max_tunnels_per_workload,
                _positive_int,
                "a count",
            ),
            shed_loop_lag=duration("limits.shedLoopLag", lim.shed_loop_lag),
            shed_accept_queue=reader.get(
                "limits.shedAcceptQueue",
                lim.shed_accept_queue,
                _fraction,
                "a fraction of the listen backlog, e.g. 0.5 (0 turns it off)",
            ),
            splice_max_tunnels=reader.get(
                "limits.spliceMaxTunnels",
                lim.splice_max_tunnels,
                _count,
                "a count (0 turns splice off)",
            ),
            splice_after_bytes=reader.get(
                "limits.spliceAfterBytes", lim.splice_after_bytes, _count, "a byte count"
            ),
        ),
        tls_ca_cert=reader.get("tls.caCert", None, str, "a path to a PEM file"),
        tls_ca_key=reader.get("tls.caKey", None, str, "a path to a PEM file"),
        tls_upstream_ca_bundle=reader.get("tls.upstreamCABundle", None, str, "a PEM bundle path"),
        tls_cert_cache_size=reader.get(
            "tls.certCacheSize", d.tls_cert_cache_size, _positive_int, "a count, e.g. 1024"
        ),
        dlp_custom=reader.get(
            "dlp.custom",
            (),
            parse_custom_detectors,
            "a list like [{name: ticket-ids, headerValue: 'TICKET-[0-9]+'}]",
        ),
        dlp_credential_hosts=reader.get(
            "dlp.credentialHosts",
            (),
            parse_credential_hosts,
            "a list like [{name: ghe, token: '^ghp_', hosts: [github.corp.example]}]",
        ),
        audit_output=reader.get("audit.output", "stdout", _audit_output, "stdout"),
        audit_format=reader.get(
            "audit.format", d.audit_format, _audit_format, "json, squid (access.log lines) or both"
        ),
        audit_squid_output=reader.get(
            "audit.squidOutput",
            d.audit_squid_output,
            # A relative file is relative to the config file, as policy paths are.
            lambda v: "stdout" if v == "stdout" else str(base_dir / str(v)),
            "stdout or a file path",
        ),
        audit_squid_logformat=reader.get(
            "audit.squidLogformat",
            d.audit_squid_logformat,
            _squid_logformat,
            "squid, common, combined, or a format string of the supported codes",
        ),
        ui_enabled=reader.get("ui.enabled", d.ui_enabled, _bool, "true or false"),
        ui_token_file=reader.get(
            "ui.tokenFile",
            None,
            # A relative file is relative to the config file, as policy paths are.
            lambda v: str(base_dir / Path(_nonempty(v)).expanduser()),
            "a path to a file holding the bearer token, e.g. a mounted Secret's key",
        ),
        traffic_top_destinations=reader.get(
            "traffic.topDestinations", d.traffic_top_destinations, _positive_int, "a count, e.g. 50"
        ),
        traffic_max_workloads=reader.get(
            "traffic.maxWorkloads", d.traffic_max_workloads, _positive_int, "a count, e.g. 100"
        ),
        traffic_metric_destinations=reader.get(
            "traffic.metricDestinations",
            d.traffic_metric_destinations,
            _count,
            "a count, e.g. 10 (0: every destination is labelled other)",
        ),
    )
    upstreams_issues = IssueCollector(file=file)
    upstreams = _parse_upstreams(
        raw.get("upstreams") if isinstance(raw, Mapping) else None, upstreams_issues, base_dir
    )
    routes = _parse_routes(
        raw.get("routes") if isinstance(raw, Mapping) else None,
        upstreams_issues,
        names={spec.name for spec in upstreams},
        resolved_by_parent=frozenset(
            spec.name for spec in upstreams if spec.resolve is ResolveMode.PARENT
        ),
    )
    reader.issues.extend(upstreams_issues.issues)
    transparent_issues = IssueCollector(file=file)
    transparent = Transparent(
        tls=reader.get(
            "transparent.tls", None, parse_endpoint, "write address:port, e.g. 0.0.0.0:8443"
        ),
        tls_port=reader.get("transparent.tlsPort", 443, _port, "a port, e.g. 443"),
        http=reader.get(
            "transparent.http", None, parse_endpoint, "write address:port, e.g. 0.0.0.0:8080"
        ),
        http_port=reader.get("transparent.httpPort", 80, _port, "a port, e.g. 80"),
        ports=_parse_port_maps(
            raw.get("transparent") if isinstance(raw, Mapping) else None, transparent_issues
        ),
    )
    reader.issues.extend(transparent_issues.issues)
    settings = dataclasses.replace(
        settings,
        upstreams=upstreams,
        routes=routes,
        auth_basic=_basic_auth(reader, base_dir, static),
        transparent=transparent,
    )
    _check_listeners_distinct(settings, reader)
    if settings.audit_format == "both" and settings.audit_squid_output == "stdout":
        reader.issue(
            "audit.squidOutput",
            "format both would interleave JSON records and Squid lines on stdout",
            "set audit.squidOutput to a file, e.g. /var/log/outgate/access.log, "
            "or use audit.format: squid",
        )
    if settings.dns_min_ttl > settings.dns_max_ttl:
        reader.issue("dns.minTTL", "minTTL is larger than maxTTL", "make minTTL <= maxTTL")
    return settings, reader.issues


# -- upstreams and routes (issue 12) ---------------------------------------------------------
_UPSTREAM_KEYS = (
    "name",
    "proxies",
    "credentialsFile",
    "caBundle",
    "connectTimeout",
    "responseTimeout",
    "failLimit",
    "retryAfter",
    "resolve",
)
_ROUTES_KEYS = ("default", "rules")
_ROUTE_RULE_KEYS = ("to", "via")
_UPSTREAM_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_UPSTREAM_EXAMPLE = "upstreams: [{name: corp, proxies: [http://proxy.corp.example:3128]}]"


def parse_proxy_url(value: object) -> ProxyAddress:
    """`http://host:port` or `https://host:port`. Credentials in the URL are refused (they would
    end up in logs, `ps` and every copy of the config); the message never repeats the value."""
    if not isinstance(value, str):
        raise ValueError(f"a proxy URL must be a string, not {describe_type(value)}")
    parts = urlsplit(value)
    if "@" in parts.netloc:
        raise ValueError(
            "the URL carries credentials; put user:password in credentialsFile instead"
        )
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme {parts.scheme or '(none)'!r} is not http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("a proxy URL has no path, query or fragment")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad port: {exc}") from None
    if port is None or port == 0:
        raise ValueError("the port is required, e.g. http://proxy.corp.example:3128")
    host = parts.hostname
    if not host:
        raise ValueError("the host is missing")
    return ProxyAddress(scheme=parts.scheme, host=host, port=port)


def _parse_upstreams(
    raw: object, issues: IssueCollector, base_dir: Path
) -> tuple[UpstreamSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        issues.add("upstreams", f"expected a list, not {describe_type(raw)}", fix=_UPSTREAM_EXAMPLE)
        return ()
    specs: list[UpstreamSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        path = key_path("upstreams", index)
        entry = issues.mapping(item, path, what="an upstream")
        if entry is None:
            continue
        issues.check_keys(entry, _UPSTREAM_KEYS, path)
        before = len(issues.issues)
        name = entry.get("name")
        if not isinstance(name, str) or not _UPSTREAM_NAME.match(name) or name == DIRECT:
            issues.add(
                key_path(path, "name"),
                f"invalid upstream name {name!r}"
                + (" (direct means no upstream)" if name == DIRECT else ""),
                fix="lowercase letters, digits and '-', e.g. name: corp",
            )
            name = f"#{index}"
        elif name in seen:
            issues.add(
                key_path(path, "name"),
                f"upstream {name!r} is defined twice",
                fix="give each upstream its own name",
            )
        seen.add(name)
        proxies: list[ProxyAddress] = []
        raw_proxies = entry.get("proxies")
        if not isinstance(raw_proxies, list) or not raw_proxies:
            issues.add(
                key_path(path, "proxies"),
                "proxies is missing or empty",
                fix="list the parent proxies in the order to try them: "
                "[http://proxy-a.corp.example:3128, http://proxy-b.corp.example:3128]",
            )
        else:
            for pindex, url in enumerate(raw_proxies):
                try:
                    proxies.append(parse_proxy_url(url))
                except ValueError as exc:
                    issues.add(
                        key_path(key_path(path, "proxies"), pindex),
                        str(exc),
                        fix="write http://host:port or https://host:port",
                    )

        spec = _parse_upstream(entry, path, issues, base_dir, name, tuple(proxies))
        if len(issues.issues) == before:
            specs.append(spec)
    return tuple(specs)


def _parse_upstream(
    entry: Mapping[str, Any],
    path: str,
    issues: IssueCollector,
    base_dir: Path,
    name: str,
    proxies: tuple[ProxyAddress, ...],
) -> UpstreamSpec:
    def value(key: str, default: T, convert: Callable[[Any], T], fix: str) -> T:
        node = entry.get(key)
        if node is None:
            return default
        try:
            return convert(node)
        except (ValueError, TypeError) as exc:
            issues.add(key_path(path, key), f"invalid value {node!r}: {exc}", fix=fix)
            return default

    def file_path(node: Any) -> str:
        if not isinstance(node, str) or not node:
            raise ValueError("expected a file path")
        return str(base_dir / Path(node).expanduser())

    def resolve_mode(node: Any) -> ResolveMode:
        return ResolveMode(str(node))

    spec = UpstreamSpec(
        name=name,
        proxies=proxies,
        credentials_file=value(
            "credentialsFile",
            None,
            file_path,
            "a path to a file whose first line is user:password",
        ),
        ca_bundle=value("caBundle", None, file_path, "a path to a PEM bundle"),
        connect_timeout=value(
            "connectTimeout", DEFAULT_CONNECT_TIMEOUT, parse_duration, "a duration, e.g. 10s"
        ),
        response_timeout=value(
            "responseTimeout", DEFAULT_RESPONSE_TIMEOUT, parse_duration, "a duration, e.g. 30s"
        ),
        fail_limit=value("failLimit", DEFAULT_FAIL_LIMIT, _positive_int, "a count, e.g. 3"),
        retry_after=value(
            "retryAfter", DEFAULT_RETRY_AFTER, parse_duration, "a duration, e.g. 10s"
        ),
        resolve=value("resolve", ResolveMode.LOCAL, resolve_mode, "local or parent"),
    )
    return spec


def _parse_routes(
    raw: object,
    issues: IssueCollector,
    *,
    names: set[str],
    resolved_by_parent: frozenset[str],
) -> RouteTable | None:
    if raw is None:
        return RouteTable(resolved_by_parent=resolved_by_parent) if names else None
    entry = issues.mapping(raw, "routes", what="routes")
    if entry is None:
        return None
    issues.check_keys(entry, _ROUTES_KEYS, "routes")
    known = ", ".join([DIRECT, *sorted(names)])

    def via(node: object, path: str) -> str:
        if isinstance(node, str) and (node == DIRECT or node in names):
            return node
        issues.add(
            path, f"{node!r} is neither direct nor an upstream's name", fix=f"use one of: {known}"
        )
        return DIRECT

    default = via(entry.get("default", DIRECT), "routes.default")
    rules: list[RouteRule] = []
    raw_rules = entry.get("rules")
    if raw_rules is not None and not isinstance(raw_rules, list):
        issues.add(
            "routes.rules",
            f"expected a list, not {describe_type(raw_rules)}",
            fix="rules: [{to: [{fqdn: '*.corp.example'}], via: direct}]",
        )
        raw_rules = []
    for index, item in enumerate(raw_rules or []):
        path = key_path("routes.rules", index)
        rule = issues.mapping(item, path, what="a route")
        if rule is None:
            continue
        issues.check_keys(rule, _ROUTE_RULE_KEYS, path)
        fqdns, suffixes, cidrs = parse_destinations(rule.get("to"), issues, f"{path}.to")
        rules.append(
            RouteRule.of(
                via=via(rule.get("via"), f"{path}.via"),
                fqdns=fqdns,
                wildcard_suffixes=suffixes,
                cidrs=cidrs,
                name=f"routes.rules[{index}]",
            )
        )
    if not names:
        return None  # with no upstream every route is direct: no routing step, no record field
    return RouteTable(rules=tuple(rules), default=default, resolved_by_parent=resolved_by_parent)


# -- transparent listeners (issue 13) ---------------------------------------------------------
_PORT_MAP_KEYS = ("listen", "to")
_PORT_MAP_EXAMPLE = "ports: [{listen: 0.0.0.0:15432, to: ledger.db.corp.example:5432}]"


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected a port number")
    return parse_port(str(value))


def _parse_port_maps(raw: object, issues: IssueCollector) -> tuple[PortMap, ...]:
    """`transparent.ports`: each `{listen: ADDR, to: HOST:PORT}`, both required."""
    node = raw.get("ports") if isinstance(raw, Mapping) else None
    if node is None:
        return ()
    if not isinstance(node, list):
        issues.add(
            "transparent.ports",
            f"expected a list, not {describe_type(node)}",
            fix=_PORT_MAP_EXAMPLE,
        )
        return ()
    maps: list[PortMap] = []
    for index, item in enumerate(node):
        path = key_path("transparent.ports", index)
        entry = issues.mapping(item, path, what="a port map")
        if entry is None:
            continue
        issues.check_keys(entry, _PORT_MAP_KEYS, path)
        listen_raw, to_raw = entry.get("listen"), entry.get("to")
        listen: Endpoint | None = None
        target: tuple[Host, int] | None = None
        if listen_raw is None:
            issues.add(f"{path}.listen", "missing", fix="listen: 0.0.0.0:15432")
        else:
            try:
                listen = parse_endpoint(listen_raw)
            except (ValueError, OutgateError) as exc:
                issues.add(
                    f"{path}.listen",
                    f"invalid value {listen_raw!r}: {exc}",
                    fix="write address:port, e.g. 0.0.0.0:15432",
                )
        if not isinstance(to_raw, str):
            issues.add(
                f"{path}.to",
                "missing, or not a string",
                fix="to: ledger.db.corp.example:5432 (a host name or IP, and a port)",
            )
        else:
            try:
                target = split_authority(to_raw, default_port=None)
            except OutgateError as exc:
                issues.add(
                    f"{path}.to",
                    f"invalid value {to_raw!r}: {exc.message}",
                    fix="to: ledger.db.corp.example:5432 (a host name or IP, and a port)",
                )
        if listen is not None and target is not None:
            maps.append(PortMap(listen=listen, host=target[0], port=target[1]))
    return tuple(maps)


def _check_listeners_distinct(settings: Settings, reader: _Reader) -> None:
    """Two listeners on one address and port cannot both bind (port 0 picks a free one)."""
    seen: dict[tuple[str, int], str] = {}
    named: list[tuple[str, Endpoint | None]] = [
        ("listen", settings.listen),
        ("admin", settings.admin),
        ("transparent.tls", settings.transparent.tls),
        ("transparent.http", settings.transparent.http),
    ]
    named += [
        (f"{key_path('transparent.ports', i)}.listen", m.listen)
        for i, m in enumerate(settings.transparent.ports)
    ]
    for path, endpoint in named:
        if endpoint is None:
            continue
        if endpoint.port == 0:
            if settings.workers > 1 and path.startswith("transparent"):
                # Each worker would pick its own port: only listen and admin are held by the
                # supervisor (proxy.supervisor), so every worker shares theirs.
                reader.issue(path, "port 0 with workers above 1", fix="give a fixed port")
            continue
        key = (endpoint.host, endpoint.port)
        if key in seen:
            reader.issue(
                path,
                f"{endpoint} is already used by {seen[key]}",
                fix="give each listener its own address:port",
            )
        else:
            seen[key] = path


def load_settings(path: str | Path | None) -> Settings:
    """Load a config file, or the embedded default when `path` is None."""
    if path is None:
        ref = resources.files("proxy") / EMBEDDED_CONFIG
        with resources.as_file(ref) as embedded:
            return _load_file(Path(embedded), label="<embedded default config>")
    return _load_file(Path(path), label=str(path))


def check_settings(path: Path) -> tuple[Settings | None, list[ConfigIssue]]:
    """For `check-config`, which reports every problem: the settings as far as the file gives
    them (a default in place of each invalid value, so the policies it names can still be
    checked) and every issue. None when the file cannot be read or is not YAML."""
    try:
        raw = _read_yaml(path, label=str(path))
    except ConfigError as exc:
        return None, exc.issues
    return _read_settings(raw, file=str(path), base_dir=path.resolve().parent)


def _load_file(path: Path, *, label: str) -> Settings:
    return settings_from_mapping(
        _read_yaml(path, label=label), file=label, base_dir=path.resolve().parent
    )


def _read_yaml(path: Path, *, label: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [
                ConfigIssue(
                    file=label, document=None, path="", message=str(exc), fix="check the path"
                )
            ]
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            [
                ConfigIssue(
                    file=label,
                    document=None,
                    path=where,
                    message=f"YAML syntax: {exc}",
                    fix="fix the YAML syntax at that line",
                )
            ]
        ) from None
    return raw
