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

Audit mode: the decision comes from enforce-mode policies only. When an audit-mode policy
selects the workload, the engine evaluates again with every policy enforced; that verdict is the
shadow decision, kept when it differs from the decision in action, ruleset or rule.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

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


class Outcome(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """One evaluation's outcome and why. For an allow, `allowed_cidrs`, `protocol` and `inspect`
    come from the deciding rule: the address guard admits a guarded address only when it is in
    `allowed_cidrs`; the tunnel enforces `protocol`. A default allow has no rule, so it carries
    no CIDRs and the default protocol (tls)."""

    action: Outcome
    reason: Reason
    rule: str | None = None
    ruleset: str | None = None
    tier: Tier | None = None
    mode: Mode | None = None
    allowed_cidrs: tuple[IPNetwork, ...] = ()
    protocol: TunnelProtocol | None = None
    inspect: Inspect | None = None

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
            )  # fmt: skip
        case Action.DENY:
            return Verdict(
                action=Outcome.DENY, reason=Reason.RULE_DENY,
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
            return Verdict(
                action=Outcome.ALLOW, reason=Reason.DEFAULT_ALLOW, protocol=TunnelProtocol.TLS
            )
        case Action.DENY:
            return Verdict(action=Outcome.DENY, reason=Reason.DEFAULT_DENY)
        case Action.PASS:
            raise ValueError("the default action is Allow or Deny")


@dataclass(frozen=True, slots=True)
class _Entry:
    """A rule placed in global evaluation order, with the verdict it gives when it decides."""

    order: int
    slot: int  # index of its policy in Engine.policies
    policy: Policy
    rule: Rule
    verdict: Verdict | None  # None for Pass


@dataclass(frozen=True, slots=True)
class _Selection:
    """Which policies select one workload shape."""

    slots: frozenset[int]
    namespace_slots: tuple[int, ...]  # selecting EgressPolicies, in evaluation order
    has_audit: bool  # an audit-mode policy selects it: the shadow evaluation is needed


class Engine:
    """A compiled, immutable policy set. Build with `Engine.compile`.

    The selection cache is memoisation only (it never changes an answer); the engine is used from
    one event loop per worker process, so it takes no lock.
    """

    __slots__ = (
        "_cache",
        "_cidrs",
        "_cluster_slots",
        "_default",
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
        order = 0
        for slot, policy in enumerate(ordered):
            for rule in policy.rules:
                entry = _Entry(order, slot, policy, rule, _rule_verdict(policy, rule))
                order += 1
                for name in rule.fqdns:
                    self._exact.setdefault(name, []).append(entry)
                for suffix in rule.wildcard_suffixes:
                    self._wildcard.setdefault(suffix, []).append(entry)
                for cidr in rule.cidrs:
                    self._cidrs.setdefault(cidr, []).append(entry)
        self._rule_count = order
        self._cache: OrderedDict[SelectionKey, _Selection] = OrderedDict()

    @classmethod
    def compile(
        cls, policies: Iterable[Policy], *, default_action: Action, revision: int
    ) -> Engine:
        return cls(policies, default_action=default_action, revision=revision)

    @property
    def rule_count(self) -> int:
        return self._rule_count

    def decide(
        self, workload: Workload, destination: Destination, *, explain: bool = False
    ) -> Decision:
        selection = self._selection(workload)
        candidates = self._candidates(destination)
        steps: list[Step] | None = [] if explain else None
        verdict = self._evaluate(candidates, selection, enforce_only=True, steps=steps)
        shadow: Verdict | None = None
        if selection.has_audit:
            shadow_steps: list[Step] | None = [] if explain else None
            every = self._evaluate(candidates, selection, enforce_only=False, steps=shadow_steps)
            if not every.same_outcome(verdict):
                shadow = every
            if steps is not None and shadow_steps is not None:
                steps.extend(dataclasses.replace(step, shadow=True) for step in shadow_steps)
        return Decision(
            verdict=verdict,
            shadow=shadow,
            revision=self.revision,
            steps=tuple(steps) if steps is not None else (),
        )

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
        return _Selection(slots, namespaced, has_audit)

    # -- candidates -----------------------------------------------------------------------------

    def _candidates(self, destination: Destination) -> list[_Entry]:
        """Rules whose destination and port match, in evaluation order (any policy, any mode)."""
        found: list[_Entry] = []
        host = destination.host
        if host.ip is None:  # fqdn entries never match an IP literal
            name = host.name
            hits = self._exact.get(name)
            if hits:
                found.extend(hits)
            # Wildcards: every strict parent suffix, so "*.stripe.com" matches names at any depth
            # under stripe.com but never stripe.com itself, and never "evilstripe.com".
            dot = name.find(".")
            while dot >= 0:
                hits = self._wildcard.get(name[dot + 1 :])
                if hits:
                    found.extend(hits)
                dot = name.find(".", dot + 1)
        if destination.ip is not None:
            for hits in self._cidrs.containing(destination.ip):
                found.extend(hits)
        port = destination.port
        matching = {entry.order: entry for entry in found if entry.rule.matches_port(port)}
        return [matching[order] for order in sorted(matching)]

    # -- evaluation -----------------------------------------------------------------------------

    def _evaluate(
        self,
        candidates: list[_Entry],
        selection: _Selection,
        *,
        enforce_only: bool,
        steps: list[Step] | None,
    ) -> Verdict:
        admin: list[_Entry] = []
        namespace: list[_Entry] = []
        baseline: list[_Entry] = []
        by_tier = {Tier.ADMIN: admin, Tier.NAMESPACE: namespace, Tier.BASELINE: baseline}
        for candidate in candidates:
            if candidate.slot in selection.slots and not (
                enforce_only and candidate.policy.mode is Mode.AUDIT
            ):
                by_tier[candidate.policy.tier].append(candidate)

        # 1. Admin tier: the first matching rule of a selecting policy decides; Pass -> step 2.
        first = self._ordered_tier(Tier.ADMIN, admin, selection, enforce_only, steps)
        if first is not None and first.verdict is not None:
            return first.verdict

        # 2. Namespace tier: Deny over Allow; selected with nothing matching -> isolation.
        verdict = self._namespace_tier(namespace, selection, enforce_only, steps)
        if verdict is not None:
            return verdict

        # 3. Baseline tier: as step 1; Pass -> step 4.
        first = self._ordered_tier(Tier.BASELINE, baseline, selection, enforce_only, steps)
        if first is not None and first.verdict is not None:
            return first.verdict

        # 4. The configured default action.
        if steps is not None:
            steps.append(
                Step(
                    tier="default",
                    ruleset=None,
                    rule=None,
                    result=f"no tier decided -> default {self._default.action}",
                )
            )
        return self._default

    def _ordered_tier(
        self,
        tier: Tier,
        entries: list[_Entry],
        selection: _Selection,
        enforce_only: bool,
        steps: list[Step] | None,
    ) -> _Entry | None:
        """Steps 1 and 3: entries are already in (priority, name, rule) order; the first decides."""
        first = entries[0] if entries else None
        if steps is None:
            return first
        any_selected = False
        for slot in self._tier_slots[tier]:
            policy = self.policies[slot]
            if slot not in selection.slots or (enforce_only and policy.mode is Mode.AUDIT):
                continue
            any_selected = True
            if first is None or first.slot != slot:
                steps.append(_step(tier, policy, None, "selects the workload; no rule matches"))
                continue
            handover = "namespace tier" if tier is Tier.ADMIN else "default action"
            result = (
                f"{first.rule.action} matches -> {first.verdict.action}"
                if first.verdict is not None
                else f"Pass matches -> {handover}"
            )
            steps.append(_step(tier, policy, first.rule.name, result))
            break
        if not any_selected:
            steps.append(_step(tier, None, None, "no policy selects the workload"))
        return first

    def _namespace_tier(
        self,
        entries: list[_Entry],
        selection: _Selection,
        enforce_only: bool,
        steps: list[Step] | None,
    ) -> Verdict | None:
        """Step 2."""
        deny = next((e for e in entries if e.rule.action is Action.DENY), None)
        allow = next((e for e in entries if e.rule.action is Action.ALLOW), None)
        selecting = [
            slot
            for slot in selection.namespace_slots
            if not (enforce_only and self.policies[slot].mode is Mode.AUDIT)
        ]
        if steps is not None:
            self._explain_namespace(entries, selecting, deny, allow, steps)
        if deny is not None:
            return deny.verdict
        if allow is not None:
            return allow.verdict
        if selecting:
            return self._isolation[selecting[0]]
        return None

    def _explain_namespace(
        self,
        entries: list[_Entry],
        selecting: list[int],
        deny: _Entry | None,
        allow: _Entry | None,
        steps: list[Step],
    ) -> None:
        tier = Tier.NAMESPACE
        for slot in selecting:
            policy = self.policies[slot]
            matched = [entry for entry in entries if entry.slot == slot]
            if not matched:
                steps.append(_step(tier, policy, None, "selects the workload; no rule matches"))
            for entry in matched:
                note = " (not a match in the namespace tier)" if entry.verdict is None else ""
                steps.append(
                    _step(tier, policy, entry.rule.name, f"{entry.rule.action} matches{note}")
                )
        if deny is not None:
            result = "Deny wins -> deny" if allow is not None else "Deny -> deny"
            steps.append(_step(tier, deny.policy, deny.rule.name, result))
        elif allow is not None:
            steps.append(_step(tier, allow.policy, allow.rule.name, "Allow -> allow"))
        elif selecting:
            steps.append(
                _step(
                    tier,
                    self.policies[selecting[0]],
                    None,
                    "selected and nothing matched -> deny (namespace isolation)",
                )
            )
        else:
            steps.append(_step(tier, None, None, "no policy selects the workload"))


def _step(tier: Tier, policy: Policy | None, rule: str | None, result: str) -> Step:
    return Step(
        tier=str(tier),
        ruleset=policy.ruleset if policy is not None else None,
        rule=rule,
        result=result,
    )
