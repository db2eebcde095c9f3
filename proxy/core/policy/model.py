"""The policy model: validated, immutable values the loader builds and the engine compiles.

Two kinds share one rule model (DESIGN section 3): a `ClusterEgressPolicy` (cluster scope, an
`admin` or `baseline` tier, a priority and an optional subject) and an `EgressPolicy`
(namespaced, selects pods of its own namespace with `podSelector`). Names in rules are stored
normalised by `proxy.core.hosts.normalize_name`, the function requests go through too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from proxy.core.hosts import Host, IPAddress, normalize_name, unmap_ipv4
from proxy.core.identity import MATCH_ALL, IPNetwork, LabelSelector, Workload, WorkloadKind

API_VERSION = "outgate.dev/v1alpha1"

# Priority orders ClusterEgressPolicies inside a tier, lower first (DESIGN section 3: 0..1000).
MIN_PRIORITY = 0
MAX_PRIORITY = 1000
# An omitted priority sits in the middle of the range, so an operator can place a policy
# before or after every unprioritised one with equal room on both sides.
DEFAULT_PRIORITY = 500

MIN_PORT = 1
MAX_PORT = 65535

# Header and URL detectors the intercept path knows (proxy.core.dlp implements them).
DLP_DETECTORS: frozenset[str] = frozenset(
    {
        "aws-access-key",
        "private-key",
        "bearer-to-other-host",
        "gcp-service-account-key",
        "github-token",
        "slack-token",
    }
)


class PolicyKind(StrEnum):
    CLUSTER = "ClusterEgressPolicy"
    NAMESPACED = "EgressPolicy"


class Action(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"
    # Admin tier: hand the decision to the namespace tier; baseline tier: to the default action.
    PASS = "Pass"  # noqa: S105 - an action name, not a password


class Tier(StrEnum):
    """Evaluation tiers in order. `namespace` is implied by kind EgressPolicy, never written."""

    ADMIN = "admin"
    NAMESPACE = "namespace"
    BASELINE = "baseline"


class Mode(StrEnum):
    ENFORCE = "enforce"
    AUDIT = "audit"  # evaluated into the shadow decision only; never changes what happens


class TunnelProtocol(StrEnum):
    """What the bytes of an allowed tunnel must be. A rule that names none (`Rule.protocol` is
    None) takes a TLS ClientHello or a plain HTTP request (proxy.core.tunnel_protocols)."""

    TLS = "tls"  # the first bytes must be a TLS ClientHello
    TCP = "tcp"  # anything
    POSTGRES = "postgres"
    SSH = "ssh"
    HTTP = "http"  # plaintext HTTP, parsed and every request re-checked


class SniMode(StrEnum):
    """Whether a `tls` tunnel's ClientHello must carry a server name (a present one must always
    equal the CONNECT host)."""

    REQUIRED = "required"
    OPTIONAL = "optional"  # for clients that omit SNI, e.g. some JDKs for single-label names


class EchMode(StrEnum):
    """Encrypted Client Hello: `allow` still checks the outer SNI; `deny` refuses the tunnel."""

    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsOptions:
    """A rule's `tls: {sni: required|optional, ech: allow|deny}` (tunnels with protocol tls)."""

    sni: SniMode = SniMode.REQUIRED
    ech: EchMode = EchMode.ALLOW


DEFAULT_TLS = TlsOptions()


@dataclass(frozen=True, slots=True, kw_only=True)
class PortRange:
    start: int
    end: int

    def __post_init__(self) -> None:
        if not MIN_PORT <= self.start <= self.end <= MAX_PORT:
            raise ValueError(f"invalid port range {self.start}-{self.end}")

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.start <= port <= self.end

    def __str__(self) -> str:
        return str(self.start) if self.start == self.end else f"{self.start}-{self.end}"


# DESIGN section 3: `ports` omitted means [80, 443].
DEFAULT_PORTS: tuple[PortRange, ...] = (PortRange(start=80, end=80), PortRange(start=443, end=443))


@dataclass(frozen=True, slots=True, kw_only=True)
class Inspect:
    """What an intercepting rule checks on every request. Empty tuples mean "any"."""

    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()  # "/v2/*": a trailing "*" matches any rest of the path
    dlp: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """Where a request goes. `host` comes from `hosts.parse_host`; `ip` is the address being
    checked: the literal's own address, or one resolved address when the caller re-decides
    after resolution. A name is re-normalised here so a hand-built Host cannot miss a rule."""

    host: Host
    port: int
    ip: IPAddress | None = None

    def __post_init__(self) -> None:
        if not MIN_PORT <= self.port <= MAX_PORT:
            raise ValueError(f"port {self.port} is out of range")
        if self.host.ip is None:
            name = normalize_name(self.host.name)
            if name != self.host.name:
                object.__setattr__(self, "host", Host(name=name))
        elif self.ip is not None and unmap_ipv4(self.ip) != unmap_ipv4(self.host.ip):
            raise ValueError("ip differs from the IP literal host")
        address = self.ip if self.ip is not None else self.host.ip
        if address is not None:
            object.__setattr__(self, "ip", unmap_ipv4(address))

    def __str__(self) -> str:
        host = (
            f"[{self.host.name}]"
            if self.host.ip is not None and self.host.ip.version == 6
            else self.host.name
        )
        text = f"{host}:{self.port}"
        if self.ip is not None and self.host.ip is None:
            text += f" ({self.ip})"
        return text


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    name: str
    action: Action
    fqdns: tuple[str, ...] = ()  # exact, normalised names
    wildcard_suffixes: tuple[str, ...] = ()  # "*.stripe.com" is stored as "stripe.com"
    cidrs: tuple[IPNetwork, ...] = ()
    ports: tuple[PortRange, ...] = DEFAULT_PORTS
    # None: not written. A tunnel then carries TLS, or plain HTTP served as `http` (clients
    # such as Node's undici tunnel every http:// URL); with `inspect`, TLS (it is intercepted).
    protocol: TunnelProtocol | None = None
    inspect: Inspect | None = None
    tls: TlsOptions = DEFAULT_TLS
    # Every destination, whatever its name or address: only the Deny rule of a fail-closed
    # stand-in for an invalid object (`FAIL_CLOSED_RULE`); no policy document can write it.
    any_destination: bool = False

    def matches_host(self, destination: Destination) -> bool:
        """The reference semantics the engine's indexes implement (DESIGN section 3)."""
        if self.any_destination:
            return True
        if destination.host.ip is None:
            name = destination.host.name
            if name in self.fqdns:
                return True
            # Any strict parent suffix: "a.b.stripe.com" -> "b.stripe.com", "stripe.com", "com".
            labels = name.split(".")
            for start in range(1, len(labels)):
                if ".".join(labels[start:]) in self.wildcard_suffixes:
                    return True
        ip = destination.ip
        return ip is not None and any(ip in cidr for cidr in self.cidrs)

    def matches_port(self, port: int) -> bool:
        return any(port in ports for ports in self.ports)

    def matches(self, destination: Destination) -> bool:
        return self.matches_port(destination.port) and self.matches_host(destination)


# The rule of a fail-closed stand-in: it matches every destination on every port, so whatever
# the invalid object could have decided, the stand-in decides deny at the object's place.
FAIL_CLOSED_RULE = Rule(
    name="fail-closed",
    action=Action.DENY,
    ports=(PortRange(start=MIN_PORT, end=MAX_PORT),),
    any_destination=True,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Subject:
    """Which workloads a ClusterEgressPolicy applies to. Every present part must match; an empty
    tuple means "any". A subject never selects an unknown source: it has no facts to match."""

    namespace_selector: LabelSelector = MATCH_ALL
    pod_selector: LabelSelector = MATCH_ALL
    service_accounts: tuple[str, ...] = ()
    owners: tuple[tuple[str, str], ...] = ()  # (kind, name), e.g. ("Deployment", "api")

    def selects(self, workload: Workload) -> bool:
        if workload.kind is WorkloadKind.UNKNOWN:
            return False
        if not self.namespace_selector.matches(workload.namespace_labels):
            return False
        if not self.pod_selector.matches(workload.labels):
            return False
        if self.service_accounts and workload.service_account not in self.service_accounts:
            return False
        return not self.owners or (workload.owner_kind, workload.owner_name) in self.owners


@dataclass(frozen=True, slots=True, kw_only=True)
class Origin:
    """Where a policy was read from, for messages: a file and the 1-based YAML document."""

    file: str
    document: int

    def __str__(self) -> str:
        return f"{self.file} (document {self.document})"


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    kind: PolicyKind
    name: str
    namespace: str = ""  # "" for a ClusterEgressPolicy
    tier: Tier  # NAMESPACE exactly when kind is EgressPolicy
    priority: int = DEFAULT_PRIORITY
    mode: Mode = Mode.ENFORCE
    subject: Subject | None = None  # ClusterEgressPolicy; None selects every workload
    pod_selector: LabelSelector = MATCH_ALL  # EgressPolicy; {} selects every pod of the namespace
    rules: tuple[Rule, ...]
    origin: Origin = field(default=Origin(file="<memory>", document=1), compare=False)
    # Non-empty: this policy stands in for a stored object that is invalid (these are its
    # rendered issues), and its one rule is FAIL_CLOSED_RULE (docs/kubernetes.md, "Invalid
    # objects fail closed").
    invalid_issues: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind is PolicyKind.NAMESPACED:
            if not self.namespace or self.tier is not Tier.NAMESPACE or self.subject is not None:
                raise ValueError("an EgressPolicy has a namespace, tier namespace and no subject")
        elif self.namespace or self.tier is Tier.NAMESPACE or not self.pod_selector.is_empty:
            raise ValueError(
                "a ClusterEgressPolicy has no namespace or podSelector and tier admin|baseline"
            )
        if not MIN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise ValueError(f"priority {self.priority} is out of range")
        if self.invalid_issues and self.rules != (FAIL_CLOSED_RULE,):
            raise ValueError("a stand-in for an invalid object has exactly FAIL_CLOSED_RULE")
        if not self.invalid_issues and any(rule.any_destination for rule in self.rules):
            raise ValueError("only a stand-in for an invalid object matches any destination")

    @property
    def invalid(self) -> bool:
        return bool(self.invalid_issues)

    @property
    def ruleset(self) -> str:
        """`namespace/name` (EgressPolicy) or `name` (ClusterEgressPolicy): audit `rule.ruleset`."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def identity(self) -> tuple[PolicyKind, str, str]:
        return (self.kind, self.namespace, self.name)

    def selects(self, workload: Workload) -> bool:
        if self.kind is PolicyKind.NAMESPACED:
            return (
                workload.kind is not WorkloadKind.UNKNOWN
                and workload.namespace == self.namespace
                and self.pod_selector.matches(workload.labels)
            )
        return self.subject is None or self.subject.selects(workload)
