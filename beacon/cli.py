"""Command line: `beacon run` starts the server; other commands talk to its API."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from beacon import __version__
from beacon.config import DURATION_PARSERS, OPTIONS, Config, ConfigError, Option, build_config
from beacon.logs import (
    setup_logging as setup_logging,  # re-exported until proxy/worker.py imports beacon.logs
)


def _add_run_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="start registry, DNS and proxy in one process",
        description="Start Beacon. Every flag may also be set as the BEACON_<NAME> environment variable.",
    )
    for opt in OPTIONS:
        if opt.is_switch:
            run.add_argument(
                opt.flag, dest=opt.name, default=None, nargs="?", const="true",
                metavar="BOOL", help=option_help(opt),
            )
            continue
        run.add_argument(
            opt.flag,
            dest=opt.name,
            default=None,
            action="append" if opt.repeated else "store",
            metavar=opt.metavar or _metavar(opt),
            help=option_help(opt),
        )


def _metavar(opt: Option) -> str | None:
    choices: tuple[str, ...] | None = getattr(opt.parse, "choices", None)
    if choices:
        return "{" + ",".join(choices) + "}"
    return "DURATION" if opt.parse in DURATION_PARSERS else None


def _show_default(opt: Option) -> str:
    value = opt.default
    if value is None or value == "" or value == ():
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if opt.parse in DURATION_PARSERS and isinstance(value, int | float):
        seconds = float(value)
        if seconds >= 60 and seconds % 60 == 0:
            return f"{seconds / 60:g}m"
        return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def option_help(opt: Option) -> str:
    """The flag's help with its default, unit or choices and its environment variable."""
    # Some helps name a computed default themselves ("default: hostname").
    extra = [] if "(default" in opt.help else [f"default {_show_default(opt)}"]
    if opt.parse in DURATION_PARSERS:
        extra.append("a duration: 250ms, 30s, 5m, 1h")
    if opt.repeated:
        extra.append("repeatable; env comma-separated")
    shown = f" ({'; '.join(extra)})" if extra else ""
    return f"{opt.help}{shown} [env {opt.env}]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="beacon", description=__doc__)
    parser.add_argument("--version", action="version", version=f"beacon {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_parser(sub)
    from beacon.client import add_client_commands

    add_client_commands(sub)
    return parser


def run_server(config: Config) -> int:
    from beacon.app import App
    from beacon.registry.store import StoreError

    setup_logging(config.log_level, config.log_format)
    import uvloop

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(App(config).run_until_signal())
    except (OSError, StoreError) as exc:  # a listener's port is taken; the node name is taken
        print(f"beacon: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "run":
        try:
            config = build_config(vars(args))
        except ConfigError as exc:
            print(f"beacon: {exc}", file=sys.stderr)
            return 2
        return run_server(config)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    return int(handler(args))
