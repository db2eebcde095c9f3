"""Composition root: builds every part from Settings and owns the start and stop order.

Start: load policy (a bad policy at start is fatal: fail closed) -> bind the proxy socket ->
build the guard with the bound ports -> start the proxy and admin listeners -> watch policy.
Stop (SIGTERM): readiness fails at once -> stop accepting -> drain up to timeouts.drain ->
cancel what is left (close records say `drained`) -> flush the audit log.

Kubernetes (issue 3), when `identity.kubernetes` or `policies.kubernetes` is on: the client is
built from `identity.kubeconfig`, else in-cluster, when the App is built (a bad kubeconfig is a
config error at start). The informers start after the first policy load and never block the
start: until the pod and namespace informers (and, for cluster policies, both policy kinds)
have synced, /readyz fails and the proxy answers 503. Identity is looked up in the pod index
first, then in the static identities (proxy.control.kube.informers says why). When a pod
leaves the index, every connection from its IPs is closed with reason `source_gone`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import socket
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from aiohttp import web

from proxy import metrics, native
from proxy.admin import build_admin_app
from proxy.adoption.suggest import SuggestOptions, static_identity_labels
from proxy.audit import AuditSink
from proxy.config import Settings
from proxy.control.kube.runtime import KubeControlPlane
from proxy.control.password_file import PasswordFile
from proxy.control.policy_source import PolicyFileWatcher, PolicyStore
from proxy.control.resolver import Resolver, hosts_file
from proxy.core.addresses import AddressGuard
from proxy.core.hosts import IPAddress, parse_ip_address
from proxy.core.identity import IdentityLookup, StaticIdentityIndex
from proxy.core.policy.model import Action
from proxy.dataplane.dialer import Dialer, DirectDialer, RoutingDialer
from proxy.dataplane.exchange_log import ExchangeLog
from proxy.dataplane.http_relay import HttpRelay
from proxy.dataplane.inspector import RequestInspector
from proxy.dataplane.intercept import Interceptor
from proxy.dataplane.kernel_splice import Splicer
from proxy.dataplane.limits import LoadMeter
from proxy.dataplane.proxy_auth import LoggedInIdentity, LoginScope, ProxyAuth
from proxy.dataplane.proxy_header import ProxyHeaderAdmission
from proxy.dataplane.router import Router
from proxy.dataplane.server import LISTEN_BACKLOG, ProxyServer
from proxy.dataplane.transparent import TransparentServer, transparent_listeners
from proxy.dataplane.tunnel import TunnelRelay
from proxy.dataplane.upgrade import UpgradeRelay
from proxy.dataplane.upstream import ParentDialer
from proxy.errors import ConfigError, ConfigIssue, Reason
from proxy.tasks import TaskSet
from proxy.tls.ca import load_ca
from proxy.tls.certs import CertCache
from proxy.traffic import TrafficAggregate
from proxy.ui import UiSources, load_token

log = structlog.get_logger(__name__)

# Descriptors beyond two per connection: listeners, the admin server, DNS sockets, policy files.
FD_RESERVE = 64


def _local_addresses() -> list[IPAddress]:
    """This host's own addresses, best effort: a wildcard listener is reachable on all of them."""
    found: list[IPAddress] = []
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None):
            with contextlib.suppress(ValueError):
                found.append(parse_ip_address(str(info[4][0]).split("%")[0]))
    return found


def _cert_cache(settings: Settings) -> CertCache | None:
    """The leaf cache when `tls.caCert` and `tls.caKey` are set; without them, a rule with
    `inspect` refuses its CONNECTs (502, intercept_handshake_failed) rather than splicing."""
    cert, key = settings.tls_ca_cert, settings.tls_ca_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        missing = "tls.caCert" if cert is None else "tls.caKey"
        raise ConfigError(
            [
                ConfigIssue(
                    file=settings.source,
                    document=None,
                    path=missing,
                    message="tls.caCert and tls.caKey go together",
                    fix=f"set {missing} too, or remove both",
                )
            ]
        )
    ca = load_ca(cert, key, source=settings.source)
    return CertCache(ca, size=settings.tls_cert_cache_size)


def _listen(host: str, port: int, *, workers: int) -> socket.socket:
    """A bound, listening, non-blocking socket; with `workers` above 1 every worker listens on
    the same port (SO_REUSEPORT, proxy.supervisor)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server(
        (host, port), family=family, backlog=LISTEN_BACKLOG, reuse_port=workers > 1
    )
    sock.setblocking(False)
    return sock


def build_resolver(settings: Settings) -> Resolver:
    """The resolver of the `dns` settings (proxy.control.resolver)."""
    return Resolver(
        nameservers=list(settings.dns_nameservers),
        timeout=settings.dns_timeout,
        min_ttl=settings.dns_min_ttl,
        max_ttl=settings.dns_max_ttl,
        hosts=None if settings.dns_hosts_file is None else hosts_file(settings.dns_hosts_file),
    )


def build_guard(
    settings: Settings,
    *,
    proxy_port: int,
    admin_port: int,
    transparent: Sequence[tuple[str, int]] = (),
) -> AddressGuard:
    """The address guard of DESIGN section 4 for these settings and the listeners' ports
    (`transparent`: the transparent listeners' bound addresses, issue 13)."""
    return AddressGuard(
        cluster_cidrs=settings.cluster_cidrs,
        unsafe_allow_cidrs=settings.unsafe_allow_cidrs,
        self_endpoints=[
            (parse_ip_address(settings.listen.host), proxy_port),
            (parse_ip_address(settings.admin.host), admin_port),
            *((parse_ip_address(host), port) for host, port in transparent),
        ],
        local_addresses=_local_addresses(),
    )


def build_parents(settings: Settings) -> dict[str, Dialer]:
    """One dialer per configured upstream (issue 12), by name."""
    return {
        spec.name: ParentDialer(spec, max_head_bytes=settings.limits.max_header_bytes)
        for spec in settings.upstreams
    }


def build_proxy(
    settings: Settings,
    *,
    router: Router,
    identity: IdentityLookup,
    audit: AuditSink,
    certs: CertCache | None,
    is_ready: Callable[[], bool],
    dialer: Dialer | None = None,
    passwords: PasswordFile | None = None,
) -> ProxyServer:
    """The proxy listener's server (`build_data_plane`, without the transparent listeners)."""
    return build_data_plane(
        settings,
        router=router,
        identity=identity,
        audit=audit,
        certs=certs,
        is_ready=is_ready,
        dialer=dialer,
        passwords=passwords,
    )[0]


def build_data_plane(
    settings: Settings,
    *,
    router: Router,
    identity: IdentityLookup,
    audit: AuditSink,
    certs: CertCache | None,
    is_ready: Callable[[], bool],
    dialer: Dialer | None = None,
    passwords: PasswordFile | None = None,
    traffic: TrafficAggregate | None = None,
) -> tuple[ProxyServer, TransparentServer]:
    """The data plane's parts, each handed the ones it uses (docs/architecture.md): the proxy
    listener's server and the transparent listeners' (issue 13), sharing the same Router,
    Dialer, ExchangeLog and relays. `dialer` replaces the direct one (tests hand in one that
    fails on demand); with upstreams configured, a RoutingDialer sends each route the way its
    `via` names. `passwords` is the proxy-auth password file when `auth.basic` is configured
    (`build_password_file`); it concerns the proxy listener only. `traffic` is the live
    aggregate the ExchangeLog feeds (the admin page reads it)."""
    direct = (
        dialer if dialer is not None else DirectDialer(connect_timeout=settings.timeouts.connect)
    )
    if settings.upstreams:
        dialer = RoutingDialer(direct=direct, upstreams=build_parents(settings))
    else:
        dialer = direct
    log = ExchangeLog(audit=audit, identity=identity, traffic=traffic)
    upgrades = UpgradeRelay(timeouts=settings.timeouts, log=log)
    relay = HttpRelay(settings=settings, log=log, upgrades=upgrades)
    inspector = RequestInspector(settings=settings)
    # The same trusted balancers may front every listener (docs/transparent-mode.md).
    proxy_header = ProxyHeaderAdmission(
        trusted=settings.proxy_protocol_trusted_cidrs, timeout=settings.timeouts.header
    )
    interceptor = Interceptor(
        settings=settings,
        certs=certs,
        router=router,
        dialer=dialer,
        log=log,
        relay=relay,
        inspector=inspector,
    )
    tunnels = TunnelRelay(
        timeouts=settings.timeouts,
        router=router,
        log=log,
        interceptor=interceptor,
        splicer=Splicer(
            max_tunnels=settings.limits.splice_max_tunnels,
            after_bytes=settings.limits.splice_after_bytes,
        ),
    )
    # One loop, one measure of how far behind it runs: every listener sheds on it.
    load = LoadMeter()
    proxy = ProxyServer(
        settings=settings,
        router=router,
        dialer=dialer,
        log=log,
        relay=relay,
        tunnels=tunnels,
        inspector=inspector,
        audit=audit,
        is_ready=is_ready,
        proxy_header=proxy_header,
        load=load,
        auth=None
        if settings.auth_basic is None or passwords is None
        else ProxyAuth(settings.auth_basic, passwords),
    )
    transparent = TransparentServer(
        settings=settings,
        router=router,
        dialer=dialer,
        log=log,
        relay=relay,
        tunnels=tunnels,
        inspector=inspector,
        proxy_header=proxy_header,
        login=None if settings.auth_basic is None else LoginScope(settings.auth_basic),
        audit=audit,
        is_ready=is_ready,
        load=load,
    )
    return proxy, transparent


def build_password_file(settings: Settings) -> PasswordFile | None:
    """The proxy-auth password file of `auth.basic`, loaded now: one that does not load is a
    ConfigError at start (fail closed); later, a bad version keeps the last good one."""
    if settings.auth_basic is None:
        return None
    passwords = PasswordFile(settings.auth_basic.file)
    if not passwords.load():
        raise ConfigError(
            [
                ConfigIssue(
                    file=settings.source,
                    document=None,
                    path="auth.basic.file",
                    message=f"{settings.auth_basic.file}: {passwords.watched.last_error}",
                    fix="point it at a readable htpasswd file of bcrypt hashes (htpasswd -B)",
                )
            ]
        )
    return passwords


class App:
    def __init__(self, settings: Settings, *, audit_fd: int = 1) -> None:
        self.settings = settings
        self.audit = AuditSink(audit_fd)
        self.audit.configure(settings)  # audit.format: json | squid | both
        self.policy = PolicyStore()
        self.watcher = PolicyFileWatcher(
            self.policy,
            list(settings.policy_paths),
            default_action=Action.ALLOW if settings.default_action == "allow" else Action.DENY,
        )
        self.identity: IdentityLookup = StaticIdentityIndex(settings.static_identities)
        self.kube: KubeControlPlane | None = None
        if settings.identity_kubernetes or settings.policy_kubernetes:
            self.kube = KubeControlPlane.from_settings(
                settings,
                static=self.identity,
                store=self.policy,
                on_source_gone=self._source_gone,
            )
            self.identity = self.kube.identity
        # Issue 4: the interception CA, loaded (and checked) at start: a bad pair is a config error.
        self.certs = _cert_cache(settings)
        self.resolver = build_resolver(settings)
        self.passwords = build_password_file(settings)  # auth.basic; a bad file is fatal here
        self.ui_token = load_token(settings)  # ui.tokenFile; a bad file is fatal here
        self.traffic = TrafficAggregate(
            top=settings.traffic_top_destinations,
            max_workloads=settings.traffic_max_workloads,
            metric_destinations=settings.traffic_metric_destinations,
        )
        self.draining = False
        self.router: Router | None = None  # built in start(): the guard needs the bound ports
        self.proxy: ProxyServer | None = None
        self.transparent: TransparentServer | None = None
        self._admin_runner: web.AppRunner | None = None
        self._tasks = TaskSet()
        self.proxy_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        error = self.policy.last_error
        detail: dict[str, Any] = {
            "policy_loaded": self.policy.loaded,
            "policy_revision": self.policy.revision,
            "policy_digest": self.policy.engine.digest,
            "draining": self.draining,
            "last_policy_error": [i.render() for i in error.issues] if error else None,
        }
        if self.kube is not None:
            detail["kubernetes"] = self.kube.readiness_detail()
        return self.is_ready(), detail

    def is_ready(self) -> bool:
        """Readiness: able to decide, and not draining (the Service sends nothing new)."""
        return self.can_decide() and not self.draining

    def can_decide(self) -> bool:
        """What the data plane asks before each decision: policy and identity are loaded. A
        draining proxy still decides the requests on connections it took before it stopped
        accepting."""
        kube_synced = self.kube is None or self.kube.synced
        return self.policy.loaded and kube_synced

    def _source_gone(self, ip: IPAddress, pod: str) -> None:
        """A pod's IP left it: close what is open from that IP (it may be someone else's)."""
        if self.proxy is None:
            return
        closed = self.proxy.close_connections_from(ip, Reason.SOURCE_GONE)
        if self.transparent is not None:
            closed += self.transparent.close_connections_from(ip, Reason.SOURCE_GONE)
        if closed:
            metrics.POD_SOURCE_GONE_CLOSES.inc(closed)
            log.info("source_gone_connections_closed", ip=str(ip), pod=pod, connections=closed)

    def _raise_file_limit(self) -> None:
        """Every client and upstream socket is a descriptor: take the hard limit, and say so
        when even that cannot hold maxConnections (each needs two, plus listeners and DNS)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
        needed = 2 * self.settings.limits.max_connections + FD_RESERVE
        if soft < needed:
            log.warning(
                "file_descriptor_limit_low",
                limit=soft,
                needed=needed,
                effect="past the limit new connections are dropped by the kernel until "
                "descriptors free up; lower limits.maxConnections or raise the limit",
            )

    async def start(self) -> None:
        settings = self.settings
        self._raise_file_limit()
        self.watcher.load_initial()
        self.audit.bind_loop(asyncio.get_running_loop())
        if self.kube is not None:
            self.kube.start(self._tasks)
            log.info("kube_informers_started", api=self.kube.client.config.server)
        # Both listeners are bound first: the guard must know their ports (the proxy never
        # dials itself), and the admin app's /explain asks the router that guard belongs to.
        sock = _listen(settings.listen.host, settings.listen.port, workers=settings.workers)
        admin_sock = _listen(settings.admin.host, settings.admin.port, workers=settings.workers)
        listeners = transparent_listeners(settings.transparent)
        transparent_socks = [
            (listener, _listen(listener.host, listener.bind_port, workers=settings.workers))
            for listener in listeners
        ]
        proxy_port = sock.getsockname()[1]
        admin_port = admin_sock.getsockname()[1]
        guard = build_guard(
            settings,
            proxy_port=proxy_port,
            admin_port=admin_port,
            transparent=[
                (listener.host, int(bound.getsockname()[1]))
                for listener, bound in transparent_socks
            ],
        )
        self.router = Router(
            policy=self.policy, resolver=self.resolver, guard=guard, routes=settings.routes
        )
        login = None if settings.auth_basic is None else LoginScope(settings.auth_basic)
        ui = None
        if settings.ui_enabled:
            ui = UiSources(
                router=self.router,
                traffic=self.traffic,
                readiness=self.readiness,
                audit_backlog=lambda: self.audit.backlog_bytes,
                suggest_options=SuggestOptions(
                    static_labels=static_identity_labels(settings.static_identities),
                    guard=guard,
                ),
                identity=LoggedInIdentity(self.identity, login, None),
            )
        admin_app = build_admin_app(
            router=self.router,
            identity=self.identity,
            readiness=self.readiness,
            login=login,
            ui=ui,
            ui_token=self.ui_token,
        )
        self._admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        await web.SockSite(self._admin_runner, admin_sock).start()
        self.admin_address = (str(admin_sock.getsockname()[0]), admin_port)
        if settings.unsafe_allow_cidrs:
            log.warning(
                "unsafe_allow_cidrs_in_force",
                cidrs=[str(c) for c in settings.unsafe_allow_cidrs],
                note="the address guard lets these ranges through for every workload",
            )
        self.proxy, self.transparent = build_data_plane(
            settings,
            router=self.router,
            identity=self.identity,
            audit=self.audit,
            certs=self.certs,
            is_ready=self.can_decide,
            passwords=self.passwords,
            traffic=self.traffic,
        )
        self.proxy_address = await self.proxy.start(sock=sock)
        serving = await self.transparent.start(transparent_socks)
        self._tasks.spawn(self.watcher.run(), name="policy file watcher")
        if self.passwords is not None:
            self._tasks.spawn(self.passwords.watched.run(), name="proxy auth file watcher")
        if self.resolver.hosts is not None:
            self._tasks.spawn(self.resolver.hosts.run(), name="hosts file watcher")
        # Everything built so far (modules, config, the first policy) lives as long as the
        # process: keep it out of the cyclic collector's full passes, which otherwise walk all
        # of it every few thousand requests (bench/README.md, "what limits it").
        gc.collect()
        gc.freeze()
        metrics.BUILD_INFO.labels(build=native.status().fields()["build"]).set(1)
        log.info(
            "listening",
            proxy=f"{self.proxy_address[0]}:{self.proxy_address[1]}",
            admin=f"{self.admin_address[0]}:{self.admin_address[1]}",
            policy_revision=self.policy.revision,
            # Issue 13: each transparent listener by kind, e.g. "transparent-tls": "0.0.0.0:8443"
            # (port maps: "port-map 0.0.0.0:15432" -> where it listens).
            transparent={listener.name: f"{host}:{port}" for listener, (host, port) in serving},
            config=settings.source,
            pid=os.getpid(),  # with `workers` above 1, which worker this is
        )

    async def stop(self) -> None:
        self.draining = True
        log.info("draining", timeout_seconds=self.settings.timeouts.drain)
        # Both servers stop accepting first, then drain side by side within one timeout.
        if self.transparent is not None:
            self.transparent.stop_accepting()
        drains = [
            server.drain(self.settings.timeouts.drain)
            for server in (self.transparent, self.proxy)
            if server is not None
        ]
        await asyncio.gather(*drains)
        await self._tasks.cancel_all()
        if self.kube is not None:
            await self.kube.close()
        await self.resolver.close()
        if self.certs is not None:
            self.certs.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        await asyncio.get_running_loop().run_in_executor(None, self.audit.flush_and_stop)
        log.info("stopped")

    async def run_until_signalled(self) -> None:
        # Handlers first: a signal that arrives while starting (an orchestrator's early SIGTERM,
        # a SIGHUP right after "listening") must not meet the default action, which kills.
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGUSR1, self.audit.reopen)
        await self.start()
        await stop.wait()
        await self.stop()

    def _reload(self) -> None:
        log.info("reload_requested", signal="SIGHUP")
        self.watcher.reload()
