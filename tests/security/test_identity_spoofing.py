"""Identity spoofing: a client claims another source address (10.9.9.9, a static identity with
wider rights) through headers or a PROXY protocol preamble. Identity comes only from the
socket peer; the claims change nothing and never reach the upstream."""

from __future__ import annotations

import json

import pytest

from tests.security.conftest import ADMIN_SOURCE, Range

CLAIMS = [
    ("x-forwarded-for", f"X-Forwarded-For: {ADMIN_SOURCE}"),
    ("x-forwarded-for-list", f"X-Forwarded-For: {ADMIN_SOURCE}, 127.0.0.1"),
    ("forwarded", f"Forwarded: for={ADMIN_SOURCE};proto=http"),
    ("forwarded-quoted-v6", 'Forwarded: for="[::ffff:10.9.9.9]"'),
    ("x-real-ip", f"X-Real-IP: {ADMIN_SOURCE}"),
    ("true-client-ip", f"True-Client-IP: {ADMIN_SOURCE}"),
    ("x-client-ip", f"X-Client-IP: {ADMIN_SOURCE}"),
    ("client-ip", f"Client-IP: {ADMIN_SOURCE}"),
    ("cf-connecting-ip", f"CF-Connecting-IP: {ADMIN_SOURCE}"),
    ("x-cluster-client-ip", f"X-Cluster-Client-IP: {ADMIN_SOURCE}"),
    ("x-originating-ip", f"X-Originating-IP: {ADMIN_SOURCE}"),
    ("x-forwarded-host", "X-Forwarded-Host: x.admin-only.test"),
]


@pytest.mark.parametrize("claim", [c for _, c in CLAIMS], ids=[i for i, _ in CLAIMS])
def test_a_claimed_source_header_does_not_change_the_identity(
    attack_range: Range, claim: str
) -> None:
    attack_range.dns.addresses("x.admin-only.test", "127.0.0.1")
    raw = (
        f"GET http://x.admin-only.test:{attack_range.origin.port}/hello HTTP/1.1\r\n"
        f"Host: x.admin-only.test\r\n{claim}\r\n\r\n"
    )
    attack = attack_range.send(raw.encode(), half_close=True)
    assert attack.status == 403  # the admin identity's rule would have allowed it
    assert attack.header("X-Outgate-Reason") == "namespace_isolation"
    decision = attack_range.decision(attack)
    assert decision["source"]["ip"] == "127.0.0.1"
    assert decision["kubernetes"]["namespace"] == "tests"
    assert attack_range.origin.seen == []
    assert attack_range.dns.queries == []


@pytest.mark.parametrize("claim", [c for _, c in CLAIMS], ids=[i for i, _ in CLAIMS])
def test_a_claimed_source_header_is_stripped_before_the_upstream(
    attack_range: Range, claim: str
) -> None:
    raw = (
        f"GET http://{attack_range.origin_authority}/headers HTTP/1.1\r\n"
        f"Host: {attack_range.origin_authority}\r\n{claim}\r\nConnection: close\r\n\r\n"
    )
    attack = attack_range.send(raw.encode(), half_close=True)
    assert attack.status == 200
    seen = {name.lower() for name, _ in json.loads(attack.data.split(b"\r\n\r\n", 1)[1])}
    assert claim.split(":", 1)[0].lower() not in seen
    assert "x-forwarded-for" not in seen and "forwarded" not in seen and "via" not in seen


PREAMBLES = [
    ("proxy-v1-tcp4", f"PROXY TCP4 {ADMIN_SOURCE} 127.0.0.1 5555 3128\r\n".encode()),
    ("proxy-v1-tcp6", b"PROXY TCP6 ::ffff:10.9.9.9 ::1 5555 3128\r\n"),
    ("proxy-v1-unknown", b"PROXY UNKNOWN\r\n"),
    (
        "proxy-v2-signature",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\x0a\x09\x09\x09\x7f\x00\x00\x01\x15\xb3\x0c\x38",
    ),
]


@pytest.mark.parametrize("preamble", [p for _, p in PREAMBLES], ids=[i for i, _ in PREAMBLES])
def test_a_proxy_protocol_preamble_from_a_client_is_refused(
    attack_range: Range, preamble: bytes
) -> None:
    attack_range.dns.addresses("x.admin-only.test", "127.0.0.1")
    request = (
        f"GET http://x.admin-only.test:{attack_range.origin.port}/hello HTTP/1.1\r\n"
        "Host: x.admin-only.test\r\n\r\n"
    ).encode()
    attack = attack_range.send(preamble + request)
    assert attack.status == 400, attack.data[:200]
    assert attack.closed
    assert attack_range.origin.seen == []
    assert attack_range.dns.queries == []
