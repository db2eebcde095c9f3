"""Command line: `outgate run`, `check-config`, `explain`, `webhook` and the rest. Only this
module exits the process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog
import yaml

from proxy import __version__, native
from proxy.config import Settings, check_settings, load_settings
from proxy.core.identity import StaticIdentityIndex
from proxy.core.policy.engine import Engine
from proxy.core.policy.loader import load_paths
from proxy.core.policy.model import Action
from proxy.errors import ConfigError, OutgateError

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def configure_logging() -> None:
    """Operational logs: JSON lines on stderr. Stdout carries only audit records."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def _print_config_error(exc: ConfigError) -> None:
    for issue in exc.issues:
        print(f"error: {issue.render()}", file=sys.stderr)


def _build_description() -> str:
    build = native.status()
    return "compiled" if build.compiled else f"pure Python: {build.reason}"


class _Version(argparse.Action):
    """`--version`: the version and the build, unwrapped (argparse's own action wraps lines)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(f"outgate {__version__} ({_build_description()})")
        parser.exit()


def _log_build() -> None:
    """Once a start, when the configuration is valid (with workers, by the supervisor): compiled
    modules or pure Python, and why (proxy/native.py)."""
    structlog.get_logger("proxy.native").info("build", **native.status().fields())


def _cmd_run(args: argparse.Namespace) -> int:
    from proxy.app import App

    try:
        settings = load_settings(args.config)
        if settings.workers > 1:
            from proxy import supervisor

            if not supervisor.in_worker():
                return supervisor.Supervisor(settings, config=args.config).run()
            settings = supervisor.worker_settings(settings)
        app = App(settings)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_INVALID
    if settings.workers == 1:  # with workers, the supervisor says it once
        _log_build()

    async def main() -> None:
        await app.run_until_signalled()

    import uvloop  # a dependency: libuv's loop roughly halves per-connection CPU

    try:
        uvloop.run(main())
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_INVALID
    return EXIT_OK


def _cmd_webhook(args: argparse.Namespace) -> int:
    from proxy.webhook.config import load_webhook_settings
    from proxy.webhook.server import serve_until_signalled

    try:
        settings = load_webhook_settings(Path(args.config))
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_INVALID
    try:
        asyncio.run(serve_until_signalled(settings))
    except (OSError, ssl.SSLError) as exc:  # the port is taken, the certificate unreadable
        print(f"error: outgate webhook: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


def _is_policy_file(path: Path) -> bool:
    """A directory, or a YAML file whose documents carry an outgate.dev apiVersion."""
    if path.is_dir():
        return True
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError):
        return path.suffix in (".yaml", ".yml") and "policies" in path.parts
    return any(isinstance(d, dict) and "apiVersion" in d for d in docs)


def _engine_for(settings: Settings, extra_policy_paths: Sequence[Path] = ()) -> Engine:
    policies = load_paths([*settings.policy_paths, *extra_policy_paths])
    action = Action.ALLOW if settings.default_action == "allow" else Action.DENY
    return Engine.compile(policies, default_action=action, revision=1)


def _cmd_check_config(args: argparse.Namespace) -> int:
    """Every problem in every file, the config's own and those of the policies it names: a
    config error does not stop the policies from being checked."""
    failed = False
    for raw in args.paths:
        path = Path(raw)
        try:
            if _is_policy_file(path):
                policies = load_paths([path])
                rules = sum(len(p.rules) for p in policies)
                print(f"ok: {path}: {len(policies)} policies, {rules} rules")
                continue
            settings, issues = check_settings(path)
            if issues:
                failed = True
                _print_config_error(ConfigError(issues))
            if settings is None:
                continue
            engine = _engine_for(settings)
            if not issues and not _password_file_loads(settings):
                failed = True
                continue
            if not issues:
                print(
                    f"ok: {path}: config valid; {len(engine.policies)} policies, "
                    f"{engine.rule_count} rules from {len(settings.policy_paths)} policy paths"
                )
        except ConfigError as exc:
            failed = True
            _print_config_error(exc)
    return EXIT_INVALID if failed else EXIT_OK


def _password_file_loads(settings: Settings) -> bool:
    """The proxy-auth password file (auth.basic.file) loads as `run` would load it at start."""
    from proxy.app import build_password_file

    try:
        build_password_file(settings)
    except ConfigError as exc:
        _print_config_error(exc)
        return False
    return True


def _cmd_explain(args: argparse.Namespace) -> int:
    import asyncio

    from proxy.app import build_guard, build_resolver
    from proxy.control.policy_source import PolicyStore
    from proxy.dataplane.proxy_auth import LoggedInIdentity, LoginScope
    from proxy.dataplane.router import Router
    from proxy.dataplane.transparent import transparent_listeners
    from proxy.explainer import explain, explain_route

    try:
        settings = load_settings(args.config)
        engine = _engine_for(settings, [Path(p) for p in args.policies])
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_INVALID
    login = None if settings.auth_basic is None else LoginScope(settings.auth_basic)
    identity = LoggedInIdentity(StaticIdentityIndex(settings.static_identities), login, args.user)
    store = PolicyStore()
    store.install(engine)
    # The configured ports stand in for bound ones (0 means "any": nothing to exclude).
    guard = build_guard(
        settings,
        proxy_port=settings.listen.port,
        admin_port=settings.admin.port,
        transparent=[
            (listener.host, listener.bind_port)
            for listener in transparent_listeners(settings.transparent)
        ],
    )
    resolver = build_resolver(settings)
    router = Router(policy=store, resolver=resolver, guard=guard, routes=settings.routes)

    async def run() -> tuple[str, dict[str, object]]:
        try:
            if args.resolve:
                return await explain_route(
                    router, identity, source=args.source, url=args.url, listener=args.listener
                )
            return explain(
                router, identity, source=args.source, url=args.url, listener=args.listener
            )
        finally:
            await resolver.close()

    try:
        text, _ = asyncio.run(run())
    except OutgateError as exc:
        print(f"error: {exc.message} ({exc.reason})", file=sys.stderr)
        return EXIT_USAGE
    print(text, end="" if text.endswith("\n") else "\n")
    return EXIT_OK


def _cmd_ca_init(args: argparse.Namespace) -> int:
    import datetime

    from proxy.tls.ca import CA_VALIDITY, DEFAULT_COMMON_NAME, init_ca

    if args.days is not None and args.days < 1:
        print("error: --days must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    directory = Path(args.dir)
    try:
        cert, key = init_ca(
            directory,
            common_name=args.common_name or DEFAULT_COMMON_NAME,
            validity=datetime.timedelta(days=args.days) if args.days else CA_VALIDITY,
            force=args.force,
        )
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(f"wrote {cert} (CA certificate) and {key} (private key, mode 0600)")
    print("load them into a Secret for the proxy:")
    print(f"  kubectl create secret tls outgate-ca --cert={cert} --key={key}")
    print("mount it and point the proxy config at the files:")
    print("  tls: {caCert: /etc/outgate/ca/tls.crt, caKey: /etc/outgate/ca/tls.key}")
    print(f"inspected workloads must trust {cert} (the certificate only, never the key)")
    return EXIT_OK


# import-squid wrote the policies, but some lines could not be translated (listed on stderr).
EXIT_PARTIAL = 3


def _cmd_import_squid(args: argparse.Namespace) -> int:
    from proxy.adoption.squid_import import ImportOptions, import_squid
    from proxy.core.policy.model import Mode

    options = ImportOptions(
        cluster_sources=frozenset(args.cluster_src),
        static_namespace=args.static_namespace,
        priority=args.priority,
        prefix=args.prefix,
        mode=Mode(args.mode),
    )
    try:
        result = import_squid(args.squid_conf, options)
    except OSError as exc:
        where = exc.filename or args.squid_conf
        print(f"error: cannot read {where}: {exc.strerror}", file=sys.stderr)
        return EXIT_INVALID
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.output:
        Path(args.output).write_text(result.policies_yaml, encoding="utf-8")
    else:
        sys.stdout.write(result.policies_yaml)
    if args.config_out:
        Path(args.config_out).write_text(
            yaml.safe_dump(result.config, sort_keys=False), encoding="utf-8"
        )
    for finding in result.findings:
        print(finding.render(), file=sys.stderr)
    untranslated = len(result.untranslated)
    print(
        f"import-squid: {result.policy_count} policies from {len(result.files)} files; "
        f"{untranslated} untranslated, {len(result.warnings)} warnings",
        file=sys.stderr,
    )
    return EXIT_PARTIAL if untranslated else EXIT_OK


def _cmd_suggest(args: argparse.Namespace) -> int:
    from proxy.adoption.suggest import SuggestOptions, static_identity_labels, suggest
    from proxy.core.policy.model import Mode

    static_labels: dict[tuple[str, str], dict[str, str]] = {}
    if args.config:
        try:
            settings = load_settings(args.config)
        except ConfigError as exc:
            _print_config_error(exc)
            return EXIT_INVALID
        static_labels = static_identity_labels(settings.static_identities)
    options = SuggestOptions(
        wildcard_threshold=args.wildcard_threshold,
        mode=Mode(args.mode),
        include_denied=args.include_denied,
        selector_label=args.selector_label,
        static_labels=static_labels,
    )
    sources = args.records or ["-"]
    try:
        lines = _record_lines(sources)
        result = suggest(lines, options)
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_INVALID
    text = result.to_yaml()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    print(
        f"suggest: {result.records} decision records, {len(result.workloads)} policies "
        f"({len(result.without_rules)} workloads with only refused requests)",
        file=sys.stderr,
    )
    return EXIT_OK


def _record_lines(sources: Sequence[str]) -> Iterator[bytes]:
    for source in sources:
        if source == "-":
            yield from sys.stdin.buffer
        else:
            with open(source, "rb") as file:
                yield from file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outgate", description=__doc__)
    parser.add_argument("--version", action=_Version, nargs=0, help="print the version and build")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the proxy")
    run.add_argument("--config", help="config file (default: the embedded laptop config)")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate config and policy files")
    check.add_argument("paths", nargs="+", help="config files, policy files or directories")
    check.set_defaults(func=_cmd_check_config)

    hook = sub.add_parser(
        "webhook",
        help="serve the admission webhooks (policy validation, proxy settings for pods)",
        description="A separate process on its own port (docs/webhooks.md).",
    )
    hook.add_argument("--config", required=True, help="the webhook's settings file")
    hook.set_defaults(func=_cmd_webhook)

    exp = sub.add_parser("explain", help="show how policy decides a URL for a source")
    exp.add_argument("--source", required=True, help="source IP (a pod or static identity)")
    exp.add_argument(
        "--url", required=True, help="https://host/path, http://host:port/ or host:port"
    )
    exp.add_argument("--config", help="config file (default: the embedded config)")
    exp.add_argument("--policies", nargs="*", default=[], help="extra policy files/directories")
    exp.add_argument(
        "--user",
        help="for a source in auth.basic.sources: the proxy-auth user it logs in as "
        "(its static identity decides)",
    )
    exp.add_argument(
        "--resolve",
        action="store_true",
        help="also resolve the name (the config's dns.nameservers) and show the decision per "
        "address and what the address guard drops",
    )
    exp.add_argument(
        "--listener",
        choices=["proxy", "transparent-tls", "transparent-http", "port-map"],
        help="the listener the connection arrives on (docs/transparent-mode.md): shown, with "
        "what it changes (the TLS listener refuses an IP literal before any decision)",
    )
    exp.set_defaults(func=_cmd_explain)

    ca = sub.add_parser("ca", help="the interception CA (TLS inspection)")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    init = ca_sub.add_parser(
        "init", help="create a CA: DIR/tls.crt and DIR/tls.key (0600), a kubernetes.io/tls pair"
    )
    init.add_argument("--dir", default=".", help="where to write tls.crt and tls.key")
    init.add_argument("--common-name", default=None, help="the CA's subject CN")
    init.add_argument("--days", type=int, default=None, help="validity (default: 730)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(func=_cmd_ca_init)

    squid = sub.add_parser(
        "import-squid",
        help="translate a squid.conf into policies (YAML on stdout, findings on stderr)",
        description="Exit 0: everything translated; 3: policies written, some lines not "
        "translated (each listed with its line); 1: the file cannot be read.",
    )
    squid.add_argument("squid_conf", help="the squid.conf (include files are followed)")
    squid.add_argument("-o", "--output", help="write the policies here instead of stdout")
    squid.add_argument(
        "--config-out", help="write the runtime-config fragment (listen, identities...) here"
    )
    squid.add_argument(
        "--cluster-src",
        action="append",
        default=[],
        metavar="ACL",
        help="a src ACL that means the cluster's pods: selects every known workload "
        "(repeatable; default: src ACLs become static identities)",
    )
    squid.add_argument("--static-namespace", default="squid-clients", help="for src identities")
    squid.add_argument("--priority", type=int, default=100, help="admin-tier priority (0..1000)")
    squid.add_argument("--prefix", default="squid", help="policy name prefix")
    squid.add_argument(
        "--mode",
        choices=["enforce", "audit"],
        default="enforce",
        help="audit: the policies only set shadow decisions, for a trial before the cut-over",
    )
    squid.set_defaults(func=_cmd_import_squid)

    sug = sub.add_parser(
        "suggest",
        help="suggest per-workload policies from audit records (files, or stdin)",
    )
    sug.add_argument("records", nargs="*", help="audit record files; - or nothing for stdin")
    sug.add_argument("-o", "--output", help="write the policies here instead of stdout")
    sug.add_argument(
        "--wildcard-threshold",
        type=int,
        default=5,
        metavar="N",
        help="collapse names to *.parent when N or more sit under one parent (0: never)",
    )
    sug.add_argument("--mode", choices=["audit", "enforce"], default="audit")
    sug.add_argument("--include-denied", action="store_true", help="also allow what policy denied")
    sug.add_argument(
        "--selector-label", default="app", help="pod label whose value is the owner's name"
    )
    sug.add_argument("--config", help="runtime config: static identities' labels for selectors")
    sug.set_defaults(func=_cmd_suggest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
