"""Audit records for suggest tests, rendered by the proxy's own schema functions
(`proxy.audit.decision_record` / `close_record` / `render`), so the tests read what the proxy
writes."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.audit import Exchange, close_record, decision_record, render
from proxy.core.identity import UNKNOWN_WORKLOAD, Workload, WorkloadKind
from proxy.core.policy.engine import Decision, Outcome, Verdict
from proxy.errors import Reason


def pod(namespace: str, owner_kind: str, owner: str, name: str) -> Workload:
    return Workload(
        kind=WorkloadKind.POD,
        namespace=namespace,
        name=name,
        labels={"app": owner},
        owner_kind=owner_kind,
        owner_name=owner,
    )


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as a test describes it: who, where, how it went."""

    source: str
    workload: Workload
    host: str  # a name, or an IP literal
    port: int
    kind: str = "tunnel"  # "tunnel" | "forward"
    outcome: str = "allow"  # "allow" | "deny" (policy) | "guarded"
    resolved: str = "93.184.216.34"
    close_reason: Reason = Reason.COMPLETED
    path: str = "/"

    @property
    def url(self) -> str:
        """The URL `explain` takes for this request."""
        if self.kind == "tunnel":
            return f"{self.host}:{self.port}"
        return f"http://{self.host}:{self.port}{self.path}"


ALLOW = Decision(
    verdict=Verdict(action=Outcome.ALLOW, reason=Reason.RULE_ALLOW, rule="r", ruleset="p"),
    revision=1,
)
DENY = Decision(
    verdict=Verdict(action=Outcome.DENY, reason=Reason.RULE_DENY, rule="r", ruleset="p"),
    revision=1,
)


def lines_for(seen: Seen) -> list[bytes]:
    """The decision and close record lines the proxy writes for this request."""
    is_ip = seen.host[0].isdigit() or ":" in seen.host
    ex = Exchange(
        kind=seen.kind,
        source_ip=seen.source,
        source_port=40000,
        workload=seen.workload,
        destination_domain=None if is_ip else seen.host,
        destination_ip=seen.host if is_ip else None,
        destination_port=seen.port,
        method="CONNECT" if seen.kind == "tunnel" else "GET",
        path=None if seen.kind == "tunnel" else seen.path,
    )
    if seen.outcome == "allow":
        ex.decision, ex.reason, ex.decided = ALLOW, Reason.RULE_ALLOW, True
        ex.destination_ip = seen.host if is_ip else seen.resolved
        if seen.kind == "forward":
            ex.status = None
        decision = decision_record(ex)
        if seen.kind == "forward":
            ex.status = 200
        return [render(decision), render(close_record(ex, seen.close_reason))]
    if seen.outcome == "guarded":
        ex.decision, ex.reason, ex.status = ALLOW, Reason.GUARDED_ADDRESS, 403
    else:
        ex.decision, ex.reason, ex.status = DENY, Reason.RULE_DENY, 403
    return [render(decision_record(ex)), render(close_record(ex, ex.reason))]


WEB_1 = pod("shop", "Deployment", "web", "web-5c9d-a")
WEB_2 = pod("shop", "Deployment", "web", "web-5c9d-b")
REPORT = pod("shop", "CronJob", "report", "report-2890")
ETL = pod("data", "StatefulSet", "etl", "etl-0")
SOURCES = {"10.0.1.1": WEB_1, "10.0.1.2": WEB_2, "10.0.2.1": REPORT, "10.0.3.1": ETL}

SHARDS = [f"s{n}.cdn.shop-assets.example" for n in range(1, 8)]
BUCKETS = [f"bucket-{n}.s3.amazonaws.com" for n in range(1, 7)]

OBSERVED: list[Seen] = [
    Seen("10.0.1.1", WEB_1, "api.stripe.com", 443),
    Seen("10.0.1.2", WEB_2, "api.stripe.com", 443),
    *(Seen("10.0.1.1", WEB_1, shard, 443) for shard in SHARDS),
    Seen("10.0.1.2", WEB_2, "www.example.org", 80, kind="forward", path="/feed"),
    Seen("10.0.1.1", WEB_1, "www.example.org", 443),
    *(Seen("10.0.1.2", WEB_2, bucket, 443) for bucket in BUCKETS),
    Seen("10.0.1.1", WEB_1, "203.0.113.10", 8443),
    # An internal service that a cidr rule opened: it resolves into guarded space.
    Seen("10.0.1.1", WEB_1, "inventory.corp.example", 443, resolved="10.20.3.4"),
    # Tunnels whose bytes were not TLS: the close record says protocol_mismatch.
    Seen("10.0.2.1", REPORT, "db.corp.example", 5432, close_reason=Reason.PROTOCOL_MISMATCH),
    Seen("10.0.2.1", REPORT, "git.example.net", 22, close_reason=Reason.PROTOCOL_MISMATCH),
    Seen("10.0.2.1", REPORT, "smtp.example.net", 2525, close_reason=Reason.PROTOCOL_MISMATCH),
    Seen("10.0.3.1", ETL, "api.partner.example", 443),
    Seen("10.0.3.1", ETL, "metadata.google.internal", 80, kind="forward", outcome="guarded"),
    Seen("10.0.3.1", ETL, "exfil.example", 443, outcome="deny"),
    Seen("192.0.2.50", UNKNOWN_WORKLOAD, "api.stripe.com", 443),
]


def recorded_log() -> list[bytes]:
    lines: list[bytes] = []
    for seen in OBSERVED:
        lines.extend(lines_for(seen))
    return [b"not an audit record\n", *lines, b"\n"]
