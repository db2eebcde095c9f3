"""The data plane in the test's own event loop: ProxyServer and its collaborators, built by the
same `build_proxy` the app uses, on a real socket on 127.0.0.1, with parts a test controls:

  - `FakeResolver`: names answered from a table (also the Router's unit tests use it);
  - `FlakyDialer`: the real DirectDialer, made to fail on demand (refused, timeout);
  - `RecordingSink`: the real AuditSink (records rendered and written to /dev/null), keeping
    every record so a test can wait for one.

No subprocess: a test reaches into nothing private, it drives the server over its socket and
reads the records it wrote.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.app import build_guard, build_password_file, build_proxy
from proxy.audit import AuditSink
from proxy.config import Settings, settings_from_mapping
from proxy.control.policy_source import PolicyStore
from proxy.core.hosts import IPAddress
from proxy.core.identity import StaticIdentityIndex
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_text
from proxy.core.policy.model import Action
from proxy.dataplane.dialer import DirectDialer, Upstream
from proxy.dataplane.router import Route, Router
from proxy.dataplane.server import ProxyServer
from proxy.errors import BadGateway, GatewayTimeout, Reason
from proxy.tls.ca import init_ca, load_ca
from proxy.tls.certs import CertCache
from tests.support.fixtures import policy_allowing
from tests.support.loops import settle_transports
from tests.support.origin import OriginServer
from tests.support.pki import make_pki

# Seconds a test waits for a record or an event before it fails (a bound, not a pause).
EVENT_TIMEOUT = 10.0
# A FakeResolver answer: the name is the test origin on loopback.
LOOPBACK: tuple[IPAddress, ...] = (ipaddress.ip_address("127.0.0.1"),)


@dataclass
class FakeResolver:
    """Answers from a table; records every name it was asked. An unlisted name is NXDOMAIN."""

    # An exception is raised: an OutgateError as the real resolver raises them, any other to
    # stand for a defect.
    answers: dict[str, tuple[IPAddress, ...] | Exception] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    async def resolve(self, name: str) -> tuple[IPAddress, ...]:
        self.asked.append(name)
        answer = self.answers.get(name)
        if answer is None:
            raise BadGateway(f"{name} does not exist", reason=Reason.DNS_NXDOMAIN)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FlakyDialer:
    """DirectDialer that fails the next dials on demand: `fail_next("refused" | "timeout")`."""

    def __init__(self, *, connect_timeout: float) -> None:
        self._direct = DirectDialer(connect_timeout=connect_timeout)
        self._failures: list[str] = []
        self.dialled: list[Route] = []

    def close(self) -> None:
        self._direct.close()

    def fail_next(self, kind: str, times: int = 1) -> None:
        self._failures.extend([kind] * times)

    async def dial(self, route: Route, *, tunnel: bool) -> Upstream:
        self.dialled.append(route)
        if self._failures:
            kind = self._failures.pop(0)
            if kind == "timeout":
                raise GatewayTimeout("connect timed out (on demand)")
            raise BadGateway("refused (on demand)", reason=Reason.UPSTREAM_REFUSED)
        return await self._direct.dial(route, tunnel=tunnel)


class RecordingSink(AuditSink):
    """The real sink writing to /dev/null, keeping each record for the test."""

    def __init__(self) -> None:
        self._devnull = os.open(os.devnull, os.O_WRONLY)
        super().__init__(self._devnull)
        self.records: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def emit_line(self, action: str, line: bytes) -> None:
        super().emit_line(action, line)
        self.records.append(json.loads(line))
        self._changed.set()

    async def wait_for(
        self, match: Callable[[dict[str, Any]], bool], *, count: int = 1
    ) -> list[dict[str, Any]]:
        """Wait until `count` records match; they are returned."""
        async with asyncio.timeout(EVENT_TIMEOUT):
            while True:
                found = [record for record in self.records if match(record)]
                if len(found) >= count:
                    return found
                self._changed.clear()
                await self._changed.wait()

    def stop(self) -> None:
        self.flush_and_stop()
        os.close(self._devnull)


def closes(record: dict[str, Any]) -> bool:
    return bool(record["event"]["action"] == "close")


STATIC_CLIENT = {
    "name": "client",
    "namespace": "tests",
    "cidrs": ["127.0.0.1/32"],
    "labels": {"app": "client"},
}


@dataclass
class Harness:
    server: ProxyServer
    address: tuple[str, int]
    audit: RecordingSink
    resolver: FakeResolver
    dialer: FlakyDialer
    policy: PolicyStore
    settings: Settings


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": "127.0.0.1:0",
        "identity": {"static": [STATIC_CLIENT]},
        "limits": {"newConnectionsPerSecond": 10000, "newConnectionsBurst": 10000},
    }
    raw.update(overrides)
    return settings_from_mapping(raw, file="<test>", base_dir=tmp)


@asynccontextmanager
async def inprocess_proxy(
    tmp: Path,
    policies: str,
    *,
    answers: dict[str, tuple[IPAddress, ...] | Exception] | None = None,
    certs: CertCache | None = None,
    **config: Any,
) -> AsyncIterator[Harness]:
    """A started ProxyServer on 127.0.0.1:<ephemeral>; stopped (drained, 5 s) at the end."""
    settings = make_settings(tmp, **config)
    store = PolicyStore()
    store.install(
        Engine.compile(
            load_text(policies, file="test.yaml"), default_action=Action.DENY, revision=1
        )
    )
    resolver = FakeResolver(answers=dict(answers or {}))
    audit = RecordingSink()
    audit.bind_loop(asyncio.get_running_loop())
    dialer = FlakyDialer(connect_timeout=settings.timeouts.connect)
    identity = StaticIdentityIndex(settings.static_identities)
    router = Router(
        policy=store,
        resolver=resolver,
        guard=build_guard(settings, proxy_port=0, admin_port=0),
        routes=settings.routes,
    )
    server = build_proxy(
        settings,
        router=router,
        identity=identity,
        audit=audit,
        certs=certs,
        is_ready=lambda: True,
        dialer=dialer,
        passwords=build_password_file(settings),
    )
    address = await server.start()
    try:
        yield Harness(server, address, audit, resolver, dialer, store, settings)
    finally:
        await server.drain(5.0)
        audit.stop()
        await settle_transports()  # the test's own client sockets too


@dataclass
class Intercepting:
    harness: Harness
    origin: OriginServer
    ca_cert: Path  # the proxy's interception CA, for the client to trust


@asynccontextmanager
async def intercepting_proxy(tmp: Path) -> AsyncIterator[Intercepting]:
    """The in-process proxy intercepting origin.test (`inspect: {}`), a TLS origin for it."""
    pki = make_pki(tmp / "pki", ["origin.test"])
    ca_cert, ca_key = init_ca(tmp / "ca")
    certs = CertCache(load_ca(str(ca_cert), str(ca_key)))
    policies = policy_allowing("origin.test").replace("ports:", "inspect: {}\n      ports:")
    loopback = (ipaddress.ip_address("127.0.0.1"),)
    try:
        with OriginServer(ssl_context=pki.server_context()) as origin:
            async with inprocess_proxy(
                tmp,
                policies,
                answers={"origin.test": loopback},
                certs=certs,
                tls={"upstreamCABundle": str(pki.ca_pem)},
            ) as harness:
                yield Intercepting(harness, origin, ca_cert)
    finally:
        certs.close()


async def http_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Send one request on an open connection and read one Content-Length-framed response."""
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(EVENT_TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def exchange_on_new_connection(
    harness: Harness, request: bytes, *, then_closed: bool = False
) -> tuple[int, dict[str, str], bytes, bool]:
    """`http_exchange` on a connection of its own, closed after the answer: status, headers,
    body, and (`then_closed`) whether the proxy closed the connection after answering."""
    reader, writer = await asyncio.open_connection(*harness.address)
    try:
        status, headers, body = await http_exchange(reader, writer, request)
        closed = False
        if then_closed:
            async with asyncio.timeout(EVENT_TIMEOUT):
                closed = await reader.read(1) == b""
        return status, headers, body, closed
    finally:
        writer.close()
        await writer.wait_closed()
