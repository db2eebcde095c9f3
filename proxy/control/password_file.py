"""The proxy-auth password file in force, and checking a user's password against it.

The file (`auth.basic.file`, htpasswd with bcrypt hashes; proxy.core.basic_auth parses it) is
watched like the hosts file (proxy.control.watched_file): re-read on change, and a file that
fails to load keeps the last good one, with a `proxy_auth_file_reload_failed` error in the log.
At start a file that does not load is a config error: the proxy fails closed.

Checking a password:
  1. bcrypt.checkpw, which compares in constant time, in a worker thread: one check costs tens
     to hundreds of milliseconds of CPU by design (cost 10 measures ~0.1 s here), which the
     event loop must never wait on. At most `MAX_CONCURRENT_CHECKS` run at once, so a client
     guessing passwords slows itself, not every other client's traffic.
  2. An unknown user is checked against a fixed dummy hash of the same cost, so the reply time
     does not tell which user names exist.
  3. A successful check is remembered for `VERIFIED_TTL` seconds, keyed by an HMAC of the user
     and password under a key made at start and never stored: keep-alive clients (and curl,
     which sends credentials on every request) would otherwise pay a bcrypt per request. The
     table holds no password and no unkeyed hash of one; it is emptied whenever the file
     changes, so a changed or removed password stops working at the next reload. Failures are
     never remembered: each wrong guess pays the full bcrypt cost.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Final

import bcrypt

from proxy.control.watched_file import FileLoadError, WatchedFile
from proxy.core.basic_auth import (
    EMPTY_PASSWORDS,
    PasswordFileError,
    PasswordTable,
    parse_password_file,
)

# Concurrent bcrypt checks: the 2-core proxy pod keeps a core for traffic.
MAX_CONCURRENT_CHECKS: Final = 2
# Seconds a successful check is remembered (see the module docstring, step 3).
VERIFIED_TTL: Final = 60.0
# Remembered successes; the oldest go first. One per distinct user and password in the TTL.
MAX_VERIFIED: Final = 10_000
# A password file is a few lines; 1 MiB holds thousands of users.
MAX_PASSWORD_FILE_BYTES: Final = 1 << 20
# bcrypt's cost for the dummy hash: htpasswd -B's default.
DUMMY_COST: Final = 10


@functools.cache
def _dummy_hash() -> bytes:
    """What an unknown user's password is checked against (made once, when first needed)."""
    return bcrypt.hashpw(b"outgate-dummy-password", bcrypt.gensalt(DUMMY_COST))


def _load(text: str) -> PasswordTable:
    try:
        return parse_password_file(text)
    except PasswordFileError as exc:
        raise FileLoadError(str(exc)) from None


class PasswordFile:
    """Checks (user, password) against the password file in force."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.watched = WatchedFile(
            path,
            load=_load,
            empty=EMPTY_PASSWORDS,
            event="proxy_auth_file",
            max_bytes=MAX_PASSWORD_FILE_BYTES,
            missing_ok=False,
        )
        self._clock = clock
        self._key = os.urandom(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._verified_for: PasswordTable | None = None
        self._checks: asyncio.Semaphore | None = None  # made on the event loop that uses it

    def load(self) -> bool:
        return self.watched.reload()

    async def check(self, user: str, password: str) -> bool:
        table = self.watched.current
        if table is not self._verified_for:  # the file changed: forget every success
            self._verified.clear()
            self._verified_for = table
        key = hmac.digest(self._key, f"{user}\0{password}".encode(), "sha256")
        now = self._clock()
        expires = self._verified.get(key)
        if expires is not None:
            if expires > now:
                return True
            del self._verified[key]
        hashed = table.hash_of(user)
        ok = await self._bcrypt(password.encode(), hashed if hashed is not None else _dummy_hash())
        if not ok or hashed is None:
            return False
        if self.watched.current is table:  # not when the file changed during the check
            self._verified[key] = now + VERIFIED_TTL
            while len(self._verified) > MAX_VERIFIED:
                self._verified.popitem(last=False)
        return True

    async def _bcrypt(self, password: bytes, hashed: bytes) -> bool:
        if self._checks is None:
            self._checks = asyncio.Semaphore(MAX_CONCURRENT_CHECKS)
        async with self._checks:
            return await asyncio.to_thread(_checkpw, password, hashed)


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:
        return False  # bcrypt refuses passwords over 72 bytes: no such password matches
