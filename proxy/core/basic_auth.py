"""Basic proxy authentication, the pure part: the `Proxy-Authorization` field (RFC 7617) and the
password file (Apache htpasswd format, bcrypt hashes only).

The file is `user:hash` lines, `#` comments and blank lines ignored, as `htpasswd -B` writes it
and Squid's basic_ncsa_auth reads it. Only bcrypt (`$2y$`, `$2b$`, `$2a$`) is accepted: the
other htpasswd formats (`$apr1$` MD5, `{SHA}`, crypt, plain) are fast hashes an offline attacker
with the file tests billions of guesses a second against. A file with any such line is refused
as a whole, naming the line, so no user is locked out silently.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

# bcrypt's modular-crypt form: $2y$ (htpasswd), $2b$ (OpenBSD, Python), $2a$ (old), a two-digit
# cost, 22 characters of salt and 31 of hash in bcrypt's base64 alphabet: 60 characters.
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}\Z")
# RFC 7617 section 2: user-id may not contain a colon; neither may hold control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Longest Proxy-Authorization value read (base64 of a user and password): a real one is under
# a hundred bytes; this bounds the decode work an unauthenticated client can ask for.
MAX_CREDENTIALS_FIELD = 1024
# Longest user name: Apache's htpasswd refuses names over 255 bytes.
MAX_USER_NAME = 255


class PasswordFileError(ValueError):
    """The password file cannot be used as a whole; the message names the line."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PasswordTable:
    """User -> bcrypt hash (bytes, as bcrypt.checkpw takes it)."""

    hashes: dict[str, bytes]

    def hash_of(self, user: str) -> bytes | None:
        return self.hashes.get(user)


EMPTY_PASSWORDS = PasswordTable(hashes={})


def parse_password_file(text: str) -> PasswordTable:
    """Every `user:hash` line; PasswordFileError for the first line that is not a bcrypt entry."""
    hashes: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            raise PasswordFileError(f"line {number}: expected user:hash")
        if len(user) > MAX_USER_NAME or _CONTROL.search(user):
            raise PasswordFileError(f"line {number}: the user name is too long or not printable")
        if not _BCRYPT.match(hashed):
            kind = "an MD5 ($apr1$)" if hashed.startswith("$apr1$") else "a non-bcrypt"
            raise PasswordFileError(
                f"line {number} (user {user!r}): {kind} hash; only bcrypt is accepted, "
                "write it with htpasswd -B"
            )
        if user in hashes:
            raise PasswordFileError(f"line {number}: user {user!r} is listed twice")
        hashes[user] = hashed.encode("ascii")
    return PasswordTable(hashes=hashes)


def parse_basic_credentials(value: str | None) -> tuple[str, str] | None:
    """(user, password) from a `Proxy-Authorization: Basic <base64>` value; None when it is
    absent, another scheme, or not a well-formed Basic credential."""
    if value is None or len(value) > MAX_CREDENTIALS_FIELD:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    try:
        text = decoded.decode("utf-8")  # RFC 7617 section 2.1: the charset clients use
    except UnicodeDecodeError:
        text = decoded.decode("latin-1")  # what older clients send
    user, colon, password = text.partition(":")
    if not colon or not user or _CONTROL.search(user) or _CONTROL.search(password):
        return None
    return user, password
