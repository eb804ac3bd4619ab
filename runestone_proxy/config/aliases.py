"""Aliases (``fast``, ``smart``, ``cheap`` ...) and model-name patterns: what makes them valid.

Aliases live in ``[aliases]`` of config.toml and, optionally, in a separate file named by
``RUNESTONE_ALIASES_PATH`` (read and watched by :mod:`runestone_proxy.server.aliases`). Every
table is checked here before it is installed: when the configuration is loaded
(``Config.__attrs_post_init__``) and when the file changes. Pure: a mapping in, a table or
:class:`AliasError` out. Resolution itself is routing's (``gateway/routing.py``), which
follows at most :data:`MAX_CHAIN` links.

A name containing ``*`` or ``?`` is a pattern (:func:`is_pattern`), matched by
:func:`matches`: ``*`` any run of characters, ``?`` one, everything else literal and
case-sensitive (no ``[...]`` classes, unlike :mod:`fnmatch`). An alias key may be a pattern
(``"claude-*haiku*" = "local:qwen3-coder"``), and so may a provider's ``model_patterns``;
their targets are checked like any alias's. A pattern is never the target of another alias:
targets name one thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: The longest chain of aliases resolution follows (``fast -> smart -> ...``); validation
#: refuses longer ones, so that every table it accepts resolves to the end.
MAX_CHAIN = 8


class AliasError(ValueError):
    """An alias table that must not be installed; the message names the alias."""


def is_pattern(name: str) -> bool:
    """Whether ``name`` is a model-name pattern (holds ``*`` or ``?``)."""
    return "*" in name or "?" in name


def matches(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` as a whole (``*``: any run, ``?``: one character).

    The classic two-cursor wildcard match: on a mismatch it retries from the last ``*`` one
    character further on, so the worst case is len(pattern) * len(name) steps, never the
    exponential backtracking a regex of several ``.*`` can fall into on a hostile name."""
    p = n = 0
    star = -1  # index in pattern of the last '*' seen
    resume = 0  # index in name that '*' has swallowed up to
    while n < len(name):
        if p < len(pattern) and pattern[p] != "*" and pattern[p] in ("?", name[n]):
            p += 1
            n += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, resume = p, n
            p += 1
        elif star >= 0:
            p = star + 1
            resume += 1
            n = resume
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def validate(
    aliases: Mapping[str, object], providers: Iterable[str], model_ids: Iterable[str]
) -> dict[str, str]:
    """Check every alias (and alias pattern) points at ``provider:model``, a model id, or
    another (exact) alias, with no cycles and no chain longer than :data:`MAX_CHAIN`.
    Returns the table as ``dict[str, str]``, in its order, or raises :class:`AliasError`."""
    known_providers = set(providers)
    known_models = set(model_ids)
    table: dict[str, str] = {}
    for name, target in aliases.items():
        if not name:
            raise AliasError("alias names must be non-empty strings")
        if not isinstance(target, str) or not target:
            raise AliasError(f"{_kind(name)} {name!r}: target must be a non-empty string")
        table[name] = target
    exact = {name: target for name, target in table.items() if not is_pattern(name)}
    for name, target in table.items():
        prefix, sep, rest = target.partition(":")
        if sep and prefix in known_providers:
            if not rest:
                raise AliasError(f"{_kind(name)} {name!r}: {target!r} names no model")
            continue
        if target in known_models or target in exact:
            continue
        raise AliasError(
            f"{_kind(name)} {name!r}: {target!r} is neither provider:model, a configured "
            "model, nor another alias"
        )
    for name in table:
        seen = [name]
        current = table[name]
        while current in exact:
            if current in seen:
                raise AliasError(f"alias cycle: {' -> '.join([*seen, current])}")
            seen.append(current)
            current = exact[current]
        if len(seen) > MAX_CHAIN:
            raise AliasError(
                f"alias chain too long ({len(seen)} > {MAX_CHAIN}): {' -> '.join(seen)}"
            )
    return table


def _kind(name: str) -> str:
    return "alias pattern" if is_pattern(name) else "alias"
