"""Composition root: builds every part from Settings and owns the start and stop order.

Start: load policy (a bad policy at start is fatal: fail closed) -> bind the proxy socket ->
build the guard with the bound ports -> start the proxy and admin listeners -> watch policy.
Stop (SIGTERM): readiness fails at once -> stop accepting -> drain up to timeouts.drain ->
cancel what is left (close records say `drained`) -> flush the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from typing import Any

import structlog
from aiohttp import web

from proxy.admin import build_admin_app
from proxy.audit import AuditSink
from proxy.config import Settings
from proxy.control.policy_source import PolicyFileWatcher, PolicyStore
from proxy.control.resolver import Resolver
from proxy.core.addresses import AddressGuard
from proxy.core.hosts import IPAddress, parse_ip_address
from proxy.core.identity import StaticIdentityIndex
from proxy.core.policy.model import Action
from proxy.dataplane.server import LISTEN_BACKLOG, ProxyServer
from proxy.tasks import TaskSet

log = structlog.get_logger(__name__)


def _local_addresses() -> list[IPAddress]:
    """This host's own addresses, best effort: a wildcard listener is reachable on all of them."""
    found: list[IPAddress] = []
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            with contextlib.suppress(ValueError):
                found.append(parse_ip_address(str(info[4][0]).split("%")[0]))
    return found


class App:
    def __init__(self, settings: Settings, *, audit_fd: int = 1) -> None:
        self.settings = settings
        self.audit = AuditSink(audit_fd)
        self.policy = PolicyStore()
        self.watcher = PolicyFileWatcher(
            self.policy,
            list(settings.policy_paths),
            default_action=Action.ALLOW if settings.default_action == "allow" else Action.DENY,
        )
        self.identity = StaticIdentityIndex(settings.static_identities)
        self.resolver = Resolver(
            nameservers=list(settings.dns_nameservers),
            timeout=settings.dns_timeout,
            min_ttl=settings.dns_min_ttl,
            max_ttl=settings.dns_max_ttl,
        )
        self.draining = False
        self.proxy: ProxyServer | None = None
        self._admin_runner: web.AppRunner | None = None
        self._tasks = TaskSet()
        self.proxy_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        error = self.policy.last_error
        detail: dict[str, Any] = {
            "policy_loaded": self.policy.loaded,
            "policy_revision": self.policy.revision,
            "draining": self.draining,
            "last_policy_error": [i.render() for i in error.issues] if error else None,
        }
        return (self.policy.loaded and not self.draining), detail

    def is_ready(self) -> bool:
        return self.policy.loaded and not self.draining

    async def start(self) -> None:
        settings = self.settings
        self.watcher.load_initial()
        self.audit.bind_loop(asyncio.get_running_loop())
        listen = settings.listen
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.create_server(
            (listen.host, listen.port), family=family, backlog=LISTEN_BACKLOG, reuse_port=False
        )
        sock.setblocking(False)
        proxy_port = sock.getsockname()[1]
        admin_app = build_admin_app(
            policy=self.policy, identity=self.identity, readiness=self.readiness
        )
        self._admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, settings.admin.host, settings.admin.port)
        await site.start()
        admin_sock = self._admin_runner.addresses[0]
        self.admin_address = (str(admin_sock[0]), int(admin_sock[1]))
        guard = AddressGuard(
            cluster_cidrs=settings.cluster_cidrs,
            unsafe_allow_cidrs=settings.unsafe_allow_cidrs,
            self_endpoints=[
                (parse_ip_address(listen.host), proxy_port),
                (parse_ip_address(settings.admin.host), self.admin_address[1]),
            ],
            local_addresses=_local_addresses(),
        )
        if settings.unsafe_allow_cidrs:
            log.warning(
                "unsafe_allow_cidrs_in_force",
                cidrs=[str(c) for c in settings.unsafe_allow_cidrs],
                note="the address guard lets these ranges through for every workload",
            )
        self.proxy = ProxyServer(
            settings=settings,
            policy=self.policy,
            identity=self.identity,
            resolver=self.resolver,
            guard=guard,
            audit=self.audit,
            is_ready=self.is_ready,
        )
        self.proxy_address = await self.proxy.start(sock=sock)
        self._tasks.spawn(self.watcher.run(), name="policy file watcher")
        log.info(
            "listening",
            proxy=f"{self.proxy_address[0]}:{self.proxy_address[1]}",
            admin=f"{self.admin_address[0]}:{self.admin_address[1]}",
            policy_revision=self.policy.revision,
            config=settings.source,
        )

    async def stop(self) -> None:
        self.draining = True
        log.info("draining", timeout_seconds=self.settings.timeouts.drain)
        if self.proxy is not None:
            await self.proxy.drain(self.settings.timeouts.drain)
        await self._tasks.cancel_all()
        await self.resolver.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await asyncio.get_running_loop().run_in_executor(None, self.audit.flush_and_stop)
        log.info("stopped")

    async def run_until_signalled(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        await stop.wait()
        await self.stop()

    def _reload(self) -> None:
        log.info("reload_requested", signal="SIGHUP")
        self.watcher.reload()
