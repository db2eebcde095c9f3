"""Target and port tricks: an attacker shapes the request target so that a lax parser would
decide one host and connect to another. Every shape is refused or normalised, never guessed."""

from __future__ import annotations

import pytest

from tests.security.conftest import Range

# (id, raw request line + headers, expected status, expected reason)
REFUSED = [
    (
        "userinfo-at-denied-host",
        "GET http://origin.test@pastebin.com/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
    (
        "userinfo-with-port",
        "GET http://origin.test:80@evil.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
    (
        "fragment-at",
        "GET http://evil.test#@origin.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
    (
        "backslash-at",
        "GET http://origin.test\\@evil.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
    (
        "percent-encoded-host",
        "GET http://%6Frigin.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
    ("empty-host", "GET http:///path HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
    ("port-only", "GET http://:80/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
    ("port-zero", "GET http://a.public.test:0/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_port"),
    (
        "port-overflow",
        "GET http://a.public.test:65616/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_port",
    ),
    (
        "port-leading-zero",
        "GET http://a.public.test:0080/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_port",
    ),
    (
        "port-space",
        "GET http://a.public.test: 80/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "malformed_request",
    ),
    (
        "double-port",
        "GET http://a.public.test:80:80/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
    ("zone-id", "GET http://[fe80::1%25eth0]/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
    (
        "bracketed-name",
        "GET http://[a.public.test]/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
    ("unbracketed-v6", "GET http://::1/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
    (
        "connect-with-path",
        "CONNECT a.public.test:80/x HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
    (
        "connect-userinfo",
        "CONNECT user@a.public.test:80 HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
    (
        "connect-absolute-url",
        "CONNECT http://a.public.test:80 HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
    ("connect-no-port", "CONNECT a.public.test HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_port"),
    (
        "origin-form",
        "GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
        400,
        "bad_target",
    ),
    ("asterisk-form", "OPTIONS * HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n", 400, "bad_target"),
    (
        "file-scheme",
        "GET file:///etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "unsupported_scheme",
    ),
    (
        "gopher-scheme",
        "GET gopher://a.public.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "unsupported_scheme",
    ),
    (
        "label-too-long",
        f"GET http://{'a' * 64}.public.test/ HTTP/1.1\r\nHost: x\r\n\r\n",
        400,
        "bad_target",
    ),
]


@pytest.mark.parametrize(
    ("raw", "status", "reason"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_target_trick_is_refused_and_closed_before_any_lookup(
    attack_range: Range, raw: str, status: int, reason: str
) -> None:
    attack = attack_range.send(raw.encode("latin-1"))
    assert attack.status == status, attack.data[:200]
    assert attack.header("X-Outgate-Reason") == reason
    assert attack.closed
    assert attack_range.close_reason(attack) == reason
    assert attack_range.dns.queries == []  # refused before any name was resolved
    attack_range.nothing_reached_forbidden()


# Spellings of a denied name that a case- or dot-sensitive matcher would let through.
DENIED_SPELLINGS = [
    ("uppercase", "PASTEBIN.COM"),
    ("trailing-dot", "pastebin.com."),
    ("mixed-case-trailing-dot", "PasteBin.Com."),
    ("idn-lookalike", "p\u0430stebin.com"),  # Cyrillic a: a different name, denied by default
]


@pytest.mark.parametrize(
    "host", [h for _, h in DENIED_SPELLINGS], ids=[i for i, _ in DENIED_SPELLINGS]
)
def test_respelled_denied_name_is_still_denied_without_a_dns_query(
    attack_range: Range, host: str
) -> None:
    raw = f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n"
    attack = attack_range.send(raw.encode("utf-8"), half_close=True)
    assert attack.status in (400, 403)
    assert attack_range.dns.queries == []
    decision = attack_range.decision(attack)
    assert decision["outgate"]["decision"] == "deny"


def test_host_header_cannot_redirect_an_allowed_target(attack_range: Range) -> None:
    raw = (
        f"GET http://{attack_range.origin_authority}/hello HTTP/1.1\r\n"
        f"Host: {attack_range.forbidden['169.254.169.254'].host}\r\n\r\n"
    )
    attack = attack_range.send(raw.encode(), half_close=True)
    assert attack.status == 200
    assert attack_range.origin.paths_seen() == ["/hello"]
    assert attack_range.origin.seen[0].header("Host") == attack_range.origin_authority
    attack_range.nothing_reached_forbidden()


@pytest.mark.parametrize(
    "host",
    ["\uff11\uff12\uff17.\uff10.\uff10.\uff11", "169.254.169.\u00b2\u2075\u2074", "\u00b9"],
    ids=["fullwidth-loopback", "superscript-metadata", "superscript-one"],
)
def test_unicode_digits_that_normalise_to_an_address_are_refused(
    attack_range: Range, host: str
) -> None:
    attack = attack_range.send(f"CONNECT {host}:80 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert attack.status == 400
    assert attack.closed
    assert attack_range.dns.queries == []
    attack_range.nothing_reached_forbidden()
