"""Resolver against a real (scripted) DNS server over UDP and TCP on 127.0.0.1: answers, CNAME
chains, every failure outcome, TTL caching, coalescing, rebinding sequences, and spoofed
replies."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from proxy import metrics
from proxy.control import resolver as resolver_module
from proxy.control.resolver import (
    Resolver,
    nameservers_from_resolv_conf,
    parse_nameserver,
)
from proxy.errors import BadGateway, GatewayTimeout, Reason
from tests.support.dnsserver import (
    DROP,
    FORGED_A,
    FORGED_AAAA,
    NODATA,
    REFUSED,
    SERVFAIL,
    Cname,
    Custom,
    Forgery,
    Records,
    Response,
    ScriptedDNSServer,
)
from tests.support.waiting import eventually

ip = ipaddress.ip_address


class FakeClock:
    """Cache time under the test's control (query deadlines still use the real loop clock)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


MakeResolver = Callable[..., Resolver]


@pytest.fixture
async def make_resolver(dns_server: ScriptedDNSServer) -> AsyncIterator[MakeResolver]:
    """Build resolvers pointed at the scripted server; all are closed after the test."""
    made: list[Resolver] = []

    def make(**overrides: object) -> Resolver:
        options: dict[str, object] = {
            "nameservers": [dns_server.nameserver],
            "timeout": 2.0,
            "min_ttl": 0.0,
            "max_ttl": 300.0,
        }
        options.update(overrides)
        resolver = Resolver(**options)  # type: ignore[arg-type]
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        await resolver.close()


def lookups(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("outgate_dns_lookups_total", {"result": result})
    return value or 0.0


def latency_count() -> float:
    return metrics.REGISTRY.get_sample_value("outgate_dns_lookup_seconds_count") or 0.0


# -- answers ---------------------------------------------------------------------------------


async def test_a_records_only(dns_server: ScriptedDNSServer, make_resolver: MakeResolver) -> None:
    dns_server.answer("api.example.com", "A", Records("198.51.100.7", "198.51.100.8"))
    dns_server.answer("api.example.com", "AAAA", NODATA)
    assert await make_resolver().resolve("api.example.com") == (
        ip("198.51.100.7"),
        ip("198.51.100.8"),
    )


async def test_aaaa_records_only(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("v6.example.com", "A", NODATA)
    dns_server.answer("v6.example.com", "AAAA", Records("2001:db8::7"))
    assert await make_resolver().resolve("v6.example.com") == (ip("2001:db8::7"),)


async def test_both_families_ipv4_first_in_answer_order(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("dual.example.com", "AAAA", Records("2001:db8::2", "2001:db8::1"))
    dns_server.answer("dual.example.com", "A", Records("203.0.113.9", "203.0.113.3"))
    assert await make_resolver().resolve("dual.example.com") == (
        ip("203.0.113.9"),
        ip("203.0.113.3"),
        ip("2001:db8::2"),
        ip("2001:db8::1"),
    )
    assert sorted(dns_server.queries) == [("dual.example.com", "A"), ("dual.example.com", "AAAA")]


async def test_duplicate_records_are_returned_once(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer(
        "dup.example.com",
        "A",
        Custom(
            answer=(
                ("dup.example.com", "A", 60, "192.0.2.1"),
                ("dup.example.com", "A", 60, "192.0.2.1"),
                ("dup.example.com", "A", 60, "192.0.2.2"),
            )
        ),
    )
    dns_server.answer("dup.example.com", "AAAA", NODATA)
    assert await make_resolver().resolve("dup.example.com") == (ip("192.0.2.1"), ip("192.0.2.2"))


async def test_cname_chain_is_followed_inside_the_answer(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("www.example.com", "A", Cname(target="cdn.example.net"))
    dns_server.answer("www.example.com", "AAAA", Cname(target="cdn.example.net"))
    dns_server.answer("cdn.example.net", "A", Cname(target="edge.cdn.example.net"))
    dns_server.answer("cdn.example.net", "AAAA", Cname(target="edge.cdn.example.net"))
    dns_server.addresses("edge.cdn.example.net", "192.0.2.80", "2001:db8::80")
    assert await make_resolver().resolve("www.example.com") == (
        ip("192.0.2.80"),
        ip("2001:db8::80"),
    )
    # The chain came in one answer per family: no follow-up queries for the targets.
    assert sorted(dns_server.queries) == [("www.example.com", "A"), ("www.example.com", "AAAA")]


async def test_cname_without_target_records_is_no_answer(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.addresses("target.example.com", "192.0.2.1")
    for qtype in ("A", "AAAA"):
        dns_server.answer(
            "alias.example.com", qtype, Cname(target="target.example.com", include_target=False)
        )
    with pytest.raises(BadGateway) as caught:
        await make_resolver().resolve("alias.example.com")
    assert caught.value.reason is Reason.DNS_NO_ANSWER
    assert {name for name, _ in dns_server.queries} == {"alias.example.com"}


async def test_cname_loop_ends_as_no_answer(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    for qtype in ("A", "AAAA"):
        dns_server.answer("ping.example.com", qtype, Cname(target="pong.example.com"))
        dns_server.answer("pong.example.com", qtype, Cname(target="ping.example.com"))
    with pytest.raises(BadGateway) as caught:
        await make_resolver().resolve("ping.example.com")
    assert caught.value.reason is Reason.DNS_NO_ANSWER


async def test_cname_chain_longer_than_the_limit_is_not_followed(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    hops = resolver_module.MAX_CNAME_CHAIN + 1
    for i in range(hops):
        dns_server.answer(f"h{i}.example.com", "A", Cname(target=f"h{i + 1}.example.com"))
    dns_server.answer(f"h{hops}.example.com", "A", Records("192.0.2.9"))
    dns_server.answer("h0.example.com", "AAAA", NODATA)
    with pytest.raises(BadGateway) as caught:
        await make_resolver().resolve("h0.example.com")
    assert caught.value.reason is Reason.DNS_NO_ANSWER
    # One hop fewer is followed.
    dns_server.answer("h1.example.com", "AAAA", NODATA)
    assert await make_resolver().resolve("h1.example.com") == (ip("192.0.2.9"),)


async def test_answer_records_unrelated_to_the_query_are_ignored(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer(
        "shop.example.com",
        "A",
        Custom(
            answer=(
                ("evil.example.org", "A", 60, "10.0.0.1"),  # not chained from the question
                ("shop.example.com", "CNAME", 60, "shop.cdn.example"),
                ("other.cdn.example", "A", 60, "10.0.0.2"),
                ("shop.cdn.example", "A", 60, "192.0.2.44"),
                ("shop.example.com", "AAAA", 60, "2001:db8::bad"),  # wrong type for the query
            )
        ),
    )
    dns_server.answer("shop.example.com", "AAAA", NODATA)
    assert await make_resolver().resolve("shop.example.com") == (ip("192.0.2.44"),)


async def test_names_are_queried_as_absolute_names(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.addresses("intranet", "192.0.2.5")
    assert await make_resolver().resolve("intranet") == (ip("192.0.2.5"),)
    assert {name for name, _ in dns_server.queries} == {"intranet"}  # no search domain appended


# -- failures --------------------------------------------------------------------------------


async def test_nxdomain_is_bad_gateway(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    before = lookups("nxdomain")
    with pytest.raises(BadGateway) as caught:
        await make_resolver().resolve("missing.example.com")  # unscripted: NXDOMAIN
    assert caught.value.reason is Reason.DNS_NXDOMAIN
    assert caught.value.status == 502
    assert lookups("nxdomain") == before + 1


@pytest.mark.parametrize("failure", [SERVFAIL, REFUSED], ids=["servfail", "refused"])
async def test_server_failure_is_bad_gateway_servfail(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver, failure: Response
) -> None:
    dns_server.answer("broken.example.com", "A", failure)
    dns_server.answer("broken.example.com", "AAAA", failure)
    before = lookups("servfail")
    started = time.monotonic()
    with pytest.raises(BadGateway) as caught:
        await make_resolver(timeout=5.0).resolve("broken.example.com")
    assert caught.value.reason is Reason.DNS_SERVFAIL
    assert time.monotonic() - started < 1.0  # a failure answer is final, not waited out
    assert lookups("servfail") == before + 1


async def test_noerror_without_addresses_is_no_answer(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("empty.example.com", "A", NODATA)
    dns_server.answer("empty.example.com", "AAAA", NODATA)
    with pytest.raises(BadGateway) as caught:
        await make_resolver().resolve("empty.example.com")
    assert caught.value.reason is Reason.DNS_NO_ANSWER


async def test_no_reply_is_gateway_timeout_within_the_timeout(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("blackhole.example.com", "A", DROP)
    dns_server.answer("blackhole.example.com", "AAAA", DROP)
    before = lookups("timeout")
    started = time.monotonic()
    with pytest.raises(GatewayTimeout) as caught:
        await make_resolver(timeout=0.3).resolve("blackhole.example.com")
    elapsed = time.monotonic() - started
    assert caught.value.reason is Reason.DNS_TIMEOUT
    assert caught.value.status == 504
    assert 0.25 <= elapsed < 1.0
    assert lookups("timeout") == before + 1


async def test_one_family_answering_is_enough_when_the_other_times_out(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("half.example.com", "A", Records("192.0.2.10"))
    dns_server.answer("half.example.com", "AAAA", DROP)
    started = time.monotonic()
    assert await make_resolver(timeout=0.3).resolve("half.example.com") == (ip("192.0.2.10"),)
    assert time.monotonic() - started < 1.0


async def test_one_family_answering_is_enough_when_the_other_fails(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("half.example.com", "A", SERVFAIL)
    dns_server.answer("half.example.com", "AAAA", Records("2001:db8::10"))
    assert await make_resolver().resolve("half.example.com") == (ip("2001:db8::10"),)


async def test_partial_answer_is_cached_only_for_min_ttl(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    clock = FakeClock()
    dns_server.answer("half.example.com", "A", Records("192.0.2.10", ttl=300))
    dns_server.answer("half.example.com", "AAAA", SERVFAIL)
    resolver = make_resolver(min_ttl=5.0, clock=clock)
    await resolver.resolve("half.example.com")
    clock.now += 4
    await resolver.resolve("half.example.com")
    assert dns_server.count("half.example.com", "A") == 1
    clock.now += 2
    await resolver.resolve("half.example.com")
    assert dns_server.count("half.example.com", "A") == 2


# -- nameserver selection and transport ------------------------------------------------------


async def test_next_nameserver_is_tried_when_the_first_does_not_reply(
    dns_server: ScriptedDNSServer,
) -> None:
    with ScriptedDNSServer() as silent:
        silent.answer("api.example.com", "A", DROP)
        silent.answer("api.example.com", "AAAA", DROP)
        dns_server.addresses("api.example.com", "192.0.2.20")
        resolver = Resolver(
            nameservers=[silent.nameserver, dns_server.nameserver],
            timeout=1.0,
            min_ttl=0,
            max_ttl=60,
        )
        try:
            assert await resolver.resolve("api.example.com") == (ip("192.0.2.20"),)
        finally:
            await resolver.close()
        assert silent.count("api.example.com") == 2
        assert dns_server.count("api.example.com") == 2


async def test_next_nameserver_is_tried_when_the_first_refuses(
    dns_server: ScriptedDNSServer,
) -> None:
    with ScriptedDNSServer() as refusing:
        refusing.answer("api.example.com", "A", REFUSED)
        refusing.answer("api.example.com", "AAAA", REFUSED)
        dns_server.addresses("api.example.com", "192.0.2.21")
        resolver = Resolver(
            nameservers=[refusing.nameserver, dns_server.nameserver],
            timeout=5.0,
            min_ttl=0,
            max_ttl=60,
        )
        try:
            started = time.monotonic()
            assert await resolver.resolve("api.example.com") == (ip("192.0.2.21"),)
            assert time.monotonic() - started < 1.0
        finally:
            await resolver.close()


async def test_truncated_udp_answer_is_retried_over_tcp(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("tc.example.com", "A", Records("192.0.2.30", truncate_udp=True))
    dns_server.answer("tc.example.com", "AAAA", NODATA)
    assert await make_resolver().resolve("tc.example.com") == (ip("192.0.2.30"),)
    transports = [q.transport for q in dns_server.received if q.qtype == "A"]
    assert transports == ["udp", "tcp"]


async def test_answer_too_large_for_udp_arrives_over_tcp(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    many = [f"198.51.100.{i}" for i in range(1, 201)]  # ~3 KB: more than the EDNS payload
    dns_server.answer("big.example.com", "A", Records(*many))
    dns_server.answer("big.example.com", "AAAA", NODATA)
    assert await make_resolver().resolve("big.example.com") == tuple(ip(a) for a in many)
    assert [q.transport for q in dns_server.received if q.qtype == "A"] == ["udp", "tcp"]


@pytest.mark.parametrize("forgery", ["wrong_id", "wrong_question", "other_port"])
async def test_spoofed_replies_are_ignored(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver, forgery: Forgery
) -> None:
    dns_server.answer("bank.example.com", "A", Records("192.0.2.40", forge=forgery))
    dns_server.answer("bank.example.com", "AAAA", Records("2001:db8::40", forge=forgery))
    result = await make_resolver().resolve("bank.example.com")
    assert result == (ip("192.0.2.40"), ip("2001:db8::40"))
    assert ip(FORGED_A) not in result and ip(FORGED_AAAA) not in result


# -- caching ---------------------------------------------------------------------------------


async def test_positive_answer_is_cached_for_its_ttl(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    clock = FakeClock()
    dns_server.addresses("cached.example.com", "192.0.2.50", ttl=30)
    resolver = make_resolver(clock=clock)
    cached_before, ok_before = lookups("cached"), lookups("ok")
    latency_before = latency_count()
    assert await resolver.resolve("cached.example.com") == (ip("192.0.2.50"),)
    clock.now += 29
    assert await resolver.resolve("cached.example.com") == (ip("192.0.2.50"),)
    assert len(dns_server.queries) == 2  # A and AAAA, once
    assert (lookups("ok"), lookups("cached")) == (ok_before + 1, cached_before + 1)
    assert latency_count() == latency_before + 1  # the cache hit is not a network lookup
    clock.now += 2
    await resolver.resolve("cached.example.com")
    assert len(dns_server.queries) == 4


async def test_ttl_is_the_smallest_of_the_records_used(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    clock = FakeClock()
    dns_server.answer("www.example.com", "A", Cname(target="edge.example.net", ttl=10))
    dns_server.answer("edge.example.net", "A", Records("192.0.2.60", ttl=3600))
    dns_server.answer("www.example.com", "AAAA", Records("2001:db8::60", ttl=20))
    resolver = make_resolver(clock=clock)
    await resolver.resolve("www.example.com")
    clock.now += 9
    await resolver.resolve("www.example.com")
    assert dns_server.count("www.example.com") == 2
    clock.now += 2
    await resolver.resolve("www.example.com")
    assert dns_server.count("www.example.com") == 4


async def test_ttl_zero_with_min_ttl_zero_is_queried_every_time(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.addresses("zero.example.com", "192.0.2.70", ttl=0)
    resolver = make_resolver(min_ttl=0.0)
    for _ in range(3):
        assert await resolver.resolve("zero.example.com") == (ip("192.0.2.70"),)
    assert dns_server.count("zero.example.com", "A") == 3


async def test_ttl_below_min_ttl_is_raised_to_min_ttl(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    clock = FakeClock()
    dns_server.addresses("zero.example.com", "192.0.2.70", ttl=0)
    resolver = make_resolver(min_ttl=5.0, clock=clock)
    await resolver.resolve("zero.example.com")
    clock.now += 4.9
    await resolver.resolve("zero.example.com")
    assert dns_server.count("zero.example.com", "A") == 1
    clock.now += 0.2
    await resolver.resolve("zero.example.com")
    assert dns_server.count("zero.example.com", "A") == 2


async def test_ttl_above_max_ttl_is_clamped(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    clock = FakeClock()
    dns_server.addresses("long.example.com", "192.0.2.80", ttl=86400)
    resolver = make_resolver(max_ttl=10.0, clock=clock)
    await resolver.resolve("long.example.com")
    clock.now += 9
    await resolver.resolve("long.example.com")
    assert dns_server.count("long.example.com", "A") == 1
    clock.now += 2
    await resolver.resolve("long.example.com")
    assert dns_server.count("long.example.com", "A") == 2


async def test_nxdomain_is_cached_for_min_ttl(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    clock = FakeClock()
    resolver = make_resolver(min_ttl=5.0, clock=clock)
    for _ in range(2):
        with pytest.raises(BadGateway):
            await resolver.resolve("nope.example.com")
    assert dns_server.count("nope.example.com", "A") == 1
    clock.now += 6
    with pytest.raises(BadGateway) as caught:
        await resolver.resolve("nope.example.com")
    assert caught.value.reason is Reason.DNS_NXDOMAIN
    assert dns_server.count("nope.example.com", "A") == 2


async def test_no_answer_is_cached_for_min_ttl(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    clock = FakeClock()
    dns_server.answer("empty.example.com", "A", NODATA)
    dns_server.answer("empty.example.com", "AAAA", NODATA)
    resolver = make_resolver(min_ttl=5.0, clock=clock)
    for _ in range(2):
        with pytest.raises(BadGateway) as caught:
            await resolver.resolve("empty.example.com")
        assert caught.value.reason is Reason.DNS_NO_ANSWER
    assert dns_server.count("empty.example.com", "A") == 1


async def test_min_ttl_zero_disables_negative_caching(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver(min_ttl=0.0)
    for _ in range(2):
        with pytest.raises(BadGateway):
            await resolver.resolve("nope.example.com")
    assert dns_server.count("nope.example.com", "A") == 2


async def test_failures_are_not_cached(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("flaky.example.com", "A", SERVFAIL, Records("192.0.2.90"))
    dns_server.answer("flaky.example.com", "AAAA", SERVFAIL, NODATA)
    resolver = make_resolver(min_ttl=30.0)
    with pytest.raises(BadGateway):
        await resolver.resolve("flaky.example.com")
    assert await resolver.resolve("flaky.example.com") == (ip("192.0.2.90"),)


async def test_cache_is_bounded_and_evicts_the_oldest_name(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolver_module, "MAX_CACHE_NAMES", 3)
    resolver = make_resolver()
    names = [f"n{i}.example.com" for i in range(4)]
    for name in names:
        dns_server.addresses(name, "192.0.2.1", ttl=300)
        await resolver.resolve(name)
    dns_server.clear_queries()
    for name in reversed(names):  # newest first, so re-fetching n0 evicts nothing we still test
        await resolver.resolve(name)
    assert {name for name, _ in dns_server.queries} == {"n0.example.com"}


# -- coalescing and sequences ----------------------------------------------------------------


async def test_concurrent_lookups_of_one_name_share_one_query(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("hot.example.com", "A", Records("192.0.2.100", ttl=0, delay=0.1))
    dns_server.answer("hot.example.com", "AAAA", Records("2001:db8::100", ttl=0, delay=0.1))
    resolver = make_resolver(min_ttl=0.0)
    cached_before = lookups("cached")
    results = await asyncio.gather(*(resolver.resolve("hot.example.com") for _ in range(20)))
    assert set(results) == {(ip("192.0.2.100"), ip("2001:db8::100"))}
    assert sorted(dns_server.queries) == [("hot.example.com", "A"), ("hot.example.com", "AAAA")]
    assert lookups("cached") == cached_before + 19


async def test_concurrent_failures_are_raised_to_every_caller(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.answer("gone.example.com", "A", Custom(rcode="NXDOMAIN", delay=0.05))
    dns_server.answer("gone.example.com", "AAAA", Custom(rcode="NXDOMAIN", delay=0.05))
    resolver = make_resolver()
    results = await asyncio.gather(
        *(resolver.resolve("gone.example.com") for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, BadGateway) for r in results)
    assert len({id(r) for r in results}) == 5  # each caller gets its own exception object
    assert dns_server.count("gone.example.com", "A") == 1


async def test_a_caller_giving_up_does_not_cancel_the_shared_lookup(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    dns_server.addresses("slow.example.com", "192.0.2.110", ttl=0)
    dns_server.answer("slow.example.com", "A", Records("192.0.2.110", ttl=0, delay=0.2))
    resolver = make_resolver()
    impatient = asyncio.create_task(resolver.resolve("slow.example.com"))
    patient = asyncio.create_task(resolver.resolve("slow.example.com"))
    # Both callers wait on one query once it is out.
    await eventually(lambda: dns_server.count("slow.example.com", "A") == 1)
    impatient.cancel()
    assert await patient == (ip("192.0.2.110"),)
    with pytest.raises(asyncio.CancelledError):
        await impatient
    assert dns_server.count("slow.example.com", "A") == 1


async def test_sequence_answers_are_served_one_per_query_then_the_last_repeats(
    dns_server: ScriptedDNSServer, make_resolver: MakeResolver
) -> None:
    # DNS rebinding: a public answer first, then loopback. The resolver reports each answer as
    # it came; the guard judges every address it is given.
    dns_server.answer(
        "rebind.example.com",
        "A",
        Records("198.51.100.1", ttl=0),
        Records("127.0.0.1", ttl=0),
    )
    dns_server.answer("rebind.example.com", "AAAA", NODATA)
    resolver = make_resolver(min_ttl=0.0)
    assert await resolver.resolve("rebind.example.com") == (ip("198.51.100.1"),)
    assert await resolver.resolve("rebind.example.com") == (ip("127.0.0.1"),)
    assert await resolver.resolve("rebind.example.com") == (ip("127.0.0.1"),)


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.96.0.10", ("10.96.0.10", 53)),
        ("10.96.0.10:5353", ("10.96.0.10", 5353)),
        ("fd00::10", ("fd00::10", 53)),
        ("[fd00::10]:5353", ("fd00::10", 5353)),
        ("[fd00::10]", ("fd00::10", 53)),
        (" 127.0.0.1:53 ", ("127.0.0.1", 53)),
    ],
)
def test_nameserver_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


@pytest.mark.parametrize(
    "text",
    ["kube-dns.kube-system", "10.96.0.10:0", "10.96.0.10:65536", "10.96.0.10:x", "[fd00::1", ""],
)
def test_bad_nameserver_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_nameserver(text)


def test_resolv_conf_nameserver_lines_are_read_and_search_is_ignored() -> None:
    text = (
        "# generated by kubelet\n"
        "search default.svc.cluster.local svc.cluster.local\n"
        "nameserver 10.96.0.10\n"
        "nameserver fd00::a\n"
        "nameserver not-an-ip\n"
        "options ndots:5\n"
    )
    assert nameservers_from_resolv_conf(text) == [("10.96.0.10", 53), ("fd00::a", 53)]


def test_empty_nameserver_list_reads_resolv_conf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    monkeypatch.setattr(resolver_module, "RESOLV_CONF", str(conf))
    resolver = Resolver(nameservers=[], timeout=1, min_ttl=0, max_ttl=1)
    assert resolver.nameservers == (("192.0.2.53", 53), ("192.0.2.54", 53))


def test_no_nameserver_anywhere_falls_back_to_localhost_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.com\n")
    monkeypatch.setattr(resolver_module, "RESOLV_CONF", str(conf))
    with capture_logs() as logs:
        resolver = Resolver(nameservers=[], timeout=1, min_ttl=0, max_ttl=1)
    assert resolver.nameservers == (("127.0.0.1", 53),)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["no_nameserver_configured"]


@pytest.mark.parametrize(("timeout", "min_ttl", "max_ttl"), [(0, 0, 1), (1, -1, 1), (1, 10, 5)])
def test_inconsistent_settings_are_refused(timeout: float, min_ttl: float, max_ttl: float) -> None:
    with pytest.raises(ValueError):
        Resolver(nameservers=["127.0.0.1"], timeout=timeout, min_ttl=min_ttl, max_ttl=max_ttl)
