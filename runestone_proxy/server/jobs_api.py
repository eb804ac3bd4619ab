"""The jobs API: ``GET /v1/jobs/{job_id}``, and :func:`accept_async`, which turns a request
into a durable job and answers ``202 Accepted``.

``accept_async`` commits first and answers after: by the time the client reads the 202 the
job is in the WAL on disk (group commit, see server/store.py), so a crash cannot lose it.
An ``Idempotency-Key`` header that the same tenant already used within
``idempotency_window_s`` answers with the job it created then (status as it is now),
marked ``idempotent-replayed: true``, and runs nothing twice: the API asks
:func:`replay_idempotent` before it serves a request live, so this holds even when the
retry finds the tenant with room.

Jobs belong to tenants: a key of another tenant gets 404 ``not_found``, exactly as for an id
that never existed, so job ids leak nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from runestone_proxy import telemetry
from runestone_proxy.errors import InvalidParam, NotFound
from runestone_proxy.gateway.auth import Principal
from runestone_proxy.gateway.overflow import Job, NewJob, job_view
from runestone_proxy.gateway.queue import JobQueue
from runestone_proxy.server.http import JSON_HEADERS, Request, Responder
from runestone_proxy.server.router import Router

Authenticate = Callable[[Request], Principal]

_MAX_IDEMPOTENCY_KEY = 255


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def add_job_routes(router: Router, store: JobQueue, authenticate: Authenticate) -> None:
    """Register ``GET /v1/jobs/{job_id}``. ``authenticate`` is ``Api.authenticate`` (the
    current key table across reloads; it emits ``auth.failure``)."""

    async def get_job(request: Request, responder: Responder) -> None:
        principal = authenticate(request)
        job_id = request.path_params["job_id"]
        job = await store.get(job_id, principal.tenant)
        if job is None:
            raise NotFound(f"No job with id '{job_id[:100]}' was found.", param="job_id")
        await responder.respond(200, JSON_HEADERS, _dumps(job_view(job)))

    router.add("GET", "/v1/jobs/{job_id}", get_job)


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header: 1-255 printable ASCII characters, else 400."""
    value = request.header(b"idempotency-key")
    if value is None:
        return None
    if not 0 < len(value) <= _MAX_IDEMPOTENCY_KEY or not all(0x20 <= b <= 0x7E for b in value):
        raise InvalidParam(
            f"The Idempotency-Key header must be 1 to {_MAX_IDEMPOTENCY_KEY} printable "
            "ASCII characters.",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return value.decode("ascii")


async def accept_async(
    store: JobQueue,
    request: Request,
    responder: Responder,
    principal: Principal,
    endpoint: str,
    raw: bytes,
    webhook_url: str | None,
) -> None:
    """Commit the request as a job, then answer ``202`` with its id and ``Location``.

    ``raw`` is stored as it came (the runner parses it again); ``webhook_url`` is the body's,
    already checked (``overflow.check_webhook_url``). Raises 429 ``RateLimited`` past the
    tenant's ``max_queued_jobs``, 503 if the store fails, 400 for a bad ``Idempotency-Key``."""
    job = NewJob(
        tenant=principal.tenant,
        request_id=request.request_id,
        endpoint=endpoint,
        body=raw,
        webhook_url=webhook_url,
        idempotency_key=idempotency_key(request),
    )
    enqueued = await store.enqueue(job)
    replayed = not enqueued.created
    _emit_enqueue(request, principal, enqueued.job, enqueued.queue_depth, replayed)
    await _accepted(responder, enqueued.job, replayed=replayed)


async def replay_idempotent(
    store: JobQueue, request: Request, responder: Responder, principal: Principal
) -> bool:
    """Answer a request whose ``Idempotency-Key`` already made a job (same tenant, within the
    window) with that job, as :func:`accept_async` would, whether or not the tenant has room
    now: a retry never runs the request a second time, live or queued. False (nothing sent)
    if there is no such job, no key, or no open store; 400 for a malformed key."""
    key = idempotency_key(request)
    if key is None or not store.is_open:
        return False
    twin = await store.find_idempotent(principal.tenant, key)
    if twin is None:
        return False
    _emit_enqueue(request, principal, twin, None, replayed=True)
    await _accepted(responder, twin, replayed=True)
    return True


def _emit_enqueue(
    request: Request, principal: Principal, job: Job, queue_depth: int | None, replayed: bool
) -> None:
    """``overflow.enqueue``: a job accepted, or an earlier one answered again (``replayed``)."""
    telemetry.emit(
        "overflow.enqueue",
        tenant=principal.tenant,
        key_mask=principal.key_mask,
        request_id=request.request_id,
        job_id=job.id,
        endpoint=job.endpoint,
        queue_depth=queue_depth,
        replayed=replayed,
    )


async def _accepted(responder: Responder, job: Job, *, replayed: bool) -> None:
    """``202`` with the job's id, status and ``Location``."""
    status_url = f"/v1/jobs/{job.id}"
    answer = {
        "id": job.id,
        "object": "runestone.job",
        "job_id": job.id,
        "request_id": job.request_id,
        "status": job.status.value,
        "status_url": status_url,
    }
    headers = [*JSON_HEADERS, (b"location", status_url.encode())]
    if replayed:
        headers.append((b"idempotent-replayed", b"true"))
    await responder.respond(202, headers, _dumps(answer))
