"""The promises the NetworkPolicies make, checked by evaluating the rendered objects.

A workload namespace with the lockdown component (manifests/examples/workload) can reach kube-dns
and the proxy, and nothing else; the proxy can reach the internet, kube-dns and the API server,
never a cloud metadata address or the cluster's own ranges; the proxy accepts connections only
from namespaces that opted in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from tests.deploy import kube
from tests.deploy.netpol import Cluster, External, Pod

METADATA_ADDRESSES = ["169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"]
INTERNET = ["93.184.215.14", "140.82.112.6", "2606:4700::6810:84e5"]
# Ports worth trying against cluster addresses: DNS, web, etcd, API server, kubelet, node ports.
SENSITIVE_PORTS = [22, 53, 80, 443, 2379, 3128, 5432, 6443, 8080, 9090, 10250, 10255, 30080]
# Typical cluster ranges (kubeadm, k3s, EKS, GKE, AKS) the base's placeholders must cover.
TYPICAL_CLUSTER_CIDRS = [
    "10.244.0.0/16",
    "10.96.0.0/12",
    "10.42.0.0/16",
    "10.43.0.0/16",
    "172.20.0.0/16",
    "192.168.0.0/16",
    "100.64.0.0/16",
    "fd00:10:244::/56",
]


@dataclass
class Scenario:
    cluster: Cluster
    proxy: Pod
    client: Pod  # demo-client in the locked-down demo namespace
    neighbour: Pod  # another pod of the demo namespace
    kube_dns: Pod
    opted_in: Pod  # a pod of a namespace that opted in without the lockdown
    stranger: Pod  # a pod of a namespace that did not opt in
    prometheus: Pod
    cluster_cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    apiserver: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, list[int]]]


def _pod_from_deployment(objects: list[kube.Obj], name: str, ip: str) -> Pod:
    deployment = kube.one(objects, "Deployment", name)
    template = deployment["spec"]["template"]
    ports = {
        port["name"]: (port["containerPort"], port.get("protocol", "TCP"))
        for container in template["spec"]["containers"]
        for port in container.get("ports", [])
        if "name" in port
    }
    return Pod(
        namespace=deployment["metadata"]["namespace"],
        name=name,
        ip=ipaddress.ip_address(ip),
        labels=template["metadata"]["labels"],
        ports=ports,
    )


def _scenario(overlay: str) -> Scenario:
    proxy_objects = kube.render(overlay)
    workload = kube.render("examples/workload")
    objects = proxy_objects + workload
    namespaces = {
        ns["metadata"]["name"]: ns["metadata"].get("labels", {})
        for ns in kube.find(objects, "Namespace")
    }
    namespaces |= {
        "kube-system": {},
        "team-a": {"outgate.dev/use-proxy": "true"},
        "team-b": {},
        "monitoring": {"outgate.dev/scrape-metrics": "true"},
    }
    config = yaml.safe_load(
        kube.config_map_named(proxy_objects, "outgate-config")["data"]["config.yaml"]
    )
    cidrs = [ipaddress.ip_network(c) for c in config["guard"]["clusterCIDRs"]] or [
        ipaddress.ip_network(c) for c in TYPICAL_CLUSTER_CIDRS
    ]
    apiserver_policy = kube.one(proxy_objects, "NetworkPolicy", "outgate-proxy-apiserver")
    apiserver = [
        (ipaddress.ip_network(peer["ipBlock"]["cidr"]), [p["port"] for p in rule["ports"]])
        for rule in apiserver_policy["spec"]["egress"]
        for peer in rule["to"]
    ]
    return Scenario(
        cluster=Cluster(namespaces, objects),
        proxy=_pod_from_deployment(proxy_objects, "outgate", "10.244.1.10"),
        client=_pod_from_deployment(workload, "demo-client", "10.244.2.20"),
        neighbour=Pod(
            namespace="demo",
            name="api",
            ip=ipaddress.ip_address("10.244.2.21"),
            labels={"app": "api"},
            ports={"http": (8080, "TCP")},
        ),
        kube_dns=Pod(
            namespace="kube-system",
            name="coredns",
            ip=ipaddress.ip_address("10.244.0.2"),
            labels={"k8s-app": "kube-dns"},
            ports={"dns": (53, "UDP"), "dns-tcp": (53, "TCP"), "metrics": (9153, "TCP")},
        ),
        opted_in=Pod(namespace="team-a", name="app", ip=ipaddress.ip_address("10.244.3.30")),
        stranger=Pod(namespace="team-b", name="app", ip=ipaddress.ip_address("10.244.4.40")),
        prometheus=Pod(
            namespace="monitoring", name="prometheus", ip=ipaddress.ip_address("10.244.5.50")
        ),
        cluster_cidrs=cidrs,
        apiserver=apiserver,
    )


@pytest.fixture(scope="module", params=["overlays/production", "base"])
def scenario(request: pytest.FixtureRequest) -> Scenario:
    return _scenario(request.param)


def _external(address: str) -> External:
    return External(ip=ipaddress.ip_address(address))


def _inside(network: ipaddress.IPv4Network | ipaddress.IPv6Network, s: Scenario) -> bool:
    return any(
        network.version == c.version and network.subnet_of(c)  # type: ignore[arg-type]
        for c in s.cluster_cidrs
    )


def _samples(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Iterator[External]:
    """First, a middle and the last address of a range."""
    size = network.num_addresses
    for offset in (1, size // 2, size - 2):
        yield External(ip=network[offset])


# --- a locked-down workload -------------------------------------------------------------------


def test_a_locked_down_workload_resolves_names_through_kube_dns(scenario: Scenario) -> None:
    for protocol in ("UDP", "TCP"):
        assert scenario.cluster.allowed(scenario.client, scenario.kube_dns, 53, protocol)


def test_a_locked_down_workload_reaches_the_proxy_port(scenario: Scenario) -> None:
    assert scenario.cluster.allowed(scenario.client, scenario.proxy, 3128)


def test_a_locked_down_workload_reaches_nothing_else(scenario: Scenario) -> None:
    s = scenario
    forbidden: list[tuple[Pod | External, int, str]] = [
        (s.proxy, 9090, "TCP"),  # the admin port
        (s.proxy, 3128, "UDP"),
        (s.kube_dns, 9153, "TCP"),
        (s.neighbour, 8080, "TCP"),  # its own namespace
        (s.opted_in, 80, "TCP"),
        (s.stranger, 80, "TCP"),
        (s.prometheus, 9090, "TCP"),
    ]
    forbidden += [(_external(a), port, "TCP") for a in METADATA_ADDRESSES for port in (80, 443)]
    forbidden += [(_external(a), port, "TCP") for a in INTERNET for port in (80, 443)]
    forbidden += [(_external(a), 53, "UDP") for a in INTERNET]
    forbidden += [
        (External(ip=network.network_address), port, "TCP")
        for network, ports in s.apiserver
        for port in ports
    ]
    reachable = [(str(t), p, pr) for t, p, pr in forbidden if s.cluster.allowed(s.client, t, p, pr)]
    assert reachable == []


def test_a_pod_without_the_lockdown_is_not_restricted_by_it(scenario: Scenario) -> None:
    # The lockdown is per namespace: other namespaces keep their own rules.
    assert scenario.cluster.allowed(scenario.stranger, _external(INTERNET[0]), 443)


# --- the proxy's ingress ----------------------------------------------------------------------


def test_the_proxy_accepts_only_namespaces_that_opted_in(scenario: Scenario) -> None:
    s = scenario
    assert s.cluster.allowed(s.opted_in, s.proxy, 3128)
    assert s.cluster.allowed(s.client, s.proxy, 3128)
    assert not s.cluster.allowed(s.stranger, s.proxy, 3128)
    assert not s.cluster.ingress_allowed(_external(INTERNET[0]), s.proxy, 3128, "TCP")


def test_only_the_metrics_namespace_reaches_the_admin_port(scenario: Scenario) -> None:
    s = scenario
    assert s.cluster.allowed(s.prometheus, s.proxy, 9090)
    assert not s.cluster.allowed(s.opted_in, s.proxy, 9090)
    assert not s.cluster.allowed(s.stranger, s.proxy, 9090)


# --- the proxy's egress -----------------------------------------------------------------------


def test_the_proxy_reaches_the_internet_on_any_port(scenario: Scenario) -> None:
    for address in INTERNET:
        for port in (80, 443, 5432, 22):
            assert scenario.cluster.allowed(scenario.proxy, _external(address), port)


def test_the_proxy_resolves_names_through_kube_dns(scenario: Scenario) -> None:
    for protocol in ("UDP", "TCP"):
        assert scenario.cluster.allowed(scenario.proxy, scenario.kube_dns, 53, protocol)


def test_the_proxy_never_reaches_a_cloud_metadata_address(scenario: Scenario) -> None:
    reachable = [
        (address, port, protocol)
        for address in METADATA_ADDRESSES
        for port in SENSITIVE_PORTS
        for protocol in ("TCP", "UDP")
        if scenario.cluster.allowed(scenario.proxy, _external(address), port, protocol)
    ]
    assert reachable == []


def test_the_proxy_never_reaches_the_cluster_ranges_except_the_api_server(
    scenario: Scenario,
) -> None:
    s = scenario
    apiserver = {(net.network_address, port) for net, ports in s.apiserver for port in ports}
    targets = [target for network in s.cluster_cidrs for target in _samples(network)]
    targets += [External(ip=net.network_address) for net, _ in s.apiserver if _inside(net, s)]
    reachable = [
        (str(target), port, protocol)
        for target in targets
        for port in SENSITIVE_PORTS
        for protocol in ("TCP", "UDP")
        if (target.ip, port) not in apiserver and s.cluster.allowed(s.proxy, target, port, protocol)
    ]
    # Pods are in the cluster ranges too: none is reachable but kube-dns on port 53.
    pods = (s.client, s.neighbour, s.opted_in, s.stranger, s.prometheus)
    reachable += [
        (str(p), port, "TCP")
        for p in pods
        for port in SENSITIVE_PORTS
        if s.cluster.allowed(s.proxy, p, port)
    ]
    if s.cluster.allowed(s.proxy, s.kube_dns, 9153):
        reachable.append((str(s.kube_dns), 9153, "TCP"))
    assert reachable == []


def test_the_proxy_reaches_the_api_server_on_its_ports_only(scenario: Scenario) -> None:
    s = scenario
    assert s.apiserver, "the outgate-proxy-apiserver policy names the API server"
    for network, ports in s.apiserver:
        target = External(ip=network.network_address)
        assert ports, "the API server rule names its ports"
        for port in ports:
            assert s.cluster.allowed(s.proxy, target, port)
        if _inside(network, s):  # (the base's placeholder is a TEST-NET address outside them)
            assert not s.cluster.allowed(s.proxy, target, 10250)
            assert not s.cluster.allowed(s.proxy, target, 2379)


def test_production_excepts_every_configured_cluster_range() -> None:
    # The config's guard.clusterCIDRs and the NetworkPolicy's excepts are two layers of the same
    # promise; an overlay that changes one must change the other.
    objects = kube.render("overlays/production")
    config = yaml.safe_load(kube.config_map_named(objects, "outgate-config")["data"]["config.yaml"])
    configured = [ipaddress.ip_network(c) for c in config["guard"]["clusterCIDRs"]]
    assert configured, "the production overlay sets guard.clusterCIDRs"
    policy = kube.one(objects, "NetworkPolicy", "outgate-proxy-internet")
    excepted = [
        ipaddress.ip_network(c)
        for rule in policy["spec"]["egress"]
        for peer in rule["to"]
        for c in peer["ipBlock"].get("except", [])
    ]
    missing = [
        str(net)
        for net in configured
        if not any(net.version == ex.version and net.subnet_of(ex) for ex in excepted)  # type: ignore[arg-type]
    ]
    assert missing == []


# --- the evaluator itself ---------------------------------------------------------------------


def _policy(namespace: str, spec: dict[str, object]) -> kube.Obj:
    return {
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": namespace},
        "spec": spec,
    }


A = Pod(namespace="a", name="a", ip=ipaddress.ip_address("10.0.0.1"), labels={"app": "a"})
B = Pod(namespace="b", name="b", ip=ipaddress.ip_address("10.0.0.2"), labels={"app": "b"})
OUT = External(ip=ipaddress.ip_address("203.0.113.9"))


@pytest.mark.parametrize(
    ("spec", "target", "port", "expected"),
    [
        ({"podSelector": {}, "policyTypes": ["Ingress"]}, OUT, 80, True),  # egress not isolated
        ({"podSelector": {}, "policyTypes": ["Egress"]}, OUT, 80, False),  # isolated, no rule
        (
            {"podSelector": {"matchLabels": {"app": "x"}}, "egress": []},
            OUT,
            80,
            True,
        ),  # not selected
        ({"podSelector": {}, "egress": [{}]}, OUT, 80, True),  # empty rule: anything
        (
            {
                "podSelector": {},
                "egress": [
                    {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["203.0.113.0/24"]}}]}
                ],
            },
            OUT,
            80,
            False,
        ),
        (
            {"podSelector": {}, "egress": [{"ports": [{"port": 8000, "endPort": 8100}]}]},
            OUT,
            8080,
            True,
        ),
        (
            {"podSelector": {}, "egress": [{"ports": [{"port": 80, "protocol": "UDP"}]}]},
            OUT,
            80,
            False,
        ),
        (
            {"podSelector": {}, "egress": [{"to": [{"podSelector": {}}]}]},
            B,
            80,
            False,
        ),  # own ns only
        (
            {
                "podSelector": {},
                "egress": [
                    {
                        "to": [
                            {
                                "namespaceSelector": {
                                    "matchLabels": {"kubernetes.io/metadata.name": "b"}
                                }
                            }
                        ]
                    }
                ],
            },
            B,
            80,
            True,
        ),
        (
            {
                "podSelector": {},
                "egress": [
                    {
                        "to": [
                            {
                                "namespaceSelector": {},
                                "podSelector": {
                                    "matchExpressions": [
                                        {"key": "app", "operator": "NotIn", "values": ["b"]}
                                    ]
                                },
                            }
                        ]
                    }
                ],
            },
            B,
            80,
            False,
        ),
    ],
)
def test_the_evaluator_follows_networkpolicy_semantics(
    spec: dict[str, object], target: Pod | External, port: int, expected: bool
) -> None:
    cluster = Cluster({"a": {}, "b": {}}, [_policy("a", spec)])
    assert cluster.allowed(A, target, port) is expected


def test_the_evaluator_needs_the_destinations_ingress_too() -> None:
    deny_in = _policy("b", {"podSelector": {}, "policyTypes": ["Ingress"]})
    assert not Cluster({"a": {}, "b": {}}, [deny_in]).allowed(A, B, 80)
    assert Cluster({"a": {}, "b": {}}, []).allowed(A, B, 80)
