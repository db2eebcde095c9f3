"""Transparent mode as shipped (issue 13): manifests/components/transparent rendered by the real
kustomize (overlays/transparent), the CoreDNS steering blocks parsed, and the NetworkPolicies
evaluated for a workload with no proxy setting (manifests/examples/transparent-workload)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from proxy.config import Settings, settings_from_mapping
from tests.deploy import kube
from tests.deploy.netpol import Cluster, Pod

OVERLAY = "overlays/transparent"
WORKLOAD = "examples/transparent-workload"


# -- a Corefile reader: enough of CoreDNS's syntax (server blocks, directives, nested blocks) ---
@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] = field(default_factory=list)

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block if d.name == name]


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}]|[^\s{}"]+|\n')


def parse_corefile(text: str) -> list[Directive]:
    """Server blocks as Directives named by their first zone (`args` the other zones). Raises
    ValueError on unbalanced braces or a directive outside a block, as CoreDNS refuses them."""
    lines = [
        line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        for line in text.splitlines()
    ]
    tokens = _TOKEN.findall("\n".join(lines))
    stack: list[list[Directive]] = [[]]
    current: list[str] = []
    for token in [*tokens, "\n"]:
        if token == "{":
            if not current:
                raise ValueError("a block without a name")
            directive = Directive(name=current[0], args=current[1:])
            stack[-1].append(directive)
            stack.append(directive.block)
            current = []
        elif token == "}":
            if current:
                stack[-1].append(Directive(name=current[0], args=current[1:]))
                current = []
            if len(stack) == 1:
                raise ValueError("unbalanced }")
            stack.pop()
        elif token == "\n":
            if current:
                if len(stack) == 1:
                    raise ValueError(f"directive {current[0]!r} outside a server block")
                stack[-1].append(Directive(name=current[0], args=current[1:]))
                current = []
        else:
            current.append(token.strip('"') if token.startswith('"') else token)
    if len(stack) != 1:
        raise ValueError("unbalanced {")
    return stack[0]


def test_the_corefile_reader_refuses_what_coredns_refuses() -> None:
    for broken in ("a:53 {\n errors\n", "a:53 {\n}\n}\n", "errors\n"):
        with pytest.raises(ValueError):
            parse_corefile(broken)


# -- the rendered objects -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def objects() -> list[kube.Obj]:
    return kube.render(OVERLAY)


def _steering(objects: list[kube.Obj]) -> list[Directive]:
    snippet = kube.one(objects, "ConfigMap", "outgate-coredns-steering")
    assert snippet["metadata"]["namespace"] == "kube-system"
    return parse_corefile(snippet["data"]["outgate.server"])


def _config(objects: list[kube.Obj], tmp_path: Path) -> Settings:
    raw = yaml.safe_load(kube.config_map_named(objects, "outgate-config")["data"]["config.yaml"])
    raw["policies"]["paths"] = []
    return settings_from_mapping(raw, file="config.yaml", base_dir=tmp_path)


def test_the_service_targets_the_listeners_the_config_turns_on(
    objects: list[kube.Obj], tmp_path: Path
) -> None:
    settings = _config(objects, tmp_path)
    transparent = settings.transparent
    assert transparent.tls is not None and transparent.http is not None
    (container,) = kube.one(objects, "Deployment", "outgate")["spec"]["template"]["spec"][
        "containers"
    ]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service = kube.one(objects, "Service", "outgate-transparent")
    by_port = {p["port"]: container_ports[p["targetPort"]] for p in service["spec"]["ports"]}
    assert by_port[443] == transparent.tls.port == 8443
    assert transparent.tls_port == 443
    assert by_port[80] == transparent.http.port == 8080
    (ledger,) = transparent.ports
    assert by_port[ledger.port] == ledger.listen.port == 15432
    assert ledger.host.name == "ledger.db.corp.example"


def test_coredns_answers_external_names_with_the_service_address(
    objects: list[kube.Obj],
) -> None:
    cluster_ip = kube.one(objects, "Service", "outgate-transparent")["spec"]["clusterIP"]
    blocks = {block.name: block for block in _steering(objects)}
    assert set(blocks) == {"cluster.local:53", ".:53"}
    external = blocks[".:53"]
    a_record, aaaa = external.find("template")
    assert a_record.args == ["IN", "A", "."]
    (answer,) = a_record.find("answer")
    owner, _, record = answer.args[0].partition("}} ")
    assert owner == "{{ .Name "  # the question's own name, whatever it is
    ttl, klass, rtype, address = record.split()
    assert (klass, rtype) == ("IN", "A")
    assert ipaddress.ip_address(address) == ipaddress.ip_address(cluster_ip)
    assert int(ttl) <= 60  # steering changes reach clients within a minute
    # No IPv6 answer: an AAAA record would give clients a way around the proxy.
    assert aaaa.args == ["IN", "AAAA", "."]
    assert [d.args for d in aaaa.find("rcode")] == [["NOERROR"]]
    assert not aaaa.find("answer")


def test_only_the_listed_namespaces_are_steered_and_never_the_proxys(
    objects: list[kube.Obj],
) -> None:
    views = []
    for block in _steering(objects):
        (view,) = block.find("view")
        (expr,) = view.find("expr")
        views.append(" ".join(expr.args))
        # The client's namespace is metadata only with verified pod lookups.
        (kubernetes,) = block.find("kubernetes")
        assert ["verified"] in [d.args for d in kubernetes.find("pods")]
        assert block.find("metadata")
    assert len(set(views)) == 1, "both blocks must steer the same clients"
    steered = re.findall(r"'([^']+)'", views[0].split(" in ", 1)[1])
    assert steered and "outgate-system" not in steered
    assert views[0].startswith("metadata('kubernetes/client-namespace') in [")
    assert "legacy-apps" in steered  # the example workload's namespace


def test_the_cluster_domain_is_answered_as_usual_for_steered_clients(
    objects: list[kube.Obj],
) -> None:
    blocks = {block.name: block for block in _steering(objects)}
    internal = blocks["cluster.local:53"]
    assert internal.args == ["in-addr.arpa:53", "ip6.arpa:53"]
    assert not internal.find("template")
    (kubernetes,) = internal.find("kubernetes")
    assert kubernetes.args == ["cluster.local", "in-addr.arpa", "ip6.arpa"]


# -- NetworkPolicy --------------------------------------------------------------------------------
def _pod(objects: list[kube.Obj], name: str, ip: str) -> Pod:
    deployment = kube.one(objects, "Deployment", name)
    template = deployment["spec"]["template"]
    return Pod(
        namespace=deployment["metadata"]["namespace"],
        name=name,
        ip=ipaddress.ip_address(ip),
        labels=template["metadata"]["labels"],
        ports={
            p["name"]: (p["containerPort"], p.get("protocol", "TCP"))
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
        },
    )


def test_a_locked_down_transparent_client_reaches_the_listeners_and_not_the_admin_port(
    objects: list[kube.Obj],
) -> None:
    workload = kube.render(WORKLOAD)
    namespaces = {
        ns["metadata"]["name"]: ns["metadata"].get("labels", {})
        for ns in kube.find(objects + workload, "Namespace")
    }
    namespaces |= {"kube-system": {}, "team-b": {}}
    cluster = Cluster(namespaces, objects + workload)
    proxy = _pod(objects, "outgate", "10.244.1.10")
    client = _pod(workload, "legacy-client", "10.244.2.20")
    stranger = Pod(namespace="team-b", name="app", ip=ipaddress.ip_address("10.244.4.40"))
    for port in (8443, 8080, 15432, 3128):
        assert cluster.allowed(client, proxy, port), port
        assert not cluster.allowed(stranger, proxy, port), port
    assert not cluster.allowed(client, proxy, 9090)
    # The lockdown still holds: nothing else, in the cluster or outside.
    outside = Pod(namespace="team-b", name="api", ip=ipaddress.ip_address("10.244.4.41"))
    assert not cluster.allowed(client, outside, 443)


def test_without_the_transparent_client_component_the_listeners_are_closed(
    objects: list[kube.Obj],
) -> None:
    workload = kube.render("examples/workload")  # lockdown only
    namespaces = {
        ns["metadata"]["name"]: ns["metadata"].get("labels", {})
        for ns in kube.find(objects + workload, "Namespace")
    }
    cluster = Cluster(namespaces | {"kube-system": {}}, objects + workload)
    proxy = _pod(objects, "outgate", "10.244.1.10")
    client = _pod(workload, "demo-client", "10.244.2.20")
    assert cluster.allowed(client, proxy, 3128)
    assert not cluster.allowed(client, proxy, 8443)
