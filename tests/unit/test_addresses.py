"""Address guard tables: every class in both families, every IPv6 form that embeds IPv4,
cluster CIDRs, the proxy's own listeners, and the exceptions a rule or the operator grants."""

from __future__ import annotations

import ast
import ipaddress
from pathlib import Path

import pytest

from proxy.core.addresses import AddressClass, AddressGuard, embedded_ipv4

C = AddressClass
ip = ipaddress.ip_address
net = ipaddress.ip_network

PLAIN = AddressGuard()


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # loopback
        ("127.0.0.1", C.LOOPBACK),
        ("127.255.255.254", C.LOOPBACK),
        ("::1", C.LOOPBACK),
        # unspecified
        ("0.0.0.0", C.UNSPECIFIED),
        ("::", C.UNSPECIFIED),
        # RFC 1918
        ("10.0.0.1", C.PRIVATE),
        ("172.16.0.1", C.PRIVATE),
        ("172.31.255.255", C.PRIVATE),
        ("192.168.1.1", C.PRIVATE),
        # link-local
        ("169.254.1.1", C.LINK_LOCAL),
        ("169.254.169.253", C.LINK_LOCAL),  # AWS VPC DNS: link-local, deliberately not metadata
        ("fe80::1", C.LINK_LOCAL),
        ("febf:ffff::1", C.LINK_LOCAL),
        # cloud metadata and credential endpoints
        ("169.254.169.254", C.METADATA),
        ("169.254.170.2", C.METADATA),
        ("169.254.170.23", C.METADATA),
        ("100.100.100.200", C.METADATA),
        ("168.63.129.16", C.METADATA),
        ("fd00:ec2::254", C.METADATA),
        ("fd00:ec2::23", C.METADATA),
        ("fd20:ce::254", C.METADATA),
        # CGNAT
        ("100.64.0.1", C.CGNAT),
        ("100.127.255.254", C.CGNAT),
        # ULA
        ("fc00::1", C.ULA),
        ("fd12:3456::1", C.ULA),
        ("fd00:ec2::255", C.ULA),
        # multicast and broadcast
        ("224.0.0.1", C.MULTICAST),
        ("239.255.255.250", C.MULTICAST),
        ("ff02::1", C.MULTICAST),
        ("ff0e::1", C.MULTICAST),
        ("255.255.255.255", C.BROADCAST),
        # IANA special-purpose and unassigned space
        ("0.1.2.3", C.RESERVED),
        ("192.0.0.8", C.RESERVED),
        ("192.0.2.1", C.RESERVED),
        ("192.88.99.1", C.RESERVED),
        ("198.18.0.1", C.RESERVED),
        ("198.19.255.255", C.RESERVED),
        ("198.51.100.1", C.RESERVED),
        ("203.0.113.1", C.RESERVED),
        ("240.0.0.1", C.RESERVED),
        ("255.255.255.254", C.RESERVED),
        ("100::1", C.RESERVED),
        ("2001:2::1", C.RESERVED),
        ("2001:10::1", C.RESERVED),
        ("2001:db8::1", C.RESERVED),
        ("3fff::1", C.RESERVED),
        ("fec0::1", C.RESERVED),
        ("5f00::1", C.RESERVED),
        ("4000::1", C.RESERVED),
        ("fe00::1", C.RESERVED),
    ],
)
def test_builtin_classes_cover_both_families(address: str, expected: AddressClass) -> None:
    assert PLAIN.classify(ip(address)) is expected
    assert PLAIN.check(ip(address), 443) is expected


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.215.14",
        "100.63.255.255",  # just below CGNAT
        "100.128.0.0",  # just above CGNAT
        "172.15.255.255",  # just below 172.16/12
        "172.32.0.0",  # just above
        "169.253.255.255",
        "192.31.196.1",  # AS112: globally reachable special-purpose block
        "223.255.255.255",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "2a00:1450:4001:80b::200e",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8: how an IPv6-only cluster reaches the internet
    ],
)
def test_public_unicast_passes(address: str) -> None:
    assert PLAIN.classify(ip(address)) is None
    assert PLAIN.check(ip(address), 443) is None


# Every IPv6 form that carries an IPv4 address, for a metadata, a private and a loopback target.
EMBEDDINGS = {
    "mapped": lambda v4: f"::ffff:{v4}",
    "translated (SIIT)": lambda v4: f"::ffff:0:{v4}",
    "compatible": lambda v4: f"::{v4}",
    "nat64": lambda v4: f"64:ff9b::{v4}",
    "nat64 local-use": lambda v4: f"64:ff9b:1::{v4}",
    "6to4": lambda v4: str(
        ipaddress.IPv6Address((0x2002 << 112) | (int(ipaddress.IPv4Address(v4)) << 80) | 1)
    ),
    "teredo": lambda v4: str(
        ipaddress.IPv6Address(
            (0x2001_0000 << 96)
            | (int(ipaddress.IPv4Address("65.54.227.120")) << 64)  # Teredo server
            | (0x8000 << 48)
            | (0xABCD << 32)
            | (~int(ipaddress.IPv4Address(v4)) & 0xFFFF_FFFF)
        )
    ),
}
TARGETS = [
    ("169.254.169.254", C.METADATA),
    ("10.0.0.1", C.PRIVATE),
    ("127.0.0.1", C.LOOPBACK),
    ("100.64.1.1", C.CGNAT),
    ("0.0.0.0", C.UNSPECIFIED),
]


@pytest.mark.parametrize(
    ("form", "v4", "expected"),
    [
        (form, v4, expected)
        for form in sorted(EMBEDDINGS)
        for v4, expected in TARGETS
        # ::0.0.0.0 is ::, the IPv6 unspecified address, not an embedding.
        if not (form == "compatible" and v4 == "0.0.0.0")
    ],
)
def test_ipv6_forms_embedding_ipv4_are_judged_by_the_ipv4(
    form: str, v4: str, expected: AddressClass
) -> None:
    v6 = ipaddress.IPv6Address(EMBEDDINGS[form](v4))
    assert embedded_ipv4(v6) == ipaddress.IPv4Address(v4)
    assert PLAIN.classify(v6) is expected
    assert PLAIN.check(v6, 443) is expected


@pytest.mark.parametrize("form", sorted(EMBEDDINGS))
def test_ipv6_forms_embedding_a_public_ipv4_pass(form: str) -> None:
    v6 = ipaddress.IPv6Address(EMBEDDINGS[form]("8.8.8.8"))
    assert PLAIN.check(v6, 443) is None


@pytest.mark.parametrize(
    "address",
    ["::", "::1", "2606:4700::1111", "fe80::1", "2003::1", "fd00:ec2::254", "::fffe:a00:1"],
)
def test_addresses_without_an_embedded_ipv4_have_none(address: str) -> None:
    assert embedded_ipv4(ipaddress.IPv6Address(address)) is None


def test_teredo_client_address_is_the_inverted_low_32_bits() -> None:
    # RFC 4380 section 4 example: server 65.54.227.120, client 192.0.2.45.
    teredo = ipaddress.IPv6Address("2001:0:4136:e378:8000:63bf:3fff:fdd2")
    assert embedded_ipv4(teredo) == ipaddress.IPv4Address("192.0.2.45")
    assert PLAIN.classify(teredo) is C.RESERVED


CLUSTER = AddressGuard(
    cluster_cidrs=[net("10.96.0.0/12"), net("100.64.0.0/16"), net("fd10:96::/108")]
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.96.0.1", C.CLUSTER),
        ("10.111.255.255", C.CLUSTER),
        ("10.95.255.255", C.PRIVATE),  # outside the cluster range: still RFC 1918
        ("100.64.3.4", C.CLUSTER),  # cluster wins over CGNAT
        ("100.65.0.1", C.CGNAT),
        ("fd10:96::1", C.CLUSTER),
        ("fd10:97::1", C.ULA),
        ("::ffff:10.96.0.10", C.CLUSTER),
        ("64:ff9b::10.96.0.10", C.CLUSTER),
        ("127.0.0.1", C.LOOPBACK),  # narrow built-in classes keep their name
        ("8.8.8.8", None),
    ],
)
def test_cluster_cidrs_are_guarded(address: str, expected: AddressClass | None) -> None:
    assert CLUSTER.classify(ip(address)) is expected


def test_cluster_cidr_may_cover_public_space() -> None:
    guard = AddressGuard(cluster_cidrs=[net("203.0.112.0/24"), net("2a05:d000::/64")])
    assert guard.check(ip("203.0.112.7"), 443) is C.CLUSTER
    assert guard.check(ip("2a05:d000::7"), 443) is C.CLUSTER
    assert guard.check(ip("203.0.111.7"), 443) is None


def test_metadata_wins_over_a_cluster_cidr_that_covers_it() -> None:
    guard = AddressGuard(cluster_cidrs=[net("169.254.0.0/16")])
    assert guard.classify(ip("169.254.169.254")) is C.METADATA
    assert guard.classify(ip("169.254.1.1")) is C.LINK_LOCAL  # narrow built-ins come first


@pytest.mark.parametrize(
    ("address", "allowed", "expected"),
    [
        ("10.20.1.2", ["10.20.0.0/16"], None),
        ("10.21.1.2", ["10.20.0.0/16"], C.PRIVATE),
        ("169.254.169.254", ["169.254.169.254/32"], None),
        ("127.0.0.1", ["127.0.0.0/8"], None),
        ("10.96.0.1", ["10.96.0.0/12"], None),  # a rule may reach a cluster range it names
        ("fd12::1", ["fd12::/16"], None),
        ("fd12::1", ["10.0.0.0/8"], C.ULA),  # the other family never matches
        # For a form embedding IPv4, naming the IPv4 counts ...
        ("::ffff:10.20.1.2", ["10.20.0.0/16"], None),
        ("64:ff9b::10.20.1.2", ["10.20.0.0/16"], None),
        # ... but naming the whole IPv6 translation prefix opens no guarded block.
        ("64:ff9b::10.20.1.2", ["64:ff9b::/96"], C.PRIVATE),
        # A cidr opens guarded space only inside the guarded block it names:
        ("169.254.169.254", ["169.254.0.0/16"], C.METADATA),
        ("10.20.1.2", ["0.0.0.0/0"], C.PRIVATE),
        ("fd00:ec2::254", ["::/0"], C.METADATA),
        ("10.96.0.1", ["10.0.0.0/8"], C.CLUSTER),
        ("10.20.1.2", ["10.0.0.0/8"], None),
        ("::ffff:10.20.1.2", ["10.21.0.0/16"], C.PRIVATE),
        ("10.20.1.2", [], C.PRIVATE),
    ],
)
def test_allowed_cidrs_of_the_deciding_rule_lift_the_guard(
    address: str, allowed: list[str], expected: AddressClass | None
) -> None:
    guard = AddressGuard(cluster_cidrs=[net("10.96.0.0/12")])
    assert guard.check(ip(address), 5432, allowed_cidrs=[net(a) for a in allowed]) is expected


def test_unsafe_allow_cidrs_lift_the_guard_for_every_request() -> None:
    guard = AddressGuard(
        cluster_cidrs=[net("10.96.0.0/12")],
        unsafe_allow_cidrs=[net("10.96.5.0/24"), net("192.168.0.0/16")],
    )
    assert guard.check(ip("10.96.5.9"), 443) is None
    assert guard.check(ip("192.168.3.3"), 443) is None
    assert guard.check(ip("::ffff:192.168.3.3"), 443) is None
    assert guard.check(ip("10.96.6.9"), 443) is C.CLUSTER
    assert guard.classify(ip("192.168.3.3")) is C.PRIVATE  # classification is unchanged


SELF = AddressGuard(
    self_endpoints=[(ip("127.0.0.1"), 9090), (ip("10.1.2.3"), 8443), (ip("0.0.0.0"), 3128)],
    local_addresses=[ip("10.1.2.3"), ip("203.0.113.200"), ip("2001:db8::5")],
)


@pytest.mark.parametrize(
    ("address", "port", "expected"),
    [
        ("127.0.0.1", 9090, C.PROXY_SELF),  # admin listener
        ("::ffff:127.0.0.1", 9090, C.PROXY_SELF),  # its IPv4-mapped form
        ("0.0.0.0", 9090, C.PROXY_SELF),  # Linux sends 0.0.0.0 to loopback
        ("127.0.0.2", 9090, C.LOOPBACK),  # another loopback address: not that listener
        ("127.0.0.1", 9091, C.LOOPBACK),
        ("10.1.2.3", 8443, C.PROXY_SELF),  # specific listener on the pod address
        ("10.1.2.3", 8444, C.PRIVATE),
        # the wildcard listener on 3128 is reachable on loopback, unspecified and local addresses
        ("127.0.0.1", 3128, C.PROXY_SELF),
        ("127.9.9.9", 3128, C.PROXY_SELF),
        ("0.0.0.0", 3128, C.PROXY_SELF),
        ("10.1.2.3", 3128, C.PROXY_SELF),
        ("203.0.113.200", 3128, C.PROXY_SELF),  # a public local address too
        ("::ffff:10.1.2.3", 3128, C.PROXY_SELF),
        ("10.1.2.4", 3128, C.PRIVATE),  # some other host on the same port
        ("8.8.8.8", 3128, None),
        ("::1", 3128, C.LOOPBACK),  # an IPv4 wildcard does not listen on IPv6
    ],
)
def test_proxy_own_listeners_are_refused(
    address: str, port: int, expected: AddressClass | None
) -> None:
    assert SELF.check(ip(address), port) is expected


def test_ipv6_wildcard_listener_is_assumed_dual_stack() -> None:
    guard = AddressGuard(
        self_endpoints=[(ip("::"), 3128)], local_addresses=[ip("2001:db8::5"), ip("10.1.2.3")]
    )
    for address in ["::1", "::", "2001:db8::5", "127.0.0.1", "10.1.2.3", "::ffff:127.0.0.1"]:
        assert guard.check(ip(address), 3128) is C.PROXY_SELF, address
    assert guard.check(ip("2001:db8::6"), 3128) is C.RESERVED
    assert guard.check(ip("2606:4700::1111"), 3128) is None


def test_proxy_self_is_refused_even_when_allowed_cidrs_cover_it() -> None:
    guard = AddressGuard(
        self_endpoints=[(ip("127.0.0.1"), 9090), (ip("0.0.0.0"), 3128)],
        local_addresses=[ip("10.1.2.3")],
        unsafe_allow_cidrs=[net("0.0.0.0/0"), net("::/0")],
    )
    everything = [net("0.0.0.0/0"), net("::/0")]
    assert guard.check(ip("127.0.0.1"), 9090, allowed_cidrs=everything) is C.PROXY_SELF
    assert guard.check(ip("10.1.2.3"), 3128, allowed_cidrs=everything) is C.PROXY_SELF
    assert guard.check(ip("::ffff:127.0.0.1"), 3128, allowed_cidrs=everything) is C.PROXY_SELF
    assert guard.check(ip("127.0.0.1"), 9091, allowed_cidrs=everything) is None


def test_proxy_bound_to_a_public_address_is_still_self() -> None:
    guard = AddressGuard(self_endpoints=[(ip("198.51.99.10"), 3128)])
    assert guard.check(ip("198.51.99.10"), 3128) is C.PROXY_SELF
    assert guard.check(ip("198.51.99.10"), 443) is None


def test_guard_is_immutable() -> None:
    with pytest.raises(AttributeError):
        PLAIN._unsafe_allow = (net("0.0.0.0/0"),)


def test_address_classes_are_stable_metric_labels() -> None:
    assert {c.value for c in AddressClass} == {
        "loopback",
        "unspecified",
        "private",
        "link_local",
        "metadata",
        "cgnat",
        "ula",
        "multicast",
        "broadcast",
        "reserved",
        "cluster",
        "proxy_self",
    }


def test_guard_module_is_pure() -> None:
    source = Path(__file__).parents[2] / "proxy" / "core" / "addresses.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "ssl", "aiohttp", "selectors", "dns"}


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # Boundaries of every IPv4 table entry: the byte before, the first, the last, the next.
        ("9.255.255.255", None),
        ("10.0.0.0", C.PRIVATE),
        ("10.255.255.255", C.PRIVATE),
        ("11.0.0.0", None),
        ("126.255.255.255", None),
        ("128.0.0.0", None),
        ("192.167.255.255", None),
        ("192.169.0.0", None),
        ("198.17.255.255", None),
        ("198.20.0.0", None),
        ("223.255.255.255", None),
        ("224.0.0.0", C.MULTICAST),
        ("239.255.255.255", C.MULTICAST),
        ("240.0.0.0", C.RESERVED),
        ("1.0.0.0", None),
        ("0.255.255.255", C.RESERVED),
        ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", C.RESERVED),
        ("2000::", None),
        ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", C.RESERVED),
        ("2001:200::", None),
        ("3fff:fff:ffff::", C.RESERVED),
        ("3fff:1000::", None),
        ("3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
        ("4000::", C.RESERVED),
    ],
)
def test_range_boundaries(address: str, expected: AddressClass | None) -> None:
    assert PLAIN.classify(ip(address)) is expected
