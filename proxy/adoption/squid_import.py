"""Translate a squid.conf into an equivalent Outgate policy set, and say what could not be.

`import_squid(path)` reads the configuration (following `include` files and quoted ACL value
files), translates its ACLs and `http_access` lines, and returns the policies as YAML that
`outgate check-config` accepts, a runtime-config fragment (listener, DNS, static identities for
`src` ACLs, audit format, upstreams and routes), and every finding with its file and line.
Nothing is dropped silently: a line is translated, or it is a finding.

How the list maps (Squid: first matching `http_access` line wins):

  1. Each translatable `http_access` line becomes one admin-tier ClusterEgressPolicy with one rule,
     all at one priority and named `squid-NNN-...` so the engine's (priority, name) order is the
     file's order. `allow` -> Allow, `deny` -> Deny.
  2. `src` ACLs become subjects. Their addresses become static identities labelled
     `squid.outgate.dev/<acl>: "true"` (every ACL whose networks contain the identity's network, so
     longest-prefix identity lookup keeps Squid's overlapping ACLs); a line's `src` terms become
     `podSelector` label requirements (`!acl` -> DoesNotExist). `--cluster-src ACL` says an ACL
     means "the cluster's pods": it selects every known workload instead (`namespaceSelector: {}`).
  3. Destination ACLs (`dstdomain`, `ssl::server_name`, their `_regex` forms where a regex is a
     finite set of names and `*.` suffixes, `dst`) become `to`; several in one line intersect.
     Squid's `.example.com` is `example.com` plus `*.example.com`.
  4. Port ACLs become `ports` (Squid checks no port unless told: omitted ports mean 1-65535, not
     Outgate's [80, 443]). `!acl` is the complement.
  5. A `deny` line with no destination narrows every later Allow instead of becoming a rule:
     `deny !Safe_ports` intersects later ports with Safe_ports, `deny !whitelist` later
     destinations with whitelist, `deny src_acl` removes those sources. `deny all` ends the list
     (Outgate's `defaultAction: deny`); later lines are reported unreachable.
  6. `deny CONNECT !SSL_ports` is recognised and recorded: Outgate rules do not tell CONNECT from
     plain HTTP, and every tunnel must carry TLS (or plain HTTP, checked request by request) by
     default, which is the protection that line gives Squid. Its absence is reported as a hole.
  7. Parents and the choice between them and direct become `upstreams` and `routes`:
     - each `cache_peer ... parent` is a proxy (`http://host:port`, `https://` with `ssl`/`tls`);
       parents with the same `cache_peer_access` destinations, credentials and CA bundle form
       one upstream, proxies in file order (named after the first: `name=`, else the host).
       `tls-cafile` -> caBundle, `connect-timeout`/`peer_connect_timeout` -> connectTimeout,
       `connect-fail-limit` -> failLimit, `dead_peer_timeout` -> retryAfter.
     - `login=user:password` -> credentialsFile /etc/outgate/upstream-NAME/credentials and an
       untranslated finding: the password is masked in every text the import writes and is
       never copied. `login=PASS|PASSTHRU|*:...` (the client's credentials) is reported.
     - routes.rules, in Squid's order of checks: `always_direct allow DEST` via direct, then each
       parent's `cache_peer_access ... allow DEST` via its upstream, then `never_direct allow
       DEST` via the parents; `never_direct allow all` makes routes.default the upstream that
       takes every destination (its `default` parent's, else the first). With parents and no
       never_direct, routes.default is that upstream too (`prefer_direct on`: direct), and a
       warning says Squid would fall back to direct where Outgate does not. A parent that takes
       every destination but some (`deny DEST` ... `allow all`, `allow !DEST`) leaves DEST to
       the parent that takes it, else direct.
     - Reported: deny lines naming destinations, source/port/method ACLs in these lists,
       sibling and multicast peers, balancing (round-robin, carp, ...: Outgate fails over in
       order), client certificates to a parent, and an upstream no route uses.

What cannot be translated is reported with its line: ACL types that need the URL, headers,
users or time (url_regex, browser, proxy_auth, time, ...), methods other than CONNECT, regexes
that are not a finite set of names, allow lines with no destination ("allow localnet": Outgate
policies name destinations), negated destinations in allow lines, and every directive with no
Outgate meaning (caching, sibling caches, ssl_bump...).
"""

from __future__ import annotations

import glob
import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Final

import yaml
from publicsuffixlist import PublicSuffixList

from proxy.adoption.squid_log import NAMED_FORMATS, parse_logformat
from proxy.core.hosts import normalize_name
from proxy.core.identity import IPNetwork, is_label_key, unmap_network
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import API_VERSION, MAX_PORT, MIN_PORT, Mode
from proxy.core.upstreams import DIRECT
from proxy.errors import BadRequest, ConfigError

# Squid refuses include nesting deeper than this (cache_cf.cc, MAX_INCLUDE_DEPTH).
MAX_INCLUDE_DEPTH: Final = 16
# A regex expands to at most this many names before we call it "not a finite set of names".
MAX_REGEX_ALTERNATIVES: Final = 256
DEFAULT_PRIORITY: Final = 100
DEFAULT_PREFIX: Final = "squid"
DEFAULT_STATIC_NAMESPACE: Final = "squid-clients"
LABEL_PREFIX: Final = "squid.outgate.dev"
SOURCE_ANNOTATION: Final = "outgate.dev/squid-source"


class Severity(StrEnum):
    UNTRANSLATED = "untranslated"  # meaning is lost: the operator must act
    WARNING = "warning"  # translated, but the Squid config has a hole, or behaviour differs
    NOTE = "note"  # no Outgate meaning needed (caching, Squid's own files), or a detail


@dataclass(frozen=True, slots=True)
class Location:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    location: Location | None
    severity: Severity
    message: str
    text: str = ""  # the directive as written

    def render(self) -> str:
        where = f"{self.location}: " if self.location is not None else ""
        shown = f"  [{self.text}]" if self.text else ""
        return f"{where}{self.severity}: {self.message}{shown}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Directive:
    location: Location
    name: str
    args: tuple[str, ...] = field(repr=False)  # as written: a cache_peer login= password too
    text: str  # as written, passwords masked (redact)


# --------------------------------------------------------------------------------------------
# Reading squid.conf
# --------------------------------------------------------------------------------------------

_INLINE_COMMENT = re.compile(r"\s#.*\Z")
_TOKEN = re.compile(r'"[^"]*"|\S+')
# cache_peer's `login=user:password`: the password is masked in every text the import writes
# (findings, the output header, stderr); only the parsed arguments hold it, to group parents.
_LOGIN_SECRET = re.compile(r"(?<![^\s])(login=[^:\s]*):\S+")


def redact(line: str) -> str:
    """The line with every `login=` password replaced by `***`."""
    return _LOGIN_SECRET.sub(r"\1:***", line)


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) with `\\` continuations joined and comments removed."""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        joined = " ".join(part.strip() for part in pending).strip()
        pending = []
        if not joined or joined.startswith("#"):
            continue
        yield start, _INLINE_COMMENT.sub("", joined)
    if pending:
        joined = " ".join(part.strip() for part in pending).strip()
        if joined and not joined.startswith("#"):
            yield start, _INLINE_COMMENT.sub("", joined)


def _label(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


@dataclass(slots=True)
class _Reader:
    root: Path
    findings: list[Finding]
    files: list[str] = field(default_factory=list)

    def read(self, path: Path, *, depth: int = 0, stack: tuple[Path, ...] = ()) -> list[Directive]:
        real = path.resolve()
        label = _label(path, self.root)
        text = path.read_text(encoding="utf-8", errors="replace")
        self.files.append(label)
        directives: list[Directive] = []
        for number, line in _logical_lines(text):
            location = Location(label, number)
            tokens = _TOKEN.findall(line)
            name, args = tokens[0], tuple(tokens[1:])
            line = redact(line)
            if "${" in line:
                self.findings.append(
                    Finding(
                        location=location,
                        severity=Severity.UNTRANSLATED,
                        message="Squid macros (${...}) are expanded by Squid at start; "
                        "the line is read with the macro text as it is",
                        text=line,
                    )
                )
            if name == "include":
                directives.extend(self._include(args, real, location, line, depth, stack))
                continue
            directives.append(Directive(location=location, name=name, args=args, text=line))
        return directives

    def _include(
        self,
        args: Sequence[str],
        including: Path,
        location: Location,
        line: str,
        depth: int,
        stack: tuple[Path, ...],
    ) -> list[Directive]:
        found: list[Directive] = []
        if depth + 1 > MAX_INCLUDE_DEPTH:
            self.findings.append(
                Finding(
                    location=location,
                    severity=Severity.UNTRANSLATED,
                    message=f"include nested deeper than {MAX_INCLUDE_DEPTH}; Squid refuses this",
                    text=line,
                )
            )
            return found
        for pattern in args:
            pattern = pattern.strip('"')
            base = Path(pattern)
            full = base if base.is_absolute() else including.parent / base
            matches = sorted(glob.glob(str(full)))
            if not matches:
                self.findings.append(
                    Finding(
                        location=location,
                        severity=Severity.UNTRANSLATED,
                        message=f"include {pattern!r} matches no file here; Squid would refuse to "
                        "start (relative includes are read from the including file's directory)",
                        text=line,
                    )
                )
            for match in matches:
                target = Path(match)
                if target.resolve() in (*stack, including):
                    self.findings.append(
                        Finding(
                            location=location,
                            severity=Severity.UNTRANSLATED,
                            message=f"include {match!r} includes itself; skipped",
                            text=line,
                        )
                    )
                    continue
                found.extend(self.read(target, depth=depth + 1, stack=(*stack, including)))
        return found


# --------------------------------------------------------------------------------------------
# Sets of ports and of destinations
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortSet:
    """Sorted, merged, inclusive port ranges."""

    ranges: tuple[tuple[int, int], ...]

    @staticmethod
    def of(ranges: Iterable[tuple[int, int]]) -> PortSet:
        merged: list[tuple[int, int]] = []
        for start, end in sorted(ranges):
            if merged and start <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return PortSet(tuple(merged))

    @property
    def empty(self) -> bool:
        return not self.ranges

    def complement(self) -> PortSet:
        out: list[tuple[int, int]] = []
        low = MIN_PORT
        for start, end in self.ranges:
            if start > low:
                out.append((low, start - 1))
            low = end + 1
        if low <= MAX_PORT:
            out.append((low, MAX_PORT))
        return PortSet(tuple(out))

    def intersect(self, other: PortSet) -> PortSet:
        out: list[tuple[int, int]] = []
        for a_start, a_end in self.ranges:
            for b_start, b_end in other.ranges:
                start, end = max(a_start, b_start), min(a_end, b_end)
                if start <= end:
                    out.append((start, end))
        return PortSet.of(out)

    def as_yaml(self) -> list[Any]:
        return [
            start if start == end else {"port": start, "endPort": end} for start, end in self.ranges
        ]

    def __str__(self) -> str:
        return ",".join(str(s) if s == e else f"{s}-{e}" for s, e in self.ranges) or "none"


ALL_PORTS: Final = PortSet(((MIN_PORT, MAX_PORT),))


@dataclass(frozen=True, slots=True)
class NameSet:
    """Destinations: exact names, `*.suffix` wildcards (stored as the suffix), address ranges."""

    exact: frozenset[str] = frozenset()
    wildcards: frozenset[str] = frozenset()
    cidrs: frozenset[IPNetwork] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.exact or self.wildcards or self.cidrs)

    @property
    def has_names(self) -> bool:
        return bool(self.exact or self.wildcards)

    def covers_name(self, name: str) -> bool:
        if name in self.exact:
            return True
        labels = name.split(".")
        return any(".".join(labels[i:]) in self.wildcards for i in range(1, len(labels)))

    def union(self, other: NameSet) -> NameSet:
        return NameSet(
            self.exact | other.exact, self.wildcards | other.wildcards, self.cidrs | other.cidrs
        )

    def tidy(self) -> NameSet:
        """Drop names and wildcards that another wildcard already covers."""
        wildcards = frozenset(
            w for w in self.wildcards if not any(w.endswith("." + o) for o in self.wildcards)
        )
        kept = NameSet(frozenset(), wildcards, self.cidrs)
        exact = frozenset(n for n in self.exact if not kept.covers_name(n))
        cidrs = frozenset(
            c
            for c in self.cidrs
            if not any(c != o and c.version == o.version and c.subnet_of(o) for o in self.cidrs)  # type: ignore[arg-type]
        )
        return NameSet(exact, wildcards, cidrs)

    def intersect(self, other: NameSet) -> tuple[NameSet, bool]:
        """The intersection, and whether name-by-address cross terms had to be left out (a
        request matches a set by its name OR its address; "name in A and address in B" has no
        rule form, so the result is narrower than Squid's there)."""
        exact = {n for n in self.exact if other.covers_name(n)}
        exact |= {n for n in other.exact if self.covers_name(n)}
        wildcards: set[str] = set()
        for mine in self.wildcards:
            for theirs in other.wildcards:
                if mine == theirs or mine.endswith("." + theirs):
                    wildcards.add(mine)
                elif theirs.endswith("." + mine):
                    wildcards.add(theirs)
        cidrs: set[IPNetwork] = set()
        for mine_net in self.cidrs:
            for theirs_net in other.cidrs:
                if mine_net.version != theirs_net.version:
                    continue
                if mine_net.subnet_of(theirs_net):  # type: ignore[arg-type]
                    cidrs.add(mine_net)
                elif theirs_net.subnet_of(mine_net):  # type: ignore[arg-type]
                    cidrs.add(theirs_net)
        cross = (self.has_names and bool(other.cidrs)) or (bool(self.cidrs) and other.has_names)
        return NameSet(frozenset(exact), frozenset(wildcards), frozenset(cidrs)).tidy(), cross

    def as_yaml(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = [{"fqdn": name} for name in sorted(self.exact)]
        out.extend({"fqdn": f"*.{suffix}"} for suffix in sorted(self.wildcards))
        out.extend({"cidr": str(net)} for net in sorted(self.cidrs, key=lambda n: (n.version, n)))
        return out


# --------------------------------------------------------------------------------------------
# Regular expressions as sets of names
# --------------------------------------------------------------------------------------------


class _RegexError(ValueError):
    pass


_ANY, _START, _END = "\x00any", "\x00start", "\x00end"
_DOT = "\x00dot"


class _RegexExpander:
    """Expands a regex with no unbounded parts into every string it matches, keeping `.*`/`.+`
    as _ANY. Refuses what would not be a finite set (character classes with ranges, `\\d`,
    `*` on anything but `.`)."""

    def __init__(self, pattern: str) -> None:
        self.text = pattern
        self.pos = 0

    def run(self) -> list[list[str]]:
        sequences = self._alternation()
        if self.pos != len(self.text):
            raise _RegexError(f"unbalanced ')' at character {self.pos + 1}")
        return sequences

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _alternation(self) -> list[list[str]]:
        sequences = self._sequence()
        while self._peek() == "|":
            self.pos += 1
            sequences = sequences + self._sequence()
        return sequences

    def _sequence(self) -> list[list[str]]:
        sequences: list[list[str]] = [[]]
        while self._peek() not in ("", "|", ")"):
            atom = self._atom()
            quantifier = self._peek()
            if atom == [[_DOT]]:
                if quantifier in ("*", "+"):
                    self.pos += 1
                    atom = [[_ANY]]
                else:
                    raise _RegexError(
                        "an unescaped '.' matches any character, not only a dot "
                        "(write '\\.' for a dot)"
                    )
            elif quantifier == "?":
                self.pos += 1
                atom = [*atom, []]
            elif quantifier in ("*", "+", "{"):
                raise _RegexError(f"'{quantifier}' repeats a part: not a finite set of names")
            sequences = [left + right for left in sequences for right in atom]
            if len(sequences) > MAX_REGEX_ALTERNATIVES:
                raise _RegexError(f"expands to more than {MAX_REGEX_ALTERNATIVES} names")
        return sequences

    def _atom(self) -> list[list[str]]:
        char = self._peek()
        self.pos += 1
        if char == "(":
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self._peek() == "?":
                raise _RegexError("regex extensions (?...) are not translated")
            inner = self._alternation()
            if self._peek() != ")":
                raise _RegexError("unbalanced '('")
            self.pos += 1
            return inner
        if char == "\\":
            escaped = self._peek()
            self.pos += 1
            if not escaped or escaped.isalnum():
                raise _RegexError(f"'\\{escaped}' is a character class, not one character")
            return [[escaped]]
        if char == "[":
            return self._char_class()
        if char == ".":
            return [[_DOT]]
        if char == "^":
            return [[_START]]
        if char == "$":
            return [[_END]]
        if char in "*+?{":
            raise _RegexError(f"'{char}' has nothing to repeat")
        return [[char]]

    def _char_class(self) -> list[list[str]]:
        end = self.text.find("]", self.pos + 1)
        if end < 0:
            raise _RegexError("unbalanced '['")
        body = self.text[self.pos : end]
        self.pos = end + 1
        if body.startswith("^") or "-" in body.strip("-") or "\\" in body:
            raise _RegexError(f"character class [{body}] is a range of characters")
        return [[char] for char in dict.fromkeys(body)]


def regex_to_names(pattern: str) -> NameSet:
    """The names a dstdom_regex matches, as exact names and `*.` suffixes; _RegexError when the
    regex is not such a set (the message says why)."""
    exact: set[str] = set()
    wildcards: set[str] = set()
    for sequence in _RegexExpander(pattern).run():
        tokens: list[str] = []
        for token in sequence:
            if len(token) == 1 and tokens and len(tokens[-1]) >= 1 and tokens[-1][0] != "\x00":
                tokens[-1] += token
            else:
                tokens.append(token)
        start = next((i for i, t in enumerate(tokens) if t != _ANY), len(tokens))
        if start < len(tokens) and tokens[start] == _START:
            tokens = tokens[start + 1 :]
        else:
            tokens = [_ANY, *tokens]  # unanchored at the start: anything may come before
        if not tokens or tokens[-1] != _END:
            raise _RegexError(
                "not anchored at the end with '$': it also matches names that continue "
                "after it (example.com.attacker.example)"
            )
        tokens = tokens[:-1]
        while len(tokens) > 1 and tokens[0] == _ANY and tokens[1] == _ANY:
            tokens = tokens[1:]
        if any(t in (_START, _END) for t in tokens):
            raise _RegexError("'^' or '$' in the middle of the pattern")
        if len(tokens) == 1 and tokens[0] not in (_ANY,):
            literal, is_wildcard = tokens[0], False
        elif len(tokens) == 2 and tokens[0] == _ANY and tokens[1] != _ANY:
            if not tokens[1].startswith("."):
                raise _RegexError(
                    f"matches any name ending in {tokens[1]!r}, such as "
                    f"'attacker{tokens[1]}', not only names under it"
                )
            literal, is_wildcard = tokens[1][1:], True
        else:
            raise _RegexError("matches names by a pattern that is not a name or a '*.' suffix")
        try:
            name = normalize_name(literal.lower())
        except BadRequest as exc:
            raise _RegexError(f"{literal!r} is not a host name: {exc.message}") from None
        (wildcards if is_wildcard else exact).add(name)
    return NameSet(frozenset(exact), frozenset(wildcards)).tidy()


# --------------------------------------------------------------------------------------------
# ACLs
# --------------------------------------------------------------------------------------------


class AclKind(StrEnum):
    SRC = "src"
    DESTINATION = "destination"
    PORT = "port"
    METHOD = "method"
    UNSUPPORTED = "unsupported"


_DESTINATION_NAME_TYPES = ("dstdomain", "ssl::server_name")
_DESTINATION_REGEX_TYPES = ("dstdom_regex", "ssl::server_name_regex")
# Why each common ACL type has no Outgate equivalent.
_UNSUPPORTED_TYPES: Final[Mapping[str, str]] = {
    "url_regex": "matches the URL; Outgate sees paths only inside an intercepting rule "
    "(inspect.paths)",
    "urlpath_regex": "matches the URL path; use inspect.paths on an intercepting rule",
    "urllogin": "matches the URL login part",
    "browser": "matches the User-Agent header, which any client sets as it likes",
    "req_header": "matches request headers",
    "rep_header": "matches response headers",
    "rep_mime_type": "matches the response content type",
    "req_mime_type": "matches the request content type",
    "proxy_auth": "proxy_auth ACLs are not translated: map users to static identities in "
    "auth.basic (docs/listeners.md) and write policies for those identities",
    "proxy_auth_regex": "Outgate does not authenticate clients",
    "ident": "Outgate does not use ident",
    "ident_regex": "Outgate does not use ident",
    "ext_user": "Outgate does not use external ACL helpers",
    "external": "Outgate does not use external ACL helpers",
    "time": "Outgate policies do not depend on the time of day",
    "maxconn": "per-source connection limits are limits.maxConnectionsPerSource",
    "max_user_ip": "Outgate does not authenticate users",
    "arp": "matches MAC addresses",
    "eui64": "matches MAC addresses",
    "srcdomain": "matches the client's reverse DNS name",
    "srcdom_regex": "matches the client's reverse DNS name",
    "myip": "matches the proxy's own address",
    "localip": "matches the proxy's own address",
    "myport": "matches the proxy's listening port",
    "localport": "matches the proxy's listening port",
    "myportname": "matches the proxy's listening port",
    "proto": "matches the URL scheme (Outgate forwards http:// and tunnels CONNECT)",
    "http_status": "matches the response status",
    "peername": "matches the cache peer Squid chose; Outgate's routes choose by destination",
    "note": "matches Squid annotations",
    "has": "matches Squid transaction state",
    "at_step": "SslBump steps; Outgate's interception is the rule's inspect",
    "ssl_error": "SslBump certificate errors; Outgate always verifies upstream certificates",
    "server_cert_fingerprint": "SslBump certificate pinning",
    "user_cert": "client certificates",
    "ca_cert": "client certificates",
    "random": "a random share of requests",
    "all-of": "combined ACLs (translate its parts as separate http_access terms)",
    "any-of": "combined ACLs (translate its parts as separate http_access lines)",
    "transaction_initiator": "matches Squid-internal requests",
    "hier_code": "matches the cache hierarchy",
    "adaptation_service": "ICAP/eCAP adaptation",
    "squid_error": "matches Squid's own errors",
    "tag": "matches Squid external ACL tags",
    "client_connection_mark": "matches netfilter marks",
}

_PREDEFINED_SOURCE = """
acl all src 0.0.0.0/0 ::/0
acl localhost src 127.0.0.1/32 ::1/128
acl to_localhost dst 127.0.0.0/8 0.0.0.0/32 ::/128 ::1/128
acl to_linklocal dst 169.254.0.0/16 fe80::/10
"""


@dataclass(slots=True)
class Acl:
    name: str
    type: str
    location: Location
    kind: AclKind
    predefined: bool = False
    names: NameSet = field(default_factory=NameSet)
    sources: list[IPNetwork] = field(default_factory=list)
    ports: PortSet = field(default_factory=lambda: PortSet(()))
    methods: set[str] = field(default_factory=set)
    no_reverse_dns: bool = False
    untranslated_values: list[tuple[Location, str, str]] = field(default_factory=list)
    problem: str = ""  # why the whole ACL is unsupported
    not_applicable: str = ""  # lines using it have no meaning in Outgate at all
    used: bool = False

    @property
    def is_all_sources(self) -> bool:
        return self.kind is AclKind.SRC and any(net.prefixlen == 0 for net in self.sources)


def _parse_networks(value: str) -> list[IPNetwork]:
    """Squid's address forms: a.b.c.d, CIDR, a.b.c.d/255.255.0.0, a-b ranges, `all`."""
    if value == "all":
        return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    if "-" in value and "/" not in value:
        low, _, high = value.partition("-")
        first, last = ipaddress.ip_address(low), ipaddress.ip_address(high)
        if first.version != last.version:
            raise ValueError("range ends are of different IP versions")
        return [unmap_network(net) for net in ipaddress.summarize_address_range(first, last)]
    return [unmap_network(ipaddress.ip_network(value, strict=False))]


def _read_value_file(path: Path) -> list[str]:
    values: list[str] = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = raw.split("#", 1)[0].strip()
        values.extend(line.split())
    return values


@dataclass(slots=True)
class _AclTable:
    root: Path
    findings: list[Finding]
    acls: dict[str, Acl] = field(default_factory=dict)

    def define(self, directive: Directive, *, predefined: bool = False) -> None:
        args = list(directive.args)
        if len(args) < 2:
            self._finding(directive, Severity.UNTRANSLATED, "acl needs a name, a type and values")
            return
        name, acl_type = args[0], args[1]
        rest = args[2:]
        flags: set[str] = set()
        while rest and rest[0].startswith(("-", "+")) and len(rest[0]) > 1:
            flag = rest.pop(0)
            if flag == "--":
                break
            flags.add(flag)
        values: list[str] = []
        for value in rest:
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                file = Path(value[1:-1])
                if not file.is_absolute():
                    file = (self.root / directive.location.file).parent / file
                try:
                    values.extend(_read_value_file(file))
                except OSError as exc:
                    self._finding(
                        directive,
                        Severity.UNTRANSLATED,
                        f"cannot read the ACL value file {value}: {exc.strerror}",
                    )
            else:
                values.append(value)
        acl = self.acls.get(name)
        kind = self._kind(acl_type)
        if acl is None:
            problem = ""
            if kind is AclKind.UNSUPPORTED:
                problem = _UNSUPPORTED_TYPES.get(
                    acl_type, f"ACL type {acl_type!r} has no Outgate equivalent"
                )
            acl = Acl(
                name=name,
                type=acl_type,
                location=directive.location,
                kind=kind,
                predefined=predefined,
                problem=problem,
            )
            self.acls[name] = acl
        elif acl.type != acl_type:
            self._finding(
                directive,
                Severity.UNTRANSLATED,
                f"ACL {name!r} was defined as {acl.type} at {acl.location}; Squid refuses "
                f"to redefine it as {acl_type}",
            )
            return
        if "-n" in flags:
            acl.no_reverse_dns = True
        unknown_flags = flags - {"-i", "+i", "-n"}
        if unknown_flags:
            self._finding(
                directive,
                Severity.NOTE,
                f"ACL flags {', '.join(sorted(unknown_flags))} are ignored",
            )
        for value in values:
            problem = self._add_value(acl, value)
            if problem:
                acl.untranslated_values.append((directive.location, value, problem))

    @staticmethod
    def _kind(acl_type: str) -> AclKind:
        if acl_type == "src":
            return AclKind.SRC
        if acl_type in (*_DESTINATION_NAME_TYPES, *_DESTINATION_REGEX_TYPES, "dst"):
            return AclKind.DESTINATION
        if acl_type == "port":
            return AclKind.PORT
        if acl_type == "method":
            return AclKind.METHOD
        return AclKind.UNSUPPORTED

    def _add_value(self, acl: Acl, value: str) -> str:
        """Add one value; return why it cannot be translated, or ""."""
        try:
            if acl.type == "src":
                acl.sources.extend(_parse_networks(value))
            elif acl.type == "dst":
                networks = frozenset(_parse_networks(value))
                acl.names = acl.names.union(NameSet(cidrs=networks))
            elif acl.type in _DESTINATION_NAME_TYPES:
                acl.names = acl.names.union(self._domain(value))
            elif acl.type in _DESTINATION_REGEX_TYPES:
                acl.names = acl.names.union(regex_to_names(value))
            elif acl.type == "port":
                low, _, high = value.partition("-")
                start, end = int(low), int(high or low)
                if not MIN_PORT <= start <= end <= MAX_PORT:
                    return f"{value!r} is not a port or port range"
                acl.ports = PortSet.of([*acl.ports.ranges, (start, end)])
            elif acl.type == "method":
                acl.methods.add(value.upper())
        except _RegexError as exc:
            return f"regex {value!r} cannot be expressed as names: {exc}"
        except ValueError as exc:
            if acl.type == "dst":
                return (
                    f"{value!r} is not an address; Squid resolves a dst host name once at "
                    "start (use dstdomain for names)"
                )
            return f"{value!r} cannot be read: {exc}"
        except BadRequest as exc:
            return f"{value!r} is not a host name: {exc.message}"
        return ""

    @staticmethod
    def _domain(value: str) -> NameSet:
        apex_too = value.startswith(".")
        text = value[1:] if apex_too else value
        candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            address = None
        if address is not None:
            return NameSet(cidrs=frozenset({unmap_network(ipaddress.ip_network(address))}))
        name = normalize_name(text)
        if apex_too:
            return NameSet(exact=frozenset({name}), wildcards=frozenset({name}))
        return NameSet(exact=frozenset({name}))

    def _finding(self, directive: Directive, severity: Severity, message: str) -> None:
        self.findings.append(
            Finding(
                location=directive.location, severity=severity, message=message, text=directive.text
            )
        )


# --------------------------------------------------------------------------------------------
# Directives other than acl and http_access
# --------------------------------------------------------------------------------------------

# Directives with nothing to translate: Outgate does not cache, and Squid's own files and
# process settings have their Outgate counterparts in the runtime config or the Deployment.
_CACHING = """
    cache_dir cache_mem cache send_hit store_miss maximum_object_size maximum_object_size_in_memory
    minimum_object_size refresh_pattern cache_replacement_policy memory_replacement_policy
    cache_swap_low cache_swap_high store_dir_select_algorithm offline_mode memory_pools
    memory_cache_mode memory_cache_shared collapsed_forwarding range_offset_limit quick_abort_min
    quick_abort_max quick_abort_pct cache_store_log negative_ttl positive_dns_ttl negative_dns_ttl
"""
_PROCESS = """
    coredump_dir pid_filename cache_effective_user cache_effective_group workers cpu_affinity_map
    max_filedescriptors logfile_rotate logfile_daemon cache_log debug_options visible_hostname
    unique_hostname cache_mgr mail_from mail_program error_directory error_default_language
    httpd_suppress_version_string dns_v4_first check_hostnames allow_underscore
    strip_query_terms buffered_logs client_db half_closed_clients pipeline_prefetch forwarded_for
    via
"""
_NOT_APPLICABLE: Final[Mapping[str, str]] = {
    **dict.fromkeys(_CACHING.split(), "Outgate does not cache"),
    **dict.fromkeys(
        _PROCESS.split(), "Squid process setting; Outgate runs as its container's user"
    ),
}
# Directives whose meaning Outgate does not reproduce: each needs an operator's decision.
_UNTRANSLATED: Final[Mapping[str, str]] = {
    "ssl_bump": "TLS interception is per rule in Outgate (inspect:), with the cluster CA",
    "sslcrtd_program": "Outgate mints interception certificates itself (tls.caCert/caKey)",
    "https_port": "Outgate has one plain proxy listener",
    "http_reply_access": "Outgate does not filter responses",
    "adapted_http_access": "Outgate has no adaptation (ICAP/eCAP)",
    "icap_service": "Outgate has no ICAP",
    "ecap_service": "Outgate has no eCAP",
    "adaptation_access": "Outgate has no adaptation",
    "tcp_outgoing_address": "Outgate dials from its pod address",
    "request_header_access": "Outgate strips only hop-by-hop headers",
    "reply_header_access": "Outgate strips only hop-by-hop headers",
    "request_header_replace": "Outgate does not rewrite headers",
    "request_header_add": "Outgate does not add headers",
    "url_rewrite_program": "Outgate does not rewrite URLs",
    "auth_param": "not translated: set auth.basic (file: the htpasswd file, bcrypt entries "
    "only; sources; users -> static identities; docs/listeners.md)",
    "external_acl_type": "Outgate does not call external ACL helpers",
    "delay_pools": "Outgate does not shape bandwidth",
    "delay_class": "Outgate does not shape bandwidth",
    "delay_parameters": "Outgate does not shape bandwidth",
    "delay_access": "Outgate does not shape bandwidth",
    "client_delay_pools": "Outgate does not shape bandwidth",
    "icp_port": "Outgate has no ICP",
    "icp_access": "Outgate has no ICP",
    "htcp_port": "Outgate has no HTCP",
    "htcp_access": "Outgate has no HTCP",
    "snmp_port": "Outgate exports Prometheus metrics on the admin listener instead",
    "snmp_access": "Outgate exports Prometheus metrics instead",
    "miss_access": "Outgate does not cache",
    "deny_info": "Outgate's refusal page names workload, destination, reason and event id",
    "if": "Squid conditionals are not evaluated: every line inside was read",
    "else": "Squid conditionals are not evaluated: every line inside was read",
    "endif": "Squid conditionals are not evaluated",
    "read_timeout": "the closest Outgate setting is timeouts.idle (no byte either way)",
    "request_timeout": "the closest Outgate setting is timeouts.header",
    "client_lifetime": "Outgate ends connections on timeouts.idle, not a total lifetime",
}
_TIME_UNITS: Final = {
    "second": 1.0, "seconds": 1.0, "minute": 60.0, "minutes": 60.0, "hour": 3600.0,
    "hours": 3600.0, "millisecond": 0.001, "milliseconds": 0.001,
}  # fmt: skip
_SIZE_UNITS: Final = {"bytes": 1, "kb": 1024, "mb": 1024 * 1024}
# Squid settings with a direct Outgate counterpart: directive -> (config path, kind).
_SETTINGS: Final = {
    "connect_timeout": ("timeouts.connect", "time"),
    "shutdown_lifetime": ("timeouts.drain", "time"),
    "request_header_max_size": ("limits.maxHeaderBytes", "size"),
}


def _duration(args: Sequence[str]) -> str:
    """Squid's `N [unit]` (seconds by default) as an Outgate duration, `30s`; IndexError,
    ValueError or KeyError when it is not one."""
    amount = float(args[0])
    unit = args[1].lower() if len(args) > 1 else "seconds"
    return f"{amount * _TIME_UNITS[unit]:g}s"


def _set_path(config: dict[str, Any], dotted: str, value: object) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


# --------------------------------------------------------------------------------------------
# Parent proxies and routes (cache_peer, cache_peer_access, never_direct, always_direct)
# --------------------------------------------------------------------------------------------

# Where the fragment tells Outgate to read a parent's `user:password`: a file mounted from a
# Secret. The password in squid.conf is never copied into the output.
CREDENTIALS_FILE: Final = "/etc/outgate/upstream-{name}/credentials"
# Upstream names are DNS-label-like in the runtime config: [a-z0-9-], at most 63 characters.
MAX_UPSTREAM_NAME: Final = 63
_ROUTE_LISTS: Final = ("cache_peer_access", "never_direct", "always_direct")
_ROUTE_SWITCHES: Final = ("prefer_direct", "nonhierarchical_direct")
# Squid-wide peer timers -> the upstream setting each becomes (for every upstream).
_PEER_TIMERS: Final[Mapping[str, str]] = {
    "peer_connect_timeout": "connectTimeout",
    "dead_peer_timeout": "retryAfter",
}
# login= values with which Squid hands the client's own credentials to the parent.
_FORWARDED_LOGINS: Final = frozenset({"PASS", "PASSTHRU", "PROXYPASS"})
# How Squid spreads requests over parents; Outgate tries an upstream's proxies in order.
_SELECTION_OPTIONS: Final = frozenset(
    {"round-robin", "weighted-round-robin", "carp", "sourcehash", "userhash"}
)
_SELECTION_PREFIXES: Final = ("weight=", "carp-key=")
# Options about caching, ICP/HTCP, digests, probing, connection pools and TLS tuning: nothing
# for Outgate to do (it does not cache, opens connections as needed, uses its TLS defaults).
_PEER_NOTE_OPTIONS: Final = frozenset(
    {
        "no-query", "proxy-only", "no-digest", "no-netdb-exchange", "no-delay",
        "background-ping", "closest-only", "allow-miss", "multicast-responder",
        "multicast-siblings", "htcp", "htcp-oldsquid", "htcp-no-clr", "htcp-no-purge-clr",
        "htcp-only-clr", "htcp-forward-clr", "no-tproxy", "front-end-https", "tls-default-ca",
        "auth-no-keytab",
    }
)  # fmt: skip
_PEER_NOTE_PREFIXES: Final = (
    "ttl=", "basetime=", "htcp=", "max-conn=", "standby=", "connection-auth=", "monitorurl=",
    "monitorinterval=", "monitorsize=", "monitortimeout=", "digest-url=", "front-end-https=",
    "tls-min-version=", "tls-options=", "tls-cipher=", "sslversion=", "ssloptions=", "sslcipher=",
)  # fmt: skip
_PEER_UNTRANSLATED_OPTIONS: Final[Mapping[str, str]] = {
    **dict.fromkeys(
        ("tls-cert", "tls-key", "sslcert", "sslkey"),
        "Outgate presents no client certificate to a parent",
    ),
    **dict.fromkeys(
        ("tls-capath", "sslcapath"), "give the CA certificates as one PEM file (caBundle)"
    ),
    **dict.fromkeys(("tls-crlfile", "sslcrlfile"), "Outgate reads no CRL for a parent"),
    **dict.fromkeys(
        ("tls-domain", "ssldomain"),
        "Outgate verifies a parent's certificate for the host name in its URL",
    ),
    **dict.fromkeys(
        ("tls-flags", "sslflags"), "Outgate always verifies a parent's certificate and name"
    ),
}
# Peers that are not forward proxies at all: Squid as a reverse proxy in front of an origin.
_ORIGIN_PEER_OPTIONS: Final = ("originserver", "forceddomain")


class _Every(Enum):
    """A route line with no destination term: it covers every destination."""

    DESTINATION = "every destination"


@dataclass(slots=True, kw_only=True)
class _Peer:
    directive: Directive
    name: str  # Squid's peer name (name=, else the host): what cache_peer_access refers to
    url: str
    # `user:password`: held to group parents only, never written out (nor shown by repr)
    login: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None
    connect_timeout: str | None = None
    fail_limit: int | None = None
    default: bool = False
    access: list[Directive] = field(default_factory=list)


@dataclass(slots=True)
class _DestinationList:
    """What an access list over destinations says, for the routes."""

    allowed: list[tuple[Directive, NameSet]] = field(default_factory=list)  # allow lines, in order
    every: Directive | None = None  # the line after which every other destination is allowed
    excepted: list[tuple[Directive, NameSet]] = field(default_factory=list)  # ... but these


@dataclass(slots=True, kw_only=True)
class _Upstream:
    name: str
    peers: list[_Peer]  # in file order: the order Outgate tries them
    access: tuple[NameSet, ...] | None  # what cache_peer_access lets it take; None: everything
    excluded: tuple[NameSet, ...] = ()  # when it takes everything: but these

    @property
    def default(self) -> bool:
        return any(peer.default for peer in self.peers)


# --------------------------------------------------------------------------------------------
# http_access
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Term:
    acl: Acl
    negated: bool

    def __str__(self) -> str:
        return ("!" if self.negated else "") + self.acl.name


@dataclass(slots=True)
class _Context:
    """What earlier destination-less deny lines leave for the lines after them."""

    ports: PortSet = ALL_PORTS
    destinations: NameSet | None = None  # None: any destination
    destinations_from: list[Location] = field(default_factory=list)
    ports_from: list[Location] = field(default_factory=list)
    excluded_sources: list[Acl] = field(default_factory=list)
    required_sources: list[Acl] = field(default_factory=list)
    known_workloads_only: bool = False
    unknown_sources_only: bool = False
    closed_at: Location | None = None
    connect_restricted_at: Location | None = None
    safe_ports_at: Location | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Emitted:
    index: int
    directive: Directive
    action: str  # "Allow" | "Deny"
    terms: tuple[_Term, ...]
    subject: dict[str, Any] | None
    destinations: NameSet
    ports: PortSet


def _slug(text: str, limit: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].strip("-")


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportOptions:
    cluster_sources: frozenset[str] = frozenset()  # src ACLs that mean "the cluster's pods"
    static_namespace: str = DEFAULT_STATIC_NAMESPACE
    priority: int = DEFAULT_PRIORITY
    prefix: str = DEFAULT_PREFIX
    mode: Mode = Mode.ENFORCE  # audit: trial the imported set as shadow decisions first


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportResult:
    policies_yaml: str
    config: dict[str, Any]  # runtime-config fragment: listen, dns, identity.static, audit...
    findings: tuple[Finding, ...]
    files: tuple[str, ...]
    policy_count: int

    @property
    def untranslated(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.UNTRANSLATED)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity is Severity.WARNING)

    def report(self) -> str:
        return "\n".join(finding.render() for finding in self.findings)


class _Translator:
    def __init__(self, root: Path, options: ImportOptions) -> None:
        self.root = root
        self.options = options
        self.findings: list[Finding] = []
        self.table = _AclTable(root=root, findings=self.findings)
        self.config: dict[str, Any] = {}
        self.emitted: list[_Emitted] = []
        self.logformats: dict[str, str] = {}
        self.subject_sources: dict[str, Acl] = {}  # src ACLs some emitted subject names
        self._warned: set[tuple[str, str]] = set()  # (ACL, warning kind) already reported
        self.peers: list[_Peer] = []  # translated parents, in file order
        self.peer_names: set[str] = set()  # every cache_peer's name, translated or not
        self.route_switches: dict[str, tuple[Directive, bool]] = {}  # prefer_direct, ...
        self.peer_timers: dict[str, tuple[Directive, str]] = {}  # dead_peer_timeout, ...
        self._psl = PublicSuffixList()
        for number, line in _logical_lines(_PREDEFINED_SOURCE):
            tokens = line.split()
            self.table.define(
                Directive(
                    location=Location("<squid built-in>", number),
                    name=tokens[0],
                    args=tuple(tokens[1:]),
                    text=line,
                ),
                predefined=True,
            )
        self.table.acls["manager"] = Acl(
            name="manager",
            type="url_regex",
            location=Location("<squid built-in>", 0),
            kind=AclKind.UNSUPPORTED,
            predefined=True,
            problem="Squid's cache manager URLs",
            not_applicable="Squid's cache manager; Outgate's /metrics, /healthz and /explain "
            "are on its admin listener, never reached through the proxy port",
        )

    # -- findings -------------------------------------------------------------------------------

    def _add(
        self,
        directive: Directive | None,
        severity: Severity,
        message: str,
        *,
        at: Location | None = None,
    ) -> None:
        self.findings.append(
            Finding(
                location=at if at is not None else (directive.location if directive else None),
                severity=severity,
                message=message,
                text=directive.text if directive is not None else "",
            )
        )

    # -- directives -----------------------------------------------------------------------------

    def translate(self, directives: list[Directive]) -> None:
        access: list[Directive] = []
        routing: list[Directive] = []
        for directive in directives:
            name = directive.name
            if name == "acl":
                self.table.define(directive)
            elif name == "http_access":
                access.append(directive)
            elif name == "http_port":
                self._http_port(directive)
            elif name == "dns_nameservers":
                servers = [f"[{s}]:53" if ":" in s else f"{s}:53" for s in directive.args]
                self.config.setdefault("dns", {})["nameservers"] = servers
            elif name == "hosts_file" and len(directive.args) == 1:
                # Squid's `hosts_file none` turns it off, as `hostsFile: null` does.
                path = directive.args[0]
                self.config.setdefault("dns", {})["hostsFile"] = None if path == "none" else path
            elif name == "logformat" and len(directive.args) >= 2:
                self.logformats[directive.args[0]] = directive.text.split(None, 2)[2]
            elif name == "access_log":
                self._access_log(directive)
            elif name == "cache_peer":
                self._cache_peer(directive)
            elif name in _ROUTE_LISTS:
                routing.append(directive)
            elif name in _ROUTE_SWITCHES:
                self._route_switch(directive)
            elif name in _PEER_TIMERS:
                self._peer_timer(directive)
            elif name in _SETTINGS:
                self._setting(directive)
            elif name in _NOT_APPLICABLE:
                self._add(directive, Severity.NOTE, f"not applicable: {_NOT_APPLICABLE[name]}")
            elif name in _UNTRANSLATED:
                self._add(directive, Severity.UNTRANSLATED, _UNTRANSLATED[name])
            else:
                self._add(directive, Severity.UNTRANSLATED, f"{name}: no Outgate equivalent")
        self._access(access)
        self._routes(routing)
        self._acl_findings()

    def _http_port(self, directive: Directive) -> None:
        if not directive.args:
            self._add(directive, Severity.UNTRANSLATED, "http_port without a port")
            return
        if "listen" in self.config:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                "Outgate has one proxy listener; only the first http_port is translated",
            )
            return
        where, *options = directive.args
        host, _, port = where.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        self.config["listen"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if options:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                f"http_port options {' '.join(options)} are not translated "
                "(Outgate is an explicit forward proxy: no intercept/tproxy/accel/ssl-bump modes)",
            )

    def _access_log(self, directive: Directive) -> None:
        if not directive.args:
            return
        target = directive.args[0]
        if target == "none":
            self._add(
                directive, Severity.NOTE, "access logging off in Squid; Outgate always audits"
            )
            return
        module, _, path = target.partition(":")
        if module not in ("stdio", "daemon") or not path:
            path = target if target.startswith("/") else ""
        if not path:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                f"access_log {target}: Outgate writes Squid lines to stdout or a file "
                "(audit.squidOutput)",
            )
            return
        fmt_name = directive.args[1] if len(directive.args) > 1 else "squid"
        fmt_name = fmt_name.removeprefix("logformat=")
        fmt = self.logformats.get(fmt_name, fmt_name)
        if fmt not in NAMED_FORMATS and fmt_name not in self.logformats:
            fmt = "squid"
        try:
            parse_logformat(fmt)
        except ValueError as exc:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                f"logformat {fmt_name}: {exc}; the fragment uses Squid's native format instead",
            )
            fmt = "squid"
        if "audit" not in self.config:
            self.config["audit"] = {"format": "both", "squidOutput": path, "squidLogformat": fmt}
            self._add(
                directive,
                Severity.NOTE,
                "translated to audit.format: both with audit.squidOutput (JSON records stay "
                "on stdout; Squid lines go to the same file as before)",
            )
        else:
            self._add(directive, Severity.UNTRANSLATED, "Outgate writes one Squid access log")

    def _setting(self, directive: Directive) -> None:
        path, kind = _SETTINGS[directive.name]
        args = directive.args
        try:
            if kind == "time":
                value: object = _duration(args)
            else:
                unit = args[1].lower() if len(args) > 1 else "bytes"
                value = int(float(args[0]) * _SIZE_UNITS[unit])
        except (IndexError, ValueError, KeyError):
            self._add(directive, Severity.UNTRANSLATED, f"cannot read the value for {path}")
            return
        _set_path(self.config, path, value)

    # -- ACL findings ---------------------------------------------------------------------------

    def _acl_findings(self) -> None:
        for acl in self.table.acls.values():
            if acl.predefined:
                continue
            severity = Severity.UNTRANSLATED if acl.used else Severity.NOTE
            unused = "" if acl.used else " (no http_access or routing line uses the ACL)"
            if acl.kind is AclKind.UNSUPPORTED:
                self._add(
                    None,
                    severity,
                    f"ACL {acl.name} ({acl.type}): {acl.problem}{unused}",
                    at=acl.location,
                )
            for location, _value, problem in acl.untranslated_values:
                self._add(None, severity, f"ACL {acl.name}: {problem}{unused}", at=location)

    # -- http_access ----------------------------------------------------------------------------

    def _terms(
        self, directive: Directive, args: Sequence[str] | None = None
    ) -> tuple[str, list[_Term]] | None:
        """`allow|deny [!]acl...` (the directive's arguments, or `args`) with the ACLs looked up."""
        args = directive.args if args is None else args
        if not args or args[0] not in ("allow", "deny"):
            self._add(directive, Severity.UNTRANSLATED, f"{directive.name} needs allow or deny")
            return None
        terms: list[_Term] = []
        missing: list[str] = []
        for raw in args[1:]:
            negated = raw.startswith("!")
            name = raw[1:] if negated else raw
            acl = self.table.acls.get(name)
            if acl is None:
                missing.append(name)
                continue
            acl.used = True
            terms.append(_Term(acl, negated))
        if missing:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                f"ACL {', '.join(missing)} is not defined (Squid refuses this configuration)",
            )
            return None
        return args[0], terms

    def _access(self, lines: list[Directive]) -> None:
        context = _Context()
        first_allow: Directive | None = None
        for index, directive in enumerate(lines, start=1):
            parsed = self._terms(directive)
            if parsed is None:
                continue
            action, terms = parsed
            if context.closed_at is not None:
                self._add(
                    directive,
                    Severity.NOTE,
                    f"never reached: the deny of every request at {context.closed_at} comes first "
                    "(in Squid too)",
                )
                continue
            if action == "allow" and first_allow is None:
                first_allow = directive
            self._line(index, directive, action, terms, context)
        self._holes(lines, context, first_allow)

    def _line(
        self, index: int, directive: Directive, action: str, terms: list[_Term], context: _Context
    ) -> None:
        not_applicable = [t.acl for t in terms if t.acl.not_applicable]
        if not_applicable:
            self._add(
                directive, Severity.NOTE, f"not applicable: {not_applicable[0].not_applicable}"
            )
            return
        unsupported = [t for t in terms if t.acl.kind is AclKind.UNSUPPORTED]
        deny = action == "deny"
        if unsupported:
            names = ", ".join(f"{t.acl.name} ({t.acl.type}, {t.acl.location})" for t in unsupported)
            consequence = (
                "this deny is NOT enforced by the imported policies"
                if deny
                else "what it allows is denied by the imported policies"
            )
            self._add(
                directive, Severity.UNTRANSLATED, f"uses untranslatable ACL {names}: {consequence}"
            )
            return
        if any(t.acl.name == "all" and t.negated for t in terms):
            self._add(directive, Severity.NOTE, "never matches (!all)")
            return
        terms = [t for t in terms if not (t.acl.is_all_sources and not t.negated)]
        sources = [t for t in terms if t.acl.kind is AclKind.SRC]
        destinations = [t for t in terms if t.acl.kind is AclKind.DESTINATION]
        port_terms = [t for t in terms if t.acl.kind is AclKind.PORT]
        methods = [t for t in terms if t.acl.kind is AclKind.METHOD]
        ports = ALL_PORTS
        for term in port_terms:
            ports = ports.intersect(term.acl.ports.complement() if term.negated else term.acl.ports)
        connect_only = [t for t in methods if t.acl.methods == {"CONNECT"} and not t.negated]
        other_methods = [t for t in methods if t not in connect_only]
        partial = [t.acl.name for t in terms if t.acl.untranslated_values]
        if partial:
            self._add(
                directive,
                Severity.WARNING if deny else Severity.UNTRANSLATED,
                f"ACL {', '.join(partial)} has values that could not be translated; "
                + ("this deny does not cover them" if deny else "what they allow is denied"),
            )
        if other_methods:
            method_names = ", ".join(str(t) for t in other_methods)
            self._add(
                directive,
                Severity.UNTRANSLATED,
                f"method ACL {method_names}: Outgate rules do not match HTTP methods (an "
                "intercepting rule's inspect.methods does); "
                + ("this deny is NOT enforced" if deny else "what it allows is denied"),
            )
            return
        negated_destinations = [t for t in destinations if t.negated]
        positive_destinations = [t for t in destinations if not t.negated]
        if deny and not positive_destinations:
            self._destinationless_deny(
                directive, sources, negated_destinations, port_terms, ports, connect_only, context
            )
            return
        if negated_destinations:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                f"{'deny' if deny else 'allow'} with a negated destination "
                f"({', '.join(str(t) for t in negated_destinations)}) next to other terms has no "
                "rule form; "
                + ("this deny is NOT enforced" if deny else "what it allows is denied"),
            )
            return
        target: NameSet | None = None
        for term in positive_destinations:
            if target is None:
                target = term.acl.names
                continue
            target, cross = target.intersect(term.acl.names)
            if cross:
                self._cross_note(directive)
        if not deny:
            if context.destinations is not None:
                if target is None:
                    target = context.destinations
                else:
                    target, cross = target.intersect(context.destinations)
                    if cross:
                        self._cross_note(directive)
            ports = ports.intersect(context.ports)
        if target is None:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                "allows every destination"
                + (f" for {', '.join(str(t) for t in sources)}" if sources else " (an open proxy)")
                + ": Outgate policies name destinations. Learn them with audit mode and "
                "`outgate suggest`, or set defaultAction: allow",
            )
            return
        target = target.tidy()
        if not deny:
            target = self._drop_tld_wildcards(directive, target)
        if connect_only:
            self._add(
                directive,
                Severity.NOTE,
                "CONNECT: Outgate rules do not tell tunnels from plain HTTP; "
                + (
                    "this Deny also refuses plain-HTTP requests to the same destinations"
                    if deny
                    else "this Allow also lets plain-HTTP requests reach the same ports"
                ),
            )
        if target.empty or ports.empty:
            self._add(
                directive,
                Severity.NOTE,
                "matches nothing once earlier deny lines are applied"
                + (f" (ports left: {ports})" if ports.empty else " (no destination left)"),
            )
            return
        subject = self._subject(directive, sources, context if not deny else None)
        if subject is None:
            return
        self.emitted.append(
            _Emitted(
                index=index,
                directive=directive,
                action="Deny" if deny else "Allow",
                terms=tuple(terms),
                subject=subject or None,
                destinations=target,
                ports=ports,
            )
        )
        if not deny:
            self._allow_warnings(directive, positive_destinations)

    def _cross_note(self, directive: Directive) -> None:
        self._add(
            directive,
            Severity.NOTE,
            "names and addresses in different ACLs of one line: requests that match one ACL by "
            "name and the other by address are not allowed (narrower than Squid)",
        )

    def _drop_tld_wildcards(self, directive: Directive, target: NameSet) -> NameSet:
        tlds = {w for w in target.wildcards if "." not in w}
        if not tlds:
            return target
        self._add(
            directive,
            Severity.UNTRANSLATED,
            f"allows every name under the top-level domain(s) {', '.join(sorted(tlds))}; the "
            "loader refuses that in an Allow, so those wildcards are left out",
        )
        return NameSet(target.exact, target.wildcards - tlds, target.cidrs)

    def _once(self, acl: Acl, kind: str) -> bool:
        key = (acl.name, kind)
        if key in self._warned:
            return False
        self._warned.add(key)
        return True

    def _allow_warnings(self, directive: Directive, destinations: list[_Term]) -> None:
        for term in destinations:
            acl = term.acl
            if not self._once(acl, "allow"):
                continue
            if acl.type == "dstdomain" and not acl.no_reverse_dns and acl.names.has_names:
                self._add(
                    directive,
                    Severity.WARNING,
                    f"dstdomain ACL {acl.name} (no -n): Squid matches a request for an IP "
                    "literal against it by reverse DNS, and whoever owns an address sets its "
                    "PTR name; Outgate never matches names against IP literals, so such requests "
                    "are denied now",
                )
            if acl.type == "dstdomain" and acl.names.cidrs:
                shown = ", ".join(str(c) for c in sorted(acl.names.cidrs, key=str))
                self._add(
                    None,
                    Severity.WARNING,
                    f"dstdomain ACL {acl.name} lists IP literals ({shown}); translated to cidr "
                    "entries, which also match names that resolve into them",
                    at=acl.location,
                )
            shared = sorted(w for w in acl.names.wildcards if "." in w and self._psl.is_public(w))
            if shared:
                self._add(
                    None,
                    Severity.WARNING,
                    f"ACL {acl.name} allows every name under {', '.join(shared)}, a public "
                    "suffix: those names belong to many owners (anyone's bucket or app), "
                    "an exfiltration path; list the names you use",
                    at=acl.location,
                )

    def _destinationless_deny(
        self,
        directive: Directive,
        sources: list[_Term],
        negated_destinations: list[_Term],
        port_terms: list[_Term],
        ports: PortSet,
        connect_only: list[_Term],
        context: _Context,
    ) -> None:
        """A deny with no positive destination narrows the lines after it (module docstring, 5)."""
        has_ports = bool(port_terms)
        if connect_only:
            if not sources and not negated_destinations and has_ports:
                if any(t.negated for t in port_terms):
                    context.connect_restricted_at = directive.location
                self._add(
                    directive,
                    Severity.NOTE,
                    f"tunnels to ports other than {ports.complement()} are refused in Squid; "
                    "Outgate cannot restrict tunnels apart from plain HTTP, and instead requires "
                    "TLS (or plain HTTP, checked request by request) inside every tunnel by "
                    "default, so arbitrary protocols cannot be tunnelled; TLS tunnels to the "
                    "other allowed ports pass",
                )
                return
            self._add(
                directive,
                Severity.UNTRANSLATED,
                "a CONNECT deny with these terms has no rule form: this deny is NOT enforced",
            )
            return
        if negated_destinations:
            if sources or has_ports or len(negated_destinations) > 1:
                self._add(
                    directive,
                    Severity.UNTRANSLATED,
                    "a deny of everything outside a destination ACL, limited by other terms, has "
                    "no rule form: this deny is NOT enforced",
                )
                return
            names = negated_destinations[0].acl.names
            if context.destinations is None:
                context.destinations = names
            else:
                context.destinations, cross = context.destinations.intersect(names)
                if cross:
                    self._cross_note(directive)
            context.destinations_from.append(directive.location)
            self._add(
                directive,
                Severity.NOTE,
                f"translated: every later Allow is limited to {negated_destinations[0].acl.name}",
            )
            return
        if has_ports and not sources:
            context.ports = context.ports.intersect(ports.complement())
            context.ports_from.append(directive.location)
            if any(t.negated for t in port_terms):
                context.safe_ports_at = directive.location
            self._add(
                directive,
                Severity.NOTE,
                f"translated: every later Allow is limited to ports {context.ports}",
            )
            return
        if sources and not has_ports and len(sources) == 1:
            term = sources[0]
            cluster = term.acl.name in self.options.cluster_sources
            if cluster and not term.negated:
                context.unknown_sources_only = True
            elif cluster:
                context.known_workloads_only = True
            elif term.negated:
                context.required_sources.append(term.acl)
            else:
                context.excluded_sources.append(term.acl)
            self._add(
                directive,
                Severity.NOTE,
                f"translated: later Allow rules leave out sources {'not ' if term.negated else ''}"
                f"in {term.acl.name}",
            )
            return
        if not sources and not has_ports:
            context.closed_at = directive.location
            self._add(
                directive,
                Severity.NOTE,
                "translated: what no earlier line allows is denied (defaultAction: deny, "
                "Outgate's default)",
            )
            return
        self._add(
            directive,
            Severity.UNTRANSLATED,
            "a deny of every destination for these sources and ports has no rule form: "
            "this deny is NOT enforced",
        )

    # -- subjects -------------------------------------------------------------------------------

    def _label_key(self, acl: Acl) -> str:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", acl.name).strip("-_.")[:63].strip("-_.") or "acl"
        key = f"{LABEL_PREFIX}/{name}"
        if not is_label_key(key):  # pragma: no cover - the substitution above keeps it valid
            raise ValueError(f"cannot make a label key from ACL {acl.name!r}")
        return key

    def _subject(
        self, directive: Directive, sources: list[_Term], context: _Context | None
    ) -> dict[str, Any] | None:
        """The subject for a rule; {} for every workload; None when nothing can be selected."""
        labels: dict[str, str] = {}
        expressions: dict[str, dict[str, Any]] = {}
        known_only = False
        required = [_Term(acl, False) for acl in (context.required_sources if context else [])]
        excluded = [_Term(acl, True) for acl in (context.excluded_sources if context else [])]
        if context is not None and context.unknown_sources_only:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                "only sources outside the cluster reach this line; a policy cannot select "
                "unknown sources alone",
            )
            return None
        if context is not None and context.known_workloads_only:
            known_only = True
        for term in [*sources, *required, *excluded]:
            if term.acl.name in self.options.cluster_sources:
                if term.negated:
                    self._add(
                        directive,
                        Severity.UNTRANSLATED,
                        f"!{term.acl.name}: a policy cannot select only sources outside the "
                        "cluster",
                    )
                    return None
                known_only = True
                continue
            key = self._label_key(term.acl)
            self.subject_sources[term.acl.name] = term.acl
            if term.negated:
                if key in labels:
                    self._add(directive, Severity.NOTE, "never matches (a source and its negation)")
                    return None
                expressions[key] = {"key": key, "operator": "DoesNotExist"}
            else:
                if key in expressions:
                    self._add(directive, Severity.NOTE, "never matches (a source and its negation)")
                    return None
                labels[key] = "true"
        subject: dict[str, Any] = {}
        if known_only:
            subject["namespaceSelector"] = {}
        if labels or expressions:
            selector: dict[str, Any] = {}
            if labels:
                selector["matchLabels"] = dict(sorted(labels.items()))
            if expressions:
                selector["matchExpressions"] = [expressions[k] for k in sorted(expressions)]
            subject["podSelector"] = selector
        if expressions and not labels and not known_only:
            self._add(
                directive,
                Severity.NOTE,
                "a negated source selects known workloads only (pods and static identities); "
                "unknown sources are not selected",
            )
        return subject

    # -- holes ----------------------------------------------------------------------------------

    def _holes(
        self, lines: list[Directive], context: _Context, first_allow: Directive | None
    ) -> None:
        if first_allow is None:
            return
        if context.connect_restricted_at is None:
            self._add(
                first_allow,
                Severity.WARNING,
                "no `http_access deny CONNECT !SSL_ports` before the allow lines: Squid lets "
                "clients tunnel any protocol to any port of an allowed host (SSH, SMTP...). The "
                "imported rules keep Squid's ports; Outgate still requires TLS (or plain HTTP) "
                "inside tunnels by default, and you may narrow ports to [443]",
            )
        if context.safe_ports_at is None:
            self._add(
                first_allow,
                Severity.WARNING,
                "no `http_access deny !Safe_ports` before the allow lines: Squid forwards "
                "requests to any port of an allowed host; the imported rules allow ports 1-65535",
            )
        last = self._terms_quiet(lines[-1]) if lines else None
        if last is not None and last[0] == "deny" and context.closed_at is None:
            self._add(
                lines[-1],
                Severity.WARNING,
                "the last http_access line is a deny, so Squid ALLOWS what no line matches (its "
                "default is the opposite of the last line); Outgate's defaultAction is deny. "
                "Add `http_access deny all` to say so, or set defaultAction: allow",
            )

    def _terms_quiet(self, directive: Directive) -> tuple[str, list[str]] | None:
        if not directive.args:
            return None
        return directive.args[0], list(directive.args[1:])

    # -- parent proxies -------------------------------------------------------------------------

    def _cache_peer(self, directive: Directive) -> None:
        if len(directive.args) < 4:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                "cache_peer needs a host, a type, an HTTP port and an ICP port",
            )
            return
        host, kind, port_text, _icp_port, *options = directive.args
        name = next((o.removeprefix("name=") for o in options if o.startswith("name=")), host)
        if name in self.peer_names:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                f"a second cache_peer named {name!r} (Squid refuses this configuration)",
            )
            return
        self.peer_names.add(name)
        if kind != "parent":
            self._add(
                directive,
                Severity.UNTRANSLATED,
                f"a {kind} peer: Outgate chains only to parent proxies (Squid asks siblings for "
                "cached objects over ICP/HTCP); no request goes to it",
            )
            return
        origin = [o for o in options if o.partition("=")[0] in _ORIGIN_PEER_OPTIONS]
        if origin:
            self._add(
                directive,
                Severity.UNTRANSLATED,
                f"{origin[0].partition('=')[0]}: this peer is an origin server behind Squid as a "
                "reverse proxy, not a parent proxy; not translated",
            )
            return
        try:
            port = int(port_text)
            if not MIN_PORT <= port <= MAX_PORT:
                raise ValueError(port_text)
        except ValueError:
            self._add(directive, Severity.UNTRANSLATED, f"HTTP port {port_text!r} is not a port")
            return
        scheme = "https" if any(o in ("ssl", "tls") for o in options) else "http"
        address = f"[{host}]" if ":" in host and not host.startswith("[") else host
        peer = _Peer(directive=directive, name=name, url=f"{scheme}://{address}:{port}")
        self._peer_options(peer, options)
        self.peers.append(peer)

    def _peer_options(self, peer: _Peer, options: Sequence[str]) -> None:
        """Read a parent's options into `peer`; report the others. Messages name an option, never
        its value (a login= value holds a password)."""
        directive = peer.directive
        selection: list[str] = []
        noted: list[str] = []
        untranslated: list[str] = []
        for option in options:
            key, has_value, value = option.partition("=")
            if option in ("ssl", "tls") or key == "name":
                continue
            if option == "default":
                peer.default = True
            elif key == "login" and has_value:
                self._peer_login(peer, value)
            elif key in ("tls-cafile", "sslcafile") and value:
                peer.ca_bundle = value
            elif key == "connect-timeout" and has_value:
                try:
                    peer.connect_timeout = _duration([value])
                except ValueError:
                    untranslated.append(f"{key}: not a number of seconds")
            elif key == "connect-fail-limit" and has_value:
                if value.isdigit() and int(value) > 0:
                    peer.fail_limit = int(value)
                else:
                    untranslated.append(f"{key}: not a positive count")
            elif option in _SELECTION_OPTIONS or option.startswith(_SELECTION_PREFIXES):
                selection.append(key)
            elif option in _PEER_NOTE_OPTIONS or option.startswith(_PEER_NOTE_PREFIXES):
                noted.append(key)
            elif key in _PEER_UNTRANSLATED_OPTIONS:
                untranslated.append(f"{key}: {_PEER_UNTRANSLATED_OPTIONS[key]}")
            else:
                untranslated.append(f"{key}: no Outgate equivalent")
        if selection:
            self._add(
                directive,
                Severity.WARNING,
                f"{', '.join(selection)}: Squid spreads requests over its parents; Outgate tries "
                "an upstream's proxies in order, and the next one only while one is down",
            )
        if noted:
            self._add(
                directive,
                Severity.NOTE,
                f"not applicable: {', '.join(noted)} (caching, ICP/HTCP, digests, connection "
                "pools, TLS tuning: Outgate does not cache and uses its own TLS defaults)",
            )
        for problem in untranslated:
            self._add(directive, Severity.UNTRANSLATED, f"cache_peer option {problem}")

    def _peer_login(self, peer: _Peer, value: str) -> None:
        if value in _FORWARDED_LOGINS or value.startswith("*:"):
            shown = value if value in _FORWARDED_LOGINS else "*:..."
            self._add(
                peer.directive,
                Severity.UNTRANSLATED,
                f"login={shown} hands the client's own credentials to the parent: Outgate never "
                "forwards a client's credentials. The parent gets none from Outgate unless you "
                "give Outgate its own in credentialsFile",
            )
        elif value.upper().startswith("NEGOTIATE"):
            self._add(
                peer.directive,
                Severity.UNTRANSLATED,
                "login=NEGOTIATE (Kerberos) is not supported: Outgate sends Basic credentials "
                "read from credentialsFile",
            )
        else:
            peer.login = value

    def _route_switch(self, directive: Directive) -> None:
        value = directive.args[0].lower() if directive.args else ""
        if value not in ("on", "off"):
            self._add(directive, Severity.UNTRANSLATED, f"{directive.name} needs on or off")
            return
        self.route_switches[directive.name] = (directive, value == "on")

    def _peer_timer(self, directive: Directive) -> None:
        try:
            self.peer_timers[directive.name] = (directive, _duration(directive.args))
        except (IndexError, ValueError, KeyError):
            self._add(
                directive, Severity.UNTRANSLATED, f"cannot read the value of {directive.name}"
            )

    # -- routes ---------------------------------------------------------------------------------

    def _route_destinations(
        self, directive: Directive, terms: list[_Term], consequence: str
    ) -> NameSet | _Every | None:
        """The destinations a routing line's ACL terms cover; None (reported) when the terms say
        more than destinations, or match none."""
        terms = [t for t in terms if not (t.acl.is_all_sources and not t.negated)]
        for term in terms:
            problem = ""
            if term.acl.kind is not AclKind.DESTINATION:
                problem = f"routes choose by destination only, and {term} is a {term.acl.type} ACL"
            elif term.negated:
                problem = f"a negated destination ({term}) has no route form"
            if problem:
                self._add(directive, Severity.UNTRANSLATED, f"{problem}: {consequence}")
                return None
        if not terms:
            return _Every.DESTINATION
        partial = [t.acl.name for t in terms if t.acl.untranslated_values]
        if partial:
            self._add(
                directive,
                Severity.WARNING,
                f"ACL {', '.join(partial)} has values that could not be translated: for those, "
                f"{consequence}",
            )
        target = terms[0].acl.names
        for term in terms[1:]:
            target, cross = target.intersect(term.acl.names)
            if cross:
                self._add(
                    directive,
                    Severity.NOTE,
                    "names and addresses in different ACLs of one line: requests that match one "
                    "ACL by name and the other by address are not routed by this line",
                )
        target = target.tidy()
        if target.empty:
            self._add(directive, Severity.NOTE, "matches no destination")
            return None
        return target

    def _destination_list(
        self,
        lines: list[Directive],
        *,
        skip: int,
        routed: str,
        consequence: str,
        exceptions: bool = False,
    ) -> _DestinationList:
        """An access list over destinations (cache_peer_access, always_direct, never_direct):
        the destinations its allow lines cover, in order, and the line after which every other
        destination is allowed too (`allow all`, or a last line that is a deny: Squid applies the
        opposite of the last line to what no line matches). With `exceptions`, deny lines that
        name destinations before that line (or `allow !DEST`) are the exceptions to it; any other
        deny that names destinations has no route form and is reported."""
        result = _DestinationList()
        pending: list[tuple[Directive, NameSet]] = []  # denies that may be exceptions
        last_action = ""
        for index, line in enumerate(lines):
            parsed = self._terms(line, line.args[skip:])
            if parsed is None:
                continue
            action, terms = parsed
            last_action = action
            negated = self._negated_destination(terms) if exceptions else None
            if action == "allow" and negated is not None:  # `allow !DEST`: all but DEST
                pending.append((line, negated))
                self._close_exceptions(result, line, pending, routed)
                for later in lines[index + 1 :]:
                    reached = f"reached only for the destinations {line.location} leaves out"
                    if later.args[skip : skip + 1] == ("deny",):
                        self._add(later, Severity.NOTE, reached)
                    else:
                        self._add(later, Severity.UNTRANSLATED, f"{reached}: {consequence}")
                return result
            destinations = self._route_destinations(line, terms, consequence)
            if destinations is _Every.DESTINATION:
                for later in lines[index + 1 :]:
                    self._add(
                        later,
                        Severity.NOTE,
                        f"never reached: {line.location} decides every request first "
                        "(in Squid too)",
                    )
                if action == "allow":
                    self._close_exceptions(result, line, pending, routed)
                    return result
                for denied, _ in pending:
                    self._add(
                        denied, Severity.NOTE, f"translated: no such destination goes {routed}"
                    )
                self._add(line, Severity.NOTE, f"translated: no other destination goes {routed}")
                return result
            if destinations is None:
                continue
            if action == "allow":
                self._unexcepted(pending, line, consequence)
                pending = []
                result.allowed.append((line, destinations))
                self._add(line, Severity.NOTE, f"translated: these destinations go {routed}")
            elif exceptions:
                pending.append((line, destinations))
            else:
                self._add(
                    line,
                    Severity.UNTRANSLATED,
                    f"a deny naming destinations has no route form: {consequence}",
                )
        if last_action == "deny":
            self._add(
                lines[-1],
                Severity.WARNING,
                f"the last {lines[-1].name} line is a deny, so Squid applies allow to every "
                "request no line matches (the opposite of the last line); translated so: every "
                f"other destination goes {routed}",
            )
            self._close_exceptions(result, lines[-1], pending, routed, note=False)
            return result
        self._unexcepted(pending, None, consequence)
        return result

    def _negated_destination(self, terms: list[_Term]) -> NameSet | None:
        """DEST for a line whose only term is `!DEST` (a fully translated destination ACL)."""
        terms = [t for t in terms if not (t.acl.is_all_sources and not t.negated)]
        if len(terms) != 1:
            return None
        term = terms[0]
        if not term.negated or term.acl.kind is not AclKind.DESTINATION:
            return None
        if term.acl.untranslated_values or term.acl.names.empty:
            return None
        return term.acl.names.tidy()

    def _close_exceptions(
        self,
        result: _DestinationList,
        line: Directive,
        pending: list[tuple[Directive, NameSet]],
        routed: str,
        *,
        note: bool = True,
    ) -> None:
        """`line` allows every destination not matched earlier: the pending denies are its
        exceptions."""
        result.every = line
        result.excepted = list(pending)
        for denied, _ in pending:
            if denied is not line:
                self._add(denied, Severity.NOTE, f"translated: an exception to {line.location}")
        if note:
            self._add(
                line,
                Severity.NOTE,
                f"translated: every other destination goes {routed}"
                + (
                    " (except the destinations it leaves out)"
                    if pending and pending[-1][0] is line
                    else ""
                ),
            )

    def _unexcepted(
        self, pending: list[tuple[Directive, NameSet]], line: Directive | None, consequence: str
    ) -> None:
        for denied, _ in pending:
            self._add(
                denied,
                Severity.UNTRANSLATED,
                "a deny naming destinations"
                + (f" before an allow naming others ({line.location})" if line else "")
                + f" has no route form: {consequence}",
            )

    def _upstream_name(self, peer_name: str, taken: set[str]) -> str:
        base = _slug(peer_name, MAX_UPSTREAM_NAME) or "parent"
        if base == DIRECT:
            base = "parent-direct"
        name, number = base, 1
        while name in taken:
            number += 1
            suffix = f"-{number}"
            name = base[: MAX_UPSTREAM_NAME - len(suffix)].rstrip("-") + suffix
        taken.add(name)
        return name

    def _upstreams(self) -> list[_Upstream]:
        """Parents with the same cache_peer_access, credentials and CA bundle become one
        upstream, tried in file order (Squid's first-up parent order)."""
        groups: dict[tuple[object, ...], _Upstream] = {}
        taken: set[str] = set()
        for peer in self.peers:
            said = self._destination_list(
                peer.access,
                skip=1,
                routed=f"via {peer.name}",
                consequence=f"routes do not follow this line for {peer.name}",
                exceptions=True,
            )
            every = said.every is not None or not peer.access  # no lines: no restriction
            access = None if every else tuple(s for _, s in said.allowed)
            excluded = tuple(s for _, s in said.excepted)
            key = (access, excluded, peer.login, peer.ca_bundle)
            upstream = groups.get(key)
            if upstream is None:
                upstream = _Upstream(
                    name=self._upstream_name(peer.name, taken),
                    peers=[],
                    access=access,
                    excluded=excluded,
                )
                groups[key] = upstream
            upstream.peers.append(peer)
            self._add(
                peer.directive,
                Severity.NOTE,
                f"translated: upstream {upstream.name}, proxy {len(upstream.peers)} ({peer.url})",
            )
        return list(groups.values())

    def _upstream_yaml(self, upstream: _Upstream) -> dict[str, Any]:
        first = upstream.peers[0]
        out: dict[str, Any] = {"name": upstream.name, "proxies": [p.url for p in upstream.peers]}
        if first.login is not None:
            path = CREDENTIALS_FILE.format(name=upstream.name)
            out["credentialsFile"] = path
            self._add(
                first.directive,
                Severity.UNTRANSLATED,
                "login=: the password is not copied into the output. Put this line's "
                f"user:password as the first line of {path}, a file mounted from a Secret"
                + (
                    " (Squid reads login= URL-escaped: write it decoded, %20 as a space)"
                    if "%" in first.login
                    else ""
                ),
            )
        if first.ca_bundle is not None:
            out["caBundle"] = first.ca_bundle
        timer = self.peer_timers.get("peer_connect_timeout")
        connect = first.connect_timeout or (timer[1] if timer else None)
        if connect is not None:
            out["connectTimeout"] = connect
        if first.fail_limit is not None:
            out["failLimit"] = first.fail_limit
        dead = self.peer_timers.get("dead_peer_timeout")
        if dead is not None:
            out["retryAfter"] = dead[1]
        for peer in upstream.peers[1:]:
            if (peer.connect_timeout, peer.fail_limit) != (first.connect_timeout, first.fail_limit):
                self._add(
                    peer.directive,
                    Severity.NOTE,
                    f"connect-timeout or connect-fail-limit differ from {first.directive.location}"
                    f": upstream {upstream.name} has one value for all its proxies, the first's",
                )
        return out

    def _routes(self, lines: list[Directive]) -> None:
        """Upstreams and routes from the parents and the routing lists (module docstring, 7)."""
        always, never = self._attach_peer_access(lines)
        if not self.peers:
            settings = [d for d, _ in (*self.route_switches.values(), *self.peer_timers.values())]
            for line in [*always, *never, *settings]:
                if line.name == "never_direct":
                    self._add(
                        line,
                        Severity.UNTRANSLATED,
                        "no parent proxy is translated: Squid cannot forward the requests this "
                        "line keeps from going direct; Outgate connects directly",
                    )
                else:
                    self._add(line, Severity.NOTE, "no parent proxy: Outgate connects directly")
            return
        upstreams = self._upstreams()
        said_always = self._destination_list(
            always, skip=0, routed="direct", consequence="this line sends nothing direct"
        )
        always_sets, always_every = said_always.allowed, said_always.every
        never_sets: list[tuple[Directive, NameSet]] = []
        never_every: Directive | None = None
        if always_every is not None:
            for line in never:
                self._add(
                    line,
                    Severity.NOTE,
                    f"never applies: {always_every.location} sends every request direct first "
                    "(in Squid too)",
                )
        else:
            said_never = self._destination_list(
                never,
                skip=0,
                routed="via a parent, never direct",
                consequence="this line holds nothing to a parent",
            )
            never_sets, never_every = said_never.allowed, said_never.every
        rules: list[dict[str, Any]] = [{"to": s.as_yaml(), "via": DIRECT} for _, s in always_sets]
        default = DIRECT
        if always_every is None:
            default = self._parent_routes(upstreams, never_sets, never_every, rules)
        used = {rule["via"] for rule in rules} | {default}
        for upstream in upstreams:
            if upstream.name not in used:
                self._add(
                    upstream.peers[0].directive,
                    Severity.WARNING,
                    f"upstream {upstream.name} is never used by the routes (an earlier parent "
                    "takes the same destinations, or nothing reaches it); Outgate does not fail "
                    "over from one upstream to another",
                )
        self._route_setting_findings(forced=never_every is not None)
        self.config["upstreams"] = [self._upstream_yaml(u) for u in upstreams]
        routes: dict[str, Any] = {"default": default}
        if rules:
            routes["rules"] = rules
        self.config["routes"] = routes

    def _attach_peer_access(
        self, lines: list[Directive]
    ) -> tuple[list[Directive], list[Directive]]:
        """Give each parent its cache_peer_access lines; the always_direct and never_direct
        lines, in order."""
        by_name = {peer.name: peer for peer in self.peers}
        always: list[Directive] = []
        never: list[Directive] = []
        for line in lines:
            if line.name != "cache_peer_access":
                (always if line.name == "always_direct" else never).append(line)
                continue
            peer_name = line.args[0] if line.args else ""
            if peer_name in by_name:
                by_name[peer_name].access.append(line)
            elif peer_name in self.peer_names:
                self._add(line, Severity.NOTE, "its cache_peer is not translated (see that line)")
            else:
                self._add(
                    line,
                    Severity.UNTRANSLATED,
                    f"no cache_peer named {peer_name!r} (Squid refuses this configuration)",
                )
        return always, never

    def _parent_routes(
        self,
        upstreams: list[_Upstream],
        never_sets: list[tuple[Directive, NameSet]],
        never_every: Directive | None,
        rules: list[dict[str, Any]],
    ) -> str:
        """Append the rules that send destinations via parents (after the always_direct ones)
        and return routes.default. Squid's order: always_direct, then never_direct, then its
        peer selection, where a parent serves what its cache_peer_access allows."""
        # The upstream for every destination: one whose parents take all (`default` first).
        general = next((u for u in upstreams if u.access is None and u.default), None) or next(
            (u for u in upstreams if u.access is None), None
        )
        fallback = general or next((u for u in upstreams if u.default), upstreams[0])
        forced = never_every is not None
        # prefer_direct off (Squid's default): parents first for every request, not only held ones.
        parents_first = forced or not self.route_switches.get("prefer_direct", (None, False))[1]
        restricted = [(u, s) for u in upstreams if u.access is not None for s in u.access]
        if parents_first:
            rules.extend({"to": s.as_yaml(), "via": u.name} for u, s in restricted)
        for _, wanted in never_sets:
            if not parents_first:
                for upstream, allowed in restricted:
                    part, _cross = wanted.intersect(allowed)
                    if not part.empty:
                        rules.append({"to": part.as_yaml(), "via": upstream.name})
            rules.append({"to": wanted.as_yaml(), "via": fallback.name})
        if general is not None and general.excluded:
            if forced:
                self._add(
                    general.peers[0].directive,
                    Severity.WARNING,
                    f"cache_peer_access keeps some destinations from {general.name}: Squid "
                    "refuses them (never direct) unless another parent takes them; Outgate "
                    f"sends them via {general.name}",
                )
            elif parents_first:  # no eligible parent: Squid goes direct
                rules.extend(
                    {"to": s.as_yaml(), "via": DIRECT}
                    for s in general.excluded
                    if not any(s.intersect(allowed)[0] == s for _, allowed in restricted)
                )
        self._route_warnings(
            upstreams=upstreams,
            fallback=fallback,
            general=general,
            held=never_every or (never_sets[0][0] if never_sets else None),
            forced=forced,
            via_parents=parents_first and (general is not None or bool(restricted)),
        )
        if forced:
            return fallback.name
        if parents_first and general is not None:
            return general.name
        return DIRECT

    def _route_warnings(
        self,
        *,
        upstreams: list[_Upstream],
        fallback: _Upstream,
        general: _Upstream | None,
        held: Directive | None,
        forced: bool,
        via_parents: bool,
    ) -> None:
        """Where Squid's choice between parents and direct differs from the routes."""
        if held is not None and general is None:
            self._add(
                held,
                Severity.WARNING,
                "no parent takes every destination (cache_peer_access limits each): Squid "
                "refuses a request that must not go direct when no parent's cache_peer_access "
                f"allows it; Outgate sends it via {fallback.name}, which may refuse it too",
            )
        hierarchy = self.route_switches.get("nonhierarchical_direct")
        connect_direct = hierarchy is None or hierarchy[1]
        if not forced and via_parents:
            self._add(
                upstreams[0].peers[0].directive,
                Severity.WARNING,
                "no `never_direct allow all`: Squid tries the parents first but goes direct when "
                "they fail"
                + (
                    ", and sends CONNECT and other non-hierarchical requests direct "
                    "(nonhierarchical_direct on, its default)"
                    if connect_direct
                    else ""
                )
                + ". Outgate has no fallback: the routes send these requests via the parent, "
                "never direct. Add routes.rules with via: direct for what should go direct",
            )

    def _route_setting_findings(self, *, forced: bool) -> None:
        """prefer_direct, nonhierarchical_direct and the peer timers: what became of each."""
        for name, (directive, on) in self.route_switches.items():
            if name == "prefer_direct" and on and not forced:
                self._add(
                    directive,
                    Severity.WARNING,
                    "Squid tries direct first and a parent when that fails; Outgate has no "
                    "fallback: only what never_direct holds goes via a parent",
                )
            elif name == "prefer_direct":
                self._add(
                    directive,
                    Severity.NOTE,
                    "no effect: never_direct allow all sends nothing direct"
                    if forced
                    else "translated: parents first (Squid's default)",
                )
            else:
                self._add(
                    directive,
                    Severity.NOTE,
                    "translated: CONNECT is routed like every other request, by destination"
                    + ("" if on else " (nonhierarchical_direct off: as in Squid)"),
                )
        for name, (directive, value) in self.peer_timers.items():
            self._add(
                directive,
                Severity.NOTE,
                f"translated: {_PEER_TIMERS[name]}: {value} for every upstream"
                + (
                    " whose first parent sets no connect-timeout="
                    if name == "peer_connect_timeout"
                    else ""
                )
                + (
                    " (Squid's timer counts silence from a peer; Outgate's is how long a proxy "
                    "marked down is skipped before it is tried again)"
                    if name == "dead_peer_timeout"
                    else ""
                ),
            )

    # -- output ---------------------------------------------------------------------------------

    def static_identities(self) -> list[dict[str, Any]]:
        """One identity per distinct network of the src ACLs the emitted rules use, labelled for
        every such ACL containing it (so longest-prefix lookup keeps overlapping ACLs)."""
        used = self.subject_sources
        networks: dict[IPNetwork, None] = {}
        for acl in used.values():
            if not acl.is_all_sources:
                for net in acl.sources:
                    networks[net] = None
        identities: list[dict[str, Any]] = []
        for net in sorted(networks, key=lambda n: (n.version, n)):
            labels = {
                self._label_key(acl): "true"
                for acl in used.values()
                if not acl.is_all_sources
                and any(
                    net.version == other.version and net.subnet_of(other)  # type: ignore[arg-type]
                    for other in acl.sources
                )
            }
            identities.append(
                {
                    "name": _slug(f"squid-{net}", 63),
                    "namespace": self.options.static_namespace,
                    "cidrs": [str(net)],
                    "labels": dict(sorted(labels.items())),
                }
            )
        return identities

    def documents(self) -> list[dict[str, Any]]:
        width = max(3, len(str(max((e.index for e in self.emitted), default=0))))
        docs: list[dict[str, Any]] = []
        for rule in self.emitted:
            acl_names = "-".join(t.acl.name for t in rule.terms if t.acl.name != "all")
            slug = _slug(acl_names, 40)
            action = rule.action.lower()
            name = f"{self.options.prefix}-{rule.index:0{width}d}-{action}"
            name = f"{name}-{slug}" if slug else name
            spec: dict[str, Any] = {
                "tier": "admin",
                "priority": self.options.priority,
            }
            if self.options.mode is not Mode.ENFORCE:
                spec["mode"] = str(self.options.mode)
            if rule.subject:
                spec["subject"] = rule.subject
            spec["rules"] = [
                {
                    "name": (f"{action}-{slug}"[:63].strip("-") if slug else action),
                    "action": rule.action,
                    "to": rule.destinations.as_yaml(),
                    "ports": rule.ports.as_yaml(),
                }
            ]
            docs.append(
                {
                    "apiVersion": API_VERSION,
                    "kind": "ClusterEgressPolicy",
                    "metadata": {
                        "name": name[:253].strip("-"),
                        "annotations": {
                            SOURCE_ANNOTATION: f"{rule.directive.location}: {rule.directive.text}"
                        },
                    },
                    "spec": spec,
                }
            )
        return docs


def _dump(value: object) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False, width=100)


def _commented(text: str, indent: str = "#   ") -> list[str]:
    return [f"{indent}{line}".rstrip() for line in text.splitlines()]


def import_squid(path: str | Path, options: ImportOptions | None = None) -> ImportResult:
    """Translate the squid.conf at `path` (OSError if it cannot be read)."""
    options = options or ImportOptions()
    main = Path(path)
    root = main.resolve().parent
    translator = _Translator(root, options)
    reader = _Reader(root=root, findings=translator.findings)
    directives = reader.read(main)
    translator.translate(directives)
    for name in sorted(options.cluster_sources):
        acl = translator.table.acls.get(name)
        if acl is None or acl.kind is not AclKind.SRC:
            raise ValueError(f"--cluster-src {name}: no src ACL of that name in the configuration")
    docs = translator.documents()
    config = dict(translator.config)
    config["defaultAction"] = "deny"
    identities = translator.static_identities()
    if identities:
        config["identity"] = {"static": identities}
    findings = tuple(
        sorted(
            translator.findings,
            key=lambda f: (
                f.location is None,
                reader.files.index(f.location.file)
                if f.location and f.location.file in reader.files
                else -1,
                f.location.line if f.location else 0,
            ),
        )
    )
    header = [
        f"# Outgate policies translated from {', '.join(reader.files)} by `outgate import-squid`.",
        "# Each policy is one http_access line, in order (admin tier, one priority, ordered by "
        "name);",
        f"# the {SOURCE_ANNOTATION} annotation names the line. Check with: outgate check-config "
        "FILE",
        "# Tunnels must carry TLS or plain HTTP (Outgate's default); Squid tunnels any bytes.",
        f"# Findings: {sum(f.severity is Severity.UNTRANSLATED for f in findings)} untranslated, "
        f"{sum(f.severity is Severity.WARNING for f in findings)} warnings, "
        f"{sum(f.severity is Severity.NOTE for f in findings)} notes:",
    ]
    header.extend(_commented("\n".join(f.render() for f in findings)))
    header.append("# Runtime config to go with these policies (outgate.yaml):")
    header.extend(_commented(_dump(config)))
    body = "---\n".join(_dump(doc) for doc in docs)
    text = "\n".join(header) + "\n" + (body if body else "")
    try:
        policies = load_text(text, file="<import-squid output>")
    except ConfigError as exc:  # pragma: no cover - a translation bug, never the input's fault
        raise RuntimeError(f"import-squid produced policies the loader refuses:\n{exc}") from exc
    return ImportResult(
        policies_yaml=text,
        config=config,
        findings=findings,
        files=tuple(reader.files),
        policy_count=len(policies),
    )
