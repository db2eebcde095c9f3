"""Render a decision and its evaluation steps for people (`outgate explain`, the admin `/explain`
endpoint) and as a JSON-safe dict (`/explain?format=json`). Call `decide(..., explain=True)` to
get the steps; without them only the outcome is shown.

`tunnel` says how the request travels: a CONNECT tunnel (`https://`, `host:port`), where the
deciding rule's `protocol` is enforced, or a forwarded plain-HTTP request (`http://`), where it
is not and so is not shown. `inspect` (methods, paths, DLP) holds both."""

from __future__ import annotations

from proxy.core.identity import Workload
from proxy.core.policy.engine import Decision, Step, Verdict
from proxy.core.policy.model import Destination


def render_explanation(
    workload: Workload, destination: Destination, decision: Decision, *, tunnel: bool = True
) -> str:
    lines = [
        f"workload:    {_describe_workload(workload)}",
        f"destination: {destination}",
        f"connection:  {'tunnel (CONNECT)' if tunnel else 'forward (plain HTTP)'}",
        f"policy revision: {decision.revision}",
    ]
    enforced = [step for step in decision.steps if not step.shadow]
    shadowed = [step for step in decision.steps if step.shadow]
    if enforced:
        lines.append("steps:")
        lines.extend(_render_steps(enforced))
    lines.append(f"decision:    {_describe_verdict(decision.verdict, tunnel=tunnel)}")
    if decision.shadow is not None:
        shadow = _describe_verdict(decision.shadow, tunnel=tunnel)
        lines.append(f"shadow:      {shadow} (audit-mode policies enforced)")
        if shadowed:
            lines.append("shadow steps:")
            lines.extend(_render_steps(shadowed))
    else:
        lines.append("shadow:      none (audit-mode policies would decide the same)")
    return "\n".join(lines)


def decision_as_dict(
    workload: Workload, destination: Destination, decision: Decision, *, tunnel: bool = True
) -> dict[str, object]:
    """JSON-safe: only str, int, bool, None, lists and dicts."""
    return {
        "workload": {
            "kind": str(workload.kind),
            "namespace": workload.namespace,
            "name": workload.name,
            "uid": workload.uid,
            "labels": dict(workload.labels),
            "namespaceLabels": dict(workload.namespace_labels),
            "serviceAccount": workload.service_account,
            "owner": {"kind": workload.owner_kind, "name": workload.owner_name},
        },
        "destination": {
            "host": destination.host.name,
            "port": destination.port,
            "ip": str(destination.ip) if destination.ip is not None else None,
        },
        "connection": "tunnel" if tunnel else "forward",
        "revision": decision.revision,
        "decision": _verdict_dict(decision.verdict, tunnel=tunnel),
        "shadow": None
        if decision.shadow is None
        else _verdict_dict(decision.shadow, tunnel=tunnel),
        "steps": [
            {
                "tier": step.tier,
                "ruleset": step.ruleset,
                "rule": step.rule,
                "result": step.result,
                "shadow": step.shadow,
            }
            for step in decision.steps
        ],
    }


def _verdict_dict(verdict: Verdict, *, tunnel: bool) -> dict[str, object]:
    """`protocol` is null for a forwarded request: it applies to tunnels only."""
    protocol = verdict.protocol if tunnel else None
    inspect = verdict.inspect
    return {
        "action": str(verdict.action),
        "reason": str(verdict.reason),
        "rule": verdict.rule,
        "ruleset": verdict.ruleset,
        "tier": str(verdict.tier) if verdict.tier is not None else None,
        "mode": str(verdict.mode) if verdict.mode is not None else None,
        "allowedCidrs": [str(cidr) for cidr in verdict.allowed_cidrs],
        "protocol": str(protocol) if protocol is not None else None,
        "inspect": None
        if inspect is None
        else {
            "methods": list(inspect.methods),
            "paths": list(inspect.paths),
            "dlp": list(inspect.dlp),
        },
    }


def _describe_workload(workload: Workload) -> str:
    if workload.is_unknown:
        return "unknown source (only subject-less ClusterEgressPolicies apply)"
    parts = [workload.describe(), f"({workload.kind} {workload.name})"]
    if workload.service_account:
        parts.append(f"serviceAccount={workload.service_account}")
    labels = ",".join(f"{key}={value}" for key, value in sorted(workload.labels.items()))
    parts.append(f"labels={{{labels}}}")
    return " ".join(parts)


def describe_outcome(verdict: Verdict) -> str:
    """`allow (rule_allow) by ns/policy rule name`: what decided, in one phrase."""
    text = f"{verdict.action} ({verdict.reason})"
    if verdict.ruleset is not None:
        text += f" by {verdict.ruleset}"
        if verdict.rule is not None:
            text += f" rule {verdict.rule}"
    return text


def _describe_verdict(verdict: Verdict, *, tunnel: bool) -> str:
    text = describe_outcome(verdict)
    details = []
    if verdict.tier is not None:
        details.append(f"tier {verdict.tier}")
    if verdict.mode is not None:
        details.append(f"mode {verdict.mode}")
    if tunnel and verdict.protocol is not None:
        details.append(f"protocol {verdict.protocol}")
    if verdict.allowed_cidrs:
        details.append("cidrs " + ",".join(str(cidr) for cidr in verdict.allowed_cidrs))
    if verdict.inspect is not None:
        details.append("inspect")
    return text + (f" [{'; '.join(details)}]" if details else "")


def _render_steps(steps: list[Step]) -> list[str]:
    lines = []
    for number, step in enumerate(steps, start=1):
        where = step.ruleset or "-"
        if step.rule is not None:
            where += f" rule {step.rule}"
        lines.append(f"  {number:>2}. {step.tier:<9} {where}: {step.result}")
    return lines
