"""Who is asking: the `Workload` a source address maps to, label selectors, and IP -> workload.

A workload's selectable facts are its namespace (and that namespace's labels), its pod labels,
its service account and its owner. Pods come from the Kubernetes informer (a later issue, which
implements `IdentityLookup`); legacy sources such as VMs come from `identity.static` in the
runtime config and get a virtual namespace labelled like a real one, so the same selectors
apply to both. A source that maps to nothing is `UNKNOWN_WORKLOAD`.

This module also holds the small validation helpers (`IssueCollector`, key checks, label and
CIDR parsing) that both the runtime config's `identity.static` parser here and the policy
loader use, so every config error reads the same way.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

from proxy.core.hosts import IPAddress, unmap_ipv4
from proxy.errors import ConfigError, ConfigIssue

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Kubernetes sets this label on every namespace (since 1.21); selecting a namespace by name
# is done with it, so static identities get it on their virtual namespace too.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


# --------------------------------------------------------------------------------------------
# Validation helpers shared with proxy.core.policy.loader
# --------------------------------------------------------------------------------------------

# Kubernetes object names: RFC 1123 label (namespaces) and subdomain (most other objects).
_DNS1123_LABEL = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?\Z")
_DNS1123_SUBDOMAIN_MAX = 253
# Label keys and values (k8s.io/apimachinery validation: qualified names, 63 characters).
_LABEL_NAME = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_LABEL_VALUE_MAX = 63
_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def is_dns1123_label(text: str) -> bool:
    return bool(_DNS1123_LABEL.match(text))


def is_dns1123_subdomain(text: str) -> bool:
    return len(text) <= _DNS1123_SUBDOMAIN_MAX and all(
        _DNS1123_LABEL.match(label) for label in text.split(".")
    )


def key_path(base: str, key: object) -> str:
    """`spec` + `rules` -> `spec.rules`; `spec.rules` + 2 -> `spec.rules[2]`; odd keys quoted."""
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{base}[{key}]"
    text = str(key)
    if _SIMPLE_KEY.match(text):
        return f"{base}.{text}" if base else text
    return f"{base}[{json.dumps(text)}]"


def describe_type(value: object) -> str:
    """What a YAML value is, in the words an operator would use."""
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid spelling of `word` (case-insensitive first), or None."""
    options = list(choices)
    for option in options:
        if option.lower() == word.lower():
            return option
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return close[0] if close else None


@dataclass(slots=True)
class IssueCollector:
    """Collects every problem in one file (or one YAML document) before anything is raised."""

    file: str
    document: int | None = None
    issues: list[ConfigIssue] = field(default_factory=list)

    def add(self, path: str, message: str, *, fix: str) -> None:
        self.issues.append(
            ConfigIssue(file=self.file, document=self.document, path=path, message=message, fix=fix)
        )

    def check_keys(
        self,
        value: Mapping[Any, object],
        allowed: Collection[str],
        path: str,
        *,
        hints: Mapping[str, str] | None = None,
    ) -> None:
        """Unknown keys are errors: a typo must not silently widen or narrow a policy."""
        for key in value:
            if isinstance(key, str) and key in allowed:
                continue
            where = key_path(path, key) if isinstance(key, str) else path
            if hints and isinstance(key, str) and key in hints:
                self.add(where, f"unknown key {key!r}", fix=hints[key])
                continue
            suggestion = did_you_mean(key, allowed) if isinstance(key, str) else None
            valid = ", ".join(sorted(allowed))
            fix = (
                f"did you mean {suggestion!r}?"
                if suggestion
                else f"remove it; valid keys here: {valid}"
            )
            self.add(where, f"unknown key {key!r}", fix=fix)

    def mapping(self, value: object, path: str, *, what: str) -> Mapping[str, object] | None:
        """`value` as a mapping, or None after recording an issue."""
        if isinstance(value, dict):
            return value
        self.add(
            path,
            f"{what} must be a mapping, not {describe_type(value)}",
            fix="write key: value pairs",
        )
        return None


def parse_network(text: object, issues: IssueCollector, path: str) -> IPNetwork | None:
    """A strict CIDR: host bits must be zero, so `10.20.1.0/16` is refused, not silently widened."""
    if not isinstance(text, str):
        issues.add(
            path,
            f"a CIDR must be a string, not {describe_type(text)}",
            fix="write it as text, e.g. 10.20.0.0/16",
        )
        return None
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        issues.add(
            path,
            f"{text!r} is not a CIDR",
            fix="write an address/prefix such as 10.20.0.0/16 or 2001:db8::/32",
        )
        return None
    address = text.partition("/")[0]
    single = f"{address}/{loose.max_prefixlen}"
    issues.add(
        path,
        f"{text!r} has host bits set",
        fix=f"write the network {loose}, or {single} for that one address",
    )
    return None


def parse_labels(raw: object, issues: IssueCollector, path: str) -> dict[str, str]:
    """A Kubernetes label map: qualified-name keys, values of at most 63 characters, all strings."""
    if not isinstance(raw, dict):
        issues.add(
            path,
            f"labels must be a mapping, not {describe_type(raw)}",
            fix="write key: value pairs, e.g. {app: api}",
        )
        return {}
    labels: dict[str, str] = {}
    for key, value in raw.items():
        where = key_path(path, key) if isinstance(key, str) else path
        if not isinstance(key, str) or not is_label_key(key):
            issues.add(
                where,
                f"{key!r} is not a valid label key",
                fix="use [prefix/]name: name up to 63 characters of letters, digits, '-', '_', '.'",
            )
            continue
        if not isinstance(value, str):
            issues.add(
                where,
                f"label value must be a string, not {describe_type(value)}",
                fix=f'quote it: {key}: "{_yaml_scalar(value)}"',
            )
            continue
        if not is_label_value(value):
            issues.add(
                where,
                f"{value!r} is not a valid label value",
                fix="use up to 63 characters of letters, digits, '-', '_', '.', "
                "starting and ending with a letter or digit",
            )
            continue
        labels[key] = value
    return labels


def _yaml_scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def is_label_key(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and not (prefix and is_dns1123_subdomain(prefix)):
        return False
    return bool(_LABEL_NAME.match(name))


def is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= _LABEL_VALUE_MAX and bool(_LABEL_NAME.match(value)))


# --------------------------------------------------------------------------------------------
# Labels and label selectors
# --------------------------------------------------------------------------------------------


class FrozenLabels(Mapping[str, str]):
    """An immutable, hashable label map (so workloads can key caches)."""

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = dict(items)
        self._hash = hash(frozenset(self._items.items()))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenLabels):
            return self._hash == other._hash and self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenLabels({self._items!r})"


EMPTY_LABELS = FrozenLabels()


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelRequirement:
    """One `matchExpressions` entry."""

    key: str
    operator: SelectorOperator
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        needs_values = self.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN)
        if needs_values != bool(self.values):
            raise ValueError(
                f"operator {self.operator} {'needs' if needs_values else 'takes no'} values"
            )

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        match self.operator:
            case SelectorOperator.IN:
                return value is not None and value in self.values
            case SelectorOperator.NOT_IN:  # Kubernetes: an absent key satisfies NotIn.
                return value is None or value not in self.values
            case SelectorOperator.EXISTS:
                return value is not None
            case SelectorOperator.DOES_NOT_EXIST:
                return value is None

    def __str__(self) -> str:
        match self.operator:
            case SelectorOperator.IN:
                return f"{self.key} in ({','.join(self.values)})"
            case SelectorOperator.NOT_IN:
                return f"{self.key} notin ({','.join(self.values)})"
            case SelectorOperator.EXISTS:
                return self.key
            case SelectorOperator.DOES_NOT_EXIST:
                return f"!{self.key}"


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelSelector:
    """A Kubernetes LabelSelector: every matchLabels pair AND every expression must hold.

    The empty selector `{}` matches everything (as in Kubernetes).
    """

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[LabelRequirement, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        return all(requirement.matches(labels) for requirement in self.match_expressions)

    def __str__(self) -> str:
        """kubectl's selector syntax (`app=api,tier in (a,b),!canary`); `{}` when empty."""
        parts = [f"{key}={value}" for key, value in self.match_labels]
        parts.extend(str(requirement) for requirement in self.match_expressions)
        return ",".join(parts) if parts else "{}"


MATCH_ALL = LabelSelector()

_SELECTOR_KEYS = ("matchLabels", "matchExpressions")
_EXPRESSION_KEYS = ("key", "operator", "values")


def parse_label_selector(raw: object, issues: IssueCollector, path: str) -> LabelSelector:
    """Validate a LabelSelector; records issues and returns MATCH_ALL-or-partial on error.

    A null selector is an issue, not "match all": `podSelector:` with nothing after it is far more
    often an indentation slip than a wish to select everything, which `{}` says explicitly.
    """
    if raw is None:
        issues.add(
            path,
            "selector is empty (null)",
            fix="write {} to select everything, or {matchLabels: {key: value}}",
        )
        return MATCH_ALL
    body = issues.mapping(raw, path, what="a label selector")
    if body is None:
        return MATCH_ALL
    issues.check_keys(body, _SELECTOR_KEYS, path)
    match_labels: tuple[tuple[str, str], ...] = ()
    if "matchLabels" in body:
        labels = parse_labels(body["matchLabels"], issues, key_path(path, "matchLabels"))
        match_labels = tuple(sorted(labels.items()))
    expressions: list[LabelRequirement] = []
    if "matchExpressions" in body:
        exprs_path = key_path(path, "matchExpressions")
        raw_exprs = body["matchExpressions"]
        if not isinstance(raw_exprs, list):
            issues.add(
                exprs_path,
                f"matchExpressions must be a list, not {describe_type(raw_exprs)}",
                fix="write [{key: app, operator: In, values: [api]}]",
            )
        else:
            for index, raw_expr in enumerate(raw_exprs):
                requirement = _parse_requirement(raw_expr, issues, key_path(exprs_path, index))
                if requirement is not None:
                    expressions.append(requirement)
    return LabelSelector(match_labels=match_labels, match_expressions=tuple(expressions))


def _parse_requirement(raw: object, issues: IssueCollector, path: str) -> LabelRequirement | None:
    body = issues.mapping(raw, path, what="a match expression")
    if body is None:
        return None
    issues.check_keys(body, _EXPRESSION_KEYS, path)
    key = body.get("key")
    ok = True
    if not isinstance(key, str) or not is_label_key(key):
        issues.add(
            key_path(path, "key"),
            f"{key!r} is not a valid label key",
            fix="name a label key, e.g. key: app",
        )
        ok = False
    raw_operator = body.get("operator")
    operator: SelectorOperator | None = None
    if isinstance(raw_operator, str) and raw_operator in SelectorOperator._value2member_map_:
        operator = SelectorOperator(raw_operator)
    else:
        choices = [op.value for op in SelectorOperator]
        suggestion = did_you_mean(raw_operator, choices) if isinstance(raw_operator, str) else None
        issues.add(
            key_path(path, "operator"),
            f"{raw_operator!r} is not a selector operator",
            fix=f"did you mean {suggestion!r}?"
            if suggestion
            else f"use one of {', '.join(choices)}",
        )
        ok = False
    values_path = key_path(path, "values")
    raw_values = body.get("values")
    values: tuple[str, ...] = ()
    if raw_values is not None:
        if not isinstance(raw_values, list) or not all(isinstance(v, str) for v in raw_values):
            issues.add(
                values_path, "values must be a list of strings", fix='write values: ["a", "b"]'
            )
            ok = False
        else:
            values = tuple(raw_values)
    if operator in (SelectorOperator.IN, SelectorOperator.NOT_IN) and not values:
        issues.add(
            values_path, f"operator {operator} needs at least one value", fix="add values: [...]"
        )
        ok = False
    if operator in (SelectorOperator.EXISTS, SelectorOperator.DOES_NOT_EXIST) and values:
        issues.add(values_path, f"operator {operator} takes no values", fix="remove values")
        ok = False
    if not ok or operator is None or not isinstance(key, str):
        return None
    return LabelRequirement(key=key, operator=operator, values=values)


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


class WorkloadKind(StrEnum):
    POD = "pod"
    STATIC = "static"
    UNKNOWN = "unknown"
    # Two live pods claim the source IP (informer issue): never decided, always refused with
    # reason ambiguous_source, because guessing would apply one workload's policy to another.
    AMBIGUOUS = "ambiguous"


# Everything a selector can look at. Two pods of one Deployment share it (name and uid are not
# in it), so the engine's subject-selection cache holds one entry per distinct shape, not per pod.
SelectionKey = tuple[WorkloadKind, str, FrozenLabels, FrozenLabels, str, str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """The source of a connection. Labels are stored frozen; the namespace's labels always carry
    `kubernetes.io/metadata.name: <namespace>` (added here when the caller left it out)."""

    kind: WorkloadKind
    namespace: str = ""  # "" for an unknown source
    name: str = ""
    uid: str = ""
    labels: Mapping[str, str] = EMPTY_LABELS
    namespace_labels: Mapping[str, str] = EMPTY_LABELS
    service_account: str = ""
    owner_kind: str = ""
    owner_name: str = ""
    selection_key: SelectionKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = FrozenLabels(self.labels)
        namespace_labels = dict(self.namespace_labels)
        if self.namespace:
            namespace_labels[NAMESPACE_NAME_LABEL] = self.namespace
        frozen_ns = FrozenLabels(namespace_labels)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "namespace_labels", frozen_ns)
        key: SelectionKey = (
            self.kind,
            self.namespace,
            labels,
            frozen_ns,
            self.service_account,
            self.owner_kind,
            self.owner_name,
        )
        object.__setattr__(self, "selection_key", key)

    @property
    def is_unknown(self) -> bool:
        return self.kind is WorkloadKind.UNKNOWN

    def describe(self) -> str:
        """The one name a person sees for a workload (refusal replies, explain, logs):
        `namespace/Kind/name` of its owner, which the audit record carries as
        `kubernetes.namespace` and `outgate.workload` (`payments/Deployment/api`,
        `dev/Static/laptop`). A pod without a controller is `namespace/Pod/<pod name>`; two pods
        claiming one address `ambiguous: <their names>`; an unknown source `unknown source`."""
        if self.kind is WorkloadKind.UNKNOWN:
            return "unknown source"
        if self.kind is WorkloadKind.AMBIGUOUS:
            where = f"{self.namespace}/" if self.namespace else ""
            return f"ambiguous: {where}{self.name}"
        if self.owner_kind:
            return f"{self.namespace}/{self.owner_kind}/{self.owner_name}"
        return f"{self.namespace}/Pod/{self.name}"


UNKNOWN_WORKLOAD = Workload(kind=WorkloadKind.UNKNOWN)


class IdentityLookup(Protocol):
    """Maps a connection's peer address to a workload. Implementations must be cheap: this runs
    once per accepted connection. Unmatched addresses map to UNKNOWN_WORKLOAD."""

    def lookup(self, ip: IPAddress) -> Workload: ...


# --------------------------------------------------------------------------------------------
# Prefix table and static identities
# --------------------------------------------------------------------------------------------

V = TypeVar("V")


class CidrTable(Generic[V]):
    """Networks -> values; `containing(ip)` yields the values of every network holding `ip`,
    longest prefix first, in O(distinct prefix lengths) dict lookups (at most 33 or 129)."""

    __slots__ = ("_by_length", "_lengths")

    def __init__(self) -> None:
        self._by_length: dict[int, dict[int, dict[int, V]]] = {4: {}, 6: {}}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}

    def setdefault(self, network: IPNetwork, default: V) -> V:
        """The value stored for exactly `network`, storing `default` first if there is none."""
        tables = self._by_length[network.version]
        table = tables.get(network.prefixlen)
        if table is None:
            table = tables[network.prefixlen] = {}
            self._lengths[network.version] = sorted(tables, reverse=True)
        key = int(network.network_address) >> (network.max_prefixlen - network.prefixlen)
        return table.setdefault(key, default)

    def containing(self, ip: IPAddress) -> Iterator[V]:
        ip = unmap_ipv4(ip)
        bits = ip.max_prefixlen
        value = int(ip)
        tables = self._by_length[ip.version]
        for length in self._lengths[ip.version]:
            hit = tables[length].get(value >> (bits - length))
            if hit is not None:
                yield hit


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticIdentity:
    """A non-pod source (a VM, a laptop) named by its CIDRs in the runtime config."""

    name: str
    namespace: str
    cidrs: tuple[IPNetwork, ...]
    labels: Mapping[str, str] = EMPTY_LABELS
    service_account: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", FrozenLabels(self.labels))

    def workload(self) -> Workload:
        return Workload(
            kind=WorkloadKind.STATIC,
            namespace=self.namespace,
            name=self.name,
            labels=self.labels,
            namespace_labels={NAMESPACE_NAME_LABEL: self.namespace},
            service_account=self.service_account,
            owner_kind="Static",
            owner_name=self.name,
        )


class StaticIdentityIndex(IdentityLookup):
    """Longest-prefix match over every static identity's CIDRs. The parser refuses the same CIDR
    in two identities; nested CIDRs are fine and the more specific one wins."""

    __slots__ = ("_table", "identities")

    def __init__(self, identities: Iterable[StaticIdentity]) -> None:
        self.identities = tuple(identities)
        self._table: CidrTable[Workload] = CidrTable()
        for identity in self.identities:
            workload = identity.workload()
            for cidr in identity.cidrs:
                self._table.setdefault(cidr, workload)  # first definition wins

    def lookup(self, ip: IPAddress) -> Workload:
        for workload in self._table.containing(ip):
            return workload
        return UNKNOWN_WORKLOAD


_STATIC_KEYS = ("name", "namespace", "cidrs", "labels", "serviceAccount")


def parse_static_identities(
    raw: object, *, file: str, path: str = "identity.static"
) -> tuple[StaticIdentity, ...]:
    """Validate `identity.static` from the runtime config; raise ConfigError with every issue.

    Shape: `[{name, namespace, cidrs: [...], labels?: {...}, serviceAccount?: str}]`.
    """
    issues = IssueCollector(file=file)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        issues.add(
            path,
            f"must be a list, not {describe_type(raw)}",
            fix="write - {name: vm1, namespace: legacy, cidrs: [10.0.0.5/32]}",
        )
        raise ConfigError(issues.issues)
    identities: list[StaticIdentity] = []
    seen_names: dict[tuple[str, str], int] = {}
    seen_cidrs: dict[IPNetwork, int] = {}
    for index, entry in enumerate(raw):
        where = key_path(path, index)
        body = issues.mapping(entry, where, what="a static identity")
        if body is None:
            continue
        issues.check_keys(body, _STATIC_KEYS, where)
        ok = True
        name = body.get("name")
        if not isinstance(name, str) or not is_dns1123_subdomain(name):
            issues.add(
                key_path(where, "name"),
                f"name {name!r} is missing or not a DNS-1123 name",
                fix="use lowercase letters, digits, '-' and '.', e.g. name: billing-vm",
            )
            ok = False
        namespace = body.get("namespace")
        if not isinstance(namespace, str) or not is_dns1123_label(namespace):
            issues.add(
                key_path(where, "namespace"),
                f"namespace {namespace!r} is missing or not a DNS-1123 label",
                fix="use up to 63 lowercase letters, digits and '-', e.g. namespace: legacy",
            )
            ok = False
        cidrs: list[IPNetwork] = []
        raw_cidrs = body.get("cidrs")
        cidrs_path = key_path(where, "cidrs")
        # An explicit empty list is an identity reached only through proxy auth (auth.basic
        # maps users to it; the runtime config checks that one does).
        if not isinstance(raw_cidrs, list):
            issues.add(
                cidrs_path,
                "cidrs must be a list",
                fix="list the source addresses, e.g. cidrs: [10.0.0.5/32] "
                "([] for an identity only proxy-auth users have)",
            )
            ok = False
        else:
            for cidr_index, raw_cidr in enumerate(raw_cidrs):
                cidr_path = key_path(cidrs_path, cidr_index)
                network = parse_network(raw_cidr, issues, cidr_path)
                if network is None:
                    ok = False
                    continue
                network = unmap_network(network)
                previous = seen_cidrs.setdefault(network, index)
                if previous != index:
                    issues.add(
                        cidr_path,
                        f"{network} is already claimed by {key_path(path, previous)}",
                        fix="give each CIDR to one identity (a more specific CIDR may nest inside)",
                    )
                    ok = False
                cidrs.append(network)
        labels: dict[str, str] = {}
        if "labels" in body:
            before = len(issues.issues)
            labels = parse_labels(body["labels"], issues, key_path(where, "labels"))
            ok = ok and len(issues.issues) == before
        service_account = body.get("serviceAccount", "")
        if not isinstance(service_account, str) or (
            service_account and not is_dns1123_subdomain(service_account)
        ):
            issues.add(
                key_path(where, "serviceAccount"),
                f"serviceAccount {service_account!r} is not a DNS-1123 name",
                fix="use lowercase letters, digits, '-' and '.'",
            )
            ok = False
        if isinstance(name, str) and isinstance(namespace, str):
            first = seen_names.setdefault((namespace, name), index)
            if first != index:
                issues.add(
                    key_path(where, "name"),
                    f"{namespace}/{name} is already defined at {key_path(path, first)}",
                    fix="give each static identity a unique namespace/name",
                )
                ok = False
        if ok and isinstance(name, str) and isinstance(namespace, str):
            identities.append(
                StaticIdentity(
                    name=name,
                    namespace=namespace,
                    cidrs=tuple(cidrs),
                    labels=labels,
                    service_account=str(service_account),
                )
            )
    if issues.issues:
        raise ConfigError(issues.issues)
    return tuple(identities)


def unmap_network(network: IPNetwork) -> IPNetwork:
    """`::ffff:10.0.0.0/104` -> `10.0.0.0/8`: lookups unwrap mapped addresses; tables must too."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network
