"""`explain`: which workload a source is, and how the policy in force decides a URL for it.

Shared by `outgate explain` and the admin `/explain` endpoint. It never resolves names: it shows
the name decision (what happens before any DNS query), and, for IP-literal URLs, the address
decision.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from proxy.core.hosts import parse_ip_address, split_authority, unmap_ipv4
from proxy.core.identity import IdentityLookup
from proxy.core.policy.engine import Destination, Engine
from proxy.core.policy.explain import decision_as_dict, render_explanation
from proxy.errors import BadRequest, Reason

_DEFAULT_PORTS = {"http": 80, "https": 443}


def destination_from_url(url: str) -> Destination:
    """`https://api.stripe.com/x`, `http://10.0.0.1:8080/`, or a bare `host:port`."""
    if "://" not in url:
        host, port = split_authority(url, default_port=None)
        return Destination(host=host, port=port, ip=host.ip)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise BadRequest(f"unsupported scheme {scheme!r}", reason=Reason.UNSUPPORTED_SCHEME)
    host, port = split_authority(parts.netloc, default_port=_DEFAULT_PORTS[scheme])
    return Destination(host=host, port=port, ip=host.ip)


def explain(
    engine: Engine, identity: IdentityLookup, *, source: str, url: str
) -> tuple[str, dict[str, Any]]:
    """Text for a person and a JSON-safe dict for tools, for the same decision."""
    try:
        source_ip = unmap_ipv4(parse_ip_address(source))
    except ValueError:
        raise BadRequest(f"source {source!r} is not an IP address") from None
    workload = identity.lookup(source_ip)
    destination = destination_from_url(url)
    decision = engine.decide(workload, destination, explain=True)
    return (
        render_explanation(workload, destination, decision),
        decision_as_dict(workload, destination, decision),
    )
