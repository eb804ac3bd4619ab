"""Who may use the admin API (``/admin/...``), and on which port.

Admin keys are not client keys. They come from ``[[admin.keys]]`` (``key_env`` names an
environment variable holding the key, or ``key_sha256`` holds only its digest) and from
``RUNESTONE_ADMIN_KEY`` (a comma list, named ``env``). Only SHA-256 digests are kept; a
presented key (``Authorization: Bearer`` or ``x-api-key``, as for client keys) is hashed,
and looked up. A client key presented on ``/admin/`` is refused
like any unknown key (401), and an admin key calling a model is unknown to the client key
table (401 there too): the two tables never meet.

With no admin key configured the admin API does not exist: every ``/admin/`` route answers
404 ``unknown_url``, as a path that was never registered, so a gateway without admin keys
does not advertise one. ``[admin] listen`` says where the routes are registered: ``main``
(the public port, and the health port when there is one) or ``health`` (only the health
port, which the operator keeps on loopback or a private network).

:meth:`AdminAuth.guard` wraps a handler: it authorises the request (401/404), records the
admin key's name in ``request.context["admin"]`` (the audit trail's "who"), then runs it.
The key table is rebuilt on reload (``apply_config``), so a SIGHUP adds or drops admin keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import attrs

from runestone_proxy import telemetry
from runestone_proxy.api.http import Handler, Request, Responder
from runestone_proxy.config import Config
from runestone_proxy.errors import AuthenticationFailed, NotFound
from runestone_proxy.gateway.auth import presented_key
from runestone_proxy.telemetry import mask_key

#: Environment variable with admin keys (comma list), beside ``[[admin.keys]]``.
ADMIN_KEY_ENV = "RUNESTONE_ADMIN_KEY"


def admin_digests(config: Config, env: Mapping[str, str]) -> dict[str, str]:
    """SHA-256 hex digest -> the admin key's name, from the config and the environment."""
    digests: dict[str, str] = {}
    for entry in config.admin.keys:
        if entry.key_sha256 is not None:
            digests[entry.key_sha256.lower()] = entry.name
            continue
        value = env.get(entry.key_env or "", "").strip()
        if value:
            digests[_digest(value)] = entry.name
    for value in env.get(ADMIN_KEY_ENV, "").split(","):
        value = value.strip()
        if value:
            digests.setdefault(_digest(value), "env")
    return digests


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@attrs.define(eq=False)
class AdminAuth:
    """The admin key table of the running gateway (rebuilt on reload)."""

    digests: dict[str, str]
    env: Mapping[str, str]

    @classmethod
    def build(cls, config: Config, env: Mapping[str, str]) -> AdminAuth:
        return cls(admin_digests(config, env), env)

    def apply_config(self, config: Config) -> None:
        self.digests = admin_digests(config, self.env)

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def authorize(self, request: Request) -> str:
        """The admin key's name, or raise: 404 when the admin API is off, 401 otherwise."""
        if not self.digests:
            raise NotFound(
                f"Unknown request URL: {request.method} {request.path}.", code="unknown_url"
            )
        presented = presented_key(request.header(b"authorization"), request.header(b"x-api-key"))
        if presented is None:
            raise AuthenticationFailed(
                "The admin API needs an admin key: Authorization: Bearer <admin key>."
            )
        # Looked up by digest, as client keys are (gateway/auth.py): timing the lookup of a
        # SHA-256 digest tells nothing about a key that has it.
        name = self.digests.get(_digest(presented))
        if name is None:
            telemetry.emit(
                "admin.auth_failure",
                key_mask=mask_key(presented),
                path=request.path,
                request_id=request.request_id,
            )
            raise AuthenticationFailed(f"Incorrect admin key provided: {mask_key(presented)}.")
        return name

    def guard(self, handler: Handler) -> Handler:
        """``handler`` behind the admin key check."""

        async def guarded(request: Request, responder: Responder) -> None:
            request.context["admin"] = self.authorize(request)
            await handler(request, responder)

        return guarded
