"""`explain`: which workload a source is, and how the proxy would route a URL for it.

Shared by `outgate explain` and the admin `/explain` endpoint. It asks the same Router the data
plane asks (proxy.dataplane.router), with the evaluation steps collected, so what is explained
is what is enforced. Without `resolve` it shows step 1, the name decision (what happens before
any DNS query; for an IP literal, the address decision). With `resolve` it runs every step: the
DNS answer, the decision per address, what the address guard dropped and why, and what would be
dialled.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from proxy.core.hosts import parse_ip_address, split_authority, unmap_ipv4
from proxy.core.http1 import DEFAULT_PORTS
from proxy.core.identity import IdentityLookup, Workload
from proxy.core.policy.engine import Decider, Destination
from proxy.core.policy.explain import decision_as_dict, describe_outcome, render_explanation
from proxy.core.upstreams import DIRECT
from proxy.dataplane.router import Route, Router
from proxy.dataplane.transparent import ListenerKind
from proxy.errors import BadRequest, Reason


def destination_from_url(url: str) -> tuple[Destination, bool]:
    """`https://api.stripe.com/x`, `http://10.0.0.1:8080/`, or a bare `host:port` -> the
    destination, and whether a client sends it through a CONNECT tunnel (`https://`, `host:port`)
    rather than as a forwarded plain-HTTP request (`http://`)."""
    if "://" not in url:
        host, port = split_authority(url, default_port=None)
        return Destination(host=host, port=port, ip=host.ip), True
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise BadRequest(f"unsupported scheme {scheme!r}", reason=Reason.UNSUPPORTED_SCHEME)
    host, port = split_authority(parts.netloc, default_port=DEFAULT_PORTS[scheme])
    return Destination(host=host, port=port, ip=host.ip), scheme != "http"


LISTENERS = ("proxy", *(str(kind) for kind in ListenerKind))


def listener_lines(listener: str | None, destination: Destination) -> tuple[list[str], Any]:
    """What the listener a connection arrives on changes (issue 13): the text lines and the
    JSON value for `listener`. Every listener is decided by the same Router; only the TLS one
    refuses an IP literal before any decision (the SNI names the destination and must be a
    name: proxy.core.tunnel_protocols.sni_destination)."""
    if listener is None:
        return [], None
    if listener not in LISTENERS:
        raise BadRequest(f"unknown listener {listener!r}: one of {', '.join(LISTENERS)}")
    if listener == ListenerKind.TLS and destination.host.ip is not None:
        return [
            f"listener:    {listener}: refused before any decision ({Reason.SNI_IP_LITERAL}): "
            "the SNI names the destination and cannot be an IP address"
        ], {"kind": listener, "refused": str(Reason.SNI_IP_LITERAL)}
    door = "a CONNECT" if listener in (ListenerKind.TLS, ListenerKind.PORT_MAP) else "a request"
    where = f"{destination.host.name}:{destination.port}"
    return [f"listener:    {listener}, decided as {door} to {where}"], {"kind": listener}


def explain(
    decider: Decider,
    identity: IdentityLookup,
    *,
    source: str,
    url: str,
    listener: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Step 1, the name decision: text for a person and a JSON-safe dict for tools. `decider`
    is the Router (or an Engine: the Router asks the Engine in force). `listener`: the
    connection's listener kind (LISTENERS), shown with what it changes."""
    workload, destination, tunnel = _parse(identity, source, url)
    door, door_data = listener_lines(listener, destination)
    decision = decider.decide(workload, destination, explain=True)
    text = render_explanation(workload, destination, decision, tunnel=tunnel)
    data = decision_as_dict(workload, destination, decision, tunnel=tunnel)
    way_out = (
        decider.way_out_by_name(destination.host, destination.port)
        if isinstance(decider, Router) and decision.allowed
        else None
    )
    if way_out is not None:
        via, undecided = way_out
        note = (
            " (by name; a cidr route may apply once it resolves: use resolve)" if undecided else ""
        )
        text += f"\nroute:       {_describe_via(via)}{note}"
        data["upstream"] = {"name": via, "final": not undecided}
    if door_data is not None:
        text += "\n" + "\n".join(door)
        data["listener"] = door_data
    return text, data


async def explain_route(
    router: Router,
    identity: IdentityLookup,
    *,
    source: str,
    url: str,
    listener: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Every step, the DNS answer and the address guard included, as the data plane runs them."""
    workload, destination, tunnel = _parse(identity, source, url)
    door, door_data = listener_lines(listener, destination)
    route = await router.route(workload, destination.host, destination.port, explain=True)
    text = render_explanation(workload, destination, route.decision, tunnel=tunnel)
    data = decision_as_dict(workload, destination, route.decision, tunnel=tunnel)
    lines = _route_lines(route) + door
    extra = {"route": _route_dict(route)}
    if door_data is not None:
        extra["listener"] = door_data
    return text + "\n" + "\n".join(lines), {**data, **extra}


def _parse(identity: IdentityLookup, source: str, url: str) -> tuple[Workload, Destination, bool]:
    try:
        source_ip = unmap_ipv4(parse_ip_address(source))
    except ValueError:
        raise BadRequest(f"source {source!r} is not an IP address") from None
    destination, tunnel = destination_from_url(url)
    return identity.lookup(source_ip), destination, tunnel


def _route_lines(route: Route) -> list[str]:
    if not route.decision.allowed:
        return ["resolve:     not asked (denied by name: no DNS query is made)"]
    if route.parent_resolves:
        return [
            f"resolve:     not here: upstream {route.via} resolves names (resolve: parent)",
            f"outcome:     allow; {_describe_via(route.via or DIRECT)}, asking it for "
            f"{route.host.name}",
            f"route:       {_describe_via(route.via or DIRECT)}",
        ]
    if route.resolve_error is not None:
        error = route.resolve_error
        return [
            f"resolve:     {route.host.name} failed: {error.message}",
            f"outcome:     {error.status} ({error.reason})",
        ]
    answer = ", ".join(str(ip) for ip in route.answer)
    lines = [
        f"resolve:     {route.host.name} -> {answer}"
        if route.host.ip is None
        else f"resolve:     not needed (IP literal {route.host.name})",
        "addresses:",
    ]
    for check in route.checks:
        if check.decision is not None and not check.decision.allowed:
            verdict = f"denied by address: {describe_outcome(check.decision.verdict)}"
        elif check.guarded is not None:
            verdict = f"dropped by the address guard: {check.guarded}"
        else:
            verdict = "permitted"
        decided = "" if check.decision is None else f" [{describe_outcome(check.decision.verdict)}]"
        lines.append(f"  {check.ip}{decided}: {verdict}")
    refusal = route.refusal()
    if refusal is not None:
        lines.append(f"outcome:     deny {refusal.status} ({refusal.reason})")
    elif route.via is None or route.via == DIRECT:
        lines.append("outcome:     allow; dial " + ", ".join(str(ip) for ip in route.permitted))
    else:
        lines.append(
            f"outcome:     allow; {_describe_via(route.via)}, asking it for {route.host.name}"
        )
    if route.via is not None:
        lines.append(f"route:       {_describe_via(route.via)}")
    return lines


def _describe_via(via: str) -> str:
    return "direct" if via == DIRECT else f"via upstream {via}"


def _route_dict(route: Route) -> dict[str, Any]:
    refusal = route.refusal()
    return {
        "answer": [str(ip) for ip in route.answer],
        "resolveError": None
        if route.resolve_error is None
        else {"reason": str(route.resolve_error.reason), "message": route.resolve_error.message},
        "addresses": [
            {
                "ip": str(check.ip),
                "decision": None
                if check.decision is None
                else {
                    "action": str(check.decision.action),
                    "reason": str(check.decision.reason),
                    "ruleset": check.decision.ruleset,
                    "rule": check.decision.rule,
                },
                "guarded": None if check.guarded is None else str(check.guarded),
                "permitted": check.permitted,
            }
            for check in route.checks
        ],
        "permitted": [str(ip) for ip in route.permitted],
        "upstream": None
        if route.via is None
        else {"name": route.via, "resolve": "parent" if route.parent_resolves else "local"},
        "outcome": "allow" if refusal is None else "deny",
        "reason": None if refusal is None else str(refusal.reason),
    }
