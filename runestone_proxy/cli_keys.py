"""``runestone-proxy [--config PATH] keys ...``: manage run-time API keys from a shell.

It uses the service's own configuration and environment (``--config``/``RUNESTONE_CONFIG``,
``RUNESTONE_STATE_DIR``) and nothing else, and opens the store directly, so it works with
the gateway stopped; a running gateway sees each change within its keys refresh interval
(0.5 s, :data:`runestone_proxy.gateway.api_keys.REFRESH_INTERVAL_S`). The rules are the
admin API's (:class:`~runestone_proxy.gateway.api_keys.KeyManager`)::

    keys create --tenant acme [--name N] [--rpm N] [--rph N] [--tpm N] [--max-concurrent N]
                [--budget-usd-day X] [--budget-usd-month X] [--budget-tokens-day N]
        stdout: the new key alone (shown this once); stderr: its id and tenant
    keys list [--tenant T] [--json]     one line per key: id, tenant, status, source,
                                        mask, name (config keys too)
    keys show ID                        the key as JSON (masked)
    keys set ID [--name N] [--rpm N|none] ...   change limits and budgets (none clears)
    keys revoke ID
    keys rotate ID [--grace 24h]        stdout: the new key; the old one works for the grace

Exit status: 0 done; 1 refused (a bad value, an unknown id, a config key, the store
unavailable: the reason on stderr); 2 arguments that do not parse.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import trio

from runestone_proxy import logs
from runestone_proxy.config import Config
from runestone_proxy.errors import GatewayError
from runestone_proxy.gateway.api_key_values import MAX_GRACE_S, KeySettings, apply_settings
from runestone_proxy.gateway.api_keys import KeyManager, key_view
from runestone_proxy.gateway.auth import KeyStore
from runestone_proxy.server.store import Store

__all__ = ["main", "parse_duration"]

#: Flags that set a setting: (flag, field, type).
_SETTINGS: tuple[tuple[str, str, Callable[[str], Any]], ...] = (
    ("--rpm", "rpm", int),
    ("--rph", "rph", int),
    ("--tpm", "tpm", int),
    ("--max-concurrent", "max_concurrent", int),
    ("--budget-usd-day", "budget_usd_day", float),
    ("--budget-usd-month", "budget_usd_month", float),
    ("--budget-tokens-day", "budget_tokens_day", int),
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d`` -> seconds (``argparse`` type)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 15m, 24h, 7d)")
    seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if seconds > MAX_GRACE_S:
        raise argparse.ArgumentTypeError(f"at most {int(MAX_GRACE_S // 86400)}d")
    return seconds


def _same(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return kind


def _nullable(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runestone-proxy keys", description="Manage run-time API keys."
    )
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="make a key for a tenant; prints it once")
    create.add_argument("--tenant", required=True)
    show = sub.add_parser("show", help="one key as JSON (masked)")
    show.add_argument("id")
    update = sub.add_parser("set", help="change a key's name, limits or budgets")
    update.add_argument("id")
    # ``set`` names only the flags given (SUPPRESS: absent otherwise); ``none`` clears one.
    for command, kind, default in (
        (create, _same, None),
        (update, _nullable, argparse.SUPPRESS),
    ):
        command.add_argument("--name", default=default)
        for flag, field, parse in _SETTINGS:
            command.add_argument(flag, dest=field, type=kind(parse), metavar="N", default=default)
    listing = sub.add_parser("list", help="every key, one line each (config keys too)")
    listing.add_argument("--tenant")
    listing.add_argument("--json", action="store_true", help="the admin API's JSON instead")
    revoke = sub.add_parser("revoke", help="revoke a key (401 from the next request)")
    revoke.add_argument("id")
    rotate = sub.add_parser("rotate", help="give a key a new secret; prints it once")
    rotate.add_argument("id")
    rotate.add_argument(
        "--grace",
        type=parse_duration,
        default=86400.0,
        help="how long the old secret keeps working (default 24h; 0 ends it now)",
    )
    return parser


def main(argv: list[str], config: Config, env: Mapping[str, str]) -> int:
    args = _parser().parse_args(argv)
    logs.configure("warning", config.logging.format)
    try:
        return trio.run(_run, args, config, env)
    except* GatewayError as group:  # from the store's nursery: refused, or unavailable
        for exc in group.exceptions:
            message = exc.message if isinstance(exc, GatewayError) else str(exc)
            print(f"runestone-proxy keys: {message}", file=sys.stderr)
    return 1


async def _run(args: argparse.Namespace, config: Config, env: Mapping[str, str]) -> int:
    store = Store.from_config(config, env)
    keys = KeyStore.build(config, env)
    manager = KeyManager(store, keys.runtime, lambda: keys)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        try:
            return await _ACTIONS[args.action](args, manager)
        finally:
            nursery.cancel_scope.cancel()


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings flags given (``set``: a flag given as ``none`` is None, clearing)."""
    given: dict[str, Any] = {}
    for field in ("name", *(f for _flag, f, _parse in _SETTINGS)):
        if hasattr(args, field) and (args.action == "set" or getattr(args, field) is not None):
            given[field] = getattr(args, field)
    return given


def _admin() -> str:
    return "cli"


async def _create(args: argparse.Namespace, manager: KeyManager) -> int:
    settings = apply_settings(KeySettings(), _settings(args))
    created = await manager.create(args.tenant, settings, admin=_admin())
    print(created.secret)
    print(
        f"created {created.key.id} for tenant {created.key.tenant} (the key is shown only once)",
        file=sys.stderr,
    )
    return 0


async def _list(args: argparse.Namespace, manager: KeyManager) -> int:
    views = await manager.list(args.tenant)
    if args.json:
        print(json.dumps({"object": "list", "data": views}, indent=2))
        return 0
    rows = [("ID", "TENANT", "STATUS", "SOURCE", "MASK", "NAME")]
    rows += [
        (v["id"], v["tenant"], v["status"], v["source"], v["mask"], v["name"] or "-") for v in views
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[5])
    return 0


async def _show(args: argparse.Namespace, manager: KeyManager) -> int:
    print(json.dumps(await manager.show(args.id), indent=2))
    return 0


async def _set(args: argparse.Namespace, manager: KeyManager) -> int:
    key = await manager.update(args.id, _settings(args), admin=_admin())
    print(json.dumps(key_view(key, manager.clock()), indent=2))
    return 0


async def _revoke(args: argparse.Namespace, manager: KeyManager) -> int:
    key = await manager.revoke(args.id, admin=_admin())
    print(f"{key.id} revoked")
    return 0


async def _rotate(args: argparse.Namespace, manager: KeyManager) -> int:
    rotated = await manager.rotate(args.id, args.grace, admin=_admin())
    print(rotated.secret)
    until = datetime.fromtimestamp(rotated.key.previous_expires_at or 0, UTC)
    print(
        f"rotated {rotated.key.id}; the old key works until {until:%Y-%m-%d %H:%M:%S} UTC",
        file=sys.stderr,
    )
    return 0


_ACTIONS: dict[str, Callable[[argparse.Namespace, KeyManager], Awaitable[int]]] = {
    "create": _create,
    "list": _list,
    "show": _show,
    "set": _set,
    "revoke": _revoke,
    "rotate": _rotate,
}
