"""The first steps every generation handler takes, whatever its dialect: authenticate the
caller, read the body, and let the service accept it (:meth:`Service.accept`: parse,
validate, route). The request headers that steer it are read here once: ``Prefer:
respond-async`` (RFC 7240 §4.1: park the request if it cannot start now) and
``Idempotency-Key``."""

from __future__ import annotations

from runestone_proxy.api.http import Request
from runestone_proxy.gateway.auth import Principal
from runestone_proxy.gateway.service import Generation, Service
from runestone_proxy.providers.base import Endpoint


def authenticate(service: Service, request: Request) -> Principal:
    """The caller's principal (``Authorization: Bearer`` or ``x-api-key``), kept in the
    request's context for the access log and the health views; 401 otherwise."""
    principal = service.authenticate(
        request.header(b"authorization"),
        request.header(b"x-api-key"),
        request_id=request.request_id,
        path=request.path,
        client=request.client,
    )
    request.context["principal"] = principal
    return principal


async def accept(
    service: Service,
    request: Request,
    endpoint: Endpoint,
    *,
    force_stream: bool = False,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> Generation:
    """Authenticate, read the body, and accept it as a :class:`Generation`."""
    principal = authenticate(service, request)
    # bytes() is free for bytes; a body that arrived as one h11 chunk is a bytearray,
    # which the upstream pool would take for a streamed (async-iterable) body.
    raw = bytes(await request.body())
    gen = service.accept(
        principal,
        endpoint,
        raw,
        request.request_id,
        force_stream=force_stream,
        prefers_async=b"respond-async" in (request.header(b"prefer") or b"").lower(),
        idempotency_key=request.header(b"idempotency-key"),
        headers=headers,
    )
    if gen.principal is not principal:  # the legacy ``tenant_id`` named the tenant
        request.context["principal"] = gen.principal
    return gen
