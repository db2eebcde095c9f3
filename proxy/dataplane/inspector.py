"""A rule's `inspect` checks on one HTTP request, wherever the proxy sees it: forwarded in
absolute form, inside a `protocol: http` tunnel, or inside an intercepted TLS tunnel.

In order: the rule's `methods` and `paths` (proxy.core.inspection.check_inspect), then its DLP
detectors on the headers and the target (proxy.core.dlp). A refusal is a 403 (PolicyDenied)
whose reason names the check; a DLP hit names the detector and the field on the exchange, and
the audit record keeps the URL without the part that carried the secret.

Every way a request reaches an origin applies the same checks, so an upgrade (a WebSocket
handshake) a rule's paths leave out is refused on plain forwarding as in a tunnel.
"""

from __future__ import annotations

from proxy import metrics
from proxy.audit import Exchange
from proxy.config import Settings
from proxy.core.dlp import DlpConfig, merge_credential_hosts, scan_request
from proxy.core.hosts import Host
from proxy.core.http1 import RequestHead
from proxy.core.inspection import check_inspect
from proxy.core.policy.model import Inspect
from proxy.errors import PolicyDenied, Reason

# What the audit record shows instead of a URL part in which a DLP detector fired.
REDACTED = "[redacted:dlp]"


class RequestInspector:
    """Holds the DLP configuration; `check` raises PolicyDenied for a request `inspect` refuses."""

    def __init__(self, *, settings: Settings) -> None:
        self._dlp = DlpConfig(
            custom=settings.dlp_custom,
            credential_hosts=merge_credential_hosts(settings.dlp_credential_hosts),
        )

    def check(self, req: RequestHead, inspect: Inspect, ex: Exchange, destination: Host) -> None:
        check_inspect(req, inspect)
        hit = scan_request(
            headers=req.headers,
            target=req.path,
            destination=destination.name,
            detectors=inspect.dlp,
            config=self._dlp,
        )
        if hit is not None:
            ex.dlp_detector, ex.dlp_field = hit.detector, hit.field
            # The audit record names the detector and the field, never the secret: a URL that
            # carried one is recorded without the part that did.
            if hit.field == "url.query":
                ex.path = req.path.partition("?")[0] + "?" + REDACTED
            elif hit.field == "url.path":
                ex.path = REDACTED
            metrics.DLP_HITS.labels(detector=hit.detector).inc()
            raise PolicyDenied(
                f"request carries what DLP detector {hit.detector} looks for ({hit.field})",
                reason=Reason.DLP_VIOLATION,
            )
