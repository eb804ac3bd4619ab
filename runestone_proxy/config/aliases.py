"""Aliases (``fast``, ``smart``, ``cheap`` ...): what makes a table of them valid.

Aliases live in ``[aliases]`` of config.toml and, optionally, in a separate file named by
``RUNESTONE_ALIASES_PATH`` (read and watched by :mod:`runestone_proxy.server.aliases`). Every
table is checked here before it is installed: when the configuration is loaded
(``Config.__attrs_post_init__``) and when the file changes. Pure: a mapping in, a table or
:class:`AliasError` out. Resolution itself is routing's (``gateway/routing.py``), which
follows at most :data:`MAX_CHAIN` links.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: The longest chain of aliases resolution follows (``fast -> smart -> ...``); validation
#: refuses longer ones, so that every table it accepts resolves to the end.
MAX_CHAIN = 8


class AliasError(ValueError):
    """An alias table that must not be installed; the message names the alias."""


def validate(
    aliases: Mapping[str, object], providers: Iterable[str], model_ids: Iterable[str]
) -> dict[str, str]:
    """Check every alias points at ``provider:model``, a model id, or another alias, with no
    cycles and no chain longer than :data:`MAX_CHAIN`. Returns the table as
    ``dict[str, str]`` or raises :class:`AliasError`."""
    known_providers = set(providers)
    known_models = set(model_ids)
    table: dict[str, str] = {}
    for name, target in aliases.items():
        if not isinstance(target, str) or not target:
            raise AliasError(f"alias {name!r}: target must be a non-empty string")
        table[name] = target
    for name, target in table.items():
        prefix, sep, rest = target.partition(":")
        if sep and prefix in known_providers:
            if not rest:
                raise AliasError(f"alias {name!r}: {target!r} names no model")
            continue
        if target in known_models or target in table:
            continue
        raise AliasError(
            f"alias {name!r}: {target!r} is neither provider:model, a configured model, "
            "nor another alias"
        )
    for name in table:
        seen = [name]
        current = table[name]
        while current in table:
            if current in seen:
                raise AliasError(f"alias cycle: {' -> '.join([*seen, current])}")
            seen.append(current)
            current = table[current]
        if len(seen) > MAX_CHAIN:
            raise AliasError(
                f"alias chain too long ({len(seen)} > {MAX_CHAIN}): {' -> '.join(seen)}"
            )
    return table
