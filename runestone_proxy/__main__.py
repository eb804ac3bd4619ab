"""``runestone-proxy`` / ``python -m runestone_proxy``: argv -> config -> logs -> trio.run.

A subcommand (:data:`COMMANDS`) runs instead of the gateway, with the same config and
environment: ``runestone-proxy [--config P] usage --since 24h --by tenant,model``.

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT drained), 2 when the configuration is
invalid (every bad key is printed with the file it came from), 1 on any other failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import trio

from runestone_proxy import __version__, cli_usage, config, logs

#: Subcommands: name -> module with ``HELP``, ``add_arguments(parser)`` and
#: ``run(config, args, env) -> exit status``.
COMMANDS = {"usage": cli_usage}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runestone-proxy",
        description="Runestone: an OpenAI-compatible LLM API gateway.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $RUNESTONE_CONFIG, else ./config.toml, else built-in defaults)",
    )
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    parser.add_argument("--version", action="version", version=f"runestone-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        # ``--config`` after the subcommand too (SUPPRESS: absent, the global one stands).
        sub.add_argument(
            "--config",
            metavar="PATH",
            default=argparse.SUPPRESS,
            help="the config file (as before the command)",
        )
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = config.find_path(args.config, os.environ)
    try:
        cfg = config.load(path, os.environ)
    except config.ConfigError as exc:
        for message in exc.messages:
            print(f"runestone-proxy: config error in {exc.source}: {message}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"runestone-proxy: {path or '<embedded defaults>'}: configuration is valid")
        return 0
    if args.command is not None:
        status: int = COMMANDS[args.command].run(cfg, args, os.environ)
        return status
    logs.configure(cfg.logging.level, cfg.logging.format)
    from runestone_proxy.server import supervisor

    if supervisor.wanted(cfg, os.environ):  # server.workers > 1: supervise, serve nothing
        return supervisor.main(cfg, Path(path) if path else None)
    from runestone_proxy.server.app import serve
    from runestone_proxy.server.systemd import ListenFdsError

    try:
        trio.run(lambda: serve(cfg, config_path=Path(path) if path else None))
    except KeyboardInterrupt:  # a signal that arrived before the handler was installed
        return 0
    except config.ConfigError as exc:  # e.g. a bad RUNESTONE_ALIASES_PATH file
        for message in exc.messages:
            print(f"runestone-proxy: config error in {exc.source}: {message}", file=sys.stderr)
        return 2
    except ListenFdsError as exc:
        print(f"runestone-proxy: socket activation: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the port is taken
        print(f"runestone-proxy: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
