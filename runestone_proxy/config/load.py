"""Loading the configuration: read the TOML, apply environment overrides, validate strictly.

Loading is strict on purpose: an unknown key, a wrong type or an impossible value is an
error that names the key (``$.server.port``) and the file, and the process exits 2 before it
listens (see ``__main__``). A cattrs converter that forbids extra keys structures the raw
dict into the tree (:mod:`.tree`), with hooks that refuse quoted numbers and booleans.

Order of precedence, lowest first: field defaults, the TOML file, environment overrides
(``PORT``, ``HEALTH_PORT``, ...; see :data:`ENV_OVERRIDES`). Overrides are applied to the raw
dict before validation, so a bad ``PORT=abc`` is reported like a bad ``server.port``. An
override wins for the value it names wherever the file sets it (:data:`ENV_ALSO_PINS`), and
``<PROVIDER>_BASE_URL`` sets that provider's ``base_url`` (:data:`BASE_URL_PROVIDERS`).
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs

from runestone_proxy.config.fields import FieldError
from runestone_proxy.config.tree import Config

DEFAULT_CONFIG_PATHS = ("config.toml",)


class ConfigError(Exception):
    """The configuration is invalid; ``messages`` name each bad key."""

    def __init__(self, source: str, messages: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(messages))
        self.source = source
        self.messages = messages


_converter = cattrs.Converter(forbid_extra_keys=True)


def _strict(type_: type[Any], *accepted: type[Any]) -> None:
    """Structure ``type_`` only from ``accepted`` TOML types: cattrs would call ``int("80")``
    and ``bool("false")`` (True), so a quoted number or boolean would pass silently."""
    name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[type_]

    def hook(value: object, _type: object) -> object:
        if isinstance(value, bool) is not (type_ is bool) or not isinstance(value, accepted):
            raise ValueError(f"expected {name}, got {type(value).__name__} {value!r}")
        return type_(value)

    _converter.register_structure_hook(type_, hook)


_strict(bool, bool)
_strict(int, int)
_strict(float, int, float)
_strict(str, str)


_strings = _converter.get_structure_hook(tuple[str, ...])


def _string_list(value: object, type_: Any) -> tuple[str, ...]:
    """A TOML array of strings. cattrs would take a bare string for a sequence of its
    characters: ``model_patterns = "claude-*"`` would claim ``c``, ``l``, ... ."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected an array of strings, got {type(value).__name__} {value!r}")
    strings: tuple[str, ...] = _strings(value, type_)
    return strings


_converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _string_list)


def _count_or_auto(value: object, _type: Any) -> int | str:
    """``server.workers``: a positive integer or the string ``"auto"``."""
    if value == "auto" or (type(value) is int and value >= 1):
        return value
    raise ValueError(f'expected a number >= 1 or "auto", got {value!r}')


_converter.register_structure_hook_func(lambda t: t == (int | Literal["auto"]), _count_or_auto)


def _set(raw: dict[str, Any], dotted: str, value: object) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return  # the file has a non-table here; validation will name it
        node = child
    node[leaf] = value


def _replace(raw: dict[str, Any], dotted: str, value: object) -> None:
    """Like :func:`_set`, but only where the file already sets the key."""
    node: object = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node:
        node[leaf] = value


def _as_int(text: str) -> object:
    try:
        return int(text)
    except ValueError:
        return text  # left as a string: validation reports the key with its bad value


#: Environment variable -> (dotted key, parser). Applied on top of the file.
ENV_OVERRIDES: dict[str, tuple[str, Callable[[str], object]]] = {
    "PORT": ("server.port", _as_int),
    "HEALTH_PORT": ("server.health_port", _as_int),
    "RUNESTONE_HOST": ("server.host", str),
    "RUNESTONE_LOG_LEVEL": ("logging.level", str.lower),
    "RUNESTONE_LOG_FORMAT": ("logging.format", str.lower),
}


def _as_bool(text: str) -> object:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    return text


ENV_OVERRIDES["RUNESTONE_ROUTER_POLICY"] = ("routing.policy", str.lower)
ENV_OVERRIDES["RUNESTONE_AUTH_ENABLED"] = ("auth.enabled", _as_bool)
ENV_OVERRIDES["MAX_CONCURRENT_PER_TENANT"] = ("tenancy.default_max_concurrent", _as_int)
ENV_OVERRIDES["RUNESTONE_WORKERS"] = ("server.workers", _as_int)
# URLs that may carry a password: the environment (a root-only EnvironmentFile) keeps it
# out of the world-readable config file.
ENV_OVERRIDES["RUNESTONE_OVERFLOW_URL"] = ("overflow.url", str)
ENV_OVERRIDES["RUNESTONE_REDIS_URL"] = ("state.url", str)

#: Overrides that name a value the file may also pin in a second, more specific place: the
#: variable wins there too. The shipped file restates ``[tenants.default] max_concurrent``,
#: which would otherwise hide ``MAX_CONCURRENT_PER_TENANT`` for the only tenant most
#: deployments have. Other tenants' explicit ``max_concurrent`` stays: an operator who wrote
#: a number for one named tenant meant that tenant, and the variable names the default.
#: (A value that failed to parse is left to the first key's error, not repeated here.)
ENV_ALSO_PINS: dict[str, tuple[str, ...]] = {
    "MAX_CONCURRENT_PER_TENANT": ("tenants.default.max_concurrent",),
}

#: ``<NAME>_BASE_URL`` overrides the base_url of the provider with that name, in the form
#: that provider's official SDK reads it (``ANTHROPIC_BASE_URL`` without ``/v1``,
#: ``GROQ_BASE_URL`` the bare origin); ``ProviderConfig.api_root`` normalises either form.
BASE_URL_PROVIDERS = ("openai", "anthropic", "groq", "openrouter")


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    for name, (dotted, parse) in ENV_OVERRIDES.items():
        text = env.get(name)
        if text is not None and text != "":
            value = parse(text)
            _set(raw, dotted, value)
            if not isinstance(value, str):  # a value that failed to parse is reported once
                for pinned in ENV_ALSO_PINS.get(name, ()):
                    _replace(raw, pinned, value)
    providers = raw.get("providers")
    if isinstance(providers, list):
        for provider in providers:
            if isinstance(provider, dict) and provider.get("name") in BASE_URL_PROVIDERS:
                url = env.get(f"{str(provider['name']).upper()}_BASE_URL")
                if url:
                    provider["base_url"] = url
    return raw


def find_path(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read: ``--config``, else ``RUNESTONE_CONFIG``, else ./config.toml."""
    if explicit:
        return Path(explicit)
    if env.get("RUNESTONE_CONFIG"):
        return Path(env["RUNESTONE_CONFIG"])
    for candidate in DEFAULT_CONFIG_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def _unknown_keys(exc: cattrs.ForbiddenExtraKeysError) -> str:
    """One ``\1key\1message`` per unknown key, so each is named by its own path."""
    known = [field.name for field in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
    out = []
    for key in sorted(exc.extra_fields):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        out.append(f"\1{key}\1unknown key{hint}")
    return "".join(out)


def _format(exc: BaseException, type_: type[Any] | None) -> str:
    if isinstance(exc, FieldError):
        return f"\0{exc.field}\0{exc}"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return _unknown_keys(exc)
    if typing.get_origin(type_) is Literal:
        return f"invalid value (must be one of {', '.join(map(repr, typing.get_args(type_)))})"
    if isinstance(exc, ValueError) and type(exc) is ValueError:
        return f"invalid value ({exc})"
    return cattrs.v.format_exception(exc, type_)


def _messages(exc: cattrs.BaseValidationError) -> list[str]:
    """cattrs' messages, with validator complaints and unknown keys pinned to their path."""
    out = []
    for line in cattrs.transform_error(exc, path="$", format_exception=_format):
        if line.startswith("\0"):
            _, field, rest = line.split("\0", 2)
            message, _, path = rest.rpartition(" @ ")
            line = f"invalid value ({message}) @ {path}.{field}"
        elif line.startswith("\1"):
            found, _, path = line.rpartition(" @ ")
            parts = found.split("\1")[1:]
            for key, message in zip(parts[::2], parts[1::2], strict=True):
                out.append(f"{message} @ {path}.{key}")
            continue
        out.append(line)
    return out


def structure(raw: dict[str, Any], source: str) -> Config:
    try:
        return _converter.structure(raw, Config)
    except cattrs.BaseValidationError as exc:
        raise ConfigError(source, _messages(exc)) from None
    except FieldError as exc:
        raise ConfigError(source, [f"invalid value ({exc}) @ $.{exc.field}"]) from None


def load(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate; raise :class:`ConfigError` naming every bad key."""
    env = os.environ if env is None else env
    source = str(path) if path is not None else "<embedded defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    return structure(apply_env(raw, env), source)
