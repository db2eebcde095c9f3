"""A small NetworkPolicy evaluator (networking.k8s.io/v1 semantics) over rendered objects.

It answers "may this connection happen?" for a model of a cluster: namespaces with labels, pods
with labels, IPs and named ports, and addresses outside the cluster. The rules, from the
NetworkPolicy API reference:
1. A pod is isolated for a direction when a policy in its namespace selects it (podSelector) and
   lists that direction in policyTypes (default: Ingress, plus Egress when `egress` is present).
   A pod isolated in neither direction allows everything in that direction.
2. An isolated pod allows a connection when any rule of any selecting policy allows it; policies
   add up, none subtracts.
3. A rule allows a connection when one of its peers matches and one of its ports matches (no
   peers: any peer; no ports: any port).
4. Peers: podSelector alone = pods of the policy's namespace; namespaceSelector (with an optional
   podSelector) = pods of the selected namespaces; ipBlock = addresses in `cidr` and in no
   `except`. This evaluator applies ipBlock to pod addresses too, the conservative reading for
   "cannot reach" promises (implementations differ).
5. A connection between two pods needs the source's egress and the destination's ingress.
Policies are evaluated after Service translation, as every CNI does: a connection to a Service
is a connection to one of its pods.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


@dataclass(frozen=True, kw_only=True)
class Pod:
    namespace: str
    name: str
    ip: IPAddress
    labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # name -> (port, protocol)

    def __str__(self) -> str:
        return f"pod {self.namespace}/{self.name} ({self.ip})"


@dataclass(frozen=True, kw_only=True)
class External:
    ip: IPAddress

    def __str__(self) -> str:
        return str(self.ip)


Endpoint = Pod | External


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A Kubernetes LabelSelector; {} (or None where a selector is required) selects everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression["key"], expression["operator"]
        values = expression.get("values") or []
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


class Cluster:
    def __init__(self, namespaces: Mapping[str, Mapping[str, str]], policies: Iterable[Any]):
        self.namespaces = {
            name: {**labels, NAMESPACE_NAME_LABEL: name} for name, labels in namespaces.items()
        }
        self.policies = [p for p in policies if p["kind"] == "NetworkPolicy"]

    def _selecting(self, pod: Pod, direction: str) -> list[Mapping[str, Any]]:
        found = []
        for policy in self.policies:
            if policy["metadata"].get("namespace") != pod.namespace:
                continue
            spec = policy["spec"]
            types = spec.get("policyTypes") or (
                ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]
            )
            if direction in types and selector_matches(spec["podSelector"], pod.labels):
                found.append(policy)
        return found

    def _peer_matches(self, peer: Mapping[str, Any], policy_ns: str, other: Endpoint) -> bool:
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            network = ipaddress.ip_network(block["cidr"])
            if other.ip.version != network.version or other.ip not in network:
                return False
            return not any(
                other.ip in ipaddress.ip_network(cidr)
                for cidr in block.get("except") or []
                if ipaddress.ip_network(cidr).version == other.ip.version
            )
        if not isinstance(other, Pod):
            return False
        if "namespaceSelector" in peer:
            if not selector_matches(peer["namespaceSelector"], self.namespaces[other.namespace]):
                return False
        elif other.namespace != policy_ns:
            return False
        return "podSelector" not in peer or selector_matches(peer["podSelector"], other.labels)

    @staticmethod
    def _port_matches(entry: Mapping[str, Any], port: int, protocol: str, target: Endpoint) -> bool:
        if entry.get("protocol", "TCP") != protocol:
            return False
        wanted = entry.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):  # a named port of the destination pod
            if not isinstance(target, Pod) or wanted not in target.ports:
                return False
            named, named_protocol = target.ports[wanted]
            return named == port and named_protocol == protocol
        return wanted <= port <= entry.get("endPort", wanted)

    def _rules_allow(
        self,
        policies: list[Mapping[str, Any]],
        key: str,
        peer_key: str,
        other: Endpoint,
        port: int,
        protocol: str,
        target: Endpoint,
    ) -> bool:
        for policy in policies:
            namespace = policy["metadata"]["namespace"]
            for rule in policy["spec"].get(key) or []:
                peers = rule.get(peer_key)
                if peers and not any(self._peer_matches(p, namespace, other) for p in peers):
                    continue
                ports = rule.get("ports")
                if ports and not any(self._port_matches(e, port, protocol, target) for e in ports):
                    continue
                return True
        return False

    def egress_allowed(self, source: Pod, destination: Endpoint, port: int, protocol: str) -> bool:
        policies = self._selecting(source, "Egress")
        if not policies:
            return True
        return self._rules_allow(policies, "egress", "to", destination, port, protocol, destination)

    def ingress_allowed(self, source: Endpoint, destination: Pod, port: int, protocol: str) -> bool:
        policies = self._selecting(destination, "Ingress")
        if not policies:
            return True
        return self._rules_allow(policies, "ingress", "from", source, port, protocol, destination)

    def allowed(self, source: Pod, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
        if not self.egress_allowed(source, destination, port, protocol):
            return False
        return not isinstance(destination, Pod) or self.ingress_allowed(
            source, destination, port, protocol
        )
