"""`dlopbox watch|interface|client|status|log|verify|loadtest`: one console script for every role."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import typing
from pathlib import Path
from typing import Any

from .lifecycle import configure_logging, serve, version
from .settings import (
    ClientSettings,
    InterfaceSettings,
    SettingsError,
    WatcherSettings,
    markdown_table,
)

_DESCRIPTIONS = {
    "watch": "Watch the master's directory with inotify and post every change to the interface.",
    "interface": "Run the ingestion API: log each event in MongoDB and queue it in RabbitMQ.",
    "client": "Mirror the master's directory on this slave, from RabbitMQ and nginx.",
    "status": "Show every client's last applied seq and lag, as a table (--watch: refreshed in place).",
    "log": "Print the history of a path, a folder or everything from the interface's log (--follow: keep going).",
    "verify": "Compare a directory with the interface's manifest; exit 0 only when equal.",
    "loadtest": "Create many files on the master and measure how fast each client has them.",
    "broker-definitions": "Print the RabbitMQ definitions (vhost, exchange, users, permissions) as JSON.",
    "settings": "Print every DLOPBOX_* variable with its default, as a Markdown table.",
}


def _add_setting_flags(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None) -> None:
    """One flag per settings field; a flag given on the command line beats the environment."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f"{f.metadata['help']} [env {f.metadata['env']}]"}
        if typing.get_origin(kind) is tuple:
            kwargs["type"] = lambda s: tuple(p for p in s.split(",") if p)
        elif kind in (int, float, Path):
            kwargs["type"] = kind
        parser.add_argument(flag, **kwargs)


def _settings(cls: type, args: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls.from_env(**{k: v for k, v in vars(args).items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlopbox", description="Real-time one-way sync from a master directory to many slaves.")
    parser.add_argument("--version", action="version", version=f"dlopbox {version()}")
    parser.add_argument("--log-level", default=os.environ.get("DLOPBOX_LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING or ERROR [env DLOPBOX_LOG_LEVEL]")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=_DESCRIPTIONS[name], description=_DESCRIPTIONS[name])

    _add_setting_flags(command("watch"), WatcherSettings)
    _add_setting_flags(command("interface"), InterfaceSettings)
    _add_setting_flags(command("client"), ClientSettings)

    status = command("status")
    _add_setting_flags(status, ClientSettings, only=("interface_url", "read_token"))
    status.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                        help="Redraw the table in place every SECONDS (default 2) until Ctrl-C.")

    history = command("log")
    _add_setting_flags(history, ClientSettings, only=("interface_url", "read_token"))
    history.add_argument("--path", default=None, metavar="PREFIX",
                         help="Only events touching this path or anything below it (default: everything).")
    history.add_argument("--since", type=int, default=0, metavar="SEQ", help="Only events after this seq.")
    history.add_argument("--follow", action="store_true", help="Keep printing new events as they are logged.")

    verify = command("verify")
    _add_setting_flags(verify, ClientSettings, only=("target", "interface_url", "read_token"))

    loadtest = command("loadtest")
    loadtest.add_argument("--root", type=Path, required=True, help="The master's directory to create files in.")
    loadtest.add_argument("--targets", type=Path, nargs="+", required=True, help="Each client's directory, to time arrival.")
    loadtest.add_argument("--files", type=int, default=1000, help="How many files to create (default 1000).")
    loadtest.add_argument("--size", type=int, default=4096, help="Bytes per file (default 4096).")
    loadtest.add_argument("--rate", type=float, default=0.0, help="Files per second; 0 means as fast as possible.")
    loadtest.add_argument("--json", type=Path, help="Write the full result as JSON here.")
    loadtest.add_argument("--plot", type=Path, help="Write a PNG with the latency CDF and a timeline here.")
    loadtest.add_argument("--pid", action="append", metavar="NAME=PID",
                          help="Report peak RSS and CPU of this process (PID, or container:NAME); repeatable.")
    loadtest.add_argument("--timeout", type=float, default=300.0, help="Give up waiting for arrivals after this many seconds.")

    defs = command("broker-definitions")
    defs.add_argument("--exchange", default=os.environ.get("DLOPBOX_EXCHANGE", "dlopbox.events"))

    command("settings")
    return parser


def _run_service(module: str, settings: Any) -> int:
    mod = importlib.import_module(f"dlopbox.{module}.service")
    serve(lambda stop: mod.run(settings, stop=stop), command=module)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        match args.command:
            case "watch":
                return _run_service("watch", _settings(WatcherSettings, args).require("token"))
            case "interface":
                return _run_service("interface", _settings(InterfaceSettings, args).require("token", "read_token"))
            case "client":
                return _run_service("client", _settings(ClientSettings, args).require("read_token"))
            case "status":
                from .tools.status import status

                settings = _settings(ClientSettings, args).require("read_token")
                return serve(lambda stop: status(settings, watch=args.watch, stop=stop))
            case "log":
                from .tools.log import log

                settings = _settings(ClientSettings, args).require("read_token")
                return serve(lambda stop: log(settings, args.path, args.since, args.follow, stop=stop))
            case "verify":
                tool = importlib.import_module("dlopbox.tools.verify")
                settings = _settings(ClientSettings, args).require("read_token")
                return serve(lambda stop: tool.verify(settings))
            case "loadtest":
                tool = importlib.import_module("dlopbox.tools.loadtest")
                return serve(lambda stop: tool.run(args, stop=stop))
            case "broker-definitions":
                from .broker import definitions_from_env

                print(definitions_from_env(os.environ, exchange=args.exchange))
                return 0
            case "settings":
                print(markdown_table())
                return 0
    except SettingsError as exc:
        print(f"dlopbox {args.command}: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("dlopbox."):
            print(f"dlopbox {args.command}: not available in this build ({exc.name} is missing)", file=sys.stderr)
            return 3
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
