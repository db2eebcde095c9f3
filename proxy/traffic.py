"""Live traffic aggregates: who called what, what was refused, in fixed memory (issue 15).

Fed by the ExchangeLog at the same two points that write the audit records: once per exchange
when it is decided (`decided`) and once when it closes (`closed`). So the admin page, the
per-destination metrics and the audit stream all count the same exchanges.

What is kept, per workload (namespace + owner, as `outgate suggest` groups records):

  - one row per destination (name or address, and port): allowed and denied requests and
    tunnels, the reasons, bytes each way, first and last seen, the deciding rule, and the shadow
    decision where an audit-mode policy would decide otherwise;
  - at most `top` rows are shown, and at most 2 x `top` are held: when a workload reaches that
    many, the least used half is folded into its `other` row (counts and bytes kept, names lost).
    A busy destination that arrives late still gets a row: rows are ranked by use each time;
  - at most `max_workloads` workloads; traffic of later ones is counted in one `other
    workloads` entry.

Per workload and globally: the decisions of the last `WINDOW_MINUTES` in minute buckets (the
page's charts, its decisions per second and each workload's last hour). Globally also the last
`RECENT_REFUSALS` refusals with what the client sent (method, target, Host, User-Agent: raw
client strings, cut to `MAX_SHOWN_CHARS`).

Memory is bounded whatever the traffic: `bound_bytes()` is the documented ceiling
(docs/ui.md), checked by tests/unit/test_traffic.py with 100,000 distinct names.

The per-destination metrics (`outgate_destination_requests_total`,
`outgate_destination_bytes_total`) take their `destination` label from here: a workload's first
`metric_destinations` destinations keep their own label for the process's life, every other one
is `other`, so the series count is bounded by workloads x (metric_destinations + 1).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from proxy import metrics
from proxy.adoption.suggest import (
    ObservedWorkload,
    Observer,
    Suggestion,
    SuggestOptions,
    WorkloadKey,
    propose,
)
from proxy.audit import Exchange
from proxy.config import (
    DEFAULT_MAX_WORKLOADS,
    DEFAULT_METRIC_DESTINATIONS,
    DEFAULT_TOP_DESTINATIONS,
)
from proxy.core.identity import Workload, WorkloadKind
from proxy.core.policy.engine import Decision
from proxy.errors import Reason

WINDOW_MINUTES: Final = 60
RECENT_REFUSALS: Final = 50
# Addresses remembered per name row: enough to show where a name went and to let a suggestion
# keep the private addresses an internal service was reached at (proxy.adoption.suggest).
MAX_ADDRESSES_PER_ROW: Final = 4
# Raw client strings shown in the recent refusals are cut here (the audit record has them whole).
MAX_SHOWN_CHARS: Final = 200
# Documented ceiling of one row's memory: the row, its key, its name (up to 253 characters), its
# reasons, addresses and metric children. tests/unit/test_traffic.py measures 100,000 distinct
# 130-character names from one workload at about 225 KiB for its 101 rows and the refusals.
ROW_BYTES: Final = 2048
# Fixed cost of one workload entry beyond its rows: the entry, its key, the row table and its
# minute ring (WINDOW_MINUTES buckets of three counts).
WORKLOAD_BYTES: Final = 16384
# The recent refusals (each up to 4 raw strings of MAX_SHOWN_CHARS) and the workload table.
FIXED_BYTES: Final = 64 * 1024 + RECENT_REFUSALS * 4 * (MAX_SHOWN_CHARS + 100)

OTHER: Final = "other"
UNKNOWN_KEY: Final = WorkloadKey("", "Unknown", "unknown sources")
OTHER_WORKLOADS_KEY: Final = WorkloadKey("", "Other", "other workloads")


def workload_key(workload: Workload) -> WorkloadKey:
    """The owner a workload's traffic is grouped under, as `outgate suggest` groups records
    (`kubernetes.namespace` + `outgate.workload`, or the pod without an owner)."""
    return WorkloadKey(*_key_tuple(workload))


def _key_tuple(workload: Workload) -> tuple[str, str, str]:
    """`workload_key` as a plain tuple, equal to it and hashed alike (a dict holding
    WorkloadKeys finds it); per request, where building the NamedTuple costs more."""
    if workload.kind is WorkloadKind.UNKNOWN or workload.kind is WorkloadKind.AMBIGUOUS:
        return UNKNOWN_KEY
    if workload.owner_kind:
        return (workload.namespace, workload.owner_kind, workload.owner_name)
    return (workload.namespace, "Pod", workload.name)


def rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _count_minute(
    ring: deque[tuple[int, list[int]]], minute: int, allowed: bool, shadow: bool
) -> None:
    if not ring or ring[-1][0] != minute:
        ring.append((minute, [0, 0, 0]))
    counts = ring[-1][1]
    counts[0 if allowed else 1] += 1
    if shadow:
        counts[2] += 1


class Row:
    """One destination of one workload (or its `other` row). Mutable; owned by the aggregate."""

    __slots__ = (
        "addresses",
        "allowed",
        "bytes_in",
        "bytes_out",
        "children",
        "decision",
        "denied",
        "first_seen",
        "folded",
        "host",
        "last_reason",
        "last_seen",
        "metric_label",
        "metric_workload",
        "named",
        "outcomes",
        "port",
        "protocol_mismatches",
        "shadow",
        "shadow_differences",
        "tunnels_allowed",
        "tunnels_denied",
    )

    def __init__(
        self, host: str, port: int, *, named: bool, metric_label: str, metric_workload: str
    ) -> None:
        self.host = host
        self.port = port
        self.named = named  # a destination name (else an address, or the `other` row)
        self.metric_label = metric_label
        self.metric_workload = metric_workload
        # The row this one was folded into: an exchange decided here and closed after the fold
        # adds its bytes there.
        self.folded: Row | None = None
        self.allowed = 0  # requests and tunnels allowed
        self.denied = 0  # requests and tunnels refused (policy, guard, DNS, upstream...)
        self.tunnels_allowed = 0
        self.tunnels_denied = 0
        self.outcomes: dict[tuple[bool, Reason | None], int] = {}  # (allowed, reason) -> count
        self.bytes_out = 0  # client to upstream
        self.bytes_in = 0  # upstream to client
        self.first_seen = 0.0
        self.last_seen = 0.0
        # The last decision, and the last one whose shadow differed (shared, immutable objects:
        # their text is made when the page is drawn, not per request).
        self.decision: Decision | None = None
        self.shadow: Decision | None = None
        self.last_reason: Reason | None = None
        self.shadow_differences = 0
        self.addresses: list[str] = []
        self.protocol_mismatches = 0  # tunnels closed because they did not carry TLS
        # Metric children by (source namespace, action or direction): labelled once per row.
        self.children: dict[tuple[str, str], Any] = {}

    @property
    def rule(self) -> str | None:
        """`ruleset/rule` of the last decision, or its reason when no rule decided."""
        decision = self.decision
        if decision is None:
            return None
        if decision.rule is None:
            return str(decision.reason)
        return f"{decision.ruleset}/{decision.rule}"

    @property
    def shadow_action(self) -> str | None:
        verdict = self.shadow.shadow if self.shadow is not None else None
        return None if verdict is None else str(verdict.action)

    @property
    def shadow_rule(self) -> str | None:
        verdict = self.shadow.shadow if self.shadow is not None else None
        if verdict is None or verdict.rule is None:
            return None
        return f"{verdict.ruleset}/{verdict.rule}"

    @property
    def requests(self) -> int:
        return self.allowed + self.denied

    @property
    def would_be_denied(self) -> bool:
        """Allowed now, denied once the audit-mode policies are enforced."""
        return self.shadow_action == "deny" and self.allowed > 0

    def fold_into(self, other: Row) -> None:
        other.allowed += self.allowed
        other.denied += self.denied
        other.tunnels_allowed += self.tunnels_allowed
        other.tunnels_denied += self.tunnels_denied
        other.bytes_out += self.bytes_out
        other.bytes_in += self.bytes_in
        other.shadow_differences += self.shadow_differences
        for outcome, count in self.outcomes.items():
            other.outcomes[outcome] = other.outcomes.get(outcome, 0) + count
        other.first_seen = min(other.first_seen or self.first_seen, self.first_seen)
        other.last_seen = max(other.last_seen, self.last_seen)


class WorkloadTraffic:
    """Everything kept about one workload."""

    __slots__ = (
        "denied",
        "first_seen",
        "key",
        "last_seen",
        "metric_names",
        "metric_workload",
        "minutes",
        "other",
        "requests",
        "rows",
        "undestined",
    )

    def __init__(self, key: WorkloadKey) -> None:
        self.key = key
        self.rows: dict[tuple[str, int], Row] = {}
        self.requests = 0
        self.denied = 0
        self.undestined = 0  # refused before a destination was known (malformed, limits)
        self.first_seen = 0.0
        self.last_seen = 0.0
        self.metric_names: set[str] = set()  # destinations with their own metric label
        # The last WINDOW_MINUTES minutes: [allowed, denied, shadow differences] by minute.
        self.minutes: deque[tuple[int, list[int]]] = deque(maxlen=WINDOW_MINUTES)
        if key == UNKNOWN_KEY:
            self.metric_workload = "unknown"
        elif key == OTHER_WORKLOADS_KEY:
            self.metric_workload = OTHER
        else:
            self.metric_workload = f"{key.owner_kind}/{key.owner_name}"
        self.other = Row(
            OTHER, 0, named=False, metric_label=OTHER, metric_workload=self.metric_workload
        )

    def ranked(self) -> list[Row]:
        """Rows by use, most used first."""
        return sorted(self.rows.values(), key=lambda row: (-row.requests, row.host, row.port))


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """A recent refusal as the page shows it (raw client strings cut to MAX_SHOWN_CHARS)."""

    at: float
    event_id: str
    workload: str
    destination: str
    reason: str
    status: int | None
    method: str | None
    target: str | None
    host_field: str | None
    user_agent: str | None


def _shown(value: str | None) -> str | None:
    if value is None or len(value) <= MAX_SHOWN_CHARS:
        return value
    return value[:MAX_SHOWN_CHARS] + "..."


@dataclass(frozen=True, slots=True, kw_only=True)
class Minute:
    start: float  # seconds since the epoch
    allowed: int
    denied: int
    shadow_differences: int


class TrafficAggregate:
    """One per process, fed by its ExchangeLog and read by its admin page, both on its event
    loop (no lock)."""

    def __init__(
        self,
        *,
        top: int = DEFAULT_TOP_DESTINATIONS,
        max_workloads: int = DEFAULT_MAX_WORKLOADS,
        metric_destinations: int = DEFAULT_METRIC_DESTINATIONS,
    ) -> None:
        self.top = top
        self.max_workloads = max_workloads
        self.metric_destinations = metric_destinations
        # Keyed by WorkloadKey; looked up per request by the equal plain tuple (_key_tuple).
        self.workloads: dict[tuple[str, str, str], WorkloadTraffic] = {}
        self.refusals: deque[Refusal] = deque(maxlen=RECENT_REFUSALS)
        self.allowed = 0
        self.denied = 0
        self.shadow_differences = 0

    # -- feeding (ExchangeLog) -----------------------------------------------------------------
    def decided(self, ex: Exchange, *, allowed: bool) -> None:
        """An exchange's decision record was written: count it where it belongs."""
        now = time.time()
        decision = ex.decision
        shadow = decision.shadow if decision is not None else None
        if shadow is not None:
            self.shadow_differences += 1
        if allowed:
            self.allowed += 1
        else:
            self.denied += 1
        traffic = self._workload(ex.workload, now)
        _count_minute(traffic.minutes, int(now // 60), allowed, shadow is not None)
        traffic.requests += 1
        if not allowed:
            traffic.denied += 1
        row = self._row(traffic, ex, now)
        if row is None:
            traffic.undestined += 1
        else:
            ex.traffic_row = row
            outcome = (allowed, ex.reason)
            row.outcomes[outcome] = row.outcomes.get(outcome, 0) + 1
            row.last_reason = ex.reason
            tunnel = ex.kind == "tunnel"
            if allowed:
                row.allowed += 1
                row.tunnels_allowed += tunnel
            else:
                row.denied += 1
                row.tunnels_denied += tunnel
            row.decision = decision
            if shadow is not None:
                row.shadow_differences += 1
                row.shadow = decision
            address = ex.destination_ip
            if (
                row.named
                and address
                and address not in row.addresses
                and len(row.addresses) < MAX_ADDRESSES_PER_ROW
            ):
                row.addresses.append(address)
            action = "allow" if allowed else "deny"
            child = row.children.get((ex.workload.namespace, action))
            if child is None:
                child = row.children[(ex.workload.namespace, action)] = (
                    metrics.DESTINATION_REQUESTS.labels(
                        namespace=ex.workload.namespace,
                        workload=row.metric_workload,
                        destination=row.metric_label,
                        action=action,
                    )
                )
            child.inc()
        if not allowed:
            self._remember_refusal(ex, now)

    def closed(self, ex: Exchange, reason: Reason) -> None:
        """An exchange's close record is about to be written: its bytes, a tunnel's protocol."""
        row = ex.traffic_row
        if not isinstance(row, Row) or ex.tunnel_id is not None:
            # No destination known; or a request inside a tunnel, whose tunnel's own close
            # counts the wire bytes.
            return
        while row.folded is not None:
            row = row.folded
        row.bytes_out += ex.source_bytes
        row.bytes_in += ex.destination_bytes
        if reason is Reason.PROTOCOL_MISMATCH and ex.kind == "tunnel":
            row.protocol_mismatches += 1
        if ex.source_bytes:
            self._bytes_child(row, ex.workload.namespace, "egress").inc(ex.source_bytes)
        if ex.destination_bytes:
            self._bytes_child(row, ex.workload.namespace, "ingress").inc(ex.destination_bytes)

    @staticmethod
    def _bytes_child(row: Row, namespace: str, direction: str) -> Any:
        child = row.children.get((namespace, direction))
        if child is None:
            child = row.children[(namespace, direction)] = metrics.DESTINATION_BYTES.labels(
                namespace=namespace,
                workload=row.metric_workload,
                destination=row.metric_label,
                direction=direction,
            )
        return child

    def _workload(self, workload: Workload, now: float) -> WorkloadTraffic:
        traffic = self.workloads.get(_key_tuple(workload))
        if traffic is None:
            key = workload_key(workload)
            if len(self.workloads) >= self.max_workloads and key != UNKNOWN_KEY:
                key = OTHER_WORKLOADS_KEY
                traffic = self.workloads.get(key)
            if traffic is None:
                traffic = self.workloads[key] = WorkloadTraffic(key)
                traffic.first_seen = now
        traffic.last_seen = now
        return traffic

    def _row(self, traffic: WorkloadTraffic, ex: Exchange, now: float) -> Row | None:
        host = ex.destination_domain or ex.destination_ip
        port = ex.destination_port
        if host is None or port is None:
            return None
        row = traffic.rows.get((host, port))
        if row is None:
            if traffic.key == OTHER_WORKLOADS_KEY:
                row = traffic.other  # names of workloads past the cap are not kept
            else:
                if len(traffic.rows) >= 2 * self.top:
                    self._fold(traffic)
                name = f"{host}:{port}"
                label = OTHER
                if name in traffic.metric_names:
                    label = name
                elif len(traffic.metric_names) < self.metric_destinations:
                    traffic.metric_names.add(name)
                    label = name
                row = Row(
                    host,
                    port,
                    named=ex.destination_domain is not None,
                    metric_label=label,
                    metric_workload=traffic.metric_workload,
                )
                row.first_seen = now
                traffic.rows[(host, port)] = row
        row.last_seen = now
        return row

    def _fold(self, traffic: WorkloadTraffic) -> None:
        """Keep the `top` most used rows; fold the rest into `other`."""
        for row in traffic.ranked()[self.top :]:
            row.fold_into(traffic.other)
            row.folded = traffic.other
            del traffic.rows[(row.host, row.port)]

    def _remember_refusal(self, ex: Exchange, now: float) -> None:
        destination = ex.destination_domain or ex.destination_ip
        if destination is not None and ex.destination_port is not None:
            destination = f"{destination}:{ex.destination_port}"
        self.refusals.append(
            Refusal(
                at=now,
                event_id=ex.id,
                workload=ex.workload.describe(),
                destination=_shown(destination) or "-",
                reason=str(ex.reason),
                status=ex.status,
                method=_shown(ex.method),
                target=_shown(ex.raw_target if ex.raw_target is not None else ex.path),
                host_field=_shown(ex.host_field),
                user_agent=_shown(ex.user_agent),
            )
        )

    # -- reading (the admin page) --------------------------------------------------------------
    def minutes(
        self, now: float | None = None, workload: WorkloadTraffic | None = None
    ) -> list[Minute]:
        """The last WINDOW_MINUTES minutes, oldest first, minutes without traffic included: of
        every workload, or of `workload`."""
        current = int((time.time() if now is None else now) // 60)
        counts: dict[int, list[int]] = {}
        for traffic in self.workloads.values() if workload is None else (workload,):
            for minute, values in traffic.minutes:
                summed = counts.setdefault(minute, [0, 0, 0])
                for index, value in enumerate(values):
                    summed[index] += value
        window = []
        for minute in range(current - WINDOW_MINUTES + 1, current + 1):
            allowed, denied, shadow = counts.get(minute, (0, 0, 0))
            window.append(Minute(start=minute * 60.0, allowed=allowed, denied=denied,
                                 shadow_differences=shadow))  # fmt: skip
        return window

    def top_denied(self, limit: int) -> list[tuple[WorkloadTraffic, Row]]:
        rows = [
            (traffic, row)
            for traffic in self.workloads.values()
            for row in (*traffic.rows.values(), traffic.other)
            if row.denied
        ]
        rows.sort(key=lambda pair: (-pair[1].denied, pair[1].host))
        return rows[:limit]

    def shown_rows(self, traffic: WorkloadTraffic) -> list[Row]:
        """The rows the page shows: the `top` most used, denials first, then `would be denied`,
        then by use; the `other` row last when it holds anything."""
        rows = traffic.ranked()[: self.top]
        rows.sort(key=lambda row: (row.denied == 0, not row.would_be_denied, -row.requests))
        if traffic.other.requests:
            rows.append(traffic.other)
        return rows

    def suggestion(self, key: WorkloadKey, options: SuggestOptions) -> Suggestion | None:
        """The policy `outgate suggest` would write for this workload from what is held here
        (rows folded into `other` are not in it: the page says how many requests those were)."""
        traffic = self.workloads.get(key)
        if traffic is None or key in (UNKNOWN_KEY, OTHER_WORKLOADS_KEY):
            return None
        observed = ObservedWorkload(
            requests=traffic.requests,
            first_seen=rfc3339(traffic.first_seen),
            last_seen=rfc3339(traffic.last_seen),
        )
        observe = Observer(options)
        for row in traffic.rows.values():
            domain = row.host if row.named else None
            address = row.host if not row.named else (row.addresses[0] if row.addresses else None)
            for (allowed, reason), count in row.outcomes.items():
                observe.decision(
                    observed,
                    domain=domain,
                    address=address,
                    port=row.port,
                    decision="allow" if allowed else "deny",
                    reason=str(reason),
                    requests=count,
                )
            for extra in row.addresses[1:]:  # every address it was reached at
                if any(allowed for allowed, _ in row.outcomes):
                    observe.decision(
                        observed,
                        domain=domain,
                        address=extra,
                        port=row.port,
                        decision="allow",
                        reason=str(Reason.RULE_ALLOW),
                        requests=0,
                    )
            if row.protocol_mismatches:
                observe.tunnel_closed(
                    observed,
                    domain=domain,
                    address=address,
                    port=row.port,
                    reason=str(Reason.PROTOCOL_MISMATCH),
                )
        return propose({key: observed}, options, records=traffic.requests)

    def workload_bound_bytes(self) -> int:
        """The documented ceiling of one workload's entry: its rows, held and `other`."""
        return WORKLOAD_BYTES + (2 * self.top + 1) * ROW_BYTES

    def bound_bytes(self) -> int:
        """The documented ceiling of this aggregate's memory: every workload entry it may hold
        (`max_workloads`, unknown sources and other workloads) and the fixed parts."""
        return FIXED_BYTES + (self.max_workloads + 2) * self.workload_bound_bytes()

    def rows_held(self) -> int:
        return sum(len(t.rows) + 1 for t in self.workloads.values())
