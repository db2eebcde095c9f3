"""Proxy authentication for sources that are not pods, as Squid's `proxy_auth` (DESIGN section 6:
407 with `Proxy-Authenticate`, configured non-pod sources only).

Per request, before it is decided (the listener's step after parsing the head):

  1. Does this source authenticate? Only when its address is in `auth.basic.sources` and it is
     not a pod the informer knows: pods keep their informer identity, whatever the CIDRs say.
  2. No Basic credentials in `Proxy-Authorization`: 407 `auth_required`, with the challenge. The
     JVM and .NET send credentials only after one; curl sends them at once.
  3. Credentials that do not check against the password file (proxy.control.password_file:
     bcrypt, constant time, a short memory of successes), or a user `auth.basic.users` does not
     map to an identity: 407 `auth_failed`, with the challenge again.
  4. Otherwise the user's static identity is the request's workload, so the same selectors
     apply, and the user's name goes into the records (`user.name`).

Credentials never leave here: the field is not forwarded (proxy.core.http1 drops it as a
hop-by-hop credential), never written to a record, a log line or a reply.
"""

from __future__ import annotations

from collections.abc import Mapping

from proxy.audit import Exchange
from proxy.config import BasicAuth
from proxy.control.password_file import PasswordFile
from proxy.core.basic_auth import parse_basic_credentials
from proxy.core.hosts import IPAddress
from proxy.core.http1 import RequestHead
from proxy.core.identity import CidrTable, Workload, WorkloadKind
from proxy.errors import ProxyAuthRequired, Reason

_AUTHENTICATING_KINDS = frozenset({WorkloadKind.STATIC, WorkloadKind.UNKNOWN})


class ProxyAuth:
    """Steps 1-4 of the module docstring for one `auth.basic` configuration."""

    def __init__(self, config: BasicAuth, passwords: PasswordFile) -> None:
        self._sources: CidrTable[bool] = CidrTable()
        for network in config.sources:
            self._sources.setdefault(network, True)
        self._passwords = passwords
        self._users: Mapping[str, Workload] = {
            user: identity.workload() for user, identity in config.users.items()
        }
        self._challenge = f'Basic realm="{config.realm}", charset="UTF-8"'

    def applies(self, source: IPAddress, workload: Workload) -> bool:
        # Pods (and addresses two pods claim, refused later as ambiguous_source) never do.
        return workload.kind in _AUTHENTICATING_KINDS and next(
            self._sources.containing(source), False
        )

    async def admit(self, ex: Exchange, source: IPAddress, req: RequestHead) -> None:
        """Authenticate `req` when its source must (set `ex.workload` and `ex.user_name`);
        raise ProxyAuthRequired when it fails."""
        if not self.applies(source, ex.workload):
            return
        credentials = parse_basic_credentials(req.header("proxy-authorization"))
        if credentials is None:
            raise ProxyAuthRequired(
                "this source must authenticate to the proxy (Basic)",
                challenge=self._challenge,
                reason=Reason.AUTH_REQUIRED,
            )
        user, password = credentials
        workload = self._users.get(user)
        if not await self._passwords.check(user, password) or workload is None:
            raise ProxyAuthRequired(
                "proxy credentials were not accepted",
                challenge=self._challenge,
                reason=Reason.AUTH_FAILED,
            )
        ex.workload = workload
        ex.user_name = user
