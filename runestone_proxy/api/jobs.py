"""The jobs API: ``GET /v1/jobs/{job_id}``, and :func:`answer_parked`, the ``202 Accepted``
for a request the service parked as a durable job.

The service (``gateway/admission.py``) commits the job first and the handler answers after:
by the time the client reads the 202 the job is in the WAL on disk (group commit, see
server/store.py), so a crash cannot lose it. An ``Idempotency-Key`` header that the same
tenant already used within ``idempotency_window_s`` answers with the job it created then
(status as it is now), marked ``idempotent-replayed: true``, and runs nothing twice: the
service looks for it before it serves a request live, so this holds even when the retry
finds the tenant with room.

Jobs belong to tenants: a key of another tenant gets 404 ``not_found``, exactly as for an id
that never existed, so job ids leak nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from runestone_proxy.api.http import JSON_HEADERS, Request, Responder
from runestone_proxy.api.router import Router
from runestone_proxy.errors import NotFound
from runestone_proxy.gateway.admission import Parked
from runestone_proxy.gateway.auth import Principal
from runestone_proxy.gateway.overflow import Job, job_view
from runestone_proxy.gateway.queue import JobQueue

Authenticate = Callable[[Request], Principal]


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


async def answer_parked(responder: Responder, parked: Parked) -> None:
    """``202`` with the parked job's id, status and ``Location`` (``idempotent-replayed``
    for a job an earlier request with the same ``Idempotency-Key`` made)."""
    await _accepted(responder, parked.job, replayed=parked.replayed)


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
