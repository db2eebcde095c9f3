"""Read ClusterEgressPolicy / EgressPolicy documents from YAML and validate them into `Policy`.

Every problem in every file is collected, then one ConfigError is raised; each issue names the
file, the 1-based YAML document, the field path (`spec.rules[2].to[0].fqdn`) and the fix. Nothing
is guessed: unknown keys, a `*` anywhere but a whole leading label, an IP in `fqdn`, a CIDR with
host bits set, and duplicate YAML keys are all refused.

Directories are read one level deep (not recursively): every `*.yaml` / `*.yml` entry in name
order, skipping names that start with "." — a ConfigMap volume keeps each file twice, once in a
hidden timestamped directory and once as a symlink beside it, so recursion or hidden entries
would load every policy twice.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml

from proxy.core.hosts import normalize_name, parse_ipv4_strict
from proxy.core.identity import (
    MATCH_ALL,
    IPNetwork,
    IssueCollector,
    describe_type,
    did_you_mean,
    is_dns1123_label,
    is_dns1123_subdomain,
    key_path,
    parse_label_selector,
    parse_network,
    unmap_network,
)
from proxy.core.policy.model import (
    API_VERSION,
    DEFAULT_PORTS,
    DEFAULT_PRIORITY,
    DEFAULT_TLS,
    DLP_DETECTORS,
    FAIL_CLOSED_RULE,
    MAX_PORT,
    MAX_PRIORITY,
    MIN_PORT,
    MIN_PRIORITY,
    Action,
    EchMode,
    Inspect,
    Mode,
    Origin,
    Policy,
    PolicyKind,
    PortRange,
    Rule,
    SniMode,
    Subject,
    Tier,
    TlsOptions,
    TunnelProtocol,
)
from proxy.errors import BadRequest, ConfigError, ConfigIssue

POLICY_FILE_SUFFIXES: Final = (".yaml", ".yml")

# `status` and the server-set metadata fields appear in `kubectl get -o yaml` output; accepting
# (and ignoring) them lets an object dumped from the cluster be checked as it is.
_TOP_KEYS = ("apiVersion", "kind", "metadata", "spec", "status")
_METADATA_KEYS = (
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
)
_CLUSTER_SPEC_KEYS = ("tier", "priority", "mode", "subject", "rules")
_NAMESPACED_SPEC_KEYS = ("podSelector", "mode", "rules")
_CLUSTER_ONLY_HINTS = {
    "tier": "remove it: an EgressPolicy is always in the namespace tier "
    "(tiers are for ClusterEgressPolicy)",
    "priority": "remove it: EgressPolicies are not ordered, a matching Deny wins over an Allow",
    "subject": "an EgressPolicy selects pods of its own namespace with podSelector",
}
_NAMESPACED_ONLY_HINTS = {
    "podSelector": "a ClusterEgressPolicy selects workloads with subject: {podSelector: ...}",
}
_SUBJECT_KEYS = ("namespaceSelector", "podSelector", "serviceAccounts", "owners")
_OWNER_KEYS = ("kind", "name")
_RULE_KEYS = ("name", "action", "to", "ports", "protocol", "inspect", "tls")
_TLS_KEYS = ("sni", "ech")
_TO_KEYS = ("fqdn", "cidr")
_PORT_KEYS = ("port", "endPort")
_INSPECT_KEYS = ("methods", "paths", "dlp")
# Owner kinds the informer reports; other kinds (custom controllers) are allowed, but a known
# kind in the wrong case is refused, since it could never match.
_KNOWN_OWNER_KINDS = (
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "Job",
    "CronJob",
    "ReplicaSet",
    "ReplicationController",
    "Static",
)
_KNOWN_OWNER_KINDS_LOWER = {kind.lower(): kind for kind in _KNOWN_OWNER_KINDS}
_STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
# RFC 9110 section 5.6.2: tchar.
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Protocols an `inspect` rule can apply to: both carry HTTP requests.
_INSPECTABLE = (TunnelProtocol.TLS, TunnelProtocol.HTTP)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def load_text(text: str, *, file: str) -> list[Policy]:
    """Parse and validate one multi-document YAML text; raise ConfigError with every issue."""
    issues: list[ConfigIssue] = []
    policies = _load_stream(text, file=file, issues=issues)
    _check_duplicates(policies, issues)
    if issues:
        raise ConfigError(issues)
    return policies


def load_paths(paths: Sequence[str | Path]) -> list[Policy]:
    """Load every policy file under `paths` (files, or directories read one level deep)."""
    files, issues = policy_files(paths)
    policies: list[Policy] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(
                ConfigIssue(
                    file=str(path),
                    document=None,
                    path="",
                    message=f"cannot read the file: {exc}",
                    fix="make it a readable UTF-8 text file",
                )
            )
            continue
        policies.extend(_load_stream(text, file=str(path), issues=issues))
    _check_duplicates(policies, issues)
    if issues:
        raise ConfigError(issues)
    return policies


def fail_closed_policy(
    kind: PolicyKind,
    spec: object,
    *,
    name: str,
    namespace: str,
    issues: Sequence[ConfigIssue],
    origin: Origin,
) -> Policy:
    """The stand-in for a stored object the validator refuses: it denies everything at the
    object's place, for the object's subjects (docs/kubernetes.md, "Invalid objects fail closed").

    Whatever version of the object was meant, the stand-in is at least as strict: it denies
    every destination the object could have decided, and those it would have passed on. Each
    part it needs is read as the loader reads it; a part that is itself invalid takes its
    strictest value: tier admin (first), priority 0 (first), every workload (no subject, or
    every pod of the namespace), mode enforce. It depends on the object alone, so every replica
    builds the same stand-in.
    """
    body: Mapping[str, object] = spec if isinstance(spec, Mapping) else {}
    mode = _strictest(
        lambda issues: _parse_choice(body, "mode", Mode, Mode.ENFORCE, issues, "spec.mode"),
        Mode.ENFORCE,
    )
    subject: Subject | None = None
    pod_selector = MATCH_ALL
    if kind is PolicyKind.CLUSTER:
        tier = _strictest(lambda issues: _parse_tier(body, issues), Tier.ADMIN)
        priority = (
            _strictest(lambda issues: _parse_priority(body, issues), MIN_PRIORITY)
            if isinstance(spec, Mapping)
            else MIN_PRIORITY  # an unreadable spec has no priority to take the default of
        )
        if "subject" in body:
            # An unreadable subject selects every workload: the object's own could be any.
            subject = _strictest(lambda issues: _parse_subject(body["subject"], issues), None)
    else:
        tier, priority = Tier.NAMESPACE, DEFAULT_PRIORITY
        if "podSelector" in body:
            pod_selector = _strictest(
                lambda issues: parse_label_selector(
                    body["podSelector"], issues, "spec.podSelector"
                ),
                MATCH_ALL,
            )
    return Policy(
        kind=kind,
        name=name,
        namespace=namespace,
        tier=tier,
        priority=priority,
        mode=mode,
        subject=subject,
        pod_selector=pod_selector,
        rules=(FAIL_CLOSED_RULE,),
        origin=origin,
        invalid_issues=tuple(_issue_text(issue) for issue in issues) or ("invalid",),
    )


_Part = TypeVar("_Part")


def _strictest(parse: Callable[[IssueCollector], _Part | None], fallback: _Part) -> _Part:
    """One part of an invalid object, read as the loader reads it, or `fallback` when that
    part has an issue of its own."""
    issues = IssueCollector(file="")
    value = parse(issues)
    return fallback if value is None or issues.issues else value


def _issue_text(issue: ConfigIssue) -> str:
    field = f"{issue.path}: " if issue.path else ""
    return f"{field}{issue.message} -- fix: {issue.fix}"


def policy_files(paths: Iterable[str | Path]) -> tuple[list[Path], list[ConfigIssue]]:
    """The files `load_paths` reads, in order, plus an issue for each path that is missing.

    A file named explicitly is read whatever its suffix; a file reached twice is read once.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    issues: list[ConfigIssue] = []

    def add(path: Path) -> None:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            files.append(path)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            try:
                entries = sorted(path.iterdir(), key=lambda entry: entry.name)
            except OSError as exc:
                issues.append(
                    _file_issue(path, f"cannot list the directory: {exc}", "make it readable")
                )
                continue
            for entry in entries:
                if (
                    not entry.name.startswith(".")
                    and entry.suffix in POLICY_FILE_SUFFIXES
                    and entry.is_file()
                ):
                    add(entry)
        elif path.is_file():
            add(path)
        elif path.exists():
            issues.append(
                _file_issue(
                    path, "is not a file or directory", "point at a YAML file or a directory"
                )
            )
        else:
            issues.append(
                _file_issue(path, "does not exist", "create it, or remove it from policies.paths")
            )
    return files, issues


def _file_issue(path: Path, message: str, fix: str) -> ConfigIssue:
    return ConfigIssue(file=str(path), document=None, path="", message=message, fix=fix)


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys: YAML would silently keep the last one, so
    a second `to:` in a rule would drop the first list without a word."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key; construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_stream(text: str, *, file: str, issues: list[ConfigIssue]) -> list[Policy]:
    policies: list[Policy] = []
    document = 0
    # _StrictLoader is a SafeLoader: it constructs only plain YAML types.
    stream = yaml.load_all(text, Loader=_StrictLoader)
    try:
        for raw in stream:
            document += 1
            if raw is None:
                continue  # an empty document (a stray `---`, a file of comments)
            collector = IssueCollector(file=file, document=document)
            policy = _parse_document(raw, collector, Origin(file=file, document=document))
            issues.extend(collector.issues)
            if policy is not None:
                policies.append(policy)
    except yaml.YAMLError as exc:
        issues.append(_yaml_issue(exc, file=file, document=document + 1))
    return policies


def _yaml_issue(exc: yaml.YAMLError, *, file: str, document: int) -> ConfigIssue:
    mark = getattr(exc, "problem_mark", None)
    problem = str(getattr(exc, "problem", None) or exc)
    line = mark.line + 1 if mark is not None else None
    where = f" at line {line}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(exc, "context", None)
    message = f"YAML syntax error{where}: {problem}" + (f" ({context})" if context else "")
    snippet = ""
    if mark is not None and mark.buffer is not None:
        lines = str(mark.buffer).splitlines()
        snippet = lines[mark.line] if mark.line < len(lines) else ""
    if "alias" in f"{problem} {context}" and "*" in snippet:
        fix = 'quote names that start with "*": fqdn: "*.example.com"'
    elif "duplicate key" in problem:
        fix = "remove one of the two keys (YAML would silently keep only the last)"
    elif "'\\t'" in problem or "\t" in snippet:
        fix = "indent with spaces, not tabs"
    else:
        at = f" at line {line}" if line else ""
        fix = f"correct the YAML{at}: indentation, quoting, ':' after keys"
    return ConfigIssue(file=file, document=document, path="", message=message, fix=fix)


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------


def _parse_document(raw: object, issues: IssueCollector, origin: Origin) -> Policy | None:
    before = len(issues.issues)
    body = issues.mapping(raw, "", what="a policy document")
    if body is None:
        return None
    issues.check_keys(body, _TOP_KEYS, "")
    api_version = body.get("apiVersion")
    if api_version != API_VERSION:
        issues.add(
            "apiVersion",
            f"apiVersion {api_version!r} is not supported",
            fix=f"write apiVersion: {API_VERSION}",
        )
    kind = _parse_kind(body.get("kind"), issues)
    name, namespace = _parse_metadata(body.get("metadata"), kind, issues)
    if "spec" not in body:
        issues.add("spec", "spec is missing", fix="add spec: with rules")
        return None
    spec = issues.mapping(body["spec"], "spec", what="spec")
    if spec is None or kind is None:
        return None
    if kind is PolicyKind.CLUSTER:
        issues.check_keys(spec, _CLUSTER_SPEC_KEYS, "spec", hints=_NAMESPACED_ONLY_HINTS)
        tier = _parse_tier(spec, issues)
        priority = _parse_priority(spec, issues)
        subject = _parse_subject(spec["subject"], issues) if "subject" in spec else None
        pod_selector = MATCH_ALL
    else:
        issues.check_keys(spec, _NAMESPACED_SPEC_KEYS, "spec", hints=_CLUSTER_ONLY_HINTS)
        tier, priority, subject = Tier.NAMESPACE, DEFAULT_PRIORITY, None
        pod_selector = (
            parse_label_selector(spec["podSelector"], issues, "spec.podSelector")
            if "podSelector" in spec
            else MATCH_ALL
        )
    mode = _parse_choice(spec, "mode", Mode, Mode.ENFORCE, issues, "spec.mode")
    rules = _parse_rules(spec.get("rules"), kind, issues)
    if len(issues.issues) != before or tier is None or name is None or mode is None:
        return None
    return Policy(
        kind=kind,
        name=name,
        namespace=namespace or "",
        tier=tier,
        priority=priority,
        mode=mode,
        subject=subject,
        pod_selector=pod_selector,
        rules=tuple(rules),
        origin=origin,
    )


def _parse_kind(raw: object, issues: IssueCollector) -> PolicyKind | None:
    if isinstance(raw, str) and raw in PolicyKind._value2member_map_:
        return PolicyKind(raw)
    choices = [kind.value for kind in PolicyKind]
    suggestion = did_you_mean(raw, choices) if isinstance(raw, str) else None
    issues.add(
        "kind",
        f"kind {raw!r} is not a policy kind",
        fix=f"did you mean {suggestion!r}?" if suggestion else f"use {' or '.join(choices)}",
    )
    return None


def _parse_metadata(
    raw: object, kind: PolicyKind | None, issues: IssueCollector
) -> tuple[str | None, str | None]:
    if raw is None:
        issues.add("metadata", "metadata is missing", fix="add metadata: {name: my-policy}")
        return None, None
    metadata = issues.mapping(raw, "metadata", what="metadata")
    if metadata is None:
        return None, None
    issues.check_keys(metadata, _METADATA_KEYS, "metadata")
    name = metadata.get("name")
    if not isinstance(name, str) or not is_dns1123_subdomain(name):
        issues.add(
            "metadata.name",
            "metadata.name is missing" if name is None else f"{name!r} is not a DNS-1123 name",
            fix="use lowercase letters, digits, '-' and '.', e.g. name: payments-egress",
        )
        name = None
    namespace = metadata.get("namespace")
    if kind is PolicyKind.NAMESPACED:
        if not isinstance(namespace, str) or not is_dns1123_label(namespace):
            issues.add(
                "metadata.namespace",
                "an EgressPolicy needs metadata.namespace"
                if namespace is None
                else f"{namespace!r} is not a DNS-1123 namespace name",
                fix="add metadata.namespace: <the namespace of the pods it selects>",
            )
            namespace = None
    elif kind is PolicyKind.CLUSTER and namespace is not None:
        issues.add(
            "metadata.namespace",
            "a ClusterEgressPolicy is cluster-scoped and has no namespace",
            fix="remove metadata.namespace (select namespaces with spec.subject.namespaceSelector)",
        )
        namespace = None
    return name, namespace if isinstance(namespace, str) else None


def _parse_tier(spec: Mapping[str, object], issues: IssueCollector) -> Tier | None:
    # Required: admin (before namespace policies, can override them) and baseline (after,
    # namespace policies override it) mean opposite things; neither is a safe guess.
    raw = spec.get("tier")
    if raw in (Tier.ADMIN.value, Tier.BASELINE.value):
        return Tier(str(raw))
    suggestion = did_you_mean(raw, ["admin", "baseline"]) if isinstance(raw, str) else None
    issues.add(
        "spec.tier",
        "spec.tier is missing" if raw is None else f"tier {raw!r} is not admin or baseline",
        fix=f"did you mean {suggestion!r}?"
        if suggestion
        else "write tier: admin (evaluated before EgressPolicies) or tier: baseline (after them)",
    )
    return None


def _parse_priority(spec: Mapping[str, object], issues: IssueCollector) -> int:
    raw = spec.get("priority", DEFAULT_PRIORITY)
    if isinstance(raw, int) and not isinstance(raw, bool) and MIN_PRIORITY <= raw <= MAX_PRIORITY:
        return raw
    issues.add(
        "spec.priority",
        f"priority {raw!r} is not a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}",
        fix=f"write a number from {MIN_PRIORITY} (first) to {MAX_PRIORITY} (last); "
        f"omitted means {DEFAULT_PRIORITY}",
    )
    return DEFAULT_PRIORITY


_Choice = TypeVar("_Choice", Mode, TunnelProtocol, Action, SniMode, EchMode)


def _parse_choice(
    body: Mapping[str, object],
    key: str,
    enum: type[_Choice],
    default: _Choice | None,
    issues: IssueCollector,
    path: str,
) -> _Choice | None:
    if key not in body:
        if default is None:
            issues.add(path, f"{key} is missing", fix=f"add {key}: one of {', '.join(enum)}")
        return default
    raw = body[key]
    if isinstance(raw, str) and raw in enum._value2member_map_:
        return enum(raw)
    choices = [member.value for member in enum]
    suggestion = did_you_mean(raw, choices) if isinstance(raw, str) else None
    issues.add(
        path,
        f"{key} {raw!r} is not one of {', '.join(choices)}",
        fix=f"did you mean {suggestion!r}?" if suggestion else f"use one of {', '.join(choices)}",
    )
    return None


def _parse_subject(raw: object, issues: IssueCollector) -> Subject | None:
    path = "spec.subject"
    if raw is None:
        issues.add(
            path,
            "subject is empty (null)",
            fix="remove subject to select every workload, or give a namespaceSelector, "
            "podSelector, serviceAccounts or owners",
        )
        return None
    body = issues.mapping(raw, path, what="subject")
    if body is None:
        return None
    issues.check_keys(body, _SUBJECT_KEYS, path)
    namespace_selector = (
        parse_label_selector(body["namespaceSelector"], issues, f"{path}.namespaceSelector")
        if "namespaceSelector" in body
        else MATCH_ALL
    )
    pod_selector = (
        parse_label_selector(body["podSelector"], issues, f"{path}.podSelector")
        if "podSelector" in body
        else MATCH_ALL
    )
    service_accounts: list[str] = []
    if "serviceAccounts" in body:
        sa_path = f"{path}.serviceAccounts"
        raw_sas = body["serviceAccounts"]
        if not isinstance(raw_sas, list) or not raw_sas:
            issues.add(
                sa_path,
                "serviceAccounts must be a non-empty list",
                fix="write serviceAccounts: [api]",
            )
        else:
            for index, sa in enumerate(raw_sas):
                if isinstance(sa, str) and is_dns1123_subdomain(sa):
                    service_accounts.append(sa)
                else:
                    issues.add(
                        key_path(sa_path, index),
                        f"{sa!r} is not a service account name",
                        fix="write the name only (lowercase letters, digits, '-', '.'); "
                        "select namespaces with namespaceSelector",
                    )
    owners: list[tuple[str, str]] = []
    if "owners" in body:
        owners_path = f"{path}.owners"
        raw_owners = body["owners"]
        if not isinstance(raw_owners, list) or not raw_owners:
            issues.add(
                owners_path,
                "owners must be a non-empty list",
                fix="write owners: [{kind: Deployment, name: api}]",
            )
        else:
            for index, raw_owner in enumerate(raw_owners):
                owner = _parse_owner(raw_owner, issues, key_path(owners_path, index))
                if owner is not None:
                    owners.append(owner)
    return Subject(
        namespace_selector=namespace_selector,
        pod_selector=pod_selector,
        service_accounts=tuple(service_accounts),
        owners=tuple(owners),
    )


def _parse_owner(raw: object, issues: IssueCollector, path: str) -> tuple[str, str] | None:
    body = issues.mapping(raw, path, what="an owner")
    if body is None:
        return None
    issues.check_keys(body, _OWNER_KEYS, path)
    kind, name = body.get("kind"), body.get("name")
    ok = True
    if not isinstance(kind, str) or not kind[:1].isupper() or not kind.isalnum():
        suggestion = did_you_mean(kind, _KNOWN_OWNER_KINDS) if isinstance(kind, str) else None
        issues.add(
            key_path(path, "kind"),
            f"owner kind {kind!r} is not a Kubernetes kind",
            fix=f"did you mean {suggestion!r}?"
            if suggestion
            else f"use a kind such as {', '.join(_KNOWN_OWNER_KINDS[:5])}",
        )
        ok = False
    elif kind not in _KNOWN_OWNER_KINDS and kind.lower() in _KNOWN_OWNER_KINDS_LOWER:
        issues.add(
            key_path(path, "kind"),
            f"owner kind {kind!r} is spelled differently from the Kubernetes kind",
            fix=f"did you mean {_KNOWN_OWNER_KINDS_LOWER[kind.lower()]!r}?",
        )
        ok = False
    if not isinstance(name, str) or not is_dns1123_subdomain(name):
        issues.add(
            key_path(path, "name"),
            f"owner name {name!r} is missing or not a DNS-1123 name",
            fix="write the owning object's name, e.g. name: api",
        )
        ok = False
    if not ok or not isinstance(kind, str) or not isinstance(name, str):
        return None
    return (kind, name)


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


def _parse_rules(raw: object, kind: PolicyKind, issues: IssueCollector) -> list[Rule]:
    path = "spec.rules"
    if not isinstance(raw, list) or not raw:
        issues.add(
            path,
            "rules is missing or empty"
            if raw is None or raw == []
            else f"rules must be a list, not {describe_type(raw)}",
            fix="add at least one rule, e.g. "
            "- {name: example, action: Allow, to: [{fqdn: example.com}]}",
        )
        return []
    rules: list[Rule] = []
    names: dict[str, int] = {}
    for index, raw_rule in enumerate(raw):
        rule_path = key_path(path, index)
        rule = _parse_rule(raw_rule, kind, issues, rule_path)
        if rule is None:
            continue
        first = names.setdefault(rule.name, index)
        if first != index:
            issues.add(
                f"{rule_path}.name",
                f"rule name {rule.name!r} is already used by {key_path(path, first)}",
                fix="give each rule in a policy a unique name (audit records and metrics name it)",
            )
            continue
        rules.append(rule)
    return rules


def _parse_rule(raw: object, kind: PolicyKind, issues: IssueCollector, path: str) -> Rule | None:
    body = issues.mapping(raw, path, what="a rule")
    if body is None:
        return None
    before = len(issues.issues)
    issues.check_keys(body, _RULE_KEYS, path)
    name = body.get("name")
    if not isinstance(name, str) or not is_dns1123_label(name):
        issues.add(
            f"{path}.name",
            "rule name is missing"
            if name is None
            else f"rule name {name!r} is not a DNS-1123 label",
            fix="use up to 63 lowercase letters, digits and '-', e.g. name: allow-stripe",
        )
    action = _parse_choice(body, "action", Action, None, issues, f"{path}.action")
    if action is Action.PASS and kind is PolicyKind.NAMESPACED:
        # The engine would treat it as no match; refusing it says so at load instead.
        issues.add(
            f"{path}.action",
            "Pass hands a decision from a ClusterEgressPolicy tier to the next; "
            "an EgressPolicy has no next tier to pass to",
            fix="use Allow or Deny",
        )
    fqdns, wildcards, cidrs = _parse_to(body.get("to"), action, issues, f"{path}.to")
    ports = (
        _parse_ports(body["ports"], issues, f"{path}.ports") if "ports" in body else DEFAULT_PORTS
    )
    # Omitted stays None (TLS or plain HTTP, by the first bytes: proxy.core.policy.model.Rule).
    protocol = (
        _parse_choice(body, "protocol", TunnelProtocol, None, issues, f"{path}.protocol")
        if "protocol" in body
        else None
    )
    inspect: Inspect | None = None
    if "inspect" in body:
        inspect = _parse_inspect(body["inspect"], issues, f"{path}.inspect")
        if action is not None and action is not Action.ALLOW:
            issues.add(
                f"{path}.inspect",
                f"inspect applies to what an Allow rule lets through; this rule is {action}",
                fix="remove inspect, or make the rule action: Allow",
            )
        if protocol is not None and protocol not in _INSPECTABLE:
            issues.add(
                f"{path}.inspect",
                f"inspect checks HTTP requests; protocol {protocol} does not carry them",
                fix="remove inspect, or use protocol: tls (or http)",
            )
    tls = DEFAULT_TLS
    if "tls" in body:
        tls = _parse_tls(body["tls"], action, protocol, issues, f"{path}.tls")
    if len(issues.issues) != before or not isinstance(name, str) or action is None:
        return None
    return Rule(
        name=name,
        action=action,
        fqdns=tuple(fqdns),
        wildcard_suffixes=tuple(wildcards),
        cidrs=tuple(cidrs),
        ports=ports,
        protocol=protocol,
        inspect=inspect,
        tls=tls,
    )


def _parse_tls(
    raw: object,
    action: Action | None,
    protocol: TunnelProtocol | None,
    issues: IssueCollector,
    path: str,
) -> TlsOptions:
    """`tls: {sni: required|optional, ech: allow|deny}`: how a `tls` tunnel's ClientHello is held
    to its CONNECT host. Only meaningful on an Allow rule for protocol tls."""
    body = issues.mapping(raw, path, what="tls")
    if body is None:
        return DEFAULT_TLS
    issues.check_keys(body, _TLS_KEYS, path)
    sni = _parse_choice(body, "sni", SniMode, SniMode.REQUIRED, issues, f"{path}.sni")
    ech = _parse_choice(body, "ech", EchMode, EchMode.ALLOW, issues, f"{path}.ech")
    if action is not None and action is not Action.ALLOW:
        issues.add(
            path,
            f"tls applies to tunnels an Allow rule lets through; this rule is {action}",
            fix="remove tls, or make the rule action: Allow",
        )
    if protocol is not None and protocol is not TunnelProtocol.TLS:
        issues.add(
            path,
            f"tls options check a TLS ClientHello; protocol {protocol} does not start with one",
            fix="remove tls, or use protocol: tls",
        )
    return TlsOptions(sni=sni or SniMode.REQUIRED, ech=ech or EchMode.ALLOW)


def parse_destinations(
    raw: object, issues: IssueCollector, path: str
) -> tuple[list[str], list[str], list[IPNetwork]]:
    """A `to` list outside a rule (the runtime config's routes): exact names, wildcard suffixes
    and CIDRs, checked and normalised exactly as a rule's `to` is."""
    return _parse_to(raw, None, issues, path)


def _parse_to(
    raw: object, action: Action | None, issues: IssueCollector, path: str
) -> tuple[list[str], list[str], list[IPNetwork]]:
    fqdns: dict[str, None] = {}  # dicts as ordered sets: duplicates collapse, order is kept
    wildcards: dict[str, None] = {}
    cidrs: dict[IPNetwork, None] = {}
    if not isinstance(raw, list) or not raw:
        issues.add(
            path,
            "to is missing or empty"
            if raw is None or raw == []
            else f"to must be a list, not {describe_type(raw)}",
            fix="list destinations: to: [{fqdn: api.example.com}, {cidr: 203.0.113.0/24}]",
        )
        return [], [], []
    for index, raw_entry in enumerate(raw):
        entry_path = key_path(path, index)
        entry = issues.mapping(raw_entry, entry_path, what="a destination")
        if entry is None:
            continue
        issues.check_keys(entry, _TO_KEYS, entry_path)
        present = [key for key in _TO_KEYS if key in entry]
        if not present and len(entry) > 0:
            continue  # only unknown keys: check_keys has said which and what was meant
        if len(present) != 1:
            issues.add(
                entry_path,
                "a destination has exactly one of fqdn or cidr"
                if present
                else "a destination needs fqdn or cidr",
                fix="write one destination per entry: [{fqdn: a.example.com}, {cidr: 10.0.0.0/8}]",
            )
            continue
        if "fqdn" in entry:
            parsed = _parse_fqdn(entry["fqdn"], action, issues, f"{entry_path}.fqdn")
            if parsed is not None:
                is_wildcard, name = parsed
                (wildcards if is_wildcard else fqdns)[name] = None
        else:
            network = parse_network(entry["cidr"], issues, f"{entry_path}.cidr")
            if network is not None:
                cidrs[unmap_network(network)] = None
    return list(fqdns), list(wildcards), list(cidrs)


def _parse_fqdn(
    raw: object, action: Action | None, issues: IssueCollector, path: str
) -> tuple[bool, str] | None:
    """`(False, name)` for an exact name, `(True, suffix)` for `*.suffix`; None after an issue."""
    if not isinstance(raw, str):
        issues.add(
            path,
            f"fqdn must be a string, not {describe_type(raw)}",
            fix='write fqdn: "api.example.com"',
        )
        return None
    text = raw
    wildcard = False
    if "*" in text:
        labels = text.split(".")
        star_labels = [index for index, label in enumerate(labels) if "*" in label]
        rest = ".".join(labels[star_labels[-1] + 1 :])
        # Suggest "*.<rest>" only when rest is a registered-looking domain, never a bare TLD.
        under_rest = f'"*.{rest}" (every name under {rest}, at any depth)' if "." in rest else None
        problem: str | None = None
        fix = ""
        if text.strip(".") == "*":
            problem = "a bare * would match every name"
            fix = 'name a domain, e.g. "*.example.com"; to allow everything, set defaultAction'
        elif text.count("*") > 1:
            problem = f"{text!r} has more than one *; one leading * already matches any depth"
            fix = (
                f"write {under_rest}" if under_rest else 'write one leading *, e.g. "*.example.com"'
            )
        elif labels[star_labels[0]] != "*":
            problem = f"{text!r} has * inside a label; a wildcard matches whole labels only"
            fix = f"write {under_rest}, or list each name" if under_rest else "list each name"
        elif star_labels[0] != 0:
            problem = f"{text!r} has * after the first label; * may only be the whole first label"
            fix = f"write {under_rest}, or list each name" if under_rest else "list each name"
        if problem is not None:
            issues.add(path, problem, fix=fix)
            return None
        wildcard, text = True, rest
    address = _ip_literal(text)
    if address is not None:
        issues.add(
            path,
            f"{raw!r} is an IP address; fqdn takes names only and never matches IP literals",
            fix=f"write cidr: {address}/{address.max_prefixlen}",
        )
        return None
    try:
        parse_ipv4_strict(text)  # raises on numeric forms a request could never carry: 0x7f.1
        name = normalize_name(text)
    except BadRequest as exc:
        issues.add(
            path,
            f"{raw!r} is not a valid name: {exc.message}",
            fix="use a DNS name: letters, digits and '-' in dot-separated labels (IDN is fine)",
        )
        return None
    if wildcard and "." not in name and action is Action.ALLOW:
        # Allowing every name under a top-level domain is almost surely a slip; denying one
        # (Deny "*.zip") is a real control, so only Allow is refused.
        issues.add(
            path,
            f"{raw!r} would allow every name under the top-level domain {name!r}",
            fix=f'name a registered domain, e.g. "*.example.{name}"',
        )
        return None
    return wildcard, name


def _ip_literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    candidate = candidate[:-1] if candidate.endswith(".") else candidate
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        return None


def _parse_ports(raw: object, issues: IssueCollector, path: str) -> tuple[PortRange, ...]:
    if not isinstance(raw, list) or not raw:
        issues.add(
            path,
            "ports must be a non-empty list",
            fix="list ports, e.g. [443, {port: 8000, endPort: 8100}]; omit ports for [80, 443]",
        )
        return DEFAULT_PORTS
    ranges: list[PortRange] = []
    for index, item in enumerate(raw):
        item_path = key_path(path, index)
        if isinstance(item, dict):
            issues.check_keys(item, _PORT_KEYS, item_path)
            start = _port_number(item.get("port"), issues, f"{item_path}.port")
            # Only a written endPort is checked on its own: without one the range is the port,
            # and an error in it is reported once, at `port`.
            end = (
                _port_number(item["endPort"], issues, f"{item_path}.endPort")
                if "endPort" in item
                else start
            )
            if start is not None and end is not None:
                if start > end:
                    issues.add(
                        f"{item_path}.endPort",
                        f"endPort {end} is below port {start}",
                        fix=f"write {{port: {end}, endPort: {start}}}",
                    )
                else:
                    ranges.append(PortRange(start=start, end=end))
            continue
        if isinstance(item, str) and "-" in item:
            low, _, high = item.partition("-")
            issues.add(
                item_path,
                f"{item!r} is not a port",
                fix=f"write a range as {{port: {low.strip()}, endPort: {high.strip()}}}",
            )
            continue
        port = _port_number(item, issues, item_path)
        if port is not None:
            ranges.append(PortRange(start=port, end=port))
    return tuple(ranges)


def _port_number(raw: object, issues: IssueCollector, path: str) -> int | None:
    if isinstance(raw, int) and not isinstance(raw, bool) and MIN_PORT <= raw <= MAX_PORT:
        return raw
    if isinstance(raw, str) and raw.isdigit():
        fix = f"write {raw} without quotes"
    else:
        fix = f"use a whole number from {MIN_PORT} to {MAX_PORT}"
    issues.add(path, "port is missing" if raw is None else f"{raw!r} is not a port", fix=fix)
    return None


def _parse_inspect(raw: object, issues: IssueCollector, path: str) -> Inspect | None:
    if raw is None:
        return Inspect()
    body = issues.mapping(raw, path, what="inspect")
    if body is None:
        return None
    issues.check_keys(body, _INSPECT_KEYS, path)
    methods = _string_list(body.get("methods", []), issues, f"{path}.methods", "[GET, POST]")
    for index, method in enumerate(methods):
        if not method or not set(method) <= _TCHARS:
            issues.add(
                key_path(f"{path}.methods", index),
                f"{method!r} is not an HTTP method",
                fix="write e.g. GET",
            )
        elif method.upper() in _STANDARD_METHODS and method != method.upper():
            issues.add(
                key_path(f"{path}.methods", index),
                f"HTTP methods are case-sensitive; {method!r} never matches",
                fix=f"did you mean {method.upper()!r}?",
            )
    paths = _string_list(body.get("paths", []), issues, f"{path}.paths", '["/v2/*"]')
    for index, item in enumerate(paths):
        bad = not item.startswith("/") or any(
            c.isspace() or c in "?#" or ord(c) < 0x20 for c in item
        )
        if bad or "*" in item[:-1]:
            issues.add(
                key_path(f"{path}.paths", index),
                f"{item!r} is not a path pattern",
                fix='start with "/", no query or spaces; "*" only at the end, e.g. "/v2/*"',
            )
    dlp = _string_list(body.get("dlp", []), issues, f"{path}.dlp", "[aws-access-key, private-key]")
    for index, detector in enumerate(dlp):
        if detector not in DLP_DETECTORS:
            suggestion = did_you_mean(detector, DLP_DETECTORS)
            issues.add(
                key_path(f"{path}.dlp", index),
                f"{detector!r} is not a known DLP detector",
                fix=f"did you mean {suggestion!r}?"
                if suggestion
                else f"use one of {', '.join(sorted(DLP_DETECTORS))}",
            )
    return Inspect(
        methods=tuple(dict.fromkeys(methods)),
        paths=tuple(dict.fromkeys(paths)),
        dlp=tuple(dict.fromkeys(dlp)),
    )


def _string_list(raw: object, issues: IssueCollector, path: str, example: str) -> list[str]:
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return list(raw)
    issues.add(path, "must be a list of strings", fix=f"write e.g. {example}")
    return []


def _check_duplicates(policies: Iterable[Policy], issues: list[ConfigIssue]) -> None:
    first_seen: dict[tuple[PolicyKind, str, str], Policy] = {}
    for policy in policies:
        first = first_seen.setdefault(policy.identity, policy)
        if first is not policy:
            issues.append(
                ConfigIssue(
                    file=policy.origin.file,
                    document=policy.origin.document,
                    path="metadata.name",
                    message=f"{policy.kind} {policy.ruleset!r} is already defined in "
                    f"{first.origin}",
                    fix="rename one of them, or delete the duplicate",
                )
            )
