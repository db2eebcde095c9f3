"""The one answer to "may this workload reach this destination, and at which addresses?".

`Router.route(workload, host, port)` runs DESIGN section 1 steps 4 and 5, in this order:

  1. Decide by name (or, for an IP literal, by the literal's address). A deny ends here: a
     denied name causes no DNS query.
  2. Resolve the name (only now, after an allow), as an absolute name.
  3. Decide again per resolved address, so a `cidr` Deny rule catches a resolved address too.
  4. Pass each address through the address guard. The guard is lifted only by a `cidr` of the
     rule that allowed the request: a rule for another name cannot open guarded space to this
     one.
  5. The addresses left, in the resolver's order (IPv4 first), are the ones a dialer may use,
     and the only ones.
  6. With upstreams configured (issue 12), the way out: `direct` or an upstream's name, from
     the operator's route table (proxy.core.upstreams). Routing never replaces steps 1-5: only
     an allowed route is routed. A name routed to an upstream with `resolve: parent` skips
     steps 2-4 (only the parent can resolve it); an IP literal never does.

The answer is a frozen `Route` that says all of it, including what was dropped and why, so the
exchange log records it, a dialer dials it, and `explain` shows it. Every caller asks here: the
forward and tunnel paths, the SNI re-check (`decide`), inner intercepted requests (they reuse
their tunnel's Route), `/explain` and `outgate explain`.

Routes are memoised per (workload, destination). A memo entry is used only while the policy
revision (the Engine object), the workload object and the DNS answer are the ones it was built
from: a reload, an informer update or a new DNS answer each make a new one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final, Protocol

from proxy.core.addresses import AddressClass, AddressGuard
from proxy.core.hosts import Host, IPAddress
from proxy.core.identity import Workload
from proxy.core.policy.engine import Decision, Destination, Engine
from proxy.core.upstreams import RouteTable
from proxy.errors import OutgateError, PolicyDenied, Reason

# Routes remembered: a kept-alive client asks the same question on every request. An entry is a
# few hundred bytes; the memo is emptied when full (a wildcard rule lets clients mint names
# without end, so it must not grow).
ROUTE_MEMO_SIZE: Final = 4096


class NameResolver(Protocol):
    """What the router needs of DNS (proxy.control.resolver.Resolver; a fake in tests).

    `resolve` returns the addresses of a normalised name, IPv4 first, or raises the
    OutgateError a client should see (502 dns_nxdomain / dns_servfail / dns_no_answer, 504
    dns_timeout)."""

    async def resolve(self, name: str) -> tuple[IPAddress, ...]: ...


class PolicySource(Protocol):
    """Holds the Engine in force (proxy.control.policy_source.PolicyStore)."""

    @property
    def engine(self) -> Engine: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressCheck:
    """Steps 3 and 4 for one address: the per-address decision (None for an IP literal, which
    step 1 already decided by address) and the guard class that refused it (None: passed)."""

    ip: IPAddress
    decision: Decision | None
    guarded: AddressClass | None

    @property
    def permitted(self) -> bool:
        denied = self.decision is not None and not self.decision.allowed
        return not denied and self.guarded is None


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """Everything the router found for one (workload, host, port)."""

    workload: Workload
    host: Host
    port: int
    decision: Decision  # step 1
    answer: tuple[IPAddress, ...] = ()  # step 2 (the literal itself for an IP host); () if denied
    checks: tuple[AddressCheck, ...] = ()  # steps 3 and 4, one per answer address
    permitted: tuple[IPAddress, ...] = ()  # step 5: what may be dialled, in order
    dropped: tuple[AddressCheck, ...] = ()  # the checks the guard refused (logged per request)
    # Step 2 failed: the resolver's error (502 dns_nxdomain / dns_servfail / dns_no_answer,
    # 504 dns_timeout), what the client sees. The name decision is kept for the record.
    resolve_error: OutgateError | None = None
    # Step 6: "direct" or an upstream's name; None when no upstreams are configured.
    via: str | None = None
    # The name was not resolved here: its upstream resolves names (`resolve: parent`).
    parent_resolves: bool = False

    @property
    def allowed(self) -> bool:
        return bool(self.permitted) or (self.parent_resolves and self.decision.allowed)

    @property
    def deciding(self) -> Decision:
        """The decision the audit record carries: the name decision, unless every address was
        denied by an address rule, then the first such denial."""
        if not self.permitted and self.decision.allowed:
            for check in self.checks:
                if check.decision is not None and not check.decision.allowed:
                    return check.decision
        return self.decision

    def refusal(self) -> OutgateError | None:
        """The error a client sees when nothing may be dialled; None when allowed."""
        if self.allowed:
            return None
        if self.resolve_error is not None:
            return self.resolve_error
        if not self.decision.allowed:
            return PolicyDenied("denied by policy", reason=self.decision.reason)
        deciding = self.deciding
        if deciding is not self.decision:
            return PolicyDenied("denied by policy for every address", reason=deciding.reason)
        return PolicyDenied(
            "destination address is private, reserved or metadata",
            reason=Reason.GUARDED_ADDRESS,
        )

    def pinned(self, ip: IPAddress | None) -> Route:
        """This route narrowed to one address it permits (a tunnel's later connections go where
        its first one went). `None`: the first connection went via a parent proxy, which chose
        the address: the route is kept as it is."""
        if ip is None:
            return self
        if ip not in self.permitted:
            raise ValueError(f"{ip} is not an address this route permits")
        return dataclasses.replace(self, permitted=(ip,))


@dataclass(frozen=True, slots=True)
class _Memo:
    engine: Engine
    workload: Workload
    route: Route


class Router:
    """Owns steps 1-5 and their memo. One per process; used from its event loop only."""

    def __init__(
        self,
        *,
        policy: PolicySource,
        resolver: NameResolver,
        guard: AddressGuard,
        routes: RouteTable | None = None,
    ) -> None:
        self._policy = policy
        self._resolver = resolver
        self._guard = guard
        self._routes = routes
        self._memo: dict[tuple[int, str, bool, int], _Memo] = {}

    @property
    def engine(self) -> Engine:
        """The policy in force (the admin page lists its policies)."""
        return self._policy.engine

    @property
    def guard(self) -> AddressGuard:
        return self._guard

    def decide(
        self, workload: Workload, destination: Destination, *, explain: bool = False
    ) -> Decision:
        """Step 1 alone, with the policy in force (the SNI re-check asks this)."""
        return self._policy.engine.decide(workload, destination, explain=explain)

    def way_out_by_name(self, host: Host, port: int) -> tuple[str, bool] | None:
        """Step 6 before any DNS query (for `explain` without resolving): the way out by name or
        literal alone, and whether a `cidr` route could still change it once the name resolves.
        None when no upstreams are configured."""
        routes = self._routes
        if routes is None:
            return None
        parent = routes.resolves_at_parent(host, port)
        if parent is not None:
            return parent, False
        undecided = host.ip is None and any(rule.to.cidrs for rule in routes.rules)
        return routes.select(host, port, None), undecided

    async def route(
        self, workload: Workload, host: Host, port: int, *, explain: bool = False
    ) -> Route:
        """Steps 1-5. With `explain`, every decision carries its evaluation steps (and the memo
        is neither read nor written: the steps are not memoised). A DNS failure is a Route
        with `resolve_error` (not memoised: the resolver keeps its own negative cache)."""
        engine = self._policy.engine
        key = (id(workload), host.name, host.ip is None, port)
        memo = None if explain else self._memo.get(key)
        if memo is not None and (memo.engine is not engine or memo.workload is not workload):
            memo = None
        if memo is not None:
            decision = memo.route.decision
        else:
            decision = engine.decide(
                workload, Destination(host=host, port=port, ip=host.ip), explain=explain
            )
        parent = self._routes.resolves_at_parent(host, port) if self._routes else None
        if not decision.allowed:
            route = Route(workload=workload, host=host, port=port, decision=decision)
        elif parent is not None:
            # 6 before 2: only the parent can resolve this name, so it is not looked up here.
            if memo is not None:
                return memo.route
            route = Route(
                workload=workload,
                host=host,
                port=port,
                decision=decision,
                via=parent,
                parent_resolves=True,
            )
        else:
            if host.ip is not None:
                answer: tuple[IPAddress, ...] = (host.ip,)
            else:
                try:
                    answer = await self._resolver.resolve(host.name)
                except OutgateError as exc:
                    return Route(
                        workload=workload,
                        host=host,
                        port=port,
                        decision=decision,
                        resolve_error=exc,
                    )
            if memo is not None and (answer is memo.route.answer or answer == memo.route.answer):
                # Same policy, workload, destination and DNS answer: every step is a pure
                # function of those, so the outcome is replayed.
                return memo.route
            route = self._check_addresses(engine, workload, host, port, decision, answer, explain)
        if not explain:
            if len(self._memo) >= ROUTE_MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = _Memo(engine, workload, route)
        return route

    def recheck(self, route: Route) -> Route:
        """`route` decided again with the policy in force, for the addresses it already permits
        and without a new DNS query (a request inside a tunnel goes where the tunnel goes).
        The same route while the policy revision is unchanged."""
        engine = self._policy.engine
        if route.decision.revision == engine.revision:
            return route
        host, port, workload = route.host, route.port, route.workload
        decision = engine.decide(workload, Destination(host=host, port=port, ip=host.ip))
        if not decision.allowed:
            return Route(workload=workload, host=host, port=port, decision=decision)
        if route.parent_resolves:
            return dataclasses.replace(route, decision=decision)
        return self._check_addresses(
            engine, workload, host, port, decision, route.permitted, explain=False
        )

    def _check_addresses(
        self,
        engine: Engine,
        workload: Workload,
        host: Host,
        port: int,
        decision: Decision,
        answer: tuple[IPAddress, ...],
        explain: bool,
    ) -> Route:
        checks: list[AddressCheck] = []
        permitted: list[IPAddress] = []
        for ip in answer:
            per_address: Decision | None = None
            guarded: AddressClass | None = None
            if host.ip is None:
                # 3. An address rule may deny what the name allowed.
                per_address = engine.decide(
                    workload, Destination(host=host, port=port, ip=ip), explain=explain
                )
            if per_address is None or per_address.allowed:
                # 4. The guard, lifted only by the allowing rule's own cidrs.
                guarded = self._guard.check(ip, port, allowed_cidrs=decision.allowed_cidrs)
            check = AddressCheck(ip=ip, decision=per_address, guarded=guarded)
            checks.append(check)
            if check.permitted:
                permitted.append(ip)
        via = None if self._routes is None else self._routes.select(host, port, permitted)
        return Route(
            workload=workload,
            host=host,
            port=port,
            decision=decision,
            answer=answer,
            checks=tuple(checks),
            permitted=tuple(permitted),
            dropped=tuple(check for check in checks if check.guarded is not None),
            via=via,
        )
