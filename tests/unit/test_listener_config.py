"""The listener settings of issue 14 (proxyProtocol, auth.basic, dns.hostsFile): defaults, and
every mistake reported with its field path and fix."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from proxy.config import DEFAULT_HOSTS_FILE, Settings, settings_from_mapping
from proxy.core.basic_auth import PasswordFileError, parse_basic_credentials, parse_password_file
from proxy.errors import ConfigError

BASE = Path("/etc/outgate")
VM = {"name": "build-vm", "namespace": "ci", "cidrs": []}
LAPTOPS = {"name": "laptops", "namespace": "dev", "cidrs": ["10.9.0.0/16"]}
AUTH = {
    "file": "htpasswd",
    "sources": ["10.8.0.0/16"],
    "users": {"alice": {"identity": "build-vm"}},
}


def load(raw: dict[str, Any]) -> Settings:
    return settings_from_mapping(raw, file="outgate.yaml", base_dir=BASE)


def issues(raw: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        load(raw)
    return [(issue.path, f"{issue.message} -- {issue.fix}") for issue in caught.value.issues]


def test_defaults_trust_no_balancer_authenticate_no_one_and_read_etc_hosts() -> None:
    settings = load({})
    assert settings.proxy_protocol_trusted_cidrs == ()
    assert settings.auth_basic is None
    assert settings.dns_hosts_file == DEFAULT_HOSTS_FILE


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("", None), ("hosts", "/etc/outgate/hosts")]
)
def test_hosts_file_may_be_turned_off_or_moved(value: str | None, expected: str | None) -> None:
    assert load({"dns": {"hostsFile": value}}).dns_hosts_file == expected


def test_auth_maps_users_to_static_identities_by_name_or_namespace_and_name() -> None:
    settings = load(
        {
            "identity": {"static": [VM, LAPTOPS]},
            "auth": {
                "basic": {
                    **AUTH,
                    "users": {
                        "alice": {"identity": "build-vm"},
                        "bob": {"identity": "dev/laptops"},
                    },
                }
            },
            "proxyProtocol": {"trustedCIDRs": ["10.0.0.0/24"]},
        }
    )
    basic = settings.auth_basic
    assert basic is not None
    assert basic.file == BASE / "htpasswd"
    assert basic.realm == "outgate"
    assert basic.sources == (ipaddress.ip_network("10.8.0.0/16"),)
    assert {user: identity.name for user, identity in basic.users.items()} == {
        "alice": "build-vm",
        "bob": "laptops",
    }
    assert settings.proxy_protocol_trusted_cidrs == (ipaddress.ip_network("10.0.0.0/24"),)


@pytest.mark.parametrize(
    ("raw", "path", "words"),
    [
        ({"proxyProtocol": {"trustedCIDR": []}}, "proxyProtocol.trustedCIDR", "trustedCIDRs"),
        (
            {"proxyProtocol": {"trustedCIDRs": ["10.0.0.1/8"]}},
            "proxyProtocol.trustedCIDRs",
            "host bits",
        ),
        ({"auth": {"basic": {**AUTH, "realms": "x"}}}, "auth.basic.realms", "realm"),
        ({"auth": {"basic": {**AUTH, "realm": 'say "hi"'}}}, "auth.basic.realm", "printable"),
        ({"auth": {"basic": {**AUTH, "file": None}}}, "auth.basic.file", "htpasswd -B"),
        ({"auth": {"basic": {**AUTH, "sources": []}}}, "auth.basic.sources", "never used"),
        (
            {"auth": {"basic": {**AUTH, "users": {"alice": {"identity": "nobody"}}}}},
            "auth.basic.users.alice.identity",
            "ci/build-vm",
        ),
        (
            {"auth": {"basic": {**AUTH, "users": {"alice": "build-vm"}}}},
            "auth.basic.users.alice",
            "{identity: build-vm}",
        ),
        (
            {"auth": {"basic": {**AUTH, "users": {}}}},
            "identity.static[0].cidrs",
            "no auth.basic user",
        ),
        ({"dns": {"hostsFile": 7}}, "dns.hostsFile", "null for DNS only"),
    ],
)
def test_mistakes_name_the_field_and_the_fix(raw: dict[str, Any], path: str, words: str) -> None:
    found = issues({"identity": {"static": [VM]}, **raw})
    assert any(where == path and words in text for where, text in found), found


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Basic YWxpY2U6c2VjcmV0", ("alice", "secret")),
        ("basic   YWxpY2U6c2VjcmV0  ", ("alice", "secret")),
        ("Basic YWxpY2U6OnM6Og==", ("alice", ":s::")),  # colons after the first are the password's
        ("Basic w6lsaXNlOnDDpHNz", ("élise", "päss")),  # UTF-8 (RFC 7617 charset)
        ("Basic 6Wxpc2U6cA==", ("élise", "p")),  # Latin-1 from older clients
        (None, None),
        ("Bearer YWxpY2U6c2VjcmV0", None),
        ("Basic", None),
        ("Basic YWxpY2U=", None),  # no colon
        ("Basic OnNlY3JldA==", None),  # empty user
        ("Basic YWxpY2U6c2VjcmV0!", None),
        ("Basic YQphOmI=", None),  # control character in the user
        ("Basic " + "A" * 2000, None),
    ],
)
def test_basic_credentials_are_read_strictly(
    value: str | None, expected: tuple[str, str] | None
) -> None:
    assert parse_basic_credentials(value) == expected


BCRYPT = "$2y$10$" + "a" * 53


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("alice:$apr1$salt$hash\n", "MD5"),
        ("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "only bcrypt"),
        ("alice:plain\n", "only bcrypt"),
        (f"alice:{BCRYPT}\nalice:{BCRYPT}\n", "twice"),
        ("just-a-name\n", "user:hash"),
        (f"alice:{BCRYPT[:-1]}\n", "only bcrypt"),
    ],
)
def test_password_files_with_weak_or_broken_lines_are_refused_whole(text: str, words: str) -> None:
    with pytest.raises(PasswordFileError, match=words):
        parse_password_file(f"# ok\nbob:{BCRYPT.replace('$2y$', '$2b$')}\n{text}")


def test_a_password_file_of_bcrypt_lines_loads() -> None:
    table = parse_password_file(f"\n# comment\nalice:{BCRYPT}\nbob:{BCRYPT.replace('y', 'a', 1)}\n")
    assert set(table.hashes) == {"alice", "bob"}
    assert table.hash_of("carol") is None
