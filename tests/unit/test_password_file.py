"""Checking proxy-auth passwords (proxy.control.password_file): bcrypt in a thread, successes
remembered briefly and forgotten when the file changes."""

from __future__ import annotations

import time
from pathlib import Path

import bcrypt

from proxy.control.password_file import VERIFIED_TTL, PasswordFile


def write(path: Path, user: str, password: str, cost: int) -> None:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()
    path.write_text(f"{user}:{hashed.replace('$2b$', '$2y$')}\n")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def timed(passwords: PasswordFile, user: str, password: str) -> tuple[bool, float]:
    started = time.perf_counter()
    ok = await passwords.check(user, password)
    return ok, time.perf_counter() - started


async def test_a_success_is_remembered_for_the_ttl_and_a_failure_never(tmp_path: Path) -> None:
    # Cost 12: a check takes a few hundred milliseconds, a remembered success microseconds.
    write(tmp_path / "htpasswd", "alice", "right", cost=12)
    clock = Clock()
    passwords = PasswordFile(tmp_path / "htpasswd", clock=clock)
    assert passwords.load()
    ok, first = await timed(passwords, "alice", "right")
    assert ok and first > 0.05
    ok, second = await timed(passwords, "alice", "right")
    assert ok and second < first / 20
    ok, wrong = await timed(passwords, "alice", "wrong")
    assert not ok and wrong > 0.05
    ok, again = await timed(passwords, "alice", "wrong")
    assert not ok and again > 0.05  # failures pay bcrypt every time
    clock.now += VERIFIED_TTL + 1
    ok, expired = await timed(passwords, "alice", "right")
    assert ok and expired > 0.05


async def test_a_reloaded_file_forgets_remembered_successes(tmp_path: Path) -> None:
    write(tmp_path / "htpasswd", "alice", "old", cost=4)
    passwords = PasswordFile(tmp_path / "htpasswd")
    assert passwords.load()
    assert await passwords.check("alice", "old")
    write(tmp_path / "htpasswd", "alice", "new", cost=4)
    assert passwords.load()
    assert not await passwords.check("alice", "old")
    assert await passwords.check("alice", "new")


async def test_unknown_users_and_overlong_passwords_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "htpasswd", "alice", "a" * 72, cost=4)
    passwords = PasswordFile(tmp_path / "htpasswd")
    assert passwords.load()
    assert await passwords.check("alice", "a" * 72)
    assert not await passwords.check("alice", "a" * 73)
    assert not await passwords.check("mallory", "a" * 72)


def test_a_bad_file_at_start_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "htpasswd").write_text("alice:$apr1$x$y\n")
    assert not PasswordFile(tmp_path / "htpasswd").load()
    assert not PasswordFile(tmp_path / "missing").load()
