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
from proxy.core.identity import CidrTable, IdentityLookup, Workload, WorkloadKind
from proxy.errors import BadRequest, ProxyAuthRequired, Reason

# Pods (and addresses two pods claim, refused later as ambiguous_source) never log in.
_AUTHENTICATING_KINDS = frozenset({WorkloadKind.STATIC, WorkloadKind.UNKNOWN})


class LoginScope:
    """Who must log in (step 1) and which identity each user has: `auth.basic` without the
    password file, shared by the data plane (ProxyAuth) and explain (LoggedInIdentity)."""

    def __init__(self, config: BasicAuth) -> None:
        self._sources: CidrTable[bool] = CidrTable()
        for network in config.sources:
            self._sources.setdefault(network, True)
        self._users: Mapping[str, Workload] = {
            user: identity.workload() for user, identity in config.users.items()
        }
        self.challenge = f'Basic realm="{config.realm}", charset="UTF-8"'

    def applies(self, source: IPAddress, workload: Workload) -> bool:
        return workload.kind in _AUTHENTICATING_KINDS and next(
            self._sources.containing(source), False
        )

    def workload_of(self, user: str) -> Workload | None:
        return self._users.get(user)


class ProxyAuth:
    """Steps 1-4 of the module docstring for one `auth.basic` configuration."""

    def __init__(self, config: BasicAuth, passwords: PasswordFile) -> None:
        self.scope = LoginScope(config)
        self._passwords = passwords

    async def admit(self, ex: Exchange, source: IPAddress, req: RequestHead) -> None:
        """Authenticate `req` when its source must (set `ex.workload` and `ex.user_name`);
        raise ProxyAuthRequired when it fails."""
        scope = self.scope
        if not scope.applies(source, ex.workload):
            return
        credentials = parse_basic_credentials(req.header("proxy-authorization"))
        if credentials is None:
            raise ProxyAuthRequired(
                "this source must authenticate to the proxy (Basic)",
                challenge=scope.challenge,
                reason=Reason.AUTH_REQUIRED,
            )
        user, password = credentials
        workload = scope.workload_of(user)
        if not await self._passwords.check(user, password) or workload is None:
            raise ProxyAuthRequired(
                "proxy credentials were not accepted",
                challenge=scope.challenge,
                reason=Reason.AUTH_FAILED,
            )
        ex.workload = workload
        ex.user_name = user


class LoggedInIdentity(IdentityLookup):
    """Identity as the data plane has it once the login is done, for explain: a source that
    must log in is `user`'s identity, and without a user it cannot be explained (it would be
    answered 407 before any decision)."""

    def __init__(self, identity: IdentityLookup, scope: LoginScope | None, user: str | None):
        self._identity = identity
        self._scope = scope
        self._user = user

    def lookup(self, ip: IPAddress) -> Workload:
        workload = self._identity.lookup(ip)
        scope, user = self._scope, self._user
        if scope is None or not scope.applies(ip, workload):
            if user is not None:
                raise BadRequest(
                    "this source does not log in (a pod, or outside auth.basic.sources): "
                    "explain it without a user"
                )
            return workload
        if user is None:
            raise BadRequest(
                "this source must log in (auth.basic.sources): without credentials it is "
                "answered 407; name the user to explain its decision",
                reason=Reason.AUTH_REQUIRED,
            )
        found = scope.workload_of(user)
        if found is None:
            raise BadRequest(
                f"user {user[:64]!r} is not in auth.basic.users", reason=Reason.AUTH_FAILED
            )
        return found
