"""Read a hosts file (hosts(5): `address name [aliases...]`, `#` comments) into name -> addresses.

Names are normalised by `proxy.core.hosts.normalize_name`, the function that normalises rule
names and request hosts, so a hosts entry, a policy rule and a request always compare in one
form. Addresses are parsed strictly (canonical IPv4, IPv6 without a zone): a line the proxy
cannot read exactly is skipped and reported, never guessed. As in the resolver, IPv4 addresses
come first, then IPv6, each in file order, without duplicates.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxy.core.hosts import IPAddress, normalize_name, parse_ipv4_strict
from proxy.errors import BadRequest

# Bytes read from a hosts file. /etc/hosts is a few lines; block lists used as hosts files run
# to a few MB. Past this the file is refused as a whole (the last good table stays).
MAX_HOSTS_FILE_BYTES = 8 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class HostsTable:
    """Names -> addresses from one hosts file, and the lines that were skipped (1-based)."""

    names: dict[str, tuple[IPAddress, ...]]
    skipped: tuple[tuple[int, str], ...] = ()

    def lookup(self, name: str) -> tuple[IPAddress, ...] | None:
        return self.names.get(name)


EMPTY_HOSTS = HostsTable(names={})


def _address(text: str) -> IPAddress | None:
    if ":" in text:
        if "%" in text:
            return None  # a zone (fe80::1%eth0) names an interface, not a destination
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            return None
    try:
        return parse_ipv4_strict(text)
    except BadRequest:
        return None


def parse_hosts(text: str) -> HostsTable:
    """Every `address name...` line; lines that do not read cleanly are listed in `skipped`."""
    found: dict[str, list[IPAddress]] = {}
    skipped: list[tuple[int, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.partition("#")[0].split()
        if not fields:
            continue
        address = _address(fields[0])
        if address is None:
            skipped.append((number, f"{fields[0][:60]!r} is not an IP address"))
            continue
        if len(fields) < 2:
            skipped.append((number, "an address without a name"))
            continue
        for alias in fields[1:]:
            try:
                name = normalize_name(alias)
            except BadRequest as exc:
                skipped.append((number, f"{alias[:60]!r}: {exc.message}"))
                continue
            addresses = found.setdefault(name, [])
            if address not in addresses:
                addresses.append(address)
    names = {
        name: tuple(sorted(addresses, key=lambda ip: ip.version))  # stable: file order kept
        for name, addresses in found.items()
    }
    return HostsTable(names=names, skipped=tuple(skipped))
