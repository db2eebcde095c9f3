"""Every spelling of the metadata, private and loopback addresses: non-canonical numeric forms
are a 400, canonical and IPv6-embedded forms reach the guard and are refused — even though a
rule allows any address on port 80 — and no packet reaches the real server at that address."""

from __future__ import annotations

import pytest

from tests.security.conftest import Range

# (id, host as written in the target) -> 400 bad_target: not canonical, never parsed as an IP
NON_CANONICAL = [
    ("metadata-decimal", "2852039166"),
    ("metadata-octal", "0251.0376.0251.0376"),
    ("metadata-hex", "0xa9fea9fe"),
    ("metadata-hex-dotted", "0xa9.0xfe.0xa9.0xfe"),
    ("metadata-short-3", "169.254.43518"),
    ("metadata-short-2", "169.16689662"),
    ("metadata-leading-zeros", "169.254.169.0254"),
    ("metadata-trailing-dot", "169.254.169.254."),
    ("private-octal", "012.0.0.05"),
    ("private-decimal", "167772165"),
    ("loopback-short", "127.1"),
    ("loopback-zero", "0"),
    ("loopback-hex", "0x7f000001"),
    ("loopback-padded", "127.000.000.001"),
]

# (id, host) -> 403 guarded_address
GUARDED = [
    ("metadata", "169.254.169.254"),
    ("ecs-metadata", "169.254.170.2"),
    ("v4-mapped", "[::ffff:169.254.169.254]"),
    ("v4-mapped-hex", "[::ffff:a9fe:a9fe]"),
    ("v4-mapped-long", "[0:0:0:0:0:ffff:a9fe:a9fe]"),
    ("v4-compatible", "[::169.254.169.254]"),
    ("nat64", "[64:ff9b::169.254.169.254]"),
    ("nat64-local", "[64:ff9b:1::a9fe:a9fe]"),
    ("6to4", "[2002:a9fe:a9fe::]"),
    ("teredo", "[2001:0:4136:e378:8000:63bf:5601:5601]"),
    ("siit-translated", "[::ffff:0:a9fe:a9fe]"),
    ("aws-v6-metadata", "[fd00:ec2::254]"),
    ("private", "10.0.0.5"),
    ("private-mapped", "[::ffff:10.0.0.5]"),
    ("loopback", "127.0.0.1"),
    ("loopback-v6", "[::1]"),
    ("unspecified", "0.0.0.0"),
    ("unspecified-v6", "[::]"),
    ("cgnat", "100.64.0.1"),
    ("broadcast", "255.255.255.255"),
]


@pytest.mark.parametrize("host", [h for _, h in NON_CANONICAL], ids=[i for i, _ in NON_CANONICAL])
@pytest.mark.parametrize("method", ["GET", "CONNECT"])
def test_non_canonical_address_is_a_400_never_an_address(
    attack_range: Range, host: str, method: str
) -> None:
    target = f"{host}:80" if method == "CONNECT" else f"http://{host}/latest/meta-data/"
    attack = attack_range.send(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert attack.status == 400, attack.data[:200]
    assert attack.header("X-Outgate-Reason") == "bad_target"
    assert attack.closed
    assert attack_range.dns.queries == []
    attack_range.nothing_reached_forbidden()


@pytest.mark.parametrize("host", [h for _, h in GUARDED], ids=[i for i, _ in GUARDED])
@pytest.mark.parametrize("method", ["GET", "CONNECT"])
def test_guarded_address_in_any_form_is_refused_by_the_guard(
    attack_range: Range, host: str, method: str
) -> None:
    target = f"{host}:80" if method == "CONNECT" else f"http://{host}/latest/meta-data/"
    attack = attack_range.send(
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), half_close=True
    )
    assert attack.status == 403, attack.data[:200]
    assert attack.header("X-Outgate-Reason") == "guarded_address"
    decision = attack_range.decision(attack)
    assert decision["outgate"]["reason"] == "guarded_address"
    attack_range.nothing_reached_forbidden()


def test_public_looking_address_passes_so_the_guard_is_not_refusing_everything(
    attack_range: Range,
) -> None:
    attack = attack_range.send(
        b"GET http://11.0.0.1/hello HTTP/1.1\r\nHost: 11.0.0.1\r\n\r\n", half_close=True
    )
    assert attack.status == 200
    assert attack_range.public.paths_seen() == ["/hello"]
