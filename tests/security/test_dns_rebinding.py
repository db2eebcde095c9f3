"""DNS rebinding and hostile answers: an allowed name whose answers point inward is refused,
a mixed answer dials only the public address, and a later answer never changes an address
that was already checked."""

from __future__ import annotations

import pytest

from tests.security.conftest import METADATA, PRIVATE, PUBLIC, Range
from tests.support.dnsserver import DROP, Cname, Custom, Records, Response

# (id, answers for A, answers for AAAA) for `evil.public.test`: every one must be refused.
INWARD = [
    ("a-metadata", [Records(METADATA, ttl=0)], []),
    ("a-private", [Records(PRIVATE, ttl=0)], []),
    ("a-loopback", [Records("127.0.0.1", ttl=0)], []),
    ("a-unspecified", [Records("0.0.0.0", ttl=0)], []),
    ("a-ecs-metadata", [Records("169.254.170.2", ttl=0)], []),
    ("aaaa-ula-metadata", [], [Records("fd00:ec2::254", ttl=0)]),
    ("aaaa-mapped-metadata", [], [Records("::ffff:169.254.169.254", ttl=0)]),
    ("aaaa-nat64-metadata", [], [Records("64:ff9b::a9fe:a9fe", ttl=0)]),
    ("aaaa-loopback", [], [Records("::1", ttl=0)]),
    ("cname-to-metadata", [Cname(target="md.internal.example", ttl=0)], []),
    (
        "all-inward-mixed",
        [Records(METADATA, PRIVATE, "127.0.0.1", ttl=0)],
        [Records("fd00:ec2::254", "::1", ttl=0)],
    ),
]


def _script(attack_range: Range, a: list[Response], aaaa: list[Response]) -> None:
    attack_range.dns.answer("evil.public.test", "A", *a)
    attack_range.dns.answer("evil.public.test", "AAAA", *aaaa)
    attack_range.dns.answer("md.internal.example", "A", Records(METADATA, ttl=0))


@pytest.mark.parametrize(("a", "aaaa"), [c[1:] for c in INWARD], ids=[c[0] for c in INWARD])
@pytest.mark.parametrize("method", ["GET", "CONNECT"])
def test_allowed_name_answering_inward_is_refused(
    attack_range: Range, a: list[Response], aaaa: list[Response], method: str
) -> None:
    _script(attack_range, a, aaaa)
    target = "evil.public.test:80" if method == "CONNECT" else "http://evil.public.test/x"
    attack = attack_range.send(
        f"{method} {target} HTTP/1.1\r\nHost: evil.public.test\r\n\r\n".encode(), half_close=True
    )
    assert attack.status == 403, attack.data[:200]
    assert attack.header("X-Outgate-Reason") == "guarded_address"
    attack_range.nothing_reached_forbidden()


def test_mixed_answer_dials_only_the_public_address(attack_range: Range) -> None:
    _script(
        attack_range, [Records(METADATA, PRIVATE, PUBLIC, ttl=0)], [Records("fd00:ec2::254", ttl=0)]
    )
    attack = attack_range.send(
        b"GET http://evil.public.test/hello HTTP/1.1\r\nHost: evil.public.test\r\n\r\n",
        half_close=True,
    )
    assert attack.status == 200
    public = attack_range.public
    assert public.paths_seen() == ["/hello"]
    attack_range.nothing_reached_forbidden()


def test_rebinding_between_two_pipelined_requests_never_reaches_inward(
    attack_range: Range,
) -> None:
    _script(attack_range, [Records(PUBLIC, ttl=0), Records(METADATA, ttl=0)], [])
    request = b"GET http://evil.public.test/hello HTTP/1.1\r\nHost: evil.public.test\r\n\r\n"
    attack = attack_range.send(request + request, half_close=True)
    assert attack.data.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 403" in attack.data
    assert b"X-Outgate-Reason: guarded_address" in attack.data
    public = attack_range.public
    assert public.paths_seen() == ["/hello"]
    attack_range.nothing_reached_forbidden()


def test_a_tunnel_keeps_the_address_it_checked_when_the_name_rebinds(attack_range: Range) -> None:
    _script(attack_range, [Records(PUBLIC, ttl=0), Records(METADATA, ttl=0)], [])
    attack = attack_range.send(
        b"CONNECT evil.public.test:80 HTTP/1.1\r\nHost: evil.public.test\r\n\r\n"
        b"GET /hello HTTP/1.1\r\nHost: evil.public.test\r\nConnection: close\r\n\r\n"
    )  # the origin closes after its answer, and the tunnel closes with it
    assert attack.data.startswith(b"HTTP/1.1 200 Connection established")
    assert attack.data.endswith(b"hello from origin\n")
    assert attack_range.dns.count("evil.public.test", "A") == 1
    attack_range.nothing_reached_forbidden()


def test_a_forged_answer_section_for_another_name_is_ignored(attack_range: Range) -> None:
    forged = Custom(answer=(("other.example", "A", 0, METADATA),))
    _script(attack_range, [forged], [])
    attack = attack_range.send(
        b"GET http://evil.public.test/x HTTP/1.1\r\nHost: evil.public.test\r\n\r\n", half_close=True
    )
    assert attack.status == 502
    assert attack.header("X-Outgate-Reason") == "dns_no_answer"
    attack_range.nothing_reached_forbidden()


def test_a_dns_timeout_dials_nothing(attack_range: Range) -> None:
    _script(attack_range, [DROP], [DROP])
    attack = attack_range.send(
        b"GET http://evil.public.test/x HTTP/1.1\r\nHost: evil.public.test\r\n\r\n", half_close=True
    )
    assert attack.status == 504
    assert attack.header("X-Outgate-Reason") == "dns_timeout"
    attack_range.nothing_reached_forbidden()
