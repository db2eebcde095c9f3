"""pip and git through the proxy, configured as their users configure them (`pip --proxy`,
git's `http.proxy`): pip installs a wheel from a simple index, git clones and pushes over its
smart HTTP protocol (GET, then POST of the pack negotiation or the pack), and both show a
refusal. Neither speaks WebSocket; pip sends no POST (git's pushes are this suite's POSTs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.clientrange import (
    ALLOWED,
    DENIED,
    DENY_REASON,
    DENY_RULE,
    GIT_FILE,
    GIT_FILE_TEXT,
    GIT_REPO,
    WHEEL_MODULE_TEXT,
    WHEEL_PROJECT,
    ClientRange,
    git_environment,
)

# Seconds for one pip or git run: a hung exchange fails the case, not the suite.
RUN_TIMEOUT = 60

schemes = pytest.mark.parametrize("scheme", ["http", "https"])


def pip_install(
    client_range: ClientRange, index: str, target: Path, *options: str
) -> subprocess.CompletedProcess[str]:
    """`pip install` from `index` through the proxy. `--isolated` keeps this machine's pip
    configuration out; `--retries 1`: pip prints a connection error only when it retries."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--isolated",
            "--disable-pip-version-check",
            "--no-input",
            "install",
            "--no-cache-dir",
            "--retries",
            "1",
            "--timeout",
            "15",
            "--proxy",
            client_range.proxy_url,
            "--cert",
            str(client_range.pki.ca_pem),
            "--index-url",
            index,
            "--target",
            str(target),
            *options,
            WHEEL_PROJECT,
        ],
        env={"PATH": "/usr/bin:/bin", "HOME": str(target.parent)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def pip_index_options(scheme: str, host: str) -> list[str]:
    # pip refuses a plain-http index unless the host is named as trusted.
    return ["--trusted-host", host] if scheme == "http" else []


@schemes
def test_pip_installs_a_wheel_from_an_index_through_the_proxy(
    scheme: str, client_range: ClientRange, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    result = pip_install(
        client_range,
        f"{scheme}://{ALLOWED}/static/simple/",
        target,
        *pip_index_options(scheme, ALLOWED),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    module = WHEEL_PROJECT.replace("-", "_")
    assert (target / module / "__init__.py").read_text() == WHEEL_MODULE_TEXT


@schemes
def test_pip_shows_a_refused_index(scheme: str, client_range: ClientRange, tmp_path: Path) -> None:
    """pip prints a refused CONNECT's status line in its retry warning. A plain-http index that
    answers 403 it only reports at -vv (`Could not fetch URL ...: 403 Client Error: <reason
    phrase> for url`); by default it says no more than "No matching distribution found"."""
    verbosity = ["-vv"] if scheme == "http" else []
    before = client_range.recorded_ids()
    result = pip_install(
        client_range,
        f"{scheme}://{DENIED}/static/simple/",
        tmp_path / "site",
        *pip_index_options(scheme, DENIED),
        *verbosity,
    )
    assert result.returncode != 0
    assert client_range.deny_recorded(before)["rule"]["name"] == DENY_RULE
    assert client_range.origin_requests(DENIED) == []
    shown = [line for line in (result.stdout + result.stderr).splitlines() if " 403 " in line]
    assert shown, result.stdout + result.stderr
    assert DENY_REASON in shown[-1], shown


def git(client_range: ClientRange, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """git with the proxy in `http.proxy` and the CA in `http.sslCAInfo`."""
    return subprocess.run(
        [
            "git",
            "-c",
            f"http.proxy={client_range.proxy_url}",
            "-c",
            f"http.sslCAInfo={client_range.pki.ca_pem}",
            *args,
        ],
        cwd=cwd,
        env=git_environment(cwd),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


@schemes
def test_git_clones_over_smart_http_through_the_proxy(
    scheme: str, client_range: ClientRange, tmp_path: Path
) -> None:
    origin = client_range.http_origin if scheme == "http" else client_range.https_origin
    seen_before = len(origin.seen)
    result = git(
        client_range, "clone", f"{scheme}://{ALLOWED}/git/{GIT_REPO}", "copy", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "copy" / GIT_FILE).read_text() == GIT_FILE_TEXT
    # The smart protocol: the ref advertisement by GET, the pack negotiation by POST.
    assert ("POST", f"/git/{GIT_REPO}/git-upload-pack") in [
        (seen.method, seen.path) for seen in origin.seen[seen_before:]
    ]


@schemes
def test_git_push_carries_the_pack_to_the_origin_intact(
    scheme: str, client_range: ClientRange, tmp_path: Path
) -> None:
    """A push POSTs the new objects as a pack; the origin's repository then holds them."""
    url = f"{scheme}://{ALLOWED}/git/{GIT_REPO}"
    assert git(client_range, "clone", "--quiet", url, "work", cwd=tmp_path).returncode == 0
    work = tmp_path / "work"
    content = f"pushed over {scheme} through the proxy\n" * 200
    (work / "pushed.txt").write_text(content)
    assert git(client_range, "add", "pushed.txt", cwd=work).returncode == 0
    assert git(client_range, "commit", "--quiet", "-m", f"over {scheme}", cwd=work).returncode == 0
    branch = f"pushed-over-{scheme}"
    result = git(client_range, "push", "origin", f"HEAD:refs/heads/{branch}", cwd=work)
    assert result.returncode == 0, result.stderr
    stored = subprocess.run(
        ["git", "--git-dir", str(client_range.git_root / GIT_REPO), "show", f"{branch}:pushed.txt"],
        env=git_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=True,
    )
    assert stored.stdout == content


@schemes
def test_git_shows_a_refused_remote(scheme: str, client_range: ClientRange, tmp_path: Path) -> None:
    """git prints only the status (`CONNECT tunnel failed, response 403`, or `The requested URL
    returned error: 403`), not the reason phrase; docs/clients.md says where to find it."""
    before = client_range.recorded_ids()
    result = git(client_range, "clone", f"{scheme}://{DENIED}/git/{GIT_REPO}", "copy", cwd=tmp_path)
    assert result.returncode != 0
    assert client_range.deny_recorded(before)["rule"]["name"] == DENY_RULE
    assert client_range.origin_requests(DENIED) == []
    assert "403" in result.stderr, result.stderr
