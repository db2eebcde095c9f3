"""The range real clients are tried on: one proxy, the scripted DNS server, and an HTTP and an
HTTPS origin under public-looking names, with a CA every client is told to trust.

Clients ask for `api.allowed.example` (allowed on ports 80 and 443) and `api.denied.example`
(denied by a rule); the proxy resolves both through the scripted DNS server to ORIGIN_ADDRESS,
which tests/netns/enter.sh binds on the namespace's loopback. The origin serves, beside its
usual routes, a pip "simple" index with a wheel built here (under /static/) and git's smart
HTTP protocol through `git http-backend` (under /git/), so pip and git run as users run them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import os
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.dnsserver import ScriptedDNSServer
from tests.support.origin import OriginServer
from tests.support.pki import OriginPKI, make_pki
from tests.support.proxyproc import ProxyProcess

ALLOWED = "api.allowed.example"
DENIED = "api.denied.example"
# Public-looking, so the address guard lets the proxy dial it without a cidr in the rule, as it
# would a real API; bound on loopback inside the test's network namespace only.
ORIGIN_ADDRESS = "11.0.0.20"
DENY_RULE = "denied-api"
DENY_REASON = "rule_deny"

POLICIES = f"""
apiVersion: outgate.dev/v1alpha1
kind: EgressPolicy
metadata: {{name: clients, namespace: tests}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  rules:
    - name: {DENY_RULE}
      action: Deny
      to: [{{fqdn: {DENIED}}}]
    - name: allowed-api
      action: Allow
      to: [{{fqdn: {ALLOWED}}}]
      ports: [80, 443]
"""

# The package pip installs from the range's index, and the text its module carries.
WHEEL_PROJECT = "outgate-probe"
WHEEL_VERSION = "1.0"
WHEEL_MODULE_TEXT = 'GREETING = "installed through the proxy"\n'
# The bare repository git clones from and pushes to, and the file its first commit holds.
GIT_REPO = "probe.git"
GIT_FILE = "README"
GIT_FILE_TEXT = "cloned through the proxy\n"


@dataclass(frozen=True)
class ClientRange:
    proxy: ProxyProcess
    dns: ScriptedDNSServer
    http_origin: OriginServer  # ORIGIN_ADDRESS:80
    https_origin: OriginServer  # ORIGIN_ADDRESS:443, certificate for both names from `pki`
    pki: OriginPKI
    git_root: Path  # the origin's repositories; GIT_REPO among them

    @property
    def proxy_url(self) -> str:
        return self.proxy.url

    def origin_requests(self, host: str) -> list[str]:
        """Paths the origins received for `host` (by Host header), in order."""
        return [
            seen.path
            for origin in (self.http_origin, self.https_origin)
            for seen in list(origin.seen)
            if (seen.header("Host") or "").split(":")[0] == host
        ]

    def recorded_ids(self) -> frozenset[str]:
        """The event ids recorded so far: what a case's new records are told apart from."""
        return frozenset(record["event"]["id"] for record in list(self.proxy.records))

    def deny_recorded(self, before: frozenset[str]) -> dict[str, Any]:
        """The deny decision for DENIED recorded since `before` (from `recorded_ids`)."""

        def new_denial(record: dict[str, Any]) -> bool:
            return (
                record["event"]["action"] == "decision"
                and record["event"]["id"] not in before
                and record.get("destination", {}).get("domain") == DENIED
            )

        return self.proxy.wait_records(new_denial)[-1]


@contextlib.contextmanager
def start_client_range(workdir: Path) -> Iterator[ClientRange]:
    """Start the range; everything it starts stops when the block ends."""
    pki = make_pki(workdir / "pki", [ALLOWED, DENIED])
    static_root = workdir / "static"
    write_simple_index(static_root, build_wheel(static_root / "packages"))
    git_root = workdir / "git"
    make_bare_repository(git_root / GIT_REPO, workdir / "git-seed")
    routes = [static_files("/static", static_root), git_http_backend("/git", git_root)]
    with contextlib.ExitStack() as stack:
        dns = stack.enter_context(ScriptedDNSServer())
        for name in (ALLOWED, DENIED):
            dns.addresses(name, ORIGIN_ADDRESS, ttl=0)
        http_origin = stack.enter_context(OriginServer(ORIGIN_ADDRESS, 80, routes=routes))
        https_origin = stack.enter_context(
            OriginServer(ORIGIN_ADDRESS, 443, ssl_context=pki.server_context(), routes=routes)
        )
        proxy_dir = workdir / "proxy"
        proxy_dir.mkdir()
        proxy = stack.enter_context(
            ProxyProcess(proxy_dir, policies=POLICIES, nameserver=dns.nameserver)
        )
        yield ClientRange(
            proxy=proxy,
            dns=dns,
            http_origin=http_origin,
            https_origin=https_origin,
            pki=pki,
            git_root=git_root,
        )


# -- what the origin serves -------------------------------------------------------------------


def static_files(prefix: str, root: Path) -> web.RouteDef:
    """GET `prefix`/PATH serves root/PATH; a directory serves its index.html (as pip's simple
    index layout expects of a static web server)."""

    async def serve(request: web.Request) -> web.StreamResponse:
        path = (root / request.match_info["path"]).resolve()
        if not path.is_relative_to(root.resolve()):
            raise web.HTTPNotFound()
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    return web.get(prefix + "/{path:.*}", serve)


def git_http_backend(prefix: str, root: Path) -> web.RouteDef:
    """git's smart HTTP protocol for the repositories under `root`: each request runs
    `git http-backend` as a CGI program (GET info/refs, POST git-upload-pack / git-receive-pack)."""

    async def serve(request: web.Request) -> web.Response:
        # aiohttp has already undone a gzip Content-Encoding, so the body goes on as it is.
        body = await request.read()
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": str(root),
            "PATH_INFO": "/" + request.match_info["path"],
            "REQUEST_METHOD": request.method,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": request.remote or "",
            "GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
        }
        run = functools.partial(
            subprocess.run,
            ["git", "http-backend"],
            input=body,
            env=environment,
            capture_output=True,
            timeout=30,
            check=False,
        )
        result = await asyncio.get_running_loop().run_in_executor(None, run)
        head, _, payload = result.stdout.partition(b"\r\n\r\n")
        status = 200
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers[name] = value.strip()
        return web.Response(status=status, headers=headers, body=payload)

    return web.route("*", prefix + "/{path:.*}", serve)


def build_wheel(directory: Path) -> Path:
    """A pure-Python wheel of WHEEL_PROJECT (PEP 427), written by hand so no build backend is
    needed inside a namespace without network."""
    module = WHEEL_PROJECT.replace("-", "_")
    dist_info = f"{module}-{WHEEL_VERSION}.dist-info"
    files = {
        f"{module}/__init__.py": WHEEL_MODULE_TEXT.encode(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {WHEEL_PROJECT}\nVersion: {WHEEL_VERSION}\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: outgate-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = [f"{name},sha256={_record_hash(data)},{len(data)}" for name, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{module}-{WHEEL_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_simple_index(static_root: Path, wheel: Path) -> None:
    """PEP 503 pages: /simple/ lists the project, /simple/PROJECT/ links the wheel by hash."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    href = f"/static/{wheel.relative_to(static_root)}#sha256={digest}"
    project_dir = static_root / "simple" / WHEEL_PROJECT
    project_dir.mkdir(parents=True, exist_ok=True)
    (static_root / "simple" / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{WHEEL_PROJECT}/">{WHEEL_PROJECT}</a></body></html>\n'
    )
    (project_dir / "index.html").write_text(
        f'<!DOCTYPE html><html><body><a href="{href}">{wheel.name}</a></body></html>\n'
    )


def make_bare_repository(bare: Path, seed: Path) -> None:
    """A bare repository holding one commit with GIT_FILE, open to pushes over HTTP."""
    git = functools.partial(_git, env=git_environment(seed.parent))
    git("init", "--quiet", "--bare", "--initial-branch=main", str(bare))
    git("-C", str(bare), "config", "http.receivepack", "true")
    git("init", "--quiet", "--initial-branch=main", str(seed))
    (seed / GIT_FILE).write_text(GIT_FILE_TEXT)
    git("-C", str(seed), "add", GIT_FILE)
    git("-C", str(seed), "commit", "--quiet", "-m", "first")
    git("-C", str(seed), "push", "--quiet", str(bare), "main")


def git_environment(home: Path) -> dict[str, str]:
    """git with no system or user configuration but an identity for commits."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Outgate tests",
        "GIT_AUTHOR_EMAIL": "tests@outgate.invalid",
        "GIT_COMMITTER_NAME": "Outgate tests",
        "GIT_COMMITTER_EMAIL": "tests@outgate.invalid",
        "GIT_TERMINAL_PROMPT": "0",
    }


def _git(*args: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        ["git", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout
