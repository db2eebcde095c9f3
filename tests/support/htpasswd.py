"""Proxy-auth test material: htpasswd files as `htpasswd -B` writes them, and Basic credentials."""

from __future__ import annotations

import base64
from pathlib import Path

import bcrypt

# bcrypt's lowest cost: the format and the check are real, the test stays fast.
TEST_COST = 4


def write_password_file(path: Path, passwords: dict[str, str]) -> Path:
    """`user:$2y$...` lines (htpasswd's spelling of bcrypt) for each user and password."""
    lines = [
        f"{user}:"
        + bcrypt.hashpw(pw.encode(), bcrypt.gensalt(TEST_COST)).decode().replace("$2b$", "$2y$")
        for user, pw in passwords.items()
    ]
    path.write_text("# htpasswd -B\n" + "\n".join(lines) + "\n")
    return path


def proxy_authorization(user: str, password: str) -> str:
    """The request header line a client sends with these credentials."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Proxy-Authorization: Basic {token}\r\n"
