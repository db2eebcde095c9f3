"""Address guard (DESIGN section 4): classify an IP into the classes a proxy must not dial.

An egress proxy runs inside the network it guards, so a client that can name a destination can
otherwise reach the node's metadata service, the cluster's pods and services, and the proxy
itself. `AddressGuard.check` is asked about every literal or resolved address before a dial:
None means the address may be dialled; anything else names the class that refused it.

Rules, in the order they are applied:

1. PROXY_SELF: the destination is one of the proxy's own listeners (directly, or through a
   wildcard listener reached on a loopback, unspecified or local address). Always refused:
   no rule may point the proxy at itself, because a request to itself loops or reaches the
   admin listener with the proxy's own identity.
2. Any other class (table below, plus the configured cluster CIDRs) is refused unless a network
   in the deciding rule's `allowed_cidrs` or the global `unsafe_allow_cidrs` contains the
   address (for an IPv6 form that embeds IPv4, containing the embedded IPv4 also counts).
3. Everything else is public unicast and passes.

IPv6 forms that carry an IPv4 address (mapped, compatible, SIIT, NAT64, 6to4, Teredo) are judged
by the embedded IPv4: `::ffff:169.254.169.254` and `64:ff9b::a9fe:a9fe` are metadata, not
"some IPv6 address". That is how IPv4 guards are bypassed through a dual-stack socket or a
NAT64 gateway.

Classification is on the hot path (every resolved address of every request), so the tables are
painted at construction into sorted, disjoint integer intervals and looked up with `bisect`.
This module is pure (no asyncio, socket, ssl or aiohttp): integers, `ipaddress` and `bisect`.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any

from proxy.core.hosts import IPAddress, unmap_ipv4

IPNetwork = IPv4Network | IPv6Network


class AddressClass(StrEnum):
    """Why an address is guarded. Values are stable: they are metric labels and audit values."""

    LOOPBACK = "loopback"
    UNSPECIFIED = "unspecified"
    PRIVATE = "private"  # RFC 1918
    LINK_LOCAL = "link_local"
    METADATA = "metadata"  # cloud instance metadata / credential endpoints
    CGNAT = "cgnat"  # RFC 6598 shared address space
    ULA = "ula"  # RFC 4193 unique local IPv6
    MULTICAST = "multicast"
    BROADCAST = "broadcast"
    RESERVED = "reserved"  # the rest of the IANA special-purpose registries
    CLUSTER = "cluster"  # configured pod / service / node CIDRs
    PROXY_SELF = "proxy_self"


_C = AddressClass

# Cloud endpoints that hand out instance or workload credentials. They sit inside ranges that
# are guarded anyway (link-local, CGNAT, ULA), except Azure's WireServer; naming them lets the
# audit record and `outgate_guard_refusals_total{address_class="metadata"}` show an SSRF
# attempt for what it is.
_METADATA_V4 = (
    "169.254.169.254/32",  # AWS, GCP, Azure, OCI, OpenStack, DigitalOcean IMDS
    "169.254.170.2/32",  # AWS ECS task metadata and task-role credentials
    "169.254.170.23/32",  # AWS EKS Pod Identity agent (pod credentials)
    "100.100.100.200/32",  # Alibaba Cloud ECS metadata (inside CGNAT 100.64/10)
    # Azure WireServer: a public address answered by the host on every Azure VM. Pods on AKS
    # could read node bootstrap credentials from it (Mandiant, "WireServing Up Credentials",
    # 2024). Nothing a workload legitimately dials through an egress proxy.
    "168.63.129.16/32",
)
# Deliberately NOT metadata: 169.254.169.253 (AWS VPC DNS resolver) and 169.254.169.123 (Amazon
# Time Sync) serve no credentials; they stay LINK_LOCAL and are refused as such.
_METADATA_V6 = (
    "fd00:ec2::254/128",  # AWS IMDS over IPv6
    "fd00:ec2::23/128",  # AWS EKS Pod Identity agent over IPv6
    "fd20:ce::254/128",  # GCP metadata server over IPv6
)

# Precedence: earlier entries win where ranges overlap (a /32 metadata address is not reported
# as link-local; 255.255.255.255 is broadcast, not 240/4). Configured cluster CIDRs are painted
# between the narrow built-in classes and the broad ones, so a pod in 10.0.0.0/8 reads "cluster"
# while the node's loopback and metadata keep their own class.
_HEAD_V4: tuple[tuple[AddressClass, tuple[str, ...]], ...] = (
    (_C.METADATA, _METADATA_V4),
    (_C.UNSPECIFIED, ("0.0.0.0/32",)),  # RFC 1122 3.2.1.3
    (_C.BROADCAST, ("255.255.255.255/32",)),  # RFC 919 limited broadcast
    (_C.LOOPBACK, ("127.0.0.0/8",)),  # RFC 1122
    (_C.LINK_LOCAL, ("169.254.0.0/16",)),  # RFC 3927
    (_C.MULTICAST, ("224.0.0.0/4",)),  # RFC 5771
)
_TAIL_V4: tuple[tuple[AddressClass, tuple[str, ...]], ...] = (
    (_C.PRIVATE, ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),  # RFC 1918
    (_C.CGNAT, ("100.64.0.0/10",)),  # RFC 6598
    (
        _C.RESERVED,
        (
            "0.0.0.0/8",  # RFC 791 "this network"
            "192.0.0.0/24",  # RFC 6890 IETF protocol assignments (DS-Lite, PCP/TURN anycast...)
            "192.0.2.0/24",  # RFC 5737 TEST-NET-1
            "192.88.99.0/24",  # RFC 7526 deprecated 6to4 relay anycast
            "198.18.0.0/15",  # RFC 2544 benchmarking
            "198.51.100.0/24",  # RFC 5737 TEST-NET-2
            "203.0.113.0/24",  # RFC 5737 TEST-NET-3
            "240.0.0.0/4",  # RFC 1112 reserved for future use
        ),
    ),
)
# Globally reachable entries of the IANA registry (AS112 192.31.196/24, 192.175.48/24, AMT
# 192.52.193/24) are public unicast and pass.

_HEAD_V6: tuple[tuple[AddressClass, tuple[str, ...]], ...] = (
    (_C.METADATA, _METADATA_V6),
    (_C.UNSPECIFIED, ("::/128",)),  # RFC 4291 2.5.2
    (_C.LOOPBACK, ("::1/128",)),  # RFC 4291 2.5.3
    (_C.LINK_LOCAL, ("fe80::/10",)),  # RFC 4291 2.5.6
    (_C.MULTICAST, ("ff00::/8",)),  # RFC 4291 2.7
)
_TAIL_V6: tuple[tuple[AddressClass, tuple[str, ...]], ...] = (
    (_C.ULA, ("fc00::/7",)),  # RFC 4193
    (
        _C.RESERVED,
        (
            "100::/64",  # RFC 6666 discard-only
            "100:0:0:1::/64",  # RFC 9780 dummy IPv6 prefix
            # RFC 2928 IETF protocol assignments. Teredo 2001::/32 inside it never reaches this
            # table: it is judged by its embedded IPv4 client address.
            "2001::/23",
            "2001:db8::/32",  # RFC 3849 documentation
            "3fff::/20",  # RFC 9637 documentation
            "5f00::/16",  # RFC 9602 SRv6 SIDs
            "fec0::/10",  # RFC 3879 deprecated site-local
            # Everything outside global unicast 2000::/3 that no entry above names is unassigned
            # ("reserved by IETF"); nothing legitimate is reachable there.
            "::/3",
            "4000::/2",
            "8000::/1",
        ),
    ),
)

# Embedding prefixes as integers (the address shifted right so only the prefix remains).
_V4_MAPPED_HI96 = 0xFFFF  # ::ffff:0:0/96, RFC 4291 2.5.5.2
_V4_TRANSLATED_HI96 = 0xFFFF_0000  # ::ffff:0:0:0/96, RFC 2765 SIIT
_NAT64_WKP_HI96 = 0x0064_FF9B << 64  # 64:ff9b::/96, RFC 6052
_NAT64_LOCAL_HI48 = 0x0064_FF9B_0001  # 64:ff9b:1::/48, RFC 8215
_SIXTOFOUR_HI16 = 0x2002  # 2002::/16, RFC 3056
_TEREDO_HI32 = 0x2001_0000  # 2001::/32, RFC 4380
_LOW32 = 0xFFFF_FFFF


def _embedded_int(n: int) -> int | None:
    """The IPv4 address (as an int) that the IPv6 address `n` carries, or None."""
    hi96 = n >> 32
    if hi96 in (_V4_MAPPED_HI96, _V4_TRANSLATED_HI96, _NAT64_WKP_HI96):
        return n & _LOW32
    if hi96 == 0:
        # IPv4-compatible ::a.b.c.d (RFC 4291 2.5.5.1, deprecated); :: and ::1 are not IPv4.
        return n if n > 1 else None
    if n >> 80 == _NAT64_LOCAL_HI48:
        # RFC 8215 allows any RFC 6052 prefix length >= /48 here; without knowing the local
        # translator's, we read the /96 layout (low 32 bits), the common deployment.
        return n & _LOW32
    if n >> 112 == _SIXTOFOUR_HI16:
        return (n >> 80) & _LOW32
    if n >> 96 == _TEREDO_HI32:
        # RFC 4380 4: the client's public IPv4 is stored with every bit inverted.
        return ~n & _LOW32
    return None


def embedded_ipv4(ip: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, SIIT, NAT64, 6to4, Teredo)."""
    v4 = _embedded_int(int(ip))
    return IPv4Address(v4) if v4 is not None else None


class _Table:
    """Disjoint sorted intervals [start, end] -> class; earlier ranges win where they overlap."""

    __slots__ = ("_classes", "_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[AddressClass, Iterable[IPNetwork]]]) -> None:
        painted: list[tuple[int, int, AddressClass]] = []
        for cls, networks in ranges:
            for net in networks:
                pieces = [(int(net.network_address), int(net.broadcast_address))]
                for lo, hi, _ in painted:
                    uncovered: list[tuple[int, int]] = []
                    for p_lo, p_hi in pieces:
                        if hi < p_lo or lo > p_hi:
                            uncovered.append((p_lo, p_hi))
                            continue
                        if p_lo < lo:
                            uncovered.append((p_lo, lo - 1))
                        if p_hi > hi:
                            uncovered.append((hi + 1, p_hi))
                    pieces = uncovered
                painted.extend((p_lo, p_hi, cls) for p_lo, p_hi in pieces)
        painted.sort()
        self._starts = [lo for lo, _, _ in painted]
        self._ends = [hi for _, hi, _ in painted]
        self._classes = [cls for _, _, cls in painted]

    def lookup(self, n: int) -> AddressClass | None:
        i = bisect_right(self._starts, n) - 1
        if i >= 0 and n <= self._ends[i]:
            return self._classes[i]
        return None


_LOOPBACK_V4: IPAddress = IPv4Address("127.0.0.1")
_LOOPBACK_V6: IPAddress = IPv6Address("::1")


def _nets(texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ip_network(text) for text in texts)


def _contains(networks: Iterable[IPNetwork], ip: IPAddress, embedded: IPv4Address | None) -> bool:
    # `in` across families is simply False in `ipaddress`, so one loop serves both.
    return any(ip in net or (embedded is not None and embedded in net) for net in networks)


class AddressGuard:
    """Decides whether the proxy may dial an address. Immutable after construction.

    `cluster_cidrs` are refused like the built-in classes (class CLUSTER). `unsafe_allow_cidrs`
    is the operator's global exception (it never covers PROXY_SELF). `self_endpoints` are the
    proxy's listeners as bound, wildcard (0.0.0.0 / ::) included; `local_addresses` are this
    host's interface addresses, through which a wildcard listener is also reachable.
    """

    __slots__ = (
        "_blocks",
        "_cluster_v6",
        "_local",
        "_self_exact",
        "_self_ports",
        "_table_v4",
        "_table_v6",
        "_unsafe_allow",
        "_wildcard_ports_any",
        "_wildcard_ports_v4",
    )

    _table_v4: _Table
    _table_v6: _Table
    _cluster_v6: _Table
    _unsafe_allow: tuple[IPNetwork, ...]
    _blocks: tuple[tuple[IPNetwork, AddressClass], ...]
    _self_exact: frozenset[tuple[IPAddress, int]]
    _self_ports: frozenset[int]
    _wildcard_ports_v4: frozenset[int]
    _wildcard_ports_any: frozenset[int]
    _local: frozenset[IPAddress]

    def __init__(
        self,
        *,
        cluster_cidrs: Sequence[IPNetwork] = (),
        unsafe_allow_cidrs: Sequence[IPNetwork] = (),
        self_endpoints: Sequence[tuple[IPAddress, int]] = (),
        local_addresses: Sequence[IPAddress] = (),
    ) -> None:
        cluster_v4 = tuple(net for net in cluster_cidrs if isinstance(net, IPv4Network))
        cluster_v6 = tuple(net for net in cluster_cidrs if isinstance(net, IPv6Network))
        set_ = object.__setattr__
        set_(
            self,
            "_table_v4",
            _Table(
                [(cls, _nets(texts)) for cls, texts in _HEAD_V4]
                + [(_C.CLUSTER, cluster_v4)]
                + [(cls, _nets(texts)) for cls, texts in _TAIL_V4]
            ),
        )
        set_(
            self,
            "_table_v6",
            _Table(
                [(cls, _nets(texts)) for cls, texts in _HEAD_V6]
                + [(_C.CLUSTER, cluster_v6)]
                + [(cls, _nets(texts)) for cls, texts in _TAIL_V6]
            ),
        )
        # An embedding form whose IPv4 is public is still checked against IPv6 cluster CIDRs
        # (a cluster could number services inside 64:ff9b::/96; unusual, but configured).
        set_(self, "_cluster_v6", _Table([(_C.CLUSTER, cluster_v6)]))
        set_(self, "_unsafe_allow", tuple(unsafe_allow_cidrs))
        set_(
            self,
            "_blocks",
            tuple(
                (network, cls)
                for cls, networks in [
                    *((c, _nets(t)) for c, t in (*_HEAD_V4, *_TAIL_V4, *_HEAD_V6, *_TAIL_V6)),
                    (_C.CLUSTER, tuple(cluster_cidrs)),
                ]
                for network in networks
            ),
        )

        exact: set[tuple[IPAddress, int]] = set()
        wildcard_v4: set[int] = set()
        wildcard_any: set[int] = set()
        for address, port in self_endpoints:
            address = unmap_ipv4(address)
            if isinstance(address, IPv4Address) and address.is_unspecified:
                wildcard_v4.add(port)
            elif address.is_unspecified:
                # A `::` listener is dual-stack unless IPV6_V6ONLY is set, which the guard cannot
                # see: assume it also accepts IPv4 (refusing too much here is the safe error).
                wildcard_any.add(port)
            else:
                exact.add((address, port))
        set_(self, "_self_exact", frozenset(exact))
        # Most dials go to 80/443, never a proxy port: one set lookup skips the self check.
        set_(self, "_self_ports", frozenset(port for _, port in self_endpoints))
        set_(self, "_wildcard_ports_v4", frozenset(wildcard_v4))
        set_(self, "_wildcard_ports_any", frozenset(wildcard_any))
        set_(self, "_local", frozenset(unmap_ipv4(address) for address in local_addresses))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def classify(self, ip: IPAddress) -> AddressClass | None:
        """The guarded class of `ip`, or None for public unicast. PROXY_SELF needs a port: see
        `check`."""
        n = int(ip)
        if isinstance(ip, IPv4Address):
            return self._table_v4.lookup(n)
        v4 = _embedded_int(n)
        if v4 is None:
            return self._table_v6.lookup(n)
        return self._table_v4.lookup(v4) or self._cluster_v6.lookup(n)

    def check(
        self, ip: IPAddress, port: int, *, allowed_cidrs: Sequence[IPNetwork] = ()
    ) -> AddressClass | None:
        """None if the proxy may dial (ip, port); otherwise the class that refuses it.

        `allowed_cidrs` are the `cidr` destinations of the rule that allowed the request.
        """
        if port in self._self_ports:
            embedded = embedded_ipv4(ip) if isinstance(ip, IPv6Address) else None
            if self._is_self(ip, port) or (embedded is not None and self._is_self(embedded, port)):
                return _C.PROXY_SELF
        cls = self.classify(ip)
        if cls is None or not (allowed_cidrs or self._unsafe_allow):
            return cls
        embedded = embedded_ipv4(ip) if isinstance(ip, IPv6Address) else None
        if self._exempted(allowed_cidrs, cls, ip, embedded) or _contains(
            self._unsafe_allow, ip, embedded
        ):
            return None
        return cls

    def _exempted(
        self,
        allowed_cidrs: Sequence[IPNetwork],
        cls: AddressClass,
        ip: IPAddress,
        embedded: IPv4Address | None,
    ) -> bool:
        """A rule's cidr lifts the guard only when it lies inside the guarded block it opens.

        So `cidr: 10.20.0.0/16` opens that part of RFC 1918 and `cidr: 169.254.169.254/32`
        opens the metadata address, but a broad `cidr: 0.0.0.0/0` ("any address") opens no
        guarded block, and `cidr: 10.0.0.0/8` does not open a cluster range (10.96.0.0/12)
        inside it: guarded space is reached only by naming it.
        """
        for target in (ip, embedded):
            if target is None:
                continue
            blocks = [net for net, c in self._blocks if c is cls and target in net]
            for cidr in allowed_cidrs:
                if target in cidr and any(cidr.subnet_of(block) for block in blocks):  # type: ignore[arg-type]
                    return True
        return False

    def _is_self(self, ip: IPAddress, port: int) -> bool:
        if (ip, port) in self._self_exact:
            return True
        if ip.is_unspecified:
            # Linux connects a socket aimed at 0.0.0.0 / :: to the loopback address.
            loopback = _LOOPBACK_V4 if isinstance(ip, IPv4Address) else _LOOPBACK_V6
            if (loopback, port) in self._self_exact:
                return True
        wildcard = port in self._wildcard_ports_any or (
            isinstance(ip, IPv4Address) and port in self._wildcard_ports_v4
        )
        return wildcard and (ip.is_loopback or ip.is_unspecified or ip in self._local)
