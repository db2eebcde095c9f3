"""Each real client, driven the way its users drive it behind a proxy.

Every client gets the proxy and the test CA through its own standard settings (environment
variables, JVM system properties), never through a test-only hook, so what passes here is what
docs/clients.md tells a user to set. A client answers a request with a `Reply`, or fails with
`ClientFailed` carrying what it printed or raised: what its user sees.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import requests
import websockets

from tests.support.clientrange import ClientRange
from tests.support.clients import curl

REPO = Path(__file__).resolve().parents[2]
PROGRAMS = Path(__file__).resolve().parent / "programs"
# Where `make install-test` installs undici (tests/clients/programs/node/package-lock.json).
NODE_MODULES = REPO / ".venv" / "node-clients" / "node_modules"
# Compiled Go and Java clients, kept per machine and keyed by source and toolchain version.
BUILD_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "outgate-test-clients"
)
# Seconds: a client that hangs on a silently closed connection fails the case, not the suite.
CLIENT_TIMEOUT = 30
JAVA_TRUSTSTORE_PASSWORD = "outgate-tests"


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str | None  # the status line's reason phrase; None where the client hides it
    headers: dict[str, str]  # names in lower case
    body: str

    @classmethod
    def of(cls, status: int, reason: str | None, headers: Mapping[str, str], body: str) -> Reply:
        """A reply from a library's response parts (header names as the library keeps them)."""
        return cls(status, reason, {k.lower(): v for k, v in headers.items()}, body)


class ClientFailed(Exception):
    """The client gave up; the message is what it printed or raised."""


@dataclass
class Client:
    """One client family. `tunnel_refusal_shows`: the text its error message carries when the
    proxy refuses its CONNECT (what its user sees of a refusal)."""

    name: str
    tunnel_refusal_shows: tuple[str, ...]
    http: bool = True  # it makes HTTP requests (GET, POST)
    websocket: bool = False
    # It sends plain http:// (or ws://) through a CONNECT tunnel rather than as a forwarded
    # request, so a refusal reaches it as a failed CONNECT.
    tunnels_plain_http: bool = False
    not_applicable: dict[str, str] = field(default_factory=dict)

    def missing(self) -> str | None:
        """Why the client cannot run on this machine, or None."""
        return None

    async def request(
        self, client_range: ClientRange, method: str, url: str, body: str | None = None
    ) -> Reply:
        raise NotImplementedError

    async def echo(self, client_range: ClientRange, url: str, message: str) -> str:
        """Open a WebSocket, send `message`, return the first message that comes back."""
        raise NotImplementedError


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set these variables (and clear every other proxy variable) for an in-process client."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def proxy_environment(client_range: ClientRange) -> dict[str, str]:
    """The de-facto standard variables, in both spellings (curl reads only `http_proxy`)."""
    values = {}
    for scheme in ("http", "https"):
        values[f"{scheme}_proxy"] = client_range.proxy_url
        values[f"{scheme.upper()}_PROXY"] = client_range.proxy_url
    return values


def _reply_from_json(stdout: str) -> Reply:
    data = json.loads(stdout)
    return Reply(
        status=data["status"], reason=data["reason"], headers=data["headers"], body=data["body"]
    )


def _run(command: list[str], env: dict[str, str]) -> str:
    """Run a client program; its stdout on success, ClientFailed with its stderr otherwise."""
    try:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ClientFailed(f"no answer within {CLIENT_TIMEOUT}s") from exc
    if result.returncode != 0:
        raise ClientFailed(result.stderr.strip() or f"exit status {result.returncode}")
    return result.stdout


def _base_environment(client_range: ClientRange) -> dict[str, str]:
    """A user's shell, less its proxy settings: a UTF-8 locale (Java 17 decodes its arguments
    by the locale) and a home of its own."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(client_range.proxy.workdir),
        "LANG": "C.UTF-8",
    }


# -- curl --------------------------------------------------------------------------------------


class Curl(Client):
    async def request(
        self, client_range: ClientRange, method: str, url: str, body: str | None = None
    ) -> Reply:
        args = ["-i", "--suppress-connect-headers", "-X", method, url]
        if body is not None:
            args += ["--data-binary", body]
        env = {**proxy_environment(client_range), "CURL_CA_BUNDLE": str(client_range.pki.ca_pem)}
        result = curl(*args, env=env)
        if result.returncode != 0:
            raise ClientFailed(result.stderr.strip())
        return parse_response(result.stdout)


def parse_response(text: str) -> Reply:
    """A response as `curl -i` prints it, read with universal newlines (interim 1xx responses
    skipped)."""
    head, _, body = text.partition("\n\n")
    while head.split(" ")[1].startswith("1"):
        head, _, body = body.partition("\n\n")
    status_line, *lines = head.split("\n")
    _, status, reason = [*status_line.split(" ", 2), ""][:3]
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status=int(status), reason=reason, headers=headers, body=body)


# -- Python libraries, in this process ---------------------------------------------------------


def python_environment(client_range: ClientRange) -> dict[str, str]:
    """Proxies from the environment; SSL_CERT_FILE is the CA file OpenSSL's default context
    loads (aiohttp, websockets, httpx); requests uses its own REQUESTS_CA_BUNDLE."""
    return {
        **proxy_environment(client_range),
        "SSL_CERT_FILE": str(client_range.pki.ca_pem),
        "REQUESTS_CA_BUNDLE": str(client_range.pki.ca_pem),
    }


class Requests(Client):
    async def request(
        self, client_range: ClientRange, method: str, url: str, body: str | None = None
    ) -> Reply:
        with environment(python_environment(client_range)):
            try:
                response = requests.request(method, url, data=body, timeout=CLIENT_TIMEOUT)
            except requests.RequestException as exc:
                raise ClientFailed(str(exc)) from exc
        return Reply.of(response.status_code, response.reason, response.headers, response.text)


class Httpx(Client):
    async def request(
        self, client_range: ClientRange, method: str, url: str, body: str | None = None
    ) -> Reply:
        with environment(python_environment(client_range)):
            try:
                async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT) as client:
                    response = await client.request(method, url, content=body)
            except httpx.HTTPError as exc:
                raise ClientFailed(str(exc)) from exc
        return Reply.of(
            response.status_code, response.reason_phrase, response.headers, response.text
        )


def aiohttp_environment(client_range: ClientRange) -> dict[str, str]:
    """aiohttp looks a WebSocket's proxy up under its own scheme: WS_PROXY and WSS_PROXY."""
    return {
        **python_environment(client_range),
        "WS_PROXY": client_range.proxy_url,
        "WSS_PROXY": client_range.proxy_url,
    }


def aiohttp_session(client_range: ClientRange) -> aiohttp.ClientSession:
    """Proxies from the environment (trust_env); the CA as an SSL context, which is how aiohttp
    takes one (it does not read SSL_CERT_FILE)."""
    return aiohttp.ClientSession(
        trust_env=True,
        timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT),
        connector=aiohttp.TCPConnector(ssl=client_range.pki.client_context()),
    )


class Aiohttp(Client):
    async def request(
        self, client_range: ClientRange, method: str, url: str, body: str | None = None
    ) -> Reply:
        with environment(aiohttp_environment(client_range)):
            try:
                async with (
                    aiohttp_session(client_range) as session,
                    session.request(method, url, data=body) as response,
                ):
                    text = await response.text()
            except aiohttp.ClientError as exc:
                raise ClientFailed(str(exc)) from exc
        return Reply.of(response.status, response.reason, response.headers, text)

    async def echo(self, client_range: ClientRange, url: str, message: str) -> str:
        with environment(aiohttp_environment(client_range)):
            try:
                async with (
                    aiohttp_session(client_range) as session,
                    session.ws_connect(url) as socket,
                ):
                    await socket.send_str(message)
                    return await socket.receive_str(timeout=CLIENT_TIMEOUT)
            except (aiohttp.ClientError, TypeError) as exc:
                raise ClientFailed(str(exc)) from exc


class Websockets(Client):
    async def echo(self, client_range: ClientRange, url: str, message: str) -> str:
        with environment(python_environment(client_range)):
            try:
                async with websockets.connect(url, open_timeout=CLIENT_TIMEOUT) as socket:
                    await socket.send(message)
                    return str(await socket.recv())
            except (websockets.exceptions.WebSocketException, OSError) as exc:
                raise ClientFailed(str(exc)) from exc


# -- compiled and scripted clients -------------------------------------------------------------


def _toolchain_key(source: Path, *version_command: str) -> str:
    version = subprocess.run(
        list(version_command), capture_output=True, text=True, timeout=60, check=False
    )
    digest = hashlib.sha256(source.read_bytes())
    digest.update((version.stdout + version.stderr).encode())
    return digest.hexdigest()[:16]


def _build_once(
    target: Path, build: Callable[[Path], list[str]], env: dict[str, str] | None = None
) -> None:
    """Unless `target` exists, run the command `build(staging)` makes (it writes `staging`),
    then move the result in place: an interrupted build never leaves a half-written client in
    the cache, and of two builds racing on one machine the first to finish wins."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    _remove(staging)
    result = subprocess.run(
        build(staging), env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"building {target.name} failed: {result.stderr}"
    try:
        staging.rename(target)
    except OSError:
        if not target.exists():
            raise
        _remove(staging)


def _remove(path: Path) -> None:
    """Remove a built client, a file (Go) or a directory of classes (Java), if it is there."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class Go(Client):
    def missing(self) -> str | None:
        if shutil.which("go") is None:
            return "Go net/http: `go` is not installed (make install-test installs golang-go)"
        return None

    @staticmethod
    @functools.cache
    def binary() -> Path:
        source = PROGRAMS / "client.go"
        target = BUILD_CACHE / f"go-client-{_toolchain_key(source, 'go', 'version')}"
        # Standard library only: GOPROXY=off and GOTOOLCHAIN=local forbid any download.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(BUILD_CACHE),
            "GOCACHE": str(BUILD_CACHE / "go-build-cache"),
            "GOPATH": str(BUILD_CACHE / "gopath"),
            "GOPROXY": "off",
            "GOTOOLCHAIN": "local",
            "GOFLAGS": "",
            "CGO_ENABLED": "0",
        }
        _build_once(target, lambda out: ["go", "build", "-o", str(out), str(source)], env)
        return target

    async def request(
        self, client_range: ClientRange, method: str, url: str, body: str | None = None
    ) -> Reply:
        env = {
            **_base_environment(client_range),
            **proxy_environment(client_range),
            "SSL_CERT_FILE": str(client_range.pki.ca_pem),
        }
        command = [str(self.binary()), method, url, *([body] if body is not None else [])]
        return _reply_from_json(_run(command, env))


class Node(Client):
    def missing(self) -> str | None:
        if shutil.which("node") is None:
            return "Node (undici): `node` is not installed (make install-test installs nodejs)"
        if not (NODE_MODULES / "undici").is_dir():
            return f"Node (undici): undici is not in {NODE_MODULES} (make install-test installs it)"
        return None

    def _env(self, client_range: ClientRange) -> dict[str, str]:
        return {
            **_base_environment(client_range),
            **proxy_environment(client_range),
            "NODE_EXTRA_CA_CERTS": str(client_range.pki.ca_pem),
            "NODE_PATH": str(NODE_MODULES),
        }

    def _command(self, *args: str) -> list[str]:
        # --no-warnings: undici marks EnvHttpProxyAgent experimental on every start.
        return ["node", "--no-warnings", str(PROGRAMS / "node" / "client.js"), *args]

    async def request(
        self, client_range: ClientRange, method: str, url: str, body: str | None = None
    ) -> Reply:
        command = self._command("request", method, url, *([body] if body is not None else []))
        return _reply_from_json(_run(command, self._env(client_range)))

    async def echo(self, client_range: ClientRange, url: str, message: str) -> str:
        output = _run(self._command("websocket", url, message), self._env(client_range))
        return str(json.loads(output)["echo"])


class NodeBuiltin(Node):
    """Node's own fetch and WebSocket with NODE_USE_ENV_PROXY=1 (Node 24, later 22.x)."""

    def missing(self) -> str | None:
        if shutil.which("node") is None:
            return f"{self.name}: `node` is not installed (make install-test installs nodejs)"
        if "--use-env-proxy" not in _node_help():
            return f"{self.name}: this Node ({_node_version()}) has no NODE_USE_ENV_PROXY"
        return None

    def _env(self, client_range: ClientRange) -> dict[str, str]:
        return {
            **_base_environment(client_range),
            **proxy_environment(client_range),
            "NODE_EXTRA_CA_CERTS": str(client_range.pki.ca_pem),
            "NODE_USE_ENV_PROXY": "1",
        }


@functools.cache
def _node_help() -> str:
    return subprocess.run(
        ["node", "--help"], capture_output=True, text=True, timeout=60, check=False
    ).stdout


@functools.cache
def _node_version() -> str:
    return subprocess.run(
        ["node", "--version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout.strip()


class Java(Client):
    def missing(self) -> str | None:
        if shutil.which("javac") is None:
            return (
                "Java 17 HttpClient: `javac` is not installed "
                "(make install-test installs openjdk-17-jdk-headless)"
            )
        return None

    @staticmethod
    def tool(name: str) -> str:
        """A JDK tool beside the `javac` on PATH, so compiler and runtime are one JDK."""
        javac = shutil.which("javac")
        assert javac is not None
        return str(Path(os.path.realpath(javac)).with_name(name))

    @staticmethod
    @functools.cache
    def classes() -> Path:
        source = PROGRAMS / "Client.java"
        javac = Java.tool("javac")
        target = BUILD_CACHE / f"java-client-{_toolchain_key(source, javac, '-version')}"
        _build_once(target, lambda out: [javac, "-d", str(out), str(source)])
        return target

    def truststore(self, client_range: ClientRange) -> Path:
        store = client_range.pki.ca_pem.with_name("truststore.p12")
        if not store.exists():
            subprocess.run(
                [
                    self.tool("keytool"),
                    "-importcert",
                    "-noprompt",
                    "-alias",
                    "outgate-test-ca",
                    "-file",
                    str(client_range.pki.ca_pem),
                    "-keystore",
                    str(store),
                    "-storetype",
                    "PKCS12",
                    "-storepass",
                    JAVA_TRUSTSTORE_PASSWORD,
                ],
                capture_output=True,
                timeout=60,
                check=True,
            )
        return store

    def _command(self, client_range: ClientRange, *args: str) -> list[str]:
        port = str(client_range.proxy.port)
        return [
            self.tool("java"),
            "-Dhttp.proxyHost=127.0.0.1",
            f"-Dhttp.proxyPort={port}",
            "-Dhttps.proxyHost=127.0.0.1",
            f"-Dhttps.proxyPort={port}",
            f"-Djavax.net.ssl.trustStore={self.truststore(client_range)}",
            f"-Djavax.net.ssl.trustStorePassword={JAVA_TRUSTSTORE_PASSWORD}",
            "-cp",
            str(self.classes()),
            "Client",
            *args,
        ]

    async def request(
        self, client_range: ClientRange, method: str, url: str, body: str | None = None
    ) -> Reply:
        command = self._command(
            client_range, "request", method, url, *([body] if body is not None else [])
        )
        return _reply_from_json(_run(command, _base_environment(client_range)))

    async def echo(self, client_range: ClientRange, url: str, message: str) -> str:
        output = _run(
            self._command(client_range, "websocket", url, message), _base_environment(client_range)
        )
        return str(json.loads(output)["echo"])


NO_WEBSOCKET = "no WebSocket client"

CLIENTS = [
    Curl(
        "curl",
        tunnel_refusal_shows=("403",),
        not_applicable={"websocket": "Debian's curl is built without WebSocket support"},
    ),
    Requests(
        "requests",
        tunnel_refusal_shows=("403", "rule_deny"),
        not_applicable={"websocket": NO_WEBSOCKET},
    ),
    Httpx(
        "httpx",
        tunnel_refusal_shows=("403", "rule_deny"),
        not_applicable={"websocket": NO_WEBSOCKET},
    ),
    Aiohttp("aiohttp", tunnel_refusal_shows=("403", "rule_deny"), websocket=True),
    Websockets(
        "websockets",
        tunnel_refusal_shows=("403",),
        http=False,
        websocket=True,
        tunnels_plain_http=True,
        not_applicable={"http": "a WebSocket library only, no HTTP requests"},
    ),
    # Go prints only the reason phrase of a refused CONNECT: `Get "https://...": Forbidden ...`.
    Go(
        "go-net-http",
        tunnel_refusal_shows=("Forbidden", "rule_deny"),
        not_applicable={"websocket": "Go's standard library has no WebSocket client"},
    ),
    Node(
        "node-undici",
        tunnel_refusal_shows=("403",),
        websocket=True,
        tunnels_plain_http=True,
    ),
    NodeBuiltin(
        "node-builtin-fetch",
        tunnel_refusal_shows=("403",),
        websocket=True,
        tunnels_plain_http=True,
    ),
    Java("java-httpclient", tunnel_refusal_shows=("403",), websocket=True),
]
