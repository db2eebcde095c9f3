"""Error types and reason codes: every refusal the proxy can give, with the status it answers.

A reason is a `StrEnum` so it is safe as a metric label and as an audit value. Each error type
carries its HTTP status; `proxy.dataplane.responses.render_error` is the one place that turns an
error into bytes on the wire. This module imports nothing of the proxy, so the pure core may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar


class Reason(StrEnum):
    """Why a request was allowed, refused or closed. Values are stable: SIEM rules key on them."""

    # Policy outcomes (proxy.core.policy.engine sets these).
    RULE_ALLOW = "rule_allow"
    RULE_DENY = "rule_deny"
    NAMESPACE_ISOLATION = "namespace_isolation"
    DEFAULT_ALLOW = "default_allow"
    DEFAULT_DENY = "default_deny"
    # A stored ClusterEgressPolicy/EgressPolicy is invalid: its stand-in denies (fail closed).
    POLICY_INVALID = "policy_invalid"
    # Address guard and resolution.
    GUARDED_ADDRESS = "guarded_address"
    DNS_NXDOMAIN = "dns_nxdomain"
    DNS_SERVFAIL = "dns_servfail"
    DNS_NO_ANSWER = "dns_no_answer"
    DNS_TIMEOUT = "dns_timeout"
    # Upstream.
    UPSTREAM_REFUSED = "upstream_refused"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_RESET = "upstream_reset"
    UPSTREAM_BAD_RESPONSE = "upstream_bad_response"
    # Parent proxies (issue 12).
    UPSTREAM_PROXY_REFUSED = "upstream_proxy_refused"  # the parent answered CONNECT with non-2xx
    UPSTREAM_PROXY_UNAVAILABLE = "upstream_proxy_unavailable"  # no proxy of the upstream answered
    UPSTREAM_PROXY_TIMEOUT = "upstream_proxy_timeout"  # connect or the parent's answer timed out
    # Client input (RFC 9112 strictness).
    MALFORMED_REQUEST = "malformed_request"
    AMBIGUOUS_FRAMING = "ambiguous_framing"
    BAD_TARGET = "bad_target"
    BAD_PORT = "bad_port"
    UNSUPPORTED_SCHEME = "unsupported_scheme"
    URI_TOO_LONG = "uri_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"
    HEADER_TIMEOUT = "header_timeout"
    BODY_TIMEOUT = "body_timeout"
    BAD_CHUNK = "bad_chunk"
    UNSUPPORTED_VERSION = "unsupported_version"
    # Identity (Kubernetes informer).
    AMBIGUOUS_SOURCE = "ambiguous_source"  # two live pods claim the source IP
    SOURCE_GONE = "source_gone"  # the source pod left the index; its IP may be handed on
    # Listener (issue 14): the PROXY protocol header of a load balancer, and proxy auth.
    PROXY_PROTOCOL_INVALID = "proxy_protocol_invalid"  # malformed or cut short
    PROXY_PROTOCOL_MISSING = "proxy_protocol_missing"  # a trusted peer sent none
    PROXY_PROTOCOL_TIMEOUT = "proxy_protocol_timeout"  # not complete within timeouts.header
    AUTH_REQUIRED = "auth_required"  # a source that must authenticate sent no credentials
    AUTH_FAILED = "auth_failed"  # wrong credentials, or a user with no identity
    # Tunnel content (TLS issue): SNI and protocol checks.
    SNI_MISSING = "sni_missing"
    SNI_MISMATCH = "sni_mismatch"
    SNI_IP_LITERAL = "sni_ip_literal"
    SNI_DENIED = "sni_denied"
    ECH_DENIED = "ech_denied"
    CLIENTHELLO_MALFORMED = "clienthello_malformed"
    CLIENTHELLO_TIMEOUT = "clienthello_timeout"
    PROTOCOL_MISMATCH = "protocol_mismatch"
    # Interception (TLS issue).
    UPSTREAM_CERT_INVALID = "upstream_cert_invalid"
    INTERCEPT_HANDSHAKE_FAILED = "intercept_handshake_failed"
    MISDIRECTED_REQUEST = "misdirected_request"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PATH_NOT_ALLOWED = "path_not_allowed"
    DLP_VIOLATION = "dlp_violation"
    # Proxy state.
    NOT_READY = "not_ready"
    CONNECTION_LIMIT = "connection_limit"
    OVERLOADED = "overloaded"  # behind: limits.shedAcceptQueue or limits.shedLoopLag (limits.py)
    INTERNAL_ERROR = "internal_error"
    # Close records (how a connection or request ended).
    COMPLETED = "completed"
    CLIENT_CLOSED = "client_closed"
    UPSTREAM_CLOSED = "upstream_closed"
    IDLE_TIMEOUT = "idle_timeout"
    DRAINED = "drained"


class OutgateError(Exception):
    """Base of every error the proxy answers a client with. Subclasses fix `status`."""

    status: ClassVar[int] = 500
    default_reason: ClassVar[Reason] = Reason.INTERNAL_ERROR

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason if reason is not None else self.default_reason


class BadRequest(OutgateError):
    status = 400
    default_reason = Reason.MALFORMED_REQUEST


class PolicyDenied(OutgateError):
    status = 403
    default_reason = Reason.RULE_DENY


class ProxyAuthRequired(OutgateError):
    """Proxy authentication is required and missing or wrong (RFC 9110 section 15.5.8); the
    reply carries `Proxy-Authenticate` with `challenge`."""

    status = 407
    default_reason = Reason.AUTH_REQUIRED

    def __init__(self, message: str, *, challenge: str, reason: Reason | None = None) -> None:
        super().__init__(message, reason=reason)
        self.challenge = challenge


class HeaderTimeout(OutgateError):
    status = 408
    default_reason = Reason.HEADER_TIMEOUT


class UriTooLong(OutgateError):
    status = 414
    default_reason = Reason.URI_TOO_LONG


class MisdirectedRequest(OutgateError):
    """An intercepted request for a host other than the tunnel's (RFC 9110 section 15.5.20)."""

    status = 421
    default_reason = Reason.MISDIRECTED_REQUEST


class AdmissionRefused(OutgateError):
    """A new connection refused before anything is read from it (proxy.dataplane.limits):
    over a limit (TooManyRequests) or while the event loop is behind (Overloaded). Every
    listener answers either with the refusal and both audit records."""


class TooManyRequests(AdmissionRefused):
    status = 429
    default_reason = Reason.CONNECTION_LIMIT


class HeadersTooLarge(OutgateError):
    status = 431
    default_reason = Reason.HEADERS_TOO_LARGE


class BadGateway(OutgateError):
    """DNS failure, upstream refused or reset, or an upstream response we refuse to relay."""

    status = 502
    default_reason = Reason.UPSTREAM_REFUSED


class UpstreamProxyRefused(BadGateway):
    """A parent proxy refused a CONNECT (403, 407, 502...). The client sees 502, never the
    parent's own status: a 407 would invite it to send its credentials toward the parent."""

    default_reason = Reason.UPSTREAM_PROXY_REFUSED

    def __init__(self, message: str, *, proxy: str, parent_status: int) -> None:
        super().__init__(message)
        self.proxy = proxy  # host:port of the parent proxy (never credentials)
        self.parent_status = parent_status


class ServiceUnavailable(OutgateError):
    status = 503
    default_reason = Reason.NOT_READY


class Overloaded(AdmissionRefused):
    """A new connection refused at once because the process is behind (limits.shedAcceptQueue,
    limits.shedLoopLag): cheaper than serving it late, and every connection already open keeps
    its pace."""

    status = 503
    default_reason = Reason.OVERLOADED


class GatewayTimeout(OutgateError):
    status = 504
    default_reason = Reason.UPSTREAM_TIMEOUT


class VersionNotSupported(OutgateError):
    status = 505
    default_reason = Reason.UNSUPPORTED_VERSION


class TunnelViolation(OutgateError):
    """What flows inside an accepted tunnel breaks its rule (SNI, protocol). The 200 is already
    sent, so this is never rendered: the tunnel is closed and audited with the reason."""

    status = 403
    default_reason = Reason.PROTOCOL_MISMATCH


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigIssue:
    """One problem in a config or policy file, precise enough to fix without reading code."""

    file: str
    document: int | None  # 1-based index of the YAML document in a multi-document file
    path: str  # field path, e.g. "spec.rules[2].to[0].fqdn"
    message: str
    fix: str

    def render(self) -> str:
        where = self.file
        if self.document is not None:
            where += f" (document {self.document})"
        field = f" {self.path}:" if self.path else ""
        return f"{where}:{field} {self.message} -- fix: {self.fix}"


class ConfigError(Exception):
    """Raised by config and policy loading; carries every issue found, not just the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(issue.render() for issue in self.issues))
