"""Learn, from recorded audit records, the smallest policy set that allows what was observed.

`suggest(lines)` reads audit records (JSON lines as the proxy writes them, e.g. from
`kubectl logs`) and groups the allowed requests by workload: namespace plus owner
(`outgate.workload`, e.g. `Deployment/api`). For each workload it proposes one EgressPolicy:

  - exact names as seen; IP-literal destinations as single-address `cidr` entries;
  - names collapsed to `*.parent` only when at least `wildcard_threshold` distinct names sit
    directly under one parent, and never under a public suffix (`*.s3.amazonaws.com` would let
    the workload reach anyone's bucket), judged with the Public Suffix List;
  - the ports seen for each name: names are grouped into one rule per (protocol, port set), so no
    name gets a port it was not seen on (a collapsed wildcard takes its names' ports together);
  - the protocol seen for tunnels: the default (`tls`, written as no `protocol`, which takes TLS
    or plain HTTP) unless a close record shows the tunnel's bytes were neither (reason
    `protocol_mismatch`), then the protocol the port suggests (22 ssh, 5432 postgres, 80 http)
    or `tcp`.

Destinations the address guard refused (reason `guarded_address`) are never allowed by a
suggestion; they are listed in a comment above the workload's policy, since reaching them needs
a deliberate `cidr` rule. A name that was allowed and resolved into guarded space (an internal
service that a rule's `cidr` opened) keeps working: its rule lists exactly the addresses it was
seen at, as /32 or /128 `cidr` entries, because the guard admits a private address only when the
deciding rule lists it (that also admits requests for those addresses by IP literal). Requests
the policy denied are left out unless `include_denied`.

The policies select pods with `podSelector: {matchLabels: {<selector_label>: <owner name>}}`
(audit records carry the owner, not pod labels), or, for static identities, with the identity's
own labels when the runtime config is given. Each policy says which selector it assumed.

Fast enough for a million records in well under a minute: close records (half the stream) are
skipped by a substring test unless they can carry protocol evidence, and only decision records
are parsed and counted.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import yaml
from publicsuffixlist import PublicSuffixList

from proxy.core.addresses import AddressGuard
from proxy.core.hosts import parse_ip_address
from proxy.core.identity import StaticIdentity
from proxy.core.policy.model import API_VERSION, Mode

# At least this many distinct names directly under one parent become `*.parent`. Five: a
# workload that calls a CDN's or a bucket service's shards shows dozens, while a service with a
# handful of named endpoints (api., auth., uploads.) stays exact; 0 turns collapsing off.
DEFAULT_WILDCARD_THRESHOLD: Final = 5
DEFAULT_SELECTOR_LABEL: Final = "app"
SOURCE_ANNOTATION: Final = "outgate.dev/suggested-from"
# Tunnel protocols a port implies once a tunnel is known not to carry TLS.
_PORT_PROTOCOLS: Final[Mapping[int, str]] = {22: "ssh", 5432: "postgres", 80: "http"}
# Reasons of a policy refusal: what `include_denied` adds.
_POLICY_DENIALS: Final = frozenset({"rule_deny", "namespace_isolation", "default_deny"})
# Reasons of requests the policy allowed before DNS or the upstream failed: the workload did
# try to reach them, so a suggestion keeps them.
_ALLOWED_THEN_FAILED: Final = frozenset(
    {
        "dns_nxdomain", "dns_servfail", "dns_no_answer", "dns_timeout", "upstream_refused",
        "upstream_timeout", "upstream_reset", "upstream_bad_response",
    }
)  # fmt: skip
_GUARDED: Final = "guarded_address"
# Addresses classified once each; a busy cluster's egress reaches far fewer distinct ones.
_GUARD_CACHE_SIZE: Final = 100_000
_CLOSE_MARK: Final = b'"action":"close"'
_CLOSE_EVIDENCE: Final = (b"protocol_mismatch", b'"protocol":')
_DNS1123: Final = re.compile(r"[^a-z0-9-]+")
# libyaml's emitter when PyYAML has it: the pure-Python one spends seconds on a large cluster's
# suggestions. Both are safe dumpers (plain types only).
_DUMPER: Final = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class WorkloadKey(NamedTuple):
    namespace: str
    owner_kind: str
    owner_name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.owner_kind}/{self.owner_name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SuggestOptions:
    wildcard_threshold: int = DEFAULT_WILDCARD_THRESHOLD
    mode: Mode = Mode.AUDIT
    include_denied: bool = False
    selector_label: str = DEFAULT_SELECTOR_LABEL
    # (namespace, static identity name) -> its labels, from the runtime config when given.
    static_labels: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)
    # Classifies the addresses allowed names resolved to (give it the config's clusterCIDRs).
    guard: AddressGuard = field(default_factory=AddressGuard)


@dataclass(slots=True)
class ObservedDestination:
    ports: dict[int, set[str]] = field(default_factory=dict)  # port -> protocol evidence
    guarded_cidrs: set[str] = field(default_factory=set)  # guarded addresses it was dialled at
    requests: int = 0


@dataclass(slots=True)
class ObservedWorkload:
    """What one workload was seen doing: the input of `propose`. Filled from audit records
    (`suggest`) or from the proxy's live traffic aggregate (proxy.traffic), through `Observer`."""

    names: dict[str, ObservedDestination] = field(default_factory=dict)
    addresses: dict[str, ObservedDestination] = field(default_factory=dict)
    guarded: dict[tuple[str, int], int] = field(default_factory=dict)
    denied: dict[tuple[str, int, str], int] = field(default_factory=dict)
    requests: int = 0
    first_seen: str = ""
    last_seen: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SuggestedRule:
    name: str
    protocol: str
    ports: tuple[int, ...]
    fqdns: tuple[str, ...]  # exact names, then "*.suffix"
    cidrs: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadSuggestion:
    key: WorkloadKey
    policy_name: str
    pod_selector: Mapping[str, str]
    selector_source: str  # how the selector was chosen, for the comment
    rules: tuple[SuggestedRule, ...]
    requests: int
    first_seen: str
    last_seen: str
    guarded: tuple[tuple[str, int, int], ...]  # (host, port, requests) the guard refused
    denied: tuple[tuple[str, int, str, int], ...]  # (host, port, reason, requests) left out

    def document(self, mode: Mode) -> dict[str, Any]:
        rules = []
        for rule in self.rules:
            body: dict[str, Any] = {
                "name": rule.name,
                "action": "Allow",
                "to": [{"fqdn": name} for name in rule.fqdns]
                + [{"cidr": cidr} for cidr in rule.cidrs],
                "ports": list(rule.ports),
            }
            if rule.protocol != "tls":
                body["protocol"] = rule.protocol
            rules.append(body)
        return {
            "apiVersion": API_VERSION,
            "kind": "EgressPolicy",
            "metadata": {
                "name": self.policy_name,
                "namespace": self.key.namespace,
                "annotations": {
                    SOURCE_ANNOTATION: f"{self.key.owner_kind}/{self.key.owner_name}: "
                    f"{self.requests} requests {self.first_seen} .. {self.last_seen}"
                },
            },
            "spec": {
                "podSelector": {"matchLabels": dict(self.pod_selector)},
                "mode": str(mode),
                "rules": rules,
            },
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Suggestion:
    workloads: tuple[WorkloadSuggestion, ...]
    without_rules: tuple[WorkloadSuggestion, ...]  # only refused traffic: no policy proposed
    records: int  # decision records counted
    unknown_source_requests: int
    unreadable_lines: int
    options: SuggestOptions

    def to_yaml(self) -> str:
        header = [
            f"# Suggested by `outgate suggest` from {self.records} decision records: one "
            "EgressPolicy per workload,",
            "# allowing what it was seen to reach (names collapse to *.parent at "
            f"{self.options.wildcard_threshold} sibling names).",
            f"# Mode {self.options.mode}: "
            + (
                "recorded as the shadow decision only; switch to enforce after a trial."
                if self.options.mode is Mode.AUDIT
                else "what a selected pod was not seen doing is denied."
            ),
        ]
        if self.unknown_source_requests:
            header.append(
                f"# {self.unknown_source_requests} requests came from unknown sources (no pod or "
                "static identity): no EgressPolicy can select them."
            )
        if self.unreadable_lines:
            header.append(
                f"# {self.unreadable_lines} lines were not audit records and were skipped."
            )
        for workload in self.without_rules:
            header.append(f"# {workload.key}: no allowed request seen; no policy proposed.")
            header.extend(_refusal_comments(workload))
        parts = ["\n".join(header) + "\n"]
        for workload in self.workloads:
            comments = [
                f"# {workload.key}: {workload.requests} requests, {workload.first_seen} .. "
                f"{workload.last_seen}",
                f"# podSelector: {workload.selector_source}",
                *_refusal_comments(workload),
            ]
            document = yaml.dump(
                workload.document(self.options.mode), Dumper=_DUMPER, sort_keys=False, width=100
            )
            parts.append("---\n" + "\n".join(comments) + "\n" + document)
        return "".join(parts)


def _refusal_comments(workload: WorkloadSuggestion) -> list[str]:
    lines = []
    for host, port, count in workload.guarded:
        lines.append(
            f"#   REFUSED BY THE ADDRESS GUARD: {host}:{port} ({count} requests) resolves to "
            "private, reserved or metadata space; not allowed here (a rule listing its cidr "
            "would be needed)"
        )
    for host, port, reason, count in workload.denied:
        lines.append(f"#   denied by policy ({reason}): {host}:{port} ({count} requests), left out")
    return lines


# --------------------------------------------------------------------------------------------
# Reading records
# --------------------------------------------------------------------------------------------


def _owner(record: Mapping[str, Any]) -> WorkloadKey | None:
    kubernetes = record.get("kubernetes")
    if not isinstance(kubernetes, dict):
        return None
    namespace = kubernetes.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        return None
    owner = record.get("outgate", {}).get("workload")
    if isinstance(owner, str) and "/" in owner:
        kind, _, name = owner.partition("/")
        return WorkloadKey(namespace, kind, name)
    pod = kubernetes.get("pod", {}).get("name") if isinstance(kubernetes.get("pod"), dict) else None
    return WorkloadKey(namespace, "Pod", pod) if isinstance(pod, str) and pod else None


def _tunnel_protocol(port: int) -> str:
    return _PORT_PROTOCOLS.get(port, "tcp")


class Observer:
    """The one reading of a decision and of a tunnel's close for a suggestion: which requests
    count as reached (allowed, or allowed and then failed in DNS or upstream), which were
    refused by the guard or by policy, and what a close says about a tunnel's protocol."""

    def __init__(self, options: SuggestOptions) -> None:
        self.options = options
        self._guarded: dict[str, str | None] = {}  # address -> its /32 when guarded

    def decision(
        self,
        workload: ObservedWorkload,
        *,
        domain: object,
        address: object,
        port: object,
        decision: object,
        reason: object,
        protocol: object = None,
        requests: int = 1,
    ) -> None:
        """`requests` decisions alike: destination name (or None), address, port, the
        decision (`allow`/`deny`), its reason code and any protocol evidence."""
        if not isinstance(port, int):
            return
        host = domain if isinstance(domain, str) and domain else address
        if not isinstance(host, str) or not host:
            return
        if reason == _GUARDED:
            workload.guarded[(host, port)] = workload.guarded.get((host, port), 0) + requests
            return
        if decision != "allow" and reason not in _ALLOWED_THEN_FAILED:
            if reason not in _POLICY_DENIALS:
                return  # refused before policy decided: malformed, limits, not ready
            if not self.options.include_denied:
                key = (host, port, str(reason))
                workload.denied[key] = workload.denied.get(key, 0) + requests
                return
        table = workload.names if host == domain else workload.addresses
        seen = table.get(host)
        if seen is None:
            seen = table[host] = ObservedDestination()
        seen.requests += requests
        if host == domain and isinstance(address, str) and address:
            cidr = self._guarded_cidr(address)
            if cidr is not None:
                seen.guarded_cidrs.add(cidr)
        evidence = seen.ports.setdefault(port, set())
        if isinstance(protocol, str):
            evidence.add(protocol)

    def _guarded_cidr(self, address: str) -> str | None:
        cached = self._guarded.get(address, "")
        if cached != "":
            return cached
        try:
            ip = parse_ip_address(address)
        except ValueError:
            return None
        cidr = f"{ip}/{ip.max_prefixlen}" if self.options.guard.classify(ip) is not None else None
        if len(self._guarded) < _GUARD_CACHE_SIZE:
            self._guarded[address] = cidr
        return cidr

    def tunnel_closed(
        self,
        workload: ObservedWorkload,
        *,
        domain: object,
        address: object,
        port: object,
        reason: object,
        protocol: object = None,
    ) -> None:
        """A tunnel's close can say what it carried: `protocol_mismatch` means not TLS."""
        host = domain if isinstance(domain, str) and domain else address
        if not isinstance(port, int) or not isinstance(host, str):
            return
        table = workload.names if host == domain else workload.addresses
        seen = table.get(host)
        if seen is None or port not in seen.ports:
            return  # not an allowed destination of this workload
        if isinstance(protocol, str):
            seen.ports[port].add(protocol)
        elif reason == "protocol_mismatch":
            seen.ports[port].add(_tunnel_protocol(port))


class _Collector:
    def __init__(self, options: SuggestOptions) -> None:
        self.options = options
        self.observer = Observer(options)
        self.workloads: dict[WorkloadKey, ObservedWorkload] = {}
        self.records = 0
        self.unknown = 0
        self.unreadable = 0
        self._by_raw: dict[tuple[object, object, str], ObservedWorkload | None] = {}

    def feed(self, lines: Iterable[bytes | str]) -> None:
        for raw in lines:
            line = raw.encode() if isinstance(raw, str) else raw
            close = _CLOSE_MARK in line
            if close and not any(mark in line for mark in _CLOSE_EVIDENCE):
                continue  # most close records: nothing a suggestion needs
            try:
                record = json.loads(line)
                event = record["event"]
                action = event["action"]
            except (ValueError, KeyError, TypeError):
                if line.strip():
                    self.unreadable += 1
                continue
            if action == "decision":
                self._decision(record)
            elif action == "close":
                self._close(record)

    def _workload(self, record: Mapping[str, Any]) -> ObservedWorkload | None:
        kubernetes = record.get("kubernetes")
        if not isinstance(kubernetes, dict):
            return None
        # Records of one workload repeat the same few strings: resolve each combination once.
        outgate = record.get("outgate")
        owner = outgate.get("workload") if isinstance(outgate, dict) else None
        # With an owner the pod does not matter; without one the pod is the workload.
        raw = (kubernetes.get("namespace"), owner, "" if owner else str(kubernetes.get("pod")))
        if raw in self._by_raw:
            return self._by_raw[raw]
        key = _owner(record)
        workload = None
        if key is not None:
            workload = self.workloads.get(key)
            if workload is None:
                workload = self.workloads[key] = ObservedWorkload()
        if len(self._by_raw) < _GUARD_CACHE_SIZE:
            self._by_raw[raw] = workload
        return workload

    def _decision(self, record: Mapping[str, Any]) -> None:
        self.records += 1
        workload = self._workload(record)
        if workload is None:
            self.unknown += 1
            return
        workload.requests += 1
        stamp = record.get("@timestamp")
        if isinstance(stamp, str):
            if not workload.first_seen or stamp < workload.first_seen:
                workload.first_seen = stamp
            if stamp > workload.last_seen:
                workload.last_seen = stamp
        destination = record.get("destination") or {}
        outgate = record.get("outgate") or {}
        self.observer.decision(
            workload,
            domain=destination.get("domain"),
            address=destination.get("ip"),
            port=destination.get("port"),
            decision=outgate.get("decision"),
            reason=outgate.get("reason"),
            protocol=outgate.get("protocol"),
        )

    def _close(self, record: Mapping[str, Any]) -> None:
        outgate = record.get("outgate") or {}
        if outgate.get("connection") != "tunnel":
            return
        workload = self._workload(record)
        if workload is None:
            return
        destination = record.get("destination") or {}
        self.observer.tunnel_closed(
            workload,
            domain=destination.get("domain"),
            address=destination.get("ip"),
            port=destination.get("port"),
            reason=outgate.get("reason"),
            protocol=outgate.get("protocol"),
        )


# --------------------------------------------------------------------------------------------
# Building policies
# --------------------------------------------------------------------------------------------


def _protocol(evidence: set[str]) -> str:
    """No evidence: TLS (the default every allowed tunnel was held to). One protocol: that one.
    Several: tcp, the only one that admits them all."""
    if not evidence:
        return "tls"
    if len(evidence) == 1:
        return next(iter(evidence))
    return "tcp"


class _Collapser:
    def __init__(self, threshold: int, psl: PublicSuffixList) -> None:
        self.threshold = threshold
        self.psl = psl

    def can_wildcard(self, parent: str) -> bool:
        # A registrable domain or below, never a public suffix (`com`, `co.uk`, `github.io`).
        return "." in parent and self.psl.privatesuffix(parent) is not None

    def collapse(
        self, names: dict[str, set[int]]
    ) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
        """(exact names -> ports, wildcard suffixes -> ports)."""
        exact = dict(names)
        wildcards: dict[str, set[int]] = {}
        if self.threshold <= 0:
            return exact, wildcards
        changed = True
        while changed:
            changed = False
            children: dict[str, list[str]] = {}
            for name in exact:
                if "." in name:
                    children.setdefault(name.split(".", 1)[1], []).append(name)
            for suffix in wildcards:
                if "." in suffix:
                    children.setdefault(suffix.split(".", 1)[1], []).append("*." + suffix)
            for parent, under in sorted(children.items(), key=lambda item: -item[0].count(".")):
                if len(under) < self.threshold or not self.can_wildcard(parent):
                    continue
                ports: set[int] = set()
                for name in list(exact):
                    if name.endswith("." + parent):
                        ports |= exact.pop(name)
                for suffix in list(wildcards):
                    if suffix.endswith("." + parent):
                        ports |= wildcards.pop(suffix)
                wildcards[parent] = ports
                changed = True
                break
        return exact, wildcards


def _slug(text: str, limit: int = 63) -> str:
    return _DNS1123.sub("-", text.lower()).strip("-")[:limit].strip("-") or "workload"


def _rule_name(protocol: str, ports: tuple[int, ...], taken: set[str]) -> str:
    shown = "-".join(str(p) for p in ports[:3]) + ("-more" if len(ports) > 3 else "")
    base = _slug(f"{protocol}-{shown}", 55)
    name, number = base, 2
    while name in taken:
        name = f"{base}-{number}"
        number += 1
    taken.add(name)
    return name


def _cidr(address: str) -> str | None:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    return f"{ip}/{ip.max_prefixlen}"


def _rules(workload: ObservedWorkload, collapser: _Collapser) -> tuple[SuggestedRule, ...]:
    # protocol -> name -> ports, and protocol -> cidr -> ports
    by_protocol: dict[str, dict[str, set[int]]] = {}
    cidrs: dict[str, dict[str, set[int]]] = {}
    for name, seen in workload.names.items():
        for port, evidence in seen.ports.items():
            by_protocol.setdefault(_protocol(evidence), {}).setdefault(name, set()).add(port)
    for address, seen in workload.addresses.items():
        cidr = _cidr(address)
        if cidr is None:
            continue
        for port, evidence in seen.ports.items():
            cidrs.setdefault(_protocol(evidence), {}).setdefault(cidr, set()).add(port)
    groups: dict[tuple[str, tuple[int, ...]], tuple[list[str], list[str]]] = {}
    for protocol in sorted(set(by_protocol) | set(cidrs)):
        names = by_protocol.get(protocol, {})
        exact, wildcards = collapser.collapse(names)
        entries = [(name, ports) for name, ports in exact.items()]
        entries += [("*." + suffix, ports) for suffix, ports in wildcards.items()]
        # Names seen at guarded addresses: few (internal services), so a scan per entry is cheap.
        guarded = {
            n: workload.names[n].guarded_cidrs for n in names if workload.names[n].guarded_cidrs
        }
        for fqdn, ports in entries:
            group = groups.setdefault((protocol, tuple(sorted(ports))), ([], []))
            group[0].append(fqdn)
            suffix = fqdn[1:] if fqdn.startswith("*.") else None
            for name, addresses in guarded.items():
                if name == fqdn or (suffix is not None and name.endswith(suffix)):
                    group[1].extend(addresses)
        for cidr, ports in cidrs.get(protocol, {}).items():
            groups.setdefault((protocol, tuple(sorted(ports))), ([], []))[1].append(cidr)
    taken: set[str] = set()
    rules = []
    for (protocol, port_list), (fqdns, cidr_list) in sorted(groups.items()):
        exact_names = sorted(f for f in fqdns if not f.startswith("*."))
        wild_names = sorted(f for f in fqdns if f.startswith("*."))
        rules.append(
            SuggestedRule(
                name=_rule_name(protocol, port_list, taken),
                protocol=protocol,
                ports=port_list,
                fqdns=(*exact_names, *wild_names),
                cidrs=tuple(sorted(set(cidr_list))),
            )
        )
    return tuple(rules)


def _selector(key: WorkloadKey, options: SuggestOptions) -> tuple[dict[str, str], str]:
    if key.owner_kind == "Static":
        labels = options.static_labels.get((key.namespace, key.owner_name))
        if labels:
            return dict(labels), f"the labels of static identity {key.owner_name} in the config"
    value = _slug(key.owner_name)
    return (
        {options.selector_label: value},
        f"assumes the pods of {key.owner_kind}/{key.owner_name} carry "
        f"{options.selector_label}={value}; correct it if they do not",
    )


def static_identity_labels(
    identities: Iterable[StaticIdentity],
) -> dict[tuple[str, str], dict[str, str]]:
    """`SuggestOptions.static_labels` from the runtime config's static identities."""
    return {(identity.namespace, identity.name): dict(identity.labels) for identity in identities}


def suggest(lines: Iterable[bytes | str], options: SuggestOptions | None = None) -> Suggestion:
    options = options or SuggestOptions()
    collector = _Collector(options)
    collector.feed(lines)
    return propose(
        collector.workloads,
        options,
        records=collector.records,
        unknown_source_requests=collector.unknown,
        unreadable_lines=collector.unreadable,
    )


def propose(
    workloads: Mapping[WorkloadKey, ObservedWorkload],
    options: SuggestOptions,
    *,
    records: int,
    unknown_source_requests: int = 0,
    unreadable_lines: int = 0,
) -> Suggestion:
    """One EgressPolicy per observed workload (the module docstring says how it is built)."""
    collapser = _Collapser(options.wildcard_threshold, _public_suffixes())
    suggestions: list[WorkloadSuggestion] = []
    empty: list[WorkloadSuggestion] = []
    names_taken: set[tuple[str, str]] = set()
    for key in sorted(workloads):
        workload = workloads[key]
        base = _slug(f"{key.owner_name}-egress", 240)
        if (key.namespace, base) in names_taken:
            base = _slug(f"{key.owner_name}-{key.owner_kind}-egress", 240)
        names_taken.add((key.namespace, base))
        selector, source = _selector(key, options)
        suggestion = WorkloadSuggestion(
            key=key,
            policy_name=base,
            pod_selector=selector,
            selector_source=source,
            rules=_rules(workload, collapser),
            requests=workload.requests,
            first_seen=workload.first_seen,
            last_seen=workload.last_seen,
            guarded=tuple(
                (host, port, count) for (host, port), count in sorted(workload.guarded.items())
            ),
            denied=tuple(
                (host, port, reason, count)
                for (host, port, reason), count in sorted(workload.denied.items())
            ),
        )
        (suggestions if suggestion.rules else empty).append(suggestion)
    return Suggestion(
        workloads=tuple(suggestions),
        without_rules=tuple(empty),
        records=records,
        unknown_source_requests=unknown_source_requests,
        unreadable_lines=unreadable_lines,
        options=options,
    )


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    """Parsed once per process (tens of milliseconds): the admin page proposes on every view."""
    return PublicSuffixList()
