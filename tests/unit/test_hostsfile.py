"""Hosts file parsing (proxy.core.hostsfile): text in, names -> addresses and skipped lines out."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.core.hostsfile import parse_hosts

HOSTS = """\
# /etc/hosts as a pod with hostAliases has it
127.0.0.1\tlocalhost
::1 localhost ip6-localhost
10.20.0.5   Legacy-DB.corp.example. legacy-db   # trailing comment
10.20.0.6 legacy-db
2001:db8::6 legacy-db
10.20.0.5 legacy-db
"""


@pytest.mark.parametrize(
    ("name", "addresses"),
    [
        ("localhost", ["127.0.0.1", "::1"]),
        ("ip6-localhost", ["::1"]),
        # Normalised like rules and requests: lowercase, no trailing dot.
        ("legacy-db.corp.example", ["10.20.0.5"]),
        # Several lines: IPv4 first, then IPv6, file order within a family, no duplicates.
        ("legacy-db", ["10.20.0.5", "10.20.0.6", "2001:db8::6"]),
        ("not-listed", None),
        ("Legacy-DB.corp.example.", None),  # lookups take normalised names
    ],
)
def test_names_map_to_their_addresses(name: str, addresses: list[str] | None) -> None:
    found = parse_hosts(HOSTS).lookup(name)
    expected = None if addresses is None else tuple(ipaddress.ip_address(a) for a in addresses)
    assert found == expected


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("0177.0.0.1 octal.example", "not an IP address"),
        ("127.1 short.example", "not an IP address"),
        ("fe80::1%eth0 zoned.example", "not an IP address"),
        ("example.com 10.0.0.1", "not an IP address"),
        ("10.0.0.1", "without a name"),
        ("10.0.0.1 bad%name.example", "bad%name.example"),
    ],
)
def test_lines_that_do_not_read_exactly_are_skipped_and_reported(line: str, why: str) -> None:
    table = parse_hosts(f"10.0.0.9 good.example\n{line}\n")
    assert table.lookup("good.example") == (ipaddress.ip_address("10.0.0.9"),)
    assert len(table.skipped) == 1
    number, message = table.skipped[0]
    assert number == 2 and why in message
    assert set(table.names) == {"good.example"}
