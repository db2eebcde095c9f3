"""Micro-benchmarks of the per-request work that does not touch a socket.

Each figure is the best of LOOPS short timed loops (on a shared machine, the least disturbed
one: a short loop is likelier to fit between other work), in microseconds per operation. Run
pinned to one CPU by bench/run.py; prints one JSON object.

- policy decision at 10, 1,000 and 10,000 rules: `cold` cycles through more distinct
  destinations than the decision memo holds (every call evaluates the rules), `warm` repeats one
  destination (what a kept-alive client costs);
- ClientHello parsing (proxy.core.clienthello), a real hello made by Python's ssl module;
- request-head parsing: find the end of a head, then parse it;
- audit record rendering: the decision and the close record of one request, to bytes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

from proxy import audit
from proxy.audit import Exchange
from proxy.core.hosts import Host, normalize_name, parse_ip_address
from proxy.core.http1 import find_head_end, parse_request_head
from proxy.core.identity import LabelSelector, Workload, WorkloadKind
from proxy.core.policy.engine import DECISION_CACHE_SIZE, Engine
from proxy.core.policy.model import (
    Action,
    Destination,
    Policy,
    PolicyKind,
    PortRange,
    Rule,
    Tier,
)
from proxy.errors import Reason

LOOPS = 25
RULE_COUNTS = (10, 1_000, 10_000)
# More distinct destinations than the decision memo holds: every `cold` call is a miss.
COLD_DESTINATIONS = DECISION_CACHE_SIZE * 2 + 1

REQUEST_HEAD = (
    b"GET http://api.example.com/v1/items?page=2 HTTP/1.1\r\n"
    b"Host: api.example.com\r\n"
    b"User-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n"
    b"Accept-Encoding: gzip\r\n"
    b"Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc\r\n"
    b"\r\n"
)


def best_of(fn: Callable[[], object], iterations: int) -> float:
    """Microseconds per call: the fastest of LOOPS loops of `iterations` calls."""
    best = float("inf")
    for _ in range(LOOPS):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        best = min(best, time.perf_counter() - start)
    return best / iterations * 1e6


# -- policy ------------------------------------------------------------------------------------


def _rule(index: int) -> Rule:
    """A third exact names, a third wildcards, a third CIDRs, with ports, like a real allowlist."""
    kind = index % 3
    ports = (PortRange(start=443, end=443), PortRange(start=8000, end=8100))
    if kind == 0:
        return Rule(
            name=f"r{index}",
            action=Action.ALLOW,
            fqdns=(normalize_name(f"svc{index}.example{index % 97}.com"),),
            ports=ports,
        )
    if kind == 1:
        return Rule(
            name=f"r{index}",
            action=Action.ALLOW,
            wildcard_suffixes=(normalize_name(f"zone{index}.example.net"),),
            ports=ports,
        )
    network = ipaddress.ip_network(f"10.{(index >> 8) & 255}.{index & 255}.0/24")
    return Rule(name=f"r{index}", action=Action.ALLOW, cidrs=(network,), ports=ports)


def build_engine(rules: int) -> Engine:
    """`rules` rules in policies of 50, half cluster-wide, half in the workload's namespace."""
    policies: list[Policy] = []
    per_policy = 50
    for start in range(0, rules, per_policy):
        chunk = tuple(_rule(i) for i in range(start, min(rules, start + per_policy)))
        number = start // per_policy
        if number % 2 == 0:
            policies.append(
                Policy(
                    kind=PolicyKind.CLUSTER,
                    name=f"cluster-{number}",
                    tier=Tier.BASELINE,
                    priority=number % 1000,
                    rules=chunk,
                )
            )
        else:
            policies.append(
                Policy(
                    kind=PolicyKind.NAMESPACED,
                    name=f"ns-{number}",
                    namespace="payments",
                    tier=Tier.NAMESPACE,
                    pod_selector=LabelSelector(match_labels=(("app", "api"),)),
                    rules=chunk,
                )
            )
    return Engine.compile(policies, default_action=Action.DENY, revision=1)


def _destinations(rules: int, count: int) -> list[Destination]:
    """Destinations that hit rules of every kind, and some that miss."""
    found: list[Destination] = []
    for n in range(count):
        index = n % rules
        kind = n % 4
        port = 443 if n % 2 else 8000 + n % 100
        if kind == 0:
            host = Host(name=f"svc{index - index % 3}.example{(index - index % 3) % 97}.com")
            found.append(Destination(host=host, port=port))
        elif kind == 1:
            zone = index - index % 3 + 1
            found.append(Destination(host=Host(name=f"h{n}.zone{zone}.example.net"), port=port))
        elif kind == 2:
            ip = parse_ip_address(f"10.{(index >> 8) & 255}.{index & 255}.{n % 250 + 1}")
            found.append(Destination(host=Host(name=f"db{n}.internal"), port=port, ip=ip))
        else:
            found.append(Destination(host=Host(name=f"miss{n}.example.org"), port=port))
    return found


def policy_results() -> dict[str, Any]:
    workload = Workload(
        kind=WorkloadKind.POD,
        namespace="payments",
        name="api-7d9f",
        labels={"app": "api"},
    )
    results: dict[str, Any] = {}
    for rules in RULE_COUNTS:
        engine = build_engine(rules)
        cold = _destinations(rules, COLD_DESTINATIONS)
        position = 0

        def decide_cold(engine: Engine = engine, cold: list[Destination] = cold) -> None:
            nonlocal position
            engine.decide(workload, cold[position])
            position = position + 1 if position + 1 < len(cold) else 0

        warm = cold[0]
        for destination in cold:  # fill the selection cache; each cold call is still a miss
            engine.decide(workload, destination)
        results[str(rules)] = {
            "rules": engine.rule_count,
            "cold_us": round(best_of(decide_cold, 4096), 3),  # the position carries on
            "warm_us": round(best_of(lambda e=engine, w=warm: e.decide(workload, w), 10_000), 3),
        }
    return results


# -- ClientHello -------------------------------------------------------------------------------


def client_hello_bytes() -> bytes:
    """A real ClientHello (SNI, ALPN, TLS 1.3 key share), as Python's ssl module sends it."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="api.example.com")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()  # stops for want of the ServerHello; the hello is written by then
    return outgoing.read()


def clienthello_results() -> dict[str, Any]:
    try:
        from proxy.core.clienthello import ClientHelloReader
    except ImportError:
        return {"status": "pending: proxy.core.clienthello is not there yet"}
    hello = client_hello_bytes()

    def parse() -> None:
        if ClientHelloReader().feed(hello) is None:
            raise RuntimeError("the ClientHello did not parse")

    return {"status": "ok", "bytes": len(hello), "us": round(best_of(parse, 2_000), 3)}


# -- heads and audit ---------------------------------------------------------------------------


def head_results() -> dict[str, Any]:
    def find_and_parse() -> None:
        end = find_head_end(REQUEST_HEAD, max_head_bytes=65536)
        parse_request_head(REQUEST_HEAD[:end])

    return {"bytes": len(REQUEST_HEAD), "us": round(best_of(find_and_parse, 5_000), 3)}


def audit_exchange() -> Exchange:
    """One allowed request of a Deployment's pod, as the records of a request describe it."""
    engine = build_engine(10)
    workload = Workload(
        kind=WorkloadKind.POD,
        namespace="payments",
        name="api-7d9f",
        uid="6f1c2a7e-1111-2222-3333-444455556666",
        labels={"app": "api"},
        service_account="api",
        owner_kind="Deployment",
        owner_name="api",
    )
    destination = _destinations(10, 1)[0]
    exchange = Exchange(kind="forward", source_ip="10.1.2.3", source_port=51234, workload=workload)
    exchange.decision = engine.decide(workload, destination)
    exchange.destination_domain = destination.host.name
    exchange.destination_ip = "10.9.8.7"
    exchange.destination_port = destination.port
    exchange.method = "GET"
    exchange.path = "/v1/items?page=2"
    exchange.decided = True
    exchange.status = 200
    exchange.source_bytes, exchange.destination_bytes = 312, 5120
    return exchange


def audit_lines(exchange: Exchange) -> Callable[[], tuple[bytes, bytes]]:
    """The two lines of `exchange` as the sink renders them: `decision_line` and `close_line`,
    or, in a tree from before them (`bench.micro_instructions --source`), the records built as
    dicts and rendered. The parts the two records share are rendered again for each pair, as
    for a new exchange (the first record renders them, the second reuses them)."""
    if hasattr(audit, "close_line"):

        def both() -> tuple[bytes, bytes]:
            exchange.audit_parts = None
            return audit.decision_line(exchange), audit.close_line(exchange, Reason.COMPLETED)

        return both
    return lambda: (
        audit.render(audit.decision_record(exchange)),
        audit.render(audit.close_record(exchange, Reason.COMPLETED)),
    )


def audit_results() -> dict[str, Any]:
    both = audit_lines(audit_exchange())
    line = both()[1]
    return {"records": 2, "close_bytes": len(line), "us": round(best_of(both, 5_000), 3)}


def main() -> int:
    results = {
        "policy_decision": policy_results(),
        "clienthello": clienthello_results(),
        "request_head": head_results(),
        "audit_render": audit_results(),
    }
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
