"""Command line: `outgate run`, `check-config`, `explain`. Only this module exits the process."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog
import yaml

from proxy import __version__
from proxy.config import Settings, load_settings
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


def _cmd_run(args: argparse.Namespace) -> int:
    from proxy.app import App

    try:
        settings = load_settings(args.config)
        app = App(settings)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_INVALID

    async def main() -> None:
        await app.run_until_signalled()

    import uvloop  # a dependency: libuv's loop roughly halves per-connection CPU

    try:
        uvloop.run(main())
    except ConfigError as exc:
        _print_config_error(exc)
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
    failed = False
    for raw in args.paths:
        path = Path(raw)
        try:
            if _is_policy_file(path):
                policies = load_paths([path])
                rules = sum(len(p.rules) for p in policies)
                print(f"ok: {path}: {len(policies)} policies, {rules} rules")
            else:
                settings = load_settings(path)
                engine = _engine_for(settings)
                print(
                    f"ok: {path}: config valid; {len(engine.policies)} policies, "
                    f"{engine.rule_count} rules from {len(settings.policy_paths)} policy paths"
                )
        except ConfigError as exc:
            failed = True
            _print_config_error(exc)
    return EXIT_INVALID if failed else EXIT_OK


def _cmd_explain(args: argparse.Namespace) -> int:
    from proxy.explainer import explain

    try:
        settings = load_settings(args.config)
        engine = _engine_for(settings, [Path(p) for p in args.policies])
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_INVALID
    identity = StaticIdentityIndex(settings.static_identities)
    try:
        text, _ = explain(engine, identity, source=args.source, url=args.url)
    except OutgateError as exc:
        print(f"error: {exc.message} ({exc.reason})", file=sys.stderr)
        return EXIT_USAGE
    print(text, end="" if text.endswith("\n") else "\n")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"outgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="start the proxy")
    run.add_argument("--config", help="config file (default: the embedded laptop config)")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate config and policy files")
    check.add_argument("paths", nargs="+", help="config files, policy files or directories")
    check.set_defaults(func=_cmd_check_config)

    exp = sub.add_parser("explain", help="show how policy decides a URL for a source")
    exp.add_argument("--source", required=True, help="source IP (a pod or static identity)")
    exp.add_argument(
        "--url", required=True, help="https://host/path, http://host:port/ or host:port"
    )
    exp.add_argument("--config", help="config file (default: the embedded config)")
    exp.add_argument("--policies", nargs="*", default=[], help="extra policy files/directories")
    exp.set_defaults(func=_cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
