"""The durable overflow queue's rules: job states, retries, lease fencing, the job view. The
webhook's own rules (its URL, body, signature, retries) are in :mod:`.webhooks`.

Pure: no trio, no sqlite, no clock of its own (time and randomness are passed in). The store
(:mod:`runestone_proxy.server.store`) applies these rules in SQL; the drainer
(:mod:`runestone_proxy.server.drainer`) decides with them and then does the I/O.

The job state table (the only transitions there are)::

    status     action                                          next status
    --------   ---------------------------------------------   -----------
    queued     claim (due, tenant has capacity): new lease     running
    running    complete (2xx outcome, lease token matches)     succeeded
    running    fail, retryable and attempts < max_attempts     queued   (next_attempt_at later)
    running    fail, not retryable or attempts exhausted       failed
    running    release (shutdown; the attempt is not counted)  queued
    running    lease expired (crash): recover, or re-claim     queued / running (new lease)
    queued     bury: due, but claimed max_claims times in a    dead
    running      row with no outcome recorded (see below)      dead
    succeeded  -- terminal: body redacted to its digest, result kept for retention_s
    failed     -- terminal: likewise, with the last error envelope as its result
    dead       -- terminal: likewise, with a fixed ``job_dead`` envelope as its result

Why ``dead``: a job whose run ends but whose outcome cannot be stored (the write fails), or
whose run takes the process down, is never settled; its lease expires and it would be
claimed again, and fail the same way, for ever. Each claim counts in ``claims`` (reset when
an outcome is recorded, given back by a release); a due job found with ``claims >=
max_claims`` is buried instead of claimed, with a fixed envelope that needs nothing of the
job's own text to be stored. What a run produced is made storable first
(:mod:`runestone_proxy.gateway.job_results`: a bounded size, an error envelope for every
failure), and the drainer falls back to a fixed ``job_outcome_unstorable`` failure when even
that write fails.

How fencing works: every claim writes a fresh random lease token. ``complete``, ``fail`` and
``release`` name the token they were given; they change the row only while it is ``running``
with that same token. A run whose lease expired and was claimed again (after a crash, or a
run slower than ``lease_s``) holds a stale token, so its result is discarded and the job
keeps exactly one stored result: the first fenced completion's.

The webhook state table, kept in the same row so delivery survives restarts::

    webhook    event                                           next
    --------   ---------------------------------------------   ---------
    none       job ends with a webhook_url                     pending  (due now)
    pending    receiver answered 2xx                           delivered
    pending    failure, attempts < webhook_max_attempts        pending  (due later, backoff)
    pending    failure, attempts exhausted                     failed

Retries back off exponentially with full jitter (``gateway/backoff.py``, the policy failover
uses too), never sooner than a ``retry_after_s`` the provider asked for.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from typing import Any

import attrs

from runestone_proxy.errors import GatewayError
from runestone_proxy.gateway.backoff import backoff_s


class JobStatus(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"


class Action(enum.Enum):
    CLAIM = "claim"
    COMPLETE = "complete"
    RETRY = "retry"
    FAIL = "fail"
    RELEASE = "release"
    EXPIRE = "expire"
    BURY = "bury"


#: (status, action) -> next status: the table above, as data.
TRANSITIONS: dict[tuple[JobStatus, Action], JobStatus] = {
    (JobStatus.QUEUED, Action.CLAIM): JobStatus.RUNNING,
    (JobStatus.RUNNING, Action.COMPLETE): JobStatus.SUCCEEDED,
    (JobStatus.RUNNING, Action.RETRY): JobStatus.QUEUED,
    (JobStatus.RUNNING, Action.FAIL): JobStatus.FAILED,
    (JobStatus.RUNNING, Action.RELEASE): JobStatus.QUEUED,
    (JobStatus.RUNNING, Action.EXPIRE): JobStatus.QUEUED,
    (JobStatus.QUEUED, Action.BURY): JobStatus.DEAD,
    (JobStatus.RUNNING, Action.BURY): JobStatus.DEAD,
}

TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.DEAD})
#: Statuses that count against a tenant's ``max_queued_jobs``.
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})


class InvalidTransition(Exception):
    pass


def transition(status: JobStatus, action: Action) -> JobStatus:
    """The next status, or :class:`InvalidTransition` if the table has no such move."""
    try:
        return TRANSITIONS[(status, action)]
    except KeyError:
        raise InvalidTransition(f"{action.value} is not allowed from {status.value}") from None


class WebhookStatus(enum.Enum):
    NONE = "none"
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


WEBHOOK_TRANSITIONS: frozenset[tuple[WebhookStatus, WebhookStatus]] = frozenset(
    {
        (WebhookStatus.NONE, WebhookStatus.PENDING),
        (WebhookStatus.PENDING, WebhookStatus.DELIVERED),
        (WebhookStatus.PENDING, WebhookStatus.PENDING),
        (WebhookStatus.PENDING, WebhookStatus.FAILED),
    }
)


# --- values ------------------------------------------------------------------------------------


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def new_lease_token() -> str:
    return secrets.token_hex(16)


def digest(body: bytes) -> bytes:
    """What a finished job keeps of its request: ``sha256:<hex>`` (redaction)."""
    return b"sha256:" + hashlib.sha256(body).hexdigest().encode()


@attrs.frozen
class NewJob:
    """An accepted request, before it is committed."""

    tenant: str
    request_id: str
    endpoint: str
    body: bytes = attrs.field(repr=False)  # the request JSON: never logged
    webhook_url: str | None = None
    idempotency_key: str | None = None
    #: Client headers a native provider receives as sent (``ProviderCall.headers``:
    #: ``anthropic-version``, ``anthropic-beta``, ...), kept with the job to run it.
    headers: tuple[tuple[bytes, bytes], ...] = attrs.field(default=(), repr=False)
    id: str = attrs.Factory(new_job_id)


@attrs.frozen
class Job:
    """One row of the queue, as read back."""

    id: str
    tenant: str
    request_id: str
    endpoint: str
    body: bytes = attrs.field(repr=False)
    webhook_url: str | None
    idempotency_key: str | None
    status: JobStatus
    attempts: int
    lease_token: str | None = attrs.field(repr=False)
    lease_expires_at: float | None
    next_attempt_at: float
    created_at: float
    updated_at: float
    finished_at: float | None
    result: bytes | None = attrs.field(repr=False)
    result_status: int | None
    last_error: str | None = attrs.field(repr=False)
    webhook_status: WebhookStatus
    webhook_attempts: int
    webhook_next_at: float | None
    #: Claims since an outcome was last recorded (``dead`` at ``max_claims``).
    claims: int = 0
    #: The forwarded client headers (:attr:`NewJob.headers`); cleared once the job ends.
    headers: tuple[tuple[bytes, bytes], ...] = attrs.field(default=(), repr=False)


@attrs.frozen
class Enqueued:
    """What ``enqueue`` answers: the job, whether it is new (else an idempotent replay), and
    the tenant's count of active (queued + running) jobs after it."""

    job: Job
    created: bool
    queue_depth: int


@attrs.frozen
class JobOutcome:
    """What running a job produced: the HTTP status and body the live request would have had."""

    status: int
    body: bytes = attrs.field(repr=False)
    retryable: bool = False
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


# --- decisions ---------------------------------------------------------------------------------


@attrs.frozen
class Complete:
    pass


@attrs.frozen
class Retry:
    at: float


@attrs.frozen
class Fail:
    pass


Settle = Complete | Retry | Fail


def settle(
    outcome: JobOutcome,
    attempts: int,
    *,
    max_attempts: int,
    base_s: float,
    max_s: float,
    now: float,
    rand: Callable[[], float],
) -> Settle:
    """Decide what a finished run means for its job: done, try again later, or give up."""
    if outcome.ok:
        return Complete()
    if not outcome.retryable or attempts >= max_attempts:
        return Fail()
    delay = backoff_s(attempts, base_s, max_s, rand)
    if outcome.retry_after_s is not None:
        delay = max(delay, outcome.retry_after_s)
    return Retry(now + delay)


def outcome_from_error(exc: GatewayError) -> JobOutcome:
    """The outcome a job gets when its run raised ``exc`` (the envelope a live request
    would have received, and whether trying again may help)."""
    retry_after = getattr(exc, "retry_after_s", None)
    return JobOutcome(
        exc.http_status,
        exc.body(),
        exc.is_retryable,
        retry_after if isinstance(retry_after, int | float) else None,
    )


def fenced(status: JobStatus, stored_token: str | None, presented_token: str) -> bool:
    """May a run holding ``presented_token`` settle this job? Only while it is running under
    that very lease (constant-time compare: tokens are capabilities)."""
    return (
        status is JobStatus.RUNNING
        and stored_token is not None
        and hmac.compare_digest(stored_token, presented_token)
    )


def round_robin(tenants: list[str], after: str | None) -> list[str]:
    """``tenants`` (sorted) in the order to try them: first the one after ``after``."""
    if after is None:
        return tenants
    later = [t for t in tenants if t > after]
    return later + [t for t in tenants if t <= after]


# --- what clients and webhooks see ---------------------------------------------------------


def _json_or_none(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return None


def job_view(job: Job) -> dict[str, Any]:
    """The ``runestone.job`` object of ``GET /v1/jobs/{id}``."""
    view: dict[str, Any] = {
        "id": job.id,
        "object": "runestone.job",
        "status": job.status.value,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "finished_at": job.finished_at,
        "request_id": job.request_id,
        "result": None,
        "error": None,
    }
    if job.status is JobStatus.SUCCEEDED:
        view["result"] = _json_or_none(job.result)
    elif job.status in (JobStatus.FAILED, JobStatus.DEAD):
        view["error"] = _json_or_none(job.result) or error_envelope(job.last_error or "failed")
    return view


def error_envelope(message: str, code: str = "job_failed") -> dict[str, Any]:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
