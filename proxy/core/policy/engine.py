"""The policy engine: one pure entry, `Engine.decide(workload, destination) -> Decision`.

An `Engine` is compiled once per policy revision and never changes; a reload builds a new one
and swaps it in (proxy.control.policy_source). Deciding costs the same however many rules
cannot match: rules are indexed by exact name, by wildcard suffix and by CIDR, so `decide`
looks up only the rules whose destination matches, then walks those few in evaluation order.

Evaluation, DESIGN section 3 (the same numbers mark the code in `_evaluate`):

  1. Admin tier. ClusterEgressPolicies with `tier: admin` whose subject selects the workload,
     ordered by (priority, name), rules in order. The first rule whose destination and port
     match decides: Allow -> allow (rule_allow), Deny -> deny (rule_deny), Pass -> step 2.
  2. Namespace tier. EgressPolicies in the workload's namespace whose podSelector selects it.
     A matching Deny wins over a matching Allow (when several match, the first in (policy
     name, rule order) is reported). Pass is not a match here (the loader refuses it).
     If any policy selects the workload and no Allow or Deny matched: deny
     (namespace_isolation), as NetworkPolicy isolates a selected pod.
  3. Baseline tier. As step 1 with `tier: baseline`; Pass -> step 4.
  4. The configured default action (default_allow / default_deny).

A policy that stands in for an invalid stored object (`Policy.invalid`) holds one rule matching
every destination and port, Deny: at its place in the order it denies everything that reaches it,
with reason policy_invalid (docs/kubernetes.md, "Invalid objects fail closed").

Audit mode: the decision comes from enforce-mode policies only. When an audit-mode policy
selects the workload, the engine evaluates again with every policy enforced; that verdict is the
shadow decision, kept when it differs from the decision in action, ruleset or rule.

Explain: there is one evaluator, `Engine._evaluate`. `decide(..., explain=True)` runs it with a
`_Trace`, which it tells of each rule it takes and each tier's outcome as it goes; the trace only
words those choices as `Step`s (DESIGN: what is explained is what is enforced). Without a trace
the evaluator pays one `is not None` test per choice. tests/unit/test_policy_differential.py
checks over generated policy sets that both paths give the same decision.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Final, Protocol

from proxy.core.hosts import IPAddress
from proxy.core.identity import CidrTable, IPNetwork, SelectionKey, Workload
from proxy.core.policy.model import (
    Action,
    Destination,
    Inspect,
    Mode,
    Policy,
    PolicyKind,
    Rule,
    Tier,
    TlsOptions,
    TunnelProtocol,
)
from proxy.errors import Reason

__all__ = [
    "SELECTION_CACHE_SIZE",
    "Decider",
    "Decision",
    "Destination",  # defined in model; re-exported because callers build it to call decide
    "Engine",
    "Outcome",
    "Step",
    "Verdict",
]

# Subject selection is cached per workload *shape* (namespace, labels, service account, owner;
# not pod name), so replicas share an entry. A large cluster has a few thousand distinct shapes
# (roughly its Deployments and StatefulSets); an entry is one small frozenset.
SELECTION_CACHE_SIZE: Final = 4096
# Decisions are memoised per (workload shape, destination): a kept-alive client asks the same
# question on every request, twice (by name, then per resolved address). An entry is a key tuple
# and a shared Decision, about 200 bytes, so the cap bounds the memo near 3 MB; when it fills it
# is emptied (a wildcard rule lets clients mint names without end, so it must not grow).
DECISION_CACHE_SIZE: Final = 16384


class Outcome(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """One evaluation's outcome and why. For an allow, `allowed_cidrs`, `protocol` and `inspect`
    come from the deciding rule: the address guard admits a guarded address only when it is in
    `allowed_cidrs`; the tunnel enforces `protocol` (None: the rule names none, so TLS or plain
    HTTP). A default allow has no rule, so it carries no CIDRs and no protocol."""

    action: Outcome
    reason: Reason
    rule: str | None = None
    ruleset: str | None = None
    tier: Tier | None = None
    mode: Mode | None = None
    allowed_cidrs: tuple[IPNetwork, ...] = ()
    protocol: TunnelProtocol | None = None
    inspect: Inspect | None = None
    tls: TlsOptions | None = None  # the deciding rule's `tls`; None means the defaults

    @property
    def allowed(self) -> bool:
        return self.action is Outcome.ALLOW

    def same_outcome(self, other: Verdict) -> bool:
        return (self.action, self.ruleset, self.rule) == (other.action, other.ruleset, other.rule)


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """One line of an explanation: what a tier (or one policy in it) contributed."""

    tier: str  # "admin" | "namespace" | "baseline" | "default"
    ruleset: str | None
    rule: str | None
    result: str
    shadow: bool = False  # part of the shadow evaluation (every policy enforced)


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The enforced verdict (its fields are readable directly: `decision.action`), the shadow
    verdict when audit-mode policies would decide otherwise, the policy revision, and, with
    `decide(..., explain=True)`, every evaluation step."""

    verdict: Verdict
    shadow: Verdict | None = None
    revision: int
    steps: tuple[Step, ...] = ()

    @property
    def action(self) -> Outcome:
        return self.verdict.action

    @property
    def allowed(self) -> bool:
        return self.verdict.action is Outcome.ALLOW

    @property
    def reason(self) -> Reason:
        return self.verdict.reason

    @property
    def rule(self) -> str | None:
        return self.verdict.rule

    @property
    def ruleset(self) -> str | None:
        return self.verdict.ruleset

    @property
    def tier(self) -> Tier | None:
        return self.verdict.tier

    @property
    def mode(self) -> Mode | None:
        return self.verdict.mode

    @property
    def allowed_cidrs(self) -> tuple[IPNetwork, ...]:
        return self.verdict.allowed_cidrs

    @property
    def protocol(self) -> TunnelProtocol | None:
        return self.verdict.protocol

    @property
    def inspect(self) -> Inspect | None:
        return self.verdict.inspect

    @property
    def tls(self) -> TlsOptions | None:
        return self.verdict.tls


class Decider(Protocol):
    """What the data plane calls: an Engine, or the PolicyStore that holds the one in force."""

    def decide(
        self, workload: Workload, destination: Destination, *, explain: bool = False
    ) -> Decision: ...


def _rule_verdict(policy: Policy, rule: Rule) -> Verdict | None:
    """The verdict a rule gives when it decides; None for Pass (it hands over, never decides)."""
    match rule.action:
        case Action.ALLOW:
            return Verdict(
                action=Outcome.ALLOW, reason=Reason.RULE_ALLOW,
                rule=rule.name, ruleset=policy.ruleset, tier=policy.tier, mode=policy.mode,
                allowed_cidrs=rule.cidrs, protocol=rule.protocol, inspect=rule.inspect,
                tls=rule.tls,
            )  # fmt: skip
        case Action.DENY:
            reason = Reason.POLICY_INVALID if policy.invalid else Reason.RULE_DENY
            return Verdict(
                action=Outcome.DENY, reason=reason,
                rule=rule.name, ruleset=policy.ruleset, tier=policy.tier, mode=policy.mode,
            )  # fmt: skip
        case Action.PASS:
            return None


def _isolation_verdict(policy: Policy) -> Verdict:
    # Names the first selecting policy so the audit record points somewhere useful.
    return Verdict(
        action=Outcome.DENY, reason=Reason.NAMESPACE_ISOLATION,
        ruleset=policy.ruleset, tier=Tier.NAMESPACE, mode=policy.mode,
    )  # fmt: skip


def _default_verdict(action: Action) -> Verdict:
    match action:
        case Action.ALLOW:
            return Verdict(action=Outcome.ALLOW, reason=Reason.DEFAULT_ALLOW)
        case Action.DENY:
            return Verdict(action=Outcome.DENY, reason=Reason.DEFAULT_DENY)
        case Action.PASS:
            raise ValueError("the default action is Allow or Deny")


# A rule's ports as a set when they span at most this many numbers in all (lists of ports and
# short ranges: one hash lookup), else as (start, end) pairs compared one by one.
_PORT_SET_LIMIT: Final = 1024


@dataclass(frozen=True, slots=True, eq=False)
class _Entry:
    """A rule placed in global evaluation order, with the verdict it gives when it decides.
    Its policy's tier and mode and its ports are flattened here for the hot path; entries
    compare by identity (each exists once per engine)."""

    order: int
    slot: int  # index of its policy in Engine.policies
    policy: Policy
    rule: Rule
    verdict: Verdict | None  # None for Pass
    tier: Tier
    audit: bool  # the policy is in audit mode
    port_set: frozenset[int] | None
    port_ranges: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, order: int, slot: int, policy: Policy, rule: Rule) -> _Entry:
        ranges = tuple((r.start, r.end) for r in rule.ports)
        span = sum(end - start + 1 for start, end in ranges)
        port_set = (
            frozenset(p for start, end in ranges for p in range(start, end + 1))
            if span <= _PORT_SET_LIMIT
            else None
        )
        return cls(
            order, slot, policy, rule, _rule_verdict(policy, rule),
            policy.tier, policy.mode is Mode.AUDIT, port_set, ranges,
        )  # fmt: skip

    def matches_port(self, port: int) -> bool:
        if self.port_set is not None:
            return port in self.port_set
        return any(start <= port <= end for start, end in self.port_ranges)


@dataclass(frozen=True, slots=True, eq=False)
class _Selection:
    """Which policies select one workload shape. Compared by identity: it keys the decision
    memo, and the selection cache hands out one object per shape."""

    slots: frozenset[int]
    namespace_slots: tuple[int, ...]  # selecting EgressPolicies, in evaluation order
    has_audit: bool  # an audit-mode policy selects it: the shadow evaluation is needed
    # Step 2's isolation verdict when nothing matched (None: no EgressPolicy selects), for the
    # enforced evaluation (audit-mode policies left out) and for the shadow one (all policies).
    isolation_enforced: Verdict | None
    isolation_all: Verdict | None


class Engine:
    """A compiled, immutable policy set. Build with `Engine.compile`.

    The selection cache is memoisation only (it never changes an answer); the engine is used from
    one event loop per worker process, so it takes no lock.
    """

    __slots__ = (
        "_cache",
        "_cidrs",
        "_cluster_slots",
        "_decision_objects",
        "_decisions",
        "_default",
        "_digest",
        "_everywhere",
        "_exact",
        "_has_audit",
        "_isolation",
        "_namespace_slots",
        "_rule_count",
        "_tier_slots",
        "_wildcard",
        "default_action",
        "policies",
        "revision",
    )

    def __init__(
        self, policies: Iterable[Policy], *, default_action: Action, revision: int
    ) -> None:
        self.default_action = default_action
        self.revision = revision
        self._digest: str | None = None
        self._default = _default_verdict(default_action)
        given = list(policies)
        seen: set[tuple[PolicyKind, str, str]] = set()
        for policy in given:
            if policy.identity in seen:
                raise ValueError(f"duplicate policy {policy.kind} {policy.ruleset}")
            seen.add(policy.identity)

        def by_tier(tier: Tier) -> list[Policy]:
            return [policy for policy in given if policy.tier is tier]

        ordered = (
            sorted(by_tier(Tier.ADMIN), key=lambda p: (p.priority, p.name))
            + sorted(by_tier(Tier.NAMESPACE), key=lambda p: (p.namespace, p.name))
            + sorted(by_tier(Tier.BASELINE), key=lambda p: (p.priority, p.name))
        )
        self.policies: tuple[Policy, ...] = tuple(ordered)
        self._tier_slots: dict[Tier, tuple[int, ...]] = {
            tier: tuple(slot for slot, p in enumerate(ordered) if p.tier is tier) for tier in Tier
        }
        self._cluster_slots = self._tier_slots[Tier.ADMIN] + self._tier_slots[Tier.BASELINE]
        namespace_slots: dict[str, list[int]] = {}
        for slot in self._tier_slots[Tier.NAMESPACE]:
            namespace_slots.setdefault(ordered[slot].namespace, []).append(slot)
        self._namespace_slots = {ns: tuple(slots) for ns, slots in namespace_slots.items()}
        self._isolation = {
            slot: _isolation_verdict(ordered[slot]) for slot in self._tier_slots[Tier.NAMESPACE]
        }
        self._has_audit = any(p.mode is Mode.AUDIT for p in ordered)

        # Destination indexes. A rule sits under each name, suffix and CIDR it lists, so a rule
        # with only CIDRs is never looked at for a name, and the reverse.
        self._exact: dict[str, list[_Entry]] = {}
        self._wildcard: dict[str, list[_Entry]] = {}
        self._cidrs: CidrTable[list[_Entry]] = CidrTable()
        # Fail-closed stand-ins' rules match every destination; empty unless an object is invalid.
        self._everywhere: list[_Entry] = []
        order = 0
        for slot, policy in enumerate(ordered):
            for rule in policy.rules:
                entry = _Entry.build(order, slot, policy, rule)
                order += 1
                # Each list stays in evaluation order and holds an entry once (a rule that
                # names the same destination twice), so one list needs no merge.
                for name in rule.fqdns:
                    _add_once(self._exact.setdefault(name, []), entry)
                for suffix in rule.wildcard_suffixes:
                    _add_once(self._wildcard.setdefault(suffix, []), entry)
                for cidr in rule.cidrs:
                    _add_once(self._cidrs.setdefault(cidr, []), entry)
                if rule.any_destination:
                    self._everywhere.append(entry)
        self._rule_count = order
        self._cache: OrderedDict[SelectionKey, _Selection] = OrderedDict()
        self._decisions: dict[tuple[_Selection, str, bool, int, IPAddress | None], Decision] = {}
        # One Decision object per (verdict, shadow) pair: verdicts are built here, once, so
        # deciding allocates nothing. Keyed by identity; the values keep the verdicts alive.
        self._decision_objects: dict[tuple[int, int], Decision] = {}

    @classmethod
    def compile(
        cls, policies: Iterable[Policy], *, default_action: Action, revision: int
    ) -> Engine:
        return cls(policies, default_action=default_action, revision=revision)

    @property
    def rule_count(self) -> int:
        return self._rule_count

    @property
    def digest(self) -> str:
        """What this engine enforces, as 16 hex digits: the same on every replica that holds
        the same policies, whatever its `revision` (a per-process count of loads). Replicas
        agree exactly when their digests do."""
        if self._digest is None:
            self._digest = policy_set_digest(self.policies, self.default_action)
        return self._digest

    def decide(
        self, workload: Workload, destination: Destination, *, explain: bool = False
    ) -> Decision:
        selection = self._selection(workload)
        if explain:  # the same evaluation with a trace; never memoised (steps are per call)
            return self._decide(selection, destination, explain=True)
        host = destination.host
        key = (selection, host.name, host.ip is None, destination.port, destination.ip)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(selection, destination, explain=False)
            if len(self._decisions) >= DECISION_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    def _decide(
        self, selection: _Selection, destination: Destination, *, explain: bool
    ) -> Decision:
        """The enforced evaluation and, when an audit-mode policy selects the workload, the
        shadow one; with `explain`, each traced into steps (enforced first, then shadow)."""
        candidates = self._candidates(destination)
        trace = _Trace(self, selection, enforce_only=True) if explain else None
        verdict = self._evaluate(candidates, selection, enforce_only=True, trace=trace)
        shadow: Verdict | None = None
        shadow_trace: _Trace | None = None
        if selection.has_audit:
            shadow_trace = _Trace(self, selection, enforce_only=False) if explain else None
            every = self._evaluate(candidates, selection, enforce_only=False, trace=shadow_trace)
            if not every.same_outcome(verdict):
                shadow = every
        if trace is not None:
            steps = trace.steps + shadow_trace.steps if shadow_trace is not None else trace.steps
            return Decision(
                verdict=verdict, shadow=shadow, revision=self.revision, steps=tuple(steps)
            )
        key = (id(verdict), id(shadow))
        decision = self._decision_objects.get(key)
        if decision is None:
            decision = Decision(verdict=verdict, shadow=shadow, revision=self.revision)
            self._decision_objects[key] = decision
        return decision

    def _evaluate(
        self,
        candidates: list[_Entry],
        selection: _Selection,
        *,
        enforce_only: bool,
        trace: _Trace | None,
    ) -> Verdict:
        """Steps 1-4 of the module docstring over candidates already in evaluation order (admin
        rules, then namespace, then baseline), in one pass. The only evaluator: `decide` runs it
        with no trace, `decide(..., explain=True)` with one, which records each choice made here
        as it is made (a trace call sits beside every branch that decides or hands over)."""
        slots = selection.slots
        admin_passed = False
        deny: _Entry | None = None
        allow: _Entry | None = None
        namespace_done = False
        for entry in candidates:
            if entry.slot not in slots or (enforce_only and entry.audit):
                continue
            tier = entry.tier
            if tier is Tier.ADMIN:
                # 1. The first admin match decides; Pass hands over to step 2 and the admin
                #    matches after it are not looked at.
                if admin_passed:
                    continue
                if trace is not None:
                    trace.ordered(entry)
                if entry.verdict is not None:
                    return entry.verdict
                admin_passed = True
                continue
            if tier is Tier.NAMESPACE:
                # 2. Deny over Allow, first of each in (policy name, rule order).
                if trace is not None:
                    trace.namespace_match(entry)
                if entry.rule.action is Action.DENY:
                    if deny is None:
                        deny = entry
                elif entry.rule.action is Action.ALLOW and allow is None:
                    allow = entry
                continue
            if not namespace_done:
                namespace_done = True
                decided = _namespace_verdict(deny, allow, selection, enforce_only)
                if trace is not None:
                    trace.namespace(deny, allow, decided)
                if decided is not None:
                    return decided
            # 3. The first baseline match decides; Pass -> step 4.
            if trace is not None:
                trace.ordered(entry)
            if entry.verdict is not None:
                return entry.verdict
            break
        if not namespace_done:
            decided = _namespace_verdict(deny, allow, selection, enforce_only)
            if trace is not None:
                trace.namespace(deny, allow, decided)
            if decided is not None:
                return decided
        # 4. The configured default action.
        if trace is not None:
            trace.default(self._default)
        return self._default

    # -- selection ------------------------------------------------------------------------------

    def _selection(self, workload: Workload) -> _Selection:
        key = workload.selection_key
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        selection = self._select(workload)
        self._cache[key] = selection
        if len(self._cache) > SELECTION_CACHE_SIZE:
            self._cache.popitem(last=False)
        return selection

    def _select(self, workload: Workload) -> _Selection:
        policies = self.policies
        cluster = [slot for slot in self._cluster_slots if policies[slot].selects(workload)]
        namespaced = tuple(
            slot
            for slot in self._namespace_slots.get(workload.namespace, ())
            if policies[slot].selects(workload)
        )
        slots = frozenset(cluster).union(namespaced)
        has_audit = self._has_audit and any(policies[s].mode is Mode.AUDIT for s in slots)
        enforced = [slot for slot in namespaced if policies[slot].mode is not Mode.AUDIT]
        return _Selection(
            slots,
            namespaced,
            has_audit,
            isolation_enforced=self._isolation[enforced[0]] if enforced else None,
            isolation_all=self._isolation[namespaced[0]] if namespaced else None,
        )

    # -- candidates -----------------------------------------------------------------------------

    def _candidates(self, destination: Destination) -> list[_Entry]:
        """Rules whose destination and port match, in evaluation order (any policy, any mode)."""
        lists: list[list[_Entry]] = []
        host = destination.host
        if host.ip is None:  # fqdn entries never match an IP literal
            name = host.name
            hits = self._exact.get(name)
            if hits:
                lists.append(hits)
            # Wildcards: every strict parent suffix, so "*.stripe.com" matches names at any depth
            # under stripe.com but never stripe.com itself, and never "evilstripe.com".
            dot = name.find(".")
            while dot >= 0:
                hits = self._wildcard.get(name[dot + 1 :])
                if hits:
                    lists.append(hits)
                dot = name.find(".", dot + 1)
        if destination.ip is not None:
            lists.extend(self._cidrs.containing(destination.ip))
        if self._everywhere:
            lists.append(self._everywhere)
        port = destination.port
        if len(lists) == 1:  # the usual case: already in order, each entry once
            return [entry for entry in lists[0] if entry.matches_port(port)]
        matching = {
            entry.order: entry for hits in lists for entry in hits if entry.matches_port(port)
        }
        return [matching[order] for order in sorted(matching)]


def _add_once(entries: list[_Entry], entry: _Entry) -> None:
    if not entries or entries[-1] is not entry:
        entries.append(entry)


def _namespace_verdict(
    deny: _Entry | None, allow: _Entry | None, selection: _Selection, enforce_only: bool
) -> Verdict | None:
    """Step 2's outcome: a matching Deny, else a matching Allow, else isolation when a policy
    selects the workload; None hands over to step 3."""
    if deny is not None:
        return deny.verdict
    if allow is not None:
        return allow.verdict
    return selection.isolation_enforced if enforce_only else selection.isolation_all


def _invalid_result(policy: Policy) -> str:
    """An explanation's words for a fail-closed stand-in: which object, and its first issue."""
    more = len(policy.invalid_issues) - 1
    also = f" (and {more} more issue(s))" if more > 0 else ""
    return (
        f"the policy is invalid, so it denies until it is fixed (fail closed): "
        f"{policy.invalid_issues[0]}{also} -> deny"
    )


# The tiers in evaluation order; a trace's progress is a position in it (its length: step 4).
_TIERS: Final = (Tier.ADMIN, Tier.NAMESPACE, Tier.BASELINE)
_DEFAULT_STEP: Final = len(_TIERS)


class _Trace:
    """The steps of one evaluation, written as `Engine._evaluate` reports its choices.

    It decides nothing: the entries and verdicts it is handed are the ones the evaluation chose.
    What it adds is description only: the selecting policies that had no matching rule (named
    when the evaluation moves past their tier) and the words of each step.
    """

    __slots__ = (
        "_matches",
        "_namespace_slots",
        "_policies",
        "_reached",
        "_selected",
        "_shadow",
        "_tier_slots",
        "steps",
    )

    def __init__(self, engine: Engine, selection: _Selection, *, enforce_only: bool) -> None:
        policies = engine.policies
        self._policies = policies
        self._tier_slots = engine._tier_slots
        # The policies this evaluation looks at: those selecting the workload, less the
        # audit-mode ones when only enforce-mode policies decide.
        self._selected = frozenset(
            slot
            for slot in selection.slots
            if not (enforce_only and policies[slot].mode is Mode.AUDIT)
        )
        self._namespace_slots = [s for s in selection.namespace_slots if s in self._selected]
        self._shadow = not enforce_only  # the shadow evaluation enforces every policy
        self._matches: list[_Entry] = []  # step 2's matching rules, in evaluation order
        self._reached = 0  # position in _TIERS of the first tier not yet written
        self.steps: list[Step] = []

    def ordered(self, entry: _Entry) -> None:
        """Step 1 or 3: `entry` is the first matching rule of its tier; it decides or passes."""
        self._reach(_TIERS.index(entry.tier))
        self._ordered_steps(entry.tier, entry)
        self._reached += 1

    def namespace_match(self, entry: _Entry) -> None:
        """Step 2 saw a matching rule of a selecting EgressPolicy."""
        self._reach(_TIERS.index(Tier.NAMESPACE))
        self._matches.append(entry)

    def namespace(self, deny: _Entry | None, allow: _Entry | None, verdict: Verdict | None) -> None:
        """Step 2 concluded with `verdict` (None: it handed over to step 3)."""
        tier = Tier.NAMESPACE
        self._reach(_TIERS.index(tier))
        # The deciding rule is written once, as the step's conclusion (the last line), not also
        # among the matches before it.
        deciding = deny if deny is not None else allow
        for slot in self._namespace_slots:
            policy = self._policies[slot]
            matched = [
                entry for entry in self._matches if entry.slot == slot and entry is not deciding
            ]
            if not matched and (deciding is None or deciding.slot != slot):
                self._add(tier, policy.ruleset, None, "selects the workload; no rule matches")
            for entry in matched:
                note = " (not a match in the namespace tier)" if entry.verdict is None else ""
                self._add(
                    tier, policy.ruleset, entry.rule.name, f"{entry.rule.action} matches{note}"
                )
        if deny is not None and deny.policy.invalid:
            self._add(tier, deny.policy.ruleset, deny.rule.name, _invalid_result(deny.policy))
        elif deny is not None:
            result = "Deny wins -> deny" if allow is not None else "Deny -> deny"
            self._add(tier, deny.policy.ruleset, deny.rule.name, result)
        elif allow is not None:
            self._add(tier, allow.policy.ruleset, allow.rule.name, "Allow -> allow")
        elif verdict is not None:
            isolation = "selected and nothing matched -> deny (namespace isolation)"
            self._add(tier, verdict.ruleset, None, isolation)
        else:
            self._add(tier, None, None, "no policy selects the workload")
        self._reached += 1

    def default(self, verdict: Verdict) -> None:
        """Step 4: no tier decided."""
        self._reach(_DEFAULT_STEP)
        self.steps.append(
            Step(
                tier="default",
                ruleset=None,
                rule=None,
                result=f"no tier decided -> default {verdict.action}",
                shadow=self._shadow,
            )
        )

    def _reach(self, position: int) -> None:
        """The evaluation moved on to _TIERS[position]: an admin or baseline tier it left without
        reporting a match had none. (Step 2 always reports its outcome through `namespace`.)"""
        while self._reached < position:
            tier = _TIERS[self._reached]
            if tier is not Tier.NAMESPACE:
                self._ordered_steps(tier, None)
            self._reached += 1

    def _ordered_steps(self, tier: Tier, first: _Entry | None) -> None:
        """Steps 1 and 3: each selecting policy in order up to the one holding `first`."""
        any_selected = False
        for slot in self._tier_slots[tier]:
            if slot not in self._selected:
                continue
            any_selected = True
            policy = self._policies[slot]
            if first is None or first.slot != slot:
                self._add(tier, policy.ruleset, None, "selects the workload; no rule matches")
                continue
            handover = "namespace tier" if tier is Tier.ADMIN else "default action"
            if policy.invalid:
                result = _invalid_result(policy)
            elif first.verdict is not None:
                result = f"{first.rule.action} matches -> {first.verdict.action}"
            else:
                result = f"Pass matches -> {handover}"
            self._add(tier, policy.ruleset, first.rule.name, result)
            return
        if not any_selected:
            self._add(tier, None, None, "no policy selects the workload")

    def _add(self, tier: Tier, ruleset: str | None, rule: str | None, result: str) -> None:
        self.steps.append(
            Step(tier=str(tier), ruleset=ruleset, rule=rule, result=result, shadow=self._shadow)
        )


def policy_set_digest(policies: Iterable[Policy], default_action: Action) -> str:
    """A digest of the policies' content (every field that equality compares, so not where a
    policy was read from) and the default action, independent of order."""
    canonical = sorted(
        repr(tuple((f.name, getattr(policy, f.name)) for f in fields(policy) if f.compare))
        for policy in policies
    )
    hasher = hashlib.sha256(f"default={default_action.value}".encode())
    for text in canonical:
        hasher.update(b"\0" + text.encode())
    return hasher.hexdigest()[:16]
