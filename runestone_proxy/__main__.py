"""``runestone-proxy`` / ``python -m runestone_proxy``: argv -> config -> logs -> trio.run.

``runestone-proxy [--config PATH] [--check-config]`` runs the gateway (or only validates its
configuration). ``runestone-proxy [--config PATH] COMMAND ...`` runs one of
:data:`COMMANDS` instead, with the same configuration and environment as the service (e.g.
``keys create --tenant acme``, ``usage --since 24h --by tenant,model``); each is
``main(argv, config, env) -> exit status``. ``--config`` may also follow the command.

Exit status: 0 after a clean shutdown (SIGTERM/SIGINT drained), 2 when the configuration is
invalid (every bad key is printed with the file it came from) or a command's arguments are,
1 on any other failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from runestone_proxy import __version__, cli_keys, cli_usage, config, logs

Command = Callable[[list[str], config.Config, Mapping[str, str]], int]

#: Subcommands: name -> ``main(argv after the name, config, environment) -> exit status``.
COMMANDS: dict[str, Command] = {
    "keys": cli_keys.main,
    "usage": cli_usage.main,
}


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
    parser.add_argument(
        "command",
        nargs="?",
        choices=sorted(COMMANDS),
        help="run a command instead of the gateway (see COMMAND --help)",
    )
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def _config_after_command(args: argparse.Namespace) -> None:
    """``COMMAND ... --config PATH`` (or ``--config=PATH``): the same as before the command;
    taken out of the command's own arguments."""
    rest: list[str] = []
    words = iter(args.args)
    for word in words:
        if word == "--config":
            args.config = next(words, args.config)
        elif word.startswith("--config="):
            args.config = word.partition("=")[2]
        else:
            rest.append(word)
    args.args = rest


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is not None:
        _config_after_command(args)
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
        return COMMANDS[args.command](args.args, cfg, os.environ)
    logs.configure(cfg.logging.level, cfg.logging.format)
    from runestone_proxy.server import supervisor

    if supervisor.wanted(cfg, os.environ):  # server.workers > 1: supervise, serve nothing
        return supervisor.main(cfg, Path(path) if path else None)
    from runestone_proxy.server import heap
    from runestone_proxy.server.app import serve
    from runestone_proxy.server.systemd import ListenFdsError

    heap.tune()  # the collector's settings for a serving process: see server/heap.py
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
