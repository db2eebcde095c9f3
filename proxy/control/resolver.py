"""Resolve a normalised name to its addresses: A and AAAA over dnspython, with a bounded cache.

The proxy resolves names itself (DESIGN section 1, step 5) so that the address it checks with
the guard is the address it dials. Names arrive normalised (lowercase, punycode, no trailing
dot) and are queried as absolute names: no search list, no `ndots`, so a policy on
`api.stripe.com` can never be satisfied by `api.stripe.com.cluster.local`.

One lookup:
  0. a name in the hosts file (`dns.hostsFile`, default /etc/hosts, so a proxy pod's
     `hostAliases` work as Squid's `hosts_file` does) is answered from it, before the cache and
     DNS. The router asks only after the name was allowed, and guards the addresses like any
     answer, so an entry pointing into guarded space is refused unless a rule's cidr allows it;
  1. a fresh cache entry answers at once (positive or negative);
  2. a lookup of the same name already in flight is joined, not repeated;
  3. otherwise A and AAAA are queried concurrently, each over UDP (TCP when truncated), trying
     the nameservers in order within one overall `timeout`;
  4. each answer is read by following the CNAME chain from the queried name inside the answer
     section; records that do not chain from it are ignored;
  5. IPv4 addresses come first, then IPv6, each family in answer order, without duplicates.

Outcomes and the errors a caller sees (DESIGN section 6):
  - addresses in either family -> returned (the other family may have failed or timed out);
  - NXDOMAIN -> BadGateway(dns_nxdomain); NOERROR without addresses -> BadGateway(dns_no_answer);
  - SERVFAIL, REFUSED, any other rcode, a server that is unreachable or answers garbage
    -> BadGateway(dns_servfail);
  - no reply within `timeout` -> GatewayTimeout(dns_timeout).

Caching: a positive answer lives for the smallest TTL of the records used (CNAMEs included),
clamped to [min_ttl, max_ttl]; NXDOMAIN and no-answer live for min_ttl; failures and timeouts
are not cached. A TTL of zero (after clamping) is not cached at all.

Metrics: every `resolve` call counts once in DNS_LOOKUPS: `cached` when a positive answer came
without this call going to the network (cache hit, or joined an in-flight lookup), otherwise the
outcome (`ok`, `nxdomain`, `no_answer`, `servfail`, `timeout`; negative cache hits count as
their outcome, since that is what the client saw). DNS_LATENCY observes each network lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import structlog

from proxy import metrics
from proxy.control.watched_file import WatchedFile
from proxy.core.hosts import IPAddress
from proxy.core.hostsfile import EMPTY_HOSTS, MAX_HOSTS_FILE_BYTES, HostsTable, parse_hosts
from proxy.errors import BadGateway, GatewayTimeout, Reason

log = structlog.get_logger(__name__)

DEFAULT_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"
# What glibc falls back to when resolv.conf names no nameserver (resolv.conf(5)).
FALLBACK_NAMESERVER = ("127.0.0.1", DEFAULT_PORT)
# Distinct names kept. Names are resolved only after a policy allow, but a wildcard rule
# (`*.example.com`) lets a client mint names without end; at a few hundred bytes an entry this
# caps the cache at a few MB. The oldest entry is evicted first.
MAX_CACHE_NAMES = 10_000
# CNAME hops followed inside one answer. Recursive resolvers give up around 8-16 (BIND: 16,
# Unbound: 11); real chains (CDN fronting) are 2-4 long, and a loop must end somewhere.
MAX_CNAME_CHAIN = 8
# EDNS UDP payload we advertise: the DNS Flag Day 2020 value, which avoids IP fragmentation;
# larger answers come back truncated and are fetched again over TCP.
EDNS_PAYLOAD = 1232
# Passes over the nameserver list within one timeout, as glibc's `options attempts:2`: a single
# lost UDP datagram costs half the timeout rather than all of it.
ROUNDS = 2


class _Result(StrEnum):
    """Outcome of a lookup; the values are the DNS_LOOKUPS `result` label."""

    OK = "ok"
    NXDOMAIN = "nxdomain"
    SERVFAIL = "servfail"
    NO_ANSWER = "no_answer"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class _Answer:
    """What one query (one family) or one whole lookup produced."""

    result: _Result
    addresses: tuple[IPAddress, ...] = ()
    ttl: float = 0.0  # for a family: smallest TTL of the records used; for a lookup: cache time


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    expires: float
    answer: _Answer


_TIMED_OUT = _Answer(_Result.TIMEOUT)
_SERVFAIL = _Answer(_Result.SERVFAIL)


def parse_nameserver(text: str) -> tuple[str, int]:
    """`host`, `host:port`, `v6` or `[v6]:port` -> (address, port). Nameservers must be IPs:
    a name would need DNS to find DNS."""
    text = text.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad nameserver {text!r}: expected [v6]:port")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"bad nameserver {text!r}: the host must be an IP address") from None
    port = DEFAULT_PORT
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad nameserver {text!r}: the port must be 1..65535")
        port = int(port_text)
    return host, port


def nameservers_from_resolv_conf(text: str) -> list[tuple[str, int]]:
    """The `nameserver` lines of a resolv.conf (port 53); lines that do not parse are skipped.
    `search`, `domain` and `options ndots` are ignored on purpose: names here are absolute."""
    found: list[tuple[str, int]] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(fields[1])
                found.append((fields[1], DEFAULT_PORT))
    return found


def _system_nameservers() -> list[tuple[str, int]]:
    try:
        with open(RESOLV_CONF, encoding="utf-8", errors="replace") as f:
            found = nameservers_from_resolv_conf(f.read())
    except OSError as exc:
        log.warning("resolv_conf_unreadable", path=RESOLV_CONF, error=str(exc))
        found = []
    if not found:
        log.warning(
            "no_nameserver_configured",
            path=RESOLV_CONF,
            fallback=f"{FALLBACK_NAMESERVER[0]}:{FALLBACK_NAMESERVER[1]}",
        )
        found = [FALLBACK_NAMESERVER]
    return found


def hosts_file(path: str) -> WatchedFile[HostsTable]:
    """The hosts file at `path`, loaded now (a missing one is empty) and watched by `run`."""
    watched = WatchedFile(
        Path(path),
        load=_load_hosts,
        empty=EMPTY_HOSTS,
        event="hosts_file",
        max_bytes=MAX_HOSTS_FILE_BYTES,
        missing_ok=True,
    )
    watched.reload()
    return watched


def _load_hosts(text: str) -> HostsTable:
    table = parse_hosts(text)
    for line, why in table.skipped:
        log.warning("hosts_file_line_skipped", line=line, error=why)
    return table


class Resolver:
    """Async A/AAAA resolver with a TTL cache and in-flight coalescing. One per process."""

    def __init__(
        self,
        *,
        nameservers: Sequence[str],
        timeout: float,
        min_ttl: float,
        max_ttl: float,
        hosts: WatchedFile[HostsTable] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError("TTL bounds must satisfy 0 <= min_ttl <= max_ttl")
        self._servers: tuple[tuple[str, int], ...] = tuple(
            [parse_nameserver(ns) for ns in nameservers] if nameservers else _system_nameservers()
        )
        self._timeout = timeout
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._clock = clock  # cache expiry only; query deadlines use the event loop's clock
        self._cache: dict[str, _CacheEntry] = {}  # insertion order = age, for eviction
        self._inflight: dict[str, asyncio.Task[_Answer]] = {}
        self.hosts = hosts  # step 0; its `run` is the app's to schedule

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        return self._servers

    async def resolve(self, name: str) -> tuple[IPAddress, ...]:
        """Addresses of `name` (normalised, no trailing dot): IPv4 first, then IPv6.

        Raises BadGateway (dns_nxdomain, dns_no_answer, dns_servfail) or GatewayTimeout
        (dns_timeout).
        """
        if self.hosts is not None:
            listed = self.hosts.current.lookup(name)
            if listed is not None:
                metrics.DNS_LOOKUPS.labels(result="hosts").inc()
                return listed
        entry = self._cache.get(name)
        if entry is not None:
            if entry.expires > self._clock():
                return self._deliver(name, entry.answer, shared=True)
            del self._cache[name]
        task = self._inflight.get(name)
        shared = task is not None
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._lookup(name), name=f"dns lookup {name}"
            )
            self._inflight[name] = task
            task.add_done_callback(partial(self._lookup_done, name))
        # Shielded: a caller that gives up (client gone) does not cancel the lookup others wait
        # on. The task is bounded by `timeout` and referenced from `_inflight` until it ends.
        answer = await asyncio.shield(task)
        return self._deliver(name, answer, shared=shared)

    async def close(self) -> None:
        """Cancel lookups in flight and forget the cache (shutdown)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        self._cache.clear()

    def _deliver(self, name: str, answer: _Answer, *, shared: bool) -> tuple[IPAddress, ...]:
        result = answer.result
        if result is _Result.OK:
            metrics.DNS_LOOKUPS.labels(result="cached" if shared else "ok").inc()
            return answer.addresses
        metrics.DNS_LOOKUPS.labels(result=result.value).inc()
        if result is _Result.NXDOMAIN:
            raise BadGateway(f"{name} does not exist (NXDOMAIN)", reason=Reason.DNS_NXDOMAIN)
        if result is _Result.NO_ANSWER:
            raise BadGateway(f"{name} has no A or AAAA records", reason=Reason.DNS_NO_ANSWER)
        if result is _Result.TIMEOUT:
            raise GatewayTimeout(
                f"no DNS reply for {name} within {self._timeout:g}s", reason=Reason.DNS_TIMEOUT
            )
        raise BadGateway(f"DNS lookup of {name} failed", reason=Reason.DNS_SERVFAIL)

    def _lookup_done(self, name: str, task: asyncio.Task[_Answer]) -> None:
        if self._inflight.get(name) is task:
            del self._inflight[name]
        if not task.cancelled():
            task.exception()  # Retrieved here, so asyncio never logs it as unretrieved.

    async def _lookup(self, name: str) -> _Answer:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            qname = dns.name.from_text(name, origin=dns.name.root)
        except dns.exception.DNSException:
            return _Answer(_Result.NXDOMAIN)  # Unrepresentable in DNS: it cannot exist.
        deadline = started + self._timeout
        v4, v6 = await asyncio.gather(
            self._query(qname, dns.rdatatype.A, deadline),
            self._query(qname, dns.rdatatype.AAAA, deadline),
        )
        metrics.DNS_LATENCY.observe(loop.time() - started)
        answer = self._combine(v4, v6)
        if answer.ttl > 0:
            self._cache.pop(name, None)
            self._cache[name] = _CacheEntry(self._clock() + answer.ttl, answer)
            while len(self._cache) > MAX_CACHE_NAMES:
                del self._cache[next(iter(self._cache))]
        return answer

    def _combine(self, v4: _Answer, v6: _Answer) -> _Answer:
        """One lookup's answer from both families; `ttl` becomes how long to cache it."""
        addresses = tuple(dict.fromkeys(v4.addresses + v6.addresses))
        if addresses:
            found = [a for a in (v4, v6) if a.result is _Result.OK]
            if all(a.result in (_Result.OK, _Result.NO_ANSWER) for a in (v4, v6)):
                ttl = min(a.ttl for a in found)
            else:
                # The other family failed: keep what works, but only briefly, so its addresses
                # are asked for again soon.
                ttl = self._min_ttl
            return _Answer(_Result.OK, addresses, min(max(ttl, self._min_ttl), self._max_ttl))
        results = {v4.result, v6.result}
        if _Result.NXDOMAIN in results:
            return _Answer(_Result.NXDOMAIN, ttl=self._min_ttl)
        if _Result.SERVFAIL in results:
            return _SERVFAIL
        if _Result.TIMEOUT in results:
            return _TIMED_OUT
        return _Answer(_Result.NO_ANSWER, ttl=self._min_ttl)

    async def _query(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, deadline: float
    ) -> _Answer:
        """One family: ask the nameservers in order, ROUNDS times over, until one answers."""
        loop = asyncio.get_running_loop()
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        servers = self._servers
        failed: set[int] = set()  # servers that answered with a failure: not asked again
        for round_ in range(ROUNDS):
            for index, (host, port) in enumerate(servers):
                if index in failed:
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return _TIMED_OUT
                # Split what is left evenly over the attempts still to come.
                later_here = sum(1 for i in range(index + 1, len(servers)) if i not in failed)
                later_rounds = (ROUNDS - round_ - 1) * (len(servers) - len(failed))
                attempt_deadline = loop.time() + remaining / (1 + later_here + later_rounds)
                try:
                    response = await self._exchange(query, host, port, attempt_deadline)
                except (TimeoutError, dns.exception.Timeout):
                    continue
                except (OSError, EOFError, dns.exception.DNSException):
                    failed.add(index)  # unreachable, reset, or a reply that does not parse
                    continue
                rcode = response.rcode()
                if rcode == dns.rcode.NXDOMAIN:
                    return _Answer(_Result.NXDOMAIN)
                if rcode == dns.rcode.NOERROR:
                    return _addresses_in(response, qname, rdtype)
                failed.add(index)  # SERVFAIL, REFUSED, ...: another server may do better
            if len(failed) == len(servers):
                return _SERVFAIL
        return _SERVFAIL if failed else _TIMED_OUT

    @staticmethod
    async def _exchange(
        query: dns.message.Message, host: str, port: int, deadline: float
    ) -> dns.message.Message:
        timeout = deadline - asyncio.get_running_loop().time()
        async with asyncio.timeout_at(deadline):
            try:
                # ignore_unexpected: datagrams from any other address are dropped, not errors;
                # ignore_errors: replies whose id or question do not match ours are dropped too
                # (spoofing, stale replies), and we keep waiting for the real one.
                return await dns.asyncquery.udp(
                    query,
                    host,
                    timeout=timeout,
                    port=port,
                    ignore_unexpected=True,
                    raise_on_truncation=True,
                    ignore_errors=True,
                )
            except dns.message.Truncated:
                return await dns.asyncquery.tcp(query, host, timeout=timeout, port=port)


def _addresses_in(
    response: dns.message.Message, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
) -> _Answer:
    """Follow the CNAME chain from `qname` inside the answer section to `rdtype` records."""
    owner = qname
    ttl = math.inf
    for _ in range(MAX_CNAME_CHAIN + 1):
        rrset = response.get_rrset(response.answer, owner, dns.rdataclass.IN, rdtype)
        if rrset is not None:
            addresses = tuple(
                ipaddress.ip_address(rdata.address)
                for rdata in rrset
                if isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA)
            )
            if not addresses:
                break
            return _Answer(_Result.OK, tuple(dict.fromkeys(addresses)), min(ttl, rrset.ttl))
        cname = response.get_rrset(response.answer, owner, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None or not isinstance(cname[0], dns.rdtypes.ANY.CNAME.CNAME):
            break
        ttl = min(ttl, cname.ttl)
        owner = cname[0].target
    return _Answer(_Result.NO_ANSWER)
