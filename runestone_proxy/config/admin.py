"""The admin API's table (``[admin]``): who may manage keys and read usage, and where.

Admin keys are distinct from client keys: a client key never opens ``/admin/``, an admin key
never calls a model. They come from ``[[admin.keys]]`` (``key_env`` or ``key_sha256``, as
client keys do) and from ``RUNESTONE_ADMIN_KEY`` (a comma list). With none configured the
admin API is off (404, as any unknown path).
"""

from __future__ import annotations

from typing import Literal

import attrs

from runestone_proxy.config.fields import FieldError


@attrs.frozen
class AdminKeyConfig:
    """One admin key: from an environment variable, or by its SHA-256 (hex) only."""

    key_env: str | None = None
    key_sha256: str | None = None
    #: A name for logs and the audit trail ("ops", "billing-export").
    name: str = "admin"

    def __attrs_post_init__(self) -> None:
        if (self.key_env is None) == (self.key_sha256 is None):
            raise FieldError("key_env", "set exactly one of key_env or key_sha256")


@attrs.frozen
class AdminConfig:
    #: ``main``: ``/admin/`` on the main port (and the health port, if any); ``health``: only
    #: on ``server.health_port`` (which must then be set), never on the public port.
    listen: Literal["main", "health"] = "main"
    keys: tuple[AdminKeyConfig, ...] = ()
