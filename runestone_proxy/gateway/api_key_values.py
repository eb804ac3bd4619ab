"""What a key made at run time is, and what an admin may send for it (pure): the stored row
(:class:`StoredKey`), its settings (:class:`KeySettings`), and the checks on an admin's
input (a tenant, a key id, a rotation's grace, settings), each a 400 (or 404 for an id)
naming the field. The admin API, the CLI and :class:`~.api_keys.KeyManager` all check
with these, so every way in takes the same values; the store
(``server/store_keys_sql.py``) reads and writes the row.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from runestone_proxy.errors import InvalidParam, NotFound

__all__ = [
    "DEFAULT_GRACE_S",
    "MAX_GRACE_S",
    "SETTINGS_FIELDS",
    "KeySettings",
    "StoredKey",
    "apply_settings",
    "check_grace",
    "check_id",
    "check_tenant",
]

#: A rotated key's old secret stays valid this long unless ``grace_s`` says otherwise.
DEFAULT_GRACE_S = 86400.0
MAX_GRACE_S = 30 * 86400.0

_INT_LIMITS = ("rpm", "rph", "tpm", "max_concurrent", "budget_tokens_day")
#: Largest integer limit accepted (SQLite and PostgreSQL BIGINT both hold it).
_MAX_INT = 10**12
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
_ID = re.compile(r"key_[0-9a-f]{16}|[0-9a-f]{12}")


@attrs.frozen
class KeySettings:
    """What an admin may set on a key (None: no such limit or budget)."""

    name: str = ""
    rpm: int | None = None
    rph: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    budget_usd_day: float | None = None
    budget_usd_month: float | None = None
    budget_tokens_day: int | None = None


SETTINGS_FIELDS = tuple(f.name for f in attrs.fields(KeySettings))


@attrs.frozen
class StoredKey:
    """One row of the ``api_keys`` table."""

    id: str
    tenant: str
    sha256: str
    mask: str
    created_at: float
    updated_at: float
    settings: KeySettings = KeySettings()
    revoked_at: float | None = None
    previous_sha256: str | None = None
    previous_mask: str | None = None
    previous_expires_at: float | None = None


# --- checks on what an admin sends (pure) ------------------------------------------------------


def check_tenant(value: object) -> str:
    if not isinstance(value, str) or not _TENANT.fullmatch(value):
        raise InvalidParam(
            "'tenant' must be 1-128 characters: letters, digits and . _ : @ / - "
            "(starting with a letter or digit).",
            param="tenant",
        )
    return value


def check_id(value: str) -> str:
    """A key id as the admin API accepts it in a path (404 for anything else)."""
    if not _ID.fullmatch(value):
        raise NotFound(f"No key with id '{value[:64]}' was found.", param="id")
    return value


def check_grace(value: object) -> float:
    if value is None:
        return DEFAULT_GRACE_S
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 <= value <= MAX_GRACE_S
    ):
        raise InvalidParam(
            f"'grace_s' must be a number of seconds from 0 to {int(MAX_GRACE_S)}.",
            param="grace_s",
        )
    return float(value)


def apply_settings(
    base: KeySettings, body: Mapping[str, Any], *, allowed: Iterable[str] = ()
) -> KeySettings:
    """``base`` with the settings ``body`` names (null clears a limit or budget). Every other
    field of ``body`` must be in ``allowed`` (400 naming the first that is not)."""
    extra = set(allowed)
    changes: dict[str, Any] = {}
    for field, value in body.items():
        if field in SETTINGS_FIELDS:
            changes[field] = _check_setting(field, value)
        elif field not in extra:
            raise InvalidParam(f"Unknown field '{field[:64]}'.", param=field[:64])
    return attrs.evolve(base, **changes)


def _check_setting(field: str, value: object) -> object:
    if field == "name":
        if value is None:
            return ""
        if not isinstance(value, str) or len(value) > 200 or not value.isprintable():
            raise InvalidParam(
                "'name' must be printable text of at most 200 characters.", param=field
            )
        return value
    if value is None:
        return None
    if field in _INT_LIMITS:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _MAX_INT:
            raise InvalidParam(
                f"'{field}' must be a positive integer (at most {_MAX_INT}) or null.", param=field
            )
        return value
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= 1e12
    ):
        raise InvalidParam(f"'{field}' must be a positive number of USD or null.", param=field)
    return float(value)
