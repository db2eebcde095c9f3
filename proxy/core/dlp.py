"""Header and URL detectors for intercepted requests: does this request carry a secret out?

Pure: `scan_request` gets a parsed request's fields and the destination, and returns the first
`DlpHit` (detector name and where it fired) or None. A hit never carries the secret itself,
only the detector and the field, so the audit record and the metric cannot leak it.

What is looked at, and in which forms (a secret is found however it is wrapped once):
  - every header name and value, as sent;
  - the URL path and the query string, as sent and percent-decoded (`+` as space in the query);
  - inside any of those, runs of base64 long enough to hide a key, decoded once.

Detectors (the names a rule lists in `inspect.dlp`):
  aws-access-key          AWS access key IDs (AKIA..., ASIA..., 20 characters of base32)
  private-key             PEM/OpenSSH/PGP private key blocks (the BEGIN line is enough)
  gcp-service-account-key Google service account key files (JSON with a private_key_id)
  github-token            GitHub personal, OAuth, app and fine-grained tokens
  slack-token             Slack bot, user, app and config tokens
  bearer-to-other-host    a credential sent to a host other than the one it was issued for:
                          a JWT whose `aud` names other hosts, or a Bearer/Basic credential
                          matching a `dlp.credentialHosts` entry whose hosts exclude this one
Custom detectors (`dlp.custom` in the config) apply to every inspected request: regular
expressions on header names, header values and the query string.

Patterns an operator writes (`dlp.custom`, `dlp.credentialHosts[].token`) run on RE2, whose
matching time is linear in the input: a pattern such as `(a+)+$`, which backtracks for longer
than the universe's age on Python's `re`, cannot stall the event loop and with it every
connection of the replica. A pattern RE2 cannot run (lookaround, backreferences) is refused when
the config loads, with the reason. The built-in detectors above stay on `re`: they are fixed,
bounded patterns, tested here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import unquote, unquote_plus, urlsplit

import re2

from proxy.core.hosts import normalize_name
from proxy.errors import BadRequest

# --- Limits ---------------------------------------------------------------------------------------

# Base64 runs shorter than this cannot hold anything the detectors look for (an AWS key ID is
# 20 characters, 28 in base64; a PEM BEGIN line is 30+); shorter runs are ordinary tokens.
MIN_BASE64_RUN: Final = 28
# At most this many base64 runs are decoded per field, each at most this long: a head is at most
# limits.maxHeaderBytes, but a field of many short runs must not multiply the work.
MAX_BASE64_RUNS_PER_FIELD: Final = 16
MAX_BASE64_RUN: Final = 16384
# A JWT payload larger than this is not decoded (real ones are under 2 KiB).
MAX_JWT_PAYLOAD: Final = 8192

AWS_ACCESS_KEY = "aws-access-key"
PRIVATE_KEY = "private-key"
GCP_SERVICE_ACCOUNT_KEY = "gcp-service-account-key"
GITHUB_TOKEN = "github-token"  # noqa: S105 - a detector name
SLACK_TOKEN = "slack-token"  # noqa: S105 - a detector name
BEARER_TO_OTHER_HOST = "bearer-to-other-host"

# gitleaks' aws-access-token rule: the documented prefixes, then 16 characters of base32.
_AWS = re.compile(r"(?<![A-Z0-9])(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}(?![A-Z0-9])")
# RFC 7468 labels (RSA, EC, DSA, ENCRYPTED, OPENSSH, PGP ... PRIVATE KEY [BLOCK]); separators
# may have become `+` or `_` on the way into a URL or a header.
_PRIVATE_KEY = re.compile(r"-----BEGIN[ A-Z0-9_+-]{0,40}PRIVATE[ _+]KEY(?:[ _+]BLOCK)?-----")
# Service account key files: `"type": "service_account"` with a 40-hex-digit private_key_id.
_GCP_KEY = re.compile(r'"private_key_id"\s*:\s*"[0-9a-f]{40}"')
# GitHub token formats (github.blog 2021-04-05 "Behind GitHub's new authentication token formats").
_GITHUB = re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_\w{82})")
# Slack tokens: xoxb (bot), xoxp (user), xoxa/xoxr (refresh), xoxs, xoxe (config), xapp (app-level).
_SLACK = re.compile(r"(?<![A-Za-z0-9])(?:xox[abeoprs]-[0-9A-Za-z-]{10,}|xapp-\d-[A-Za-z0-9-]{10,})")
_BASE64_RUN = re.compile(rf"[A-Za-z0-9+/_-]{{{MIN_BASE64_RUN},}}={{0,2}}")
# header.payload.signature, each base64url; header and payload are JSON objects ('{"' -> eyJ).
_JWT = re.compile(
    r"(?<![A-Za-z0-9_-])(e[wy][A-Za-z0-9_-]{2,})\.(e[wy][A-Za-z0-9_-]{2,})\.[A-Za-z0-9_-]*"
)

_TEXT_DETECTORS: Final = (
    (AWS_ACCESS_KEY, _AWS),
    (PRIVATE_KEY, _PRIVATE_KEY),
    (GCP_SERVICE_ACCOUNT_KEY, _GCP_KEY),
    (GITHUB_TOKEN, _GITHUB),
    (SLACK_TOKEN, _SLACK),
)
BUILTIN_DETECTORS: Final = frozenset({name for name, _ in _TEXT_DETECTORS} | {BEARER_TO_OTHER_HOST})


class Pattern(Protocol):
    """A compiled search pattern: Python's `re` for the built-in detectors, RE2 for an
    operator's."""

    def search(self, text: str) -> object | None: ...


# RE2's compile errors go to the caller as exceptions, not to stderr (the operational log is
# JSON lines); 8 MiB bounds the memory one compiled pattern may take.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
_RE2_OPTIONS.max_mem = 8 << 20


def compile_operator_pattern(pattern: str) -> Pattern:
    """An operator's regular expression on the linear-time engine; ValueError says why RE2
    cannot run it and how to rewrite it."""
    try:
        compiled: Pattern = re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args else str(exc)
        raise ValueError(
            f"RE2, the linear-time engine operator patterns run on, cannot run it ({reason}); "
            "rewrite it without lookaround ((?=, (?!, (?<=, (?<!) and backreferences (\\1)"
        ) from None
    return compiled


@dataclass(frozen=True, slots=True, kw_only=True)
class DlpHit:
    """Which detector fired and where: `header:<name>`, `header-name[<index>]` (a name may itself
    be the secret, so it is never repeated), `url.path` or `url.query`."""

    detector: str
    field: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomDetector:
    """`dlp.custom` entry: at least one pattern; each is searched (not anchored)."""

    name: str
    header_name: Pattern | None = None
    header_value: Pattern | None = None
    query: Pattern | None = None

    def __post_init__(self) -> None:
        if self.header_name is None and self.header_value is None and self.query is None:
            raise ValueError(f"custom detector {self.name!r} has no pattern")


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialHosts:
    """`dlp.credentialHosts` entry: credentials matching `token` (a Bearer token, either half of
    Basic credentials, or a JWT) or JWTs whose `aud` matches one of `audiences` may be sent
    only to `hosts` (exact names or `*.suffix`, normalised like policy names)."""

    name: str
    hosts: tuple[str, ...]
    token: Pattern | None = None
    audiences: tuple[str, ...] = ()  # exact, or `*` as the leading label ("*.svc.id.goog")

    def __post_init__(self) -> None:
        if self.token is None and not self.audiences:
            raise ValueError(f"credentialHosts entry {self.name!r} needs token or audiences")
        if not self.hosts:
            raise ValueError(f"credentialHosts entry {self.name!r} lists no hosts")


# Where well-known credentials belong. An operator entry with the same name replaces one of these
# (GitHub Enterprise tokens have github.com's prefixes but live on another host).
DEFAULT_CREDENTIAL_HOSTS: Final = (
    CredentialHosts(
        name="github",
        token=re.compile(r"^(?:gh[pousr]_|github_pat_)"),
        hosts=("github.com", "*.github.com", "*.githubusercontent.com"),
    ),
    CredentialHosts(name="gitlab", token=re.compile(r"^glpat-"), hosts=("gitlab.com",)),
    CredentialHosts(
        name="slack",
        token=re.compile(r"^(?:xox[abeoprs]-|xapp-)"),
        hosts=("slack.com", "*.slack.com"),
    ),
    CredentialHosts(
        name="stripe", token=re.compile(r"^(?:sk|rk)_(?:live|test)_"), hosts=("*.stripe.com",)
    ),
    # Kubernetes projected tokens for cloud federation: the audience is not the host they go to.
    CredentialHosts(
        name="aws-irsa",
        audiences=("sts.amazonaws.com",),
        hosts=("sts.amazonaws.com", "*.amazonaws.com"),
    ),
    CredentialHosts(
        name="gke-workload-identity", audiences=("*.svc.id.goog",), hosts=("sts.googleapis.com",)
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DlpConfig:
    custom: tuple[CustomDetector, ...] = ()
    credential_hosts: tuple[CredentialHosts, ...] = DEFAULT_CREDENTIAL_HOSTS


def merge_credential_hosts(extra: tuple[CredentialHosts, ...]) -> tuple[CredentialHosts, ...]:
    """The defaults with the operator's entries added; an entry named like a default replaces it."""
    names = {entry.name for entry in extra}
    return tuple(e for e in DEFAULT_CREDENTIAL_HOSTS if e.name not in names) + extra


# --- Scanning -------------------------------------------------------------------------------------


def scan_request(
    *,
    headers: tuple[tuple[str, str], ...],
    target: str,
    destination: str,
    detectors: tuple[str, ...],
    config: DlpConfig,
) -> DlpHit | None:
    """The first hit for an intercepted request to `destination` (a normalised host), or None.

    `target` is the origin-form path and query as sent; `detectors` are the rule's `inspect.dlp`.
    Custom detectors in `config` apply whatever the rule lists.
    """
    path, _, query = target.partition("?")
    fields = _fields(headers, path, query)
    text = [name for name, _ in _TEXT_DETECTORS if name in detectors]
    if text:
        for field, forms in fields:
            for form in forms:
                for name, pattern in _TEXT_DETECTORS:
                    if name in text and pattern.search(form):
                        return DlpHit(detector=name, field=field)
    if BEARER_TO_OTHER_HOST in detectors:
        field_hit = _misdirected_credential(headers, fields, destination, config.credential_hosts)
        if field_hit is not None:
            return DlpHit(detector=BEARER_TO_OTHER_HOST, field=field_hit)
    return _scan_custom(headers, query, config.custom)


def _fields(
    headers: tuple[tuple[str, str], ...], path: str, query: str
) -> list[tuple[str, list[str]]]:
    """(field label, every form of its text worth scanning)."""
    out: list[tuple[str, list[str]]] = []
    for index, (name, value) in enumerate(headers):
        out.append((f"header-name[{index}]", _forms(name)))
        out.append((f"header:{name.lower()}", _forms(value)))
    out.append(("url.path", _forms(path)))
    if query:
        out.append(("url.query", _forms(query, plus_is_space=True)))
    return out


def _forms(text: str, *, plus_is_space: bool = False) -> list[str]:
    """The text, its percent-decoding (form-encoding in a query), and base64 runs in either."""
    forms = [text]
    if "%" in text or (plus_is_space and "+" in text):
        decoded = unquote_plus(text) if plus_is_space else unquote(text)
        if decoded != text:
            forms.append(decoded)
    for form in list(forms):
        forms.extend(_base64_decoded(form))
    return forms


def _base64_decoded(text: str) -> Iterator[str]:
    for count, match in enumerate(_BASE64_RUN.finditer(text)):
        if count >= MAX_BASE64_RUNS_PER_FIELD:
            return
        run = match.group(0)[:MAX_BASE64_RUN]
        decoded = _b64decode(run)
        if decoded is not None:
            yield decoded.decode("latin-1")


def _b64decode(run: str) -> bytes | None:
    data = run.rstrip("=").replace("-", "+").replace("_", "/")
    data = data[: len(data) - len(data) % 4] if len(data) % 4 == 1 else data
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _scan_custom(
    headers: tuple[tuple[str, str], ...], query: str, custom: tuple[CustomDetector, ...]
) -> DlpHit | None:
    decoded_query = unquote_plus(query) if query else ""
    for detector in custom:
        for index, (name, value) in enumerate(headers):
            if detector.header_name is not None and detector.header_name.search(name):
                return DlpHit(detector=detector.name, field=f"header-name[{index}]")
            if detector.header_value is not None and detector.header_value.search(value):
                return DlpHit(detector=detector.name, field=f"header:{name.lower()}")
        if (
            detector.query is not None
            and query
            and (detector.query.search(query) or detector.query.search(decoded_query))
        ):
            return DlpHit(detector=detector.name, field="url.query")
    return None


# --- Credentials for another host -----------------------------------------------------------------


def _misdirected_credential(
    headers: tuple[tuple[str, str], ...],
    fields: list[tuple[str, list[str]]],
    destination: str,
    entries: tuple[CredentialHosts, ...],
) -> str | None:
    """The field of the first credential that may not go to `destination`, or None."""
    for name, value in headers:
        if name.lower() != "authorization":
            continue
        for secret in _authorization_secrets(value):
            if _token_entry_refuses(secret, destination, entries):
                return f"header:{name.lower()}"
    for field, forms in fields:
        for form in forms:
            for match in _JWT.finditer(form):
                if _jwt_refused(match, destination, entries):
                    return field
    return None


def _authorization_secrets(value: str) -> list[str]:
    scheme, _, credentials = value.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() == "bearer" and credentials:
        return [credentials]
    if scheme.lower() == "basic" and credentials:
        decoded = _b64decode(credentials)
        if decoded is None:
            return []
        user, _, password = decoded.decode("latin-1").partition(":")
        return [part for part in (user, password) if part]
    return []


def _token_entry_refuses(
    secret: str, destination: str, entries: tuple[CredentialHosts, ...]
) -> bool:
    for entry in entries:
        if entry.token is not None and entry.token.search(secret):
            return not host_in(destination, entry.hosts)
    return False


def _jwt_refused(
    match: re.Match[str], destination: str, entries: tuple[CredentialHosts, ...]
) -> bool:
    claims = _jwt_claims(match.group(2))
    if claims is None:
        return False
    raw_aud = claims.get("aud")
    listed = raw_aud if isinstance(raw_aud, list) else [raw_aud]
    audiences = [aud for aud in listed if isinstance(aud, str)]
    allowed: list[str] = []
    judged = False
    for entry in entries:
        if any(_glob_match(aud, pattern) for aud in audiences for pattern in entry.audiences):
            allowed.extend(entry.hosts)
            judged = True
    if not judged:
        for aud in audiences:
            host = _audience_host(aud)
            if host is not None:
                allowed.append(host)
                judged = True
    if not judged:
        # No audience we can place: judge the token by its shape, as a Bearer token is.
        return _token_entry_refuses(match.group(0), destination, entries)
    return not host_in(destination, tuple(allowed))


def _jwt_claims(segment: str) -> dict[str, object] | None:
    if len(segment) > MAX_JWT_PAYLOAD:
        return None
    raw = _b64decode(segment)
    if raw is None:
        return None
    try:
        claims = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def _audience_host(aud: str) -> str | None:
    """`https://api.example.com/x` or `api.example.com` -> the host; None for an audience that
    does not name a host (`my-api`, `urn:...`)."""
    text = aud.strip()
    if "://" in text:
        text = urlsplit(text).hostname or ""
    elif "/" in text or ":" in text:
        return None
    if "." not in text:
        return None
    try:
        return normalize_name(text)
    except BadRequest:
        return None


def _glob_match(value: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return value.lower().endswith(pattern[1:].lower())
    return value.lower() == pattern.lower()


def host_in(destination: str, hosts: tuple[str, ...]) -> bool:
    """`destination` (normalised) is one of `hosts`: exact names, or `*.suffix` for any name
    under suffix at any depth and never suffix itself (the policy's wildcard rule)."""
    for pattern in hosts:
        if pattern.startswith("*."):
            if destination.endswith(pattern[1:]):
                return True
        elif destination == pattern:
            return True
    return False


def normalize_host_pattern(pattern: str) -> str:
    """A `hosts` entry in the form `host_in` compares: raises ValueError when it is not a name."""
    wildcard = pattern.startswith("*.")
    body = pattern[2:] if wildcard else pattern
    if "*" in body:
        raise ValueError(f"{pattern!r}: * is allowed only as the whole first label")
    try:
        name = normalize_name(body)
    except BadRequest as exc:
        raise ValueError(f"{pattern!r} is not a host name: {exc.message}") from None
    return f"*.{name}" if wildcard else name


# --- Config ---------------------------------------------------------------------------------------

_CUSTOM_KEYS = ("name", "headerName", "headerValue", "query")
_CREDENTIAL_KEYS = ("name", "hosts", "token", "audiences")
_DETECTOR_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def parse_custom_detectors(raw: object) -> tuple[CustomDetector, ...]:
    """`dlp.custom`: [{name, headerName?, headerValue?, query?}]; ValueError says what is wrong."""
    detectors: list[CustomDetector] = []
    for index, entry in enumerate(_entries(raw, _CUSTOM_KEYS)):
        name = _entry_name(entry, index)
        if name in BUILTIN_DETECTORS:
            raise ValueError(f"[{index}] name {name!r} is a built-in detector; choose another")
        if name in {detector.name for detector in detectors}:
            raise ValueError(f"[{index}] name {name!r} is used twice")
        detectors.append(
            CustomDetector(
                name=name,
                header_name=_pattern(entry, "headerName", index),
                header_value=_pattern(entry, "headerValue", index),
                query=_pattern(entry, "query", index),
            )
        )
    return tuple(detectors)


def parse_credential_hosts(raw: object) -> tuple[CredentialHosts, ...]:
    """`dlp.credentialHosts`: [{name, hosts, token?, audiences?}], added to (or, by name,
    replacing) DEFAULT_CREDENTIAL_HOSTS."""
    entries: list[CredentialHosts] = []
    for index, entry in enumerate(_entries(raw, _CREDENTIAL_KEYS)):
        name = _entry_name(entry, index)
        hosts = _string_list(entry.get("hosts"), f"[{index}].hosts")
        audiences = _string_list(entry.get("audiences", []), f"[{index}].audiences")
        try:
            entries.append(
                CredentialHosts(
                    name=name,
                    hosts=tuple(normalize_host_pattern(host) for host in hosts),
                    token=_pattern(entry, "token", index),
                    audiences=tuple(audiences),
                )
            )
        except ValueError as exc:
            raise ValueError(f"[{index}] {exc}") from None
    return tuple(entries)


def _entries(raw: object, keys: tuple[str, ...]) -> list[dict[str, object]]:
    if not isinstance(raw, list):
        raise ValueError("expected a list of mappings")
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ValueError(f"[{index}] is not a mapping")
        unknown = sorted(str(key) for key in entry if key not in keys)
        if unknown:
            raise ValueError(f"[{index}] unknown keys {unknown}; known: {', '.join(keys)}")
    return raw


def _entry_name(entry: dict[str, object], index: int) -> str:
    name = entry.get("name")
    if not isinstance(name, str) or not _DETECTOR_NAME.match(name):
        raise ValueError(f"[{index}].name must be a DNS-1123 label (it is a metric label)")
    return name


def _pattern(entry: dict[str, object], key: str, index: int) -> Pattern | None:
    raw = entry.get(key)
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"[{index}].{key} must be a regular expression string")
    try:
        return compile_operator_pattern(raw)
    except ValueError as exc:
        raise ValueError(f"[{index}].{key}: {exc}") from None


def _string_list(raw: object, where: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ValueError(f"{where} must be a list of strings")
    return list(raw)
