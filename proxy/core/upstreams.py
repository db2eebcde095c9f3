"""Upstream (parent) proxies and the routes that send allowed destinations through them.

Routing is not policy (DESIGN section 1, step 5): a request is decided first, exactly as
without upstreams, and only an allowed one is routed. The route table answers one question:
"which way out for this destination?", `direct` or the name of an upstream.

  - Rules are ordered; the first whose `to` matches decides, else `default`.
  - `fqdn` entries match names as policy rules do (exact, or `*.suffix` for any name under the
    suffix), normalised by the same function (proxy.core.hosts.normalize_name via the policy
    loader), so a route and a rule can never disagree on what a name is.
  - `cidr` entries match an IP literal, or any address the name resolved to that the router
    permitted (as Squid's `dst` ACL matches any resolved address).
  - An upstream with `resolve: parent` is for names only the parent can resolve (split-horizon
    DNS). A name routed to it by name is never resolved here, so `cidr` entries cannot be tested
    for it; `resolves_at_parent` says when that is the case, before any DNS query.

Values only: the dialer (proxy.dataplane.upstream) owns connections, health and credentials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from proxy.core.hosts import Host, IPAddress
from proxy.core.identity import IPNetwork
from proxy.core.policy.model import Action, Destination, PortRange, Rule

DIRECT: Final = "direct"

# Squid's defaults are the precedent (cache_peer connect-fail-limit=10, dead_peer_timeout 10s,
# peer_connect_timeout 30s); a failed parent costs every client a connect timeout, so Outgate
# gives up on one sooner (3 failures) and uses its own connect timeout's default (10s).
DEFAULT_FAIL_LIMIT: Final = 3
DEFAULT_RETRY_AFTER: Final = 10.0
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
# The parent's answer to CONNECT, or its response head: the parent itself connects onward
# first, and may wait on its own DNS and connect timeouts.
DEFAULT_RESPONSE_TIMEOUT: Final = 30.0

_EVERY_PORT: Final = (PortRange(start=1, end=65535),)


class ResolveMode(StrEnum):
    """Who resolves a name routed via an upstream."""

    LOCAL = "local"  # Outgate resolves and guards it, then asks the parent for the name
    PARENT = "parent"  # only the parent resolves it (split-horizon DNS); no local guard by address


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyAddress:
    """One parent proxy: `http://host:port`, or `https://` for TLS to the parent."""

    scheme: str  # "http" | "https"
    host: str  # a name or an IP literal (IPv6 without brackets)
    port: int

    @property
    def label(self) -> str:
        """`host:port`: how records, logs and metrics name this proxy (never credentials)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.label}"


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamSpec:
    """A named way out through one or more parent proxies, tried in order."""

    name: str
    proxies: tuple[ProxyAddress, ...]
    credentials_file: str | None = None  # first line `user:password`; re-read when it changes
    ca_bundle: str | None = None  # verifies https:// proxies (None: the system trust store)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT
    fail_limit: int = DEFAULT_FAIL_LIMIT  # consecutive connect failures that mark a proxy down
    retry_after: float = DEFAULT_RETRY_AFTER  # a down proxy is skipped this long
    resolve: ResolveMode = ResolveMode.LOCAL


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteRule:
    """`{to: [...], via: NAME | direct}`. The destinations are held as a policy Rule, so
    matching is the policy's own reference semantics (`Rule.matches_host`)."""

    to: Rule
    via: str

    @staticmethod
    def of(
        *,
        via: str,
        fqdns: Sequence[str] = (),
        wildcard_suffixes: Sequence[str] = (),
        cidrs: Sequence[IPNetwork] = (),
        name: str = "route",
    ) -> RouteRule:
        return RouteRule(
            to=Rule(
                name=name,
                action=Action.ALLOW,
                fqdns=tuple(fqdns),
                wildcard_suffixes=tuple(wildcard_suffixes),
                cidrs=tuple(cidrs),
                ports=_EVERY_PORT,
            ),
            via=via,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteTable:
    rules: tuple[RouteRule, ...] = ()
    default: str = DIRECT
    # Upstreams whose names only the parent resolves (`resolve: parent`).
    resolved_by_parent: frozenset[str] = frozenset()

    def select(self, host: Host, port: int, addresses: Sequence[IPAddress] | None) -> str:
        """The way out for `host`: the first rule that matches its name (or literal), or one of
        `addresses` (the permitted resolved ones; None: not resolved here), else the default."""
        by_name = Destination(host=host, port=port, ip=host.ip)
        for rule in self.rules:
            if rule.to.matches_host(by_name):
                return rule.via
            if addresses and host.ip is None and rule.to.cidrs:
                for ip in addresses:
                    if rule.to.matches_host(Destination(host=host, port=port, ip=ip)):
                        return rule.via
        return self.default

    def resolves_at_parent(self, host: Host, port: int) -> str | None:
        """The upstream a name goes to without a local DNS query, or None (resolve here).
        Decided by name alone: a name's route to a `resolve: parent` upstream skips `cidr`
        entries, which need addresses this proxy does not look up."""
        if host.ip is not None or not self.resolved_by_parent:
            return None
        via = self.select(host, port, None)
        return via if via in self.resolved_by_parent else None
