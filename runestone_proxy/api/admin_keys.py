"""The admin API's keys: create, list, show, change, revoke and rotate client API keys.

Every route is behind :meth:`AdminAuth.guard <runestone_proxy.api.admin_auth.AdminAuth.guard>`
(an admin key, never a client key), speaks JSON, and answers errors in OpenAI's envelope::

    POST   /admin/keys                 {tenant, name?, rpm?, rph?, tpm?, max_concurrent?,
                                        budget_usd_day?, budget_usd_month?,
                                        budget_tokens_day?}  -> 201 {..., "key": "sk-rs-..."}
    GET    /admin/keys[?tenant=T]      -> {"object": "list", "data": [key, ...]} (masked)
    GET    /admin/keys/{id}            -> key
    PATCH  /admin/keys/{id}            {name?, limits?, budgets?: null clears} -> key
    POST   /admin/keys/{id}/revoke     -> key (status "revoked"; DELETE /admin/keys/{id} too)
    POST   /admin/keys/{id}/rotate     {grace_s?: 0..2592000, default 86400}
                                        -> {..., "key": "sk-rs-..."}

The secret (``key``) is in the answer to create and rotate only; it is stored as a SHA-256
digest. Config keys are listed (``source: "config"``, id = their digest's first 12 hex
digits, as the usage ledger names them) but are read-only here: changing one is 403
``config_key_read_only``. The rules are :mod:`runestone_proxy.gateway.api_keys`' (this
module parses and encodes); each change emits ``admin.key`` (action, admin, key id).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from runestone_proxy.api.admin_auth import AdminAuth
from runestone_proxy.api.http import JSON_HEADERS, Request, Responder
from runestone_proxy.api.router import Router
from runestone_proxy.errors import InvalidParam
from runestone_proxy.gateway.api_key_values import (
    KeySettings,
    apply_settings,
    check_grace,
    check_tenant,
)
from runestone_proxy.gateway.api_keys import KeyManager, NewSecret, key_view
from runestone_proxy.gateway.request_body import parse_object

__all__ = ["add_admin_key_routes"]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object sent (400 if it is not one); an empty body is ``{}``."""
    raw = await request.body()
    return parse_object(raw) if raw.strip() else {}


def _admin(request: Request) -> str:
    return str(request.context.get("admin", "-"))


def _tenant_filter(query: str) -> str | None:
    params = parse_qs(query, keep_blank_values=True)
    for name in params:
        if name != "tenant":
            raise InvalidParam(f"Unknown query parameter '{name[:64]}'.", param=name[:64])
    values = params.get("tenant")
    if not values:
        return None
    if len(values) > 1:
        raise InvalidParam("Give 'tenant' at most once.", param="tenant")
    return check_tenant(values[0])


def _with_secret(created: NewSecret, now: float) -> bytes:
    return _dumps({**key_view(created.key, now), "key": created.secret})


def add_admin_key_routes(router: Router, manager: KeyManager, admin: AdminAuth) -> None:
    """Register the key routes on ``router``, each behind ``admin.guard``."""

    async def create(request: Request, responder: Responder) -> None:
        body = await _body(request)
        if "tenant" not in body:
            raise InvalidParam("'tenant' is required.", param="tenant")
        tenant = check_tenant(body["tenant"])
        settings = apply_settings(KeySettings(), body, allowed=("tenant",))
        created = await manager.create(tenant, settings, admin=_admin(request))
        await responder.respond(201, JSON_HEADERS, _with_secret(created, manager.clock()))

    async def list_keys(request: Request, responder: Responder) -> None:
        data = await manager.list(_tenant_filter(request.query))
        await responder.respond(200, JSON_HEADERS, _dumps({"object": "list", "data": data}))

    async def show(request: Request, responder: Responder) -> None:
        view = await manager.show(request.path_params["id"])
        await responder.respond(200, JSON_HEADERS, _dumps(view))

    async def update(request: Request, responder: Responder) -> None:
        key_id = request.path_params["id"]
        body = await _body(request)
        key = await manager.update(key_id, body, admin=_admin(request))
        await responder.respond(200, JSON_HEADERS, _dumps(key_view(key, manager.clock())))

    async def revoke(request: Request, responder: Responder) -> None:
        key_id = request.path_params["id"]
        body = await _body(request)
        if body:
            name = next(iter(body))[:64]
            raise InvalidParam(f"Unknown field '{name}': revoke takes no body.", param=name)
        key = await manager.revoke(key_id, admin=_admin(request))
        await responder.respond(200, JSON_HEADERS, _dumps(key_view(key, manager.clock())))

    async def rotate(request: Request, responder: Responder) -> None:
        key_id = request.path_params["id"]
        body = await _body(request)
        for name in body:
            if name != "grace_s":
                raise InvalidParam(f"Unknown field '{name[:64]}'.", param=name[:64])
        grace_s = check_grace(body.get("grace_s"))
        rotated = await manager.rotate(key_id, grace_s, admin=_admin(request))
        await responder.respond(200, JSON_HEADERS, _with_secret(rotated, manager.clock()))

    guard = admin.guard
    router.add("POST", "/admin/keys", guard(create))
    router.add("GET", "/admin/keys", guard(list_keys))
    router.add("GET", "/admin/keys/{id}", guard(show))
    router.add("PATCH", "/admin/keys/{id}", guard(update))
    router.add("DELETE", "/admin/keys/{id}", guard(revoke))
    router.add("POST", "/admin/keys/{id}/revoke", guard(revoke))
    router.add("POST", "/admin/keys/{id}/rotate", guard(rotate))
