"""The overflow store's SQL: one plain function per operation.

Synchronous, on a connection the caller owns (a :class:`~.store_db.Db`: SQLite or
PostgreSQL, the same SQL for both; where they differ, a fragment of ``conn.dialect``):
:mod:`runestone_proxy.server.store` calls these on its one worker thread, wraps the writing
ones in a transaction and maps the driver's errors. Nothing here opens, commits, sleeps or
awaits. The rules applied (state table, fencing, redaction) are those of
:mod:`runestone_proxy.gateway.overflow`.

The schema, its migrations and the row codec (:func:`storable` text in, lenient text out)
are in :mod:`.store_schema`.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from runestone_proxy.gateway.job_results import dead_body
from runestone_proxy.gateway.overflow import (
    Job,
    JobStatus,
    NewJob,
    WebhookStatus,
    digest,
    fenced,
    new_lease_token,
    round_robin,
)
from runestone_proxy.gateway.responses_store import StoredResponse
from runestone_proxy.server.store_db import Db
from runestone_proxy.server.store_schema import (
    encode_headers,
    job_from_row,
    response_from_row,
    storable,
)

# --- operations (the caller holds the transaction) --------------------------------------------

_ACTIVE = "('queued', 'running')"
_DUE = (
    "((status = 'queued' AND next_attempt_at <= :now)"
    " OR (status = 'running' AND lease_expires_at <= :now))"
)


def select(conn: Db, job_id: str) -> Job | None:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else job_from_row(row)


def select_for_tenant(conn: Db, job_id: str, tenant: str) -> Job | None:
    row = conn.execute(
        "SELECT * FROM jobs WHERE id = ? AND tenant = ?", (storable(job_id), storable(tenant))
    ).fetchone()
    return None if row is None else job_from_row(row)


def active_count(conn: Db, tenant: str) -> int:
    """Queued + running jobs of ``tenant`` (what ``max_queued_jobs`` caps)."""
    count: int = conn.execute(
        f"SELECT COUNT(*) FROM jobs WHERE tenant = ? AND status IN {_ACTIVE}", (storable(tenant),)
    ).fetchone()[0]
    return count


def find_idempotent(conn: Db, tenant: str, key: str, since: float) -> Job | None:
    """The tenant's job with ``key`` created at or after ``since``; an older holder of the key
    gives it up (the window has passed, the key may start a new job)."""
    row = conn.execute(
        "SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ?",
        (storable(tenant), storable(key)),
    ).fetchone()
    if row is None:
        return None
    if row["created_at"] >= since:
        return job_from_row(row)
    conn.execute("UPDATE jobs SET idempotency_key = NULL WHERE id = ?", (row["id"],))
    return None


def select_idempotent(conn: Db, tenant: str, key: str, since: float) -> Job | None:
    """Read-only :func:`find_idempotent`: the tenant's job with ``key`` created at or after
    ``since`` (an expired holder is left for the next enqueue to clear)."""
    row = conn.execute(
        "SELECT * FROM jobs WHERE tenant = ? AND idempotency_key = ? AND created_at >= ?",
        (storable(tenant), storable(key), since),
    ).fetchone()
    return None if row is None else job_from_row(row)


def insert(conn: Db, job: NewJob, now: float) -> Job:
    """Insert ``job`` (queued, due ``now``); the row as stored (``RETURNING``: one round
    trip, not two, on PostgreSQL; SQLite 3.35+)."""
    row = conn.execute(
        "INSERT INTO jobs (id, tenant, request_id, endpoint, body, webhook_url,"
        " idempotency_key, headers, status, next_attempt_at, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?) RETURNING *",
        (
            storable(job.id),
            storable(job.tenant),
            storable(job.request_id),
            storable(job.endpoint),
            job.body,
            storable(job.webhook_url),
            storable(job.idempotency_key),
            encode_headers(job.headers),
            now,
            now,
            now,
        ),
    ).fetchone()
    return job_from_row(row)


def due_by_tenant(conn: Db, now: float) -> dict[str, int]:
    """Jobs claimable now, per tenant: queued and due, or running under an expired lease."""
    due: dict[str, int] = {}
    for status, column in (("queued", "next_attempt_at"), ("running", "lease_expires_at")):
        rows = conn.execute(
            f"SELECT tenant, COUNT(*) FROM jobs WHERE status = ? AND {column} <= ? GROUP BY tenant",
            (status, now),
        )
        for tenant, count in rows:
            due[tenant] = due.get(tenant, 0) + count
    return due


def next_due_at(conn: Db, now: float) -> float | None:
    """The earliest future retry or lease expiry: when something next becomes claimable."""
    times = [
        conn.execute(
            f"SELECT MIN({column}) FROM jobs WHERE status = ? AND {column} > ?", (status, now)
        ).fetchone()[0]
        for status, column in (("queued", "next_attempt_at"), ("running", "lease_expires_at"))
    ]
    found = [t for t in times if t is not None]
    return min(found) if found else None


def claim(
    conn: Db,
    candidates: Collection[str],
    after: str | None,
    lease_s: float,
    now: float,
    max_claims: int,
    buried: list[Job],
) -> Job | None:
    """Lease the oldest due job of the first tenant, in round-robin order from ``after``,
    that has one: queued -> running (or an expired lease -> a new one), attempts + 1,
    claims + 1. A due job already claimed ``max_claims`` times with no outcome recorded is
    buried instead (-> dead, appended to ``buried``) and the next one is looked at."""
    for tenant in round_robin(sorted(candidates), after):
        while True:
            row = conn.execute(
                f"SELECT id, claims FROM jobs WHERE tenant = :tenant AND {_DUE}"
                f" ORDER BY created_at LIMIT 1{conn.dialect.skip_locked}",
                {"tenant": tenant, "now": now},
            ).fetchone()
            if row is None:
                break
            if row["claims"] >= max_claims:
                buried.append(bury(conn, row["id"], row["claims"], now))
                continue
            conn.execute(
                "UPDATE jobs SET status = 'running', lease_token = ?, lease_expires_at = ?,"
                " attempts = attempts + 1, claims = claims + 1, updated_at = ? WHERE id = ?",
                (new_lease_token(), now + lease_s, now, row["id"]),
            )
            return select(conn, row["id"])
    return None


def bury(conn: Db, job_id: str, claims: int, now: float) -> Job:
    """queued | running (lease expired) -> dead, with the fixed ``job_dead`` envelope as its
    result: like :func:`finish`, but written from fixed text only, so it cannot fail on
    anything the job carries."""
    result = dead_body(claims)
    (body,) = conn.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
    conn.execute(
        "UPDATE jobs SET status = 'dead', result = ?, result_status = 500, last_error = ?,"
        " body = ?, headers = NULL, finished_at = ?, updated_at = ?, lease_token = NULL,"
        " lease_expires_at = NULL,"
        " webhook_status = CASE WHEN webhook_url IS NULL THEN 'none' ELSE 'pending' END,"
        " webhook_next_at = CASE WHEN webhook_url IS NULL THEN NULL ELSE ? END WHERE id = ?",
        (result, error_message(result), digest(bytes(body)), now, now, now, job_id),
    )
    job = select(conn, job_id)
    assert job is not None
    return job


def fenced_update(
    conn: Db,
    job_id: str,
    lease_token: str,
    assignments: str,
    params: tuple[Any, ...],
) -> bool:
    """Apply ``SET assignments`` only if the job runs under ``lease_token``; else nothing.
    (The row is locked from the check to the write: another gateway's claim cannot slip
    between them.)"""
    row = conn.execute(
        f"SELECT status, lease_token FROM jobs WHERE id = ?{conn.dialect.lock_row}", (job_id,)
    ).fetchone()
    if row is None or not fenced(JobStatus(row["status"]), row["lease_token"], lease_token):
        return False
    conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*params, job_id))
    return True


def finish(
    conn: Db,
    job_id: str,
    lease_token: str,
    to: JobStatus,
    result: bytes,
    status: int,
    now: float,
) -> bool:
    """running -> succeeded | failed: store the one result, redact the body to its digest
    (and drop the forwarded headers), and make the webhook (if any) due now."""
    row = conn.execute("SELECT body FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return False
    error = error_message(result) if to is JobStatus.FAILED else None
    return fenced_update(
        conn,
        job_id,
        lease_token,
        "status = ?, result = ?, result_status = ?, last_error = ?, body = ?, headers = NULL,"
        " finished_at = ?, updated_at = ?, lease_token = NULL, lease_expires_at = NULL,"
        " claims = 0,"
        " webhook_status = CASE WHEN webhook_url IS NULL THEN 'none' ELSE 'pending' END,"
        " webhook_next_at = CASE WHEN webhook_url IS NULL THEN NULL ELSE ? END",
        (to.value, result, status, error, digest(bytes(row["body"])), now, now, now),
    )


def retry(conn: Db, job_id: str, lease_token: str, error: bytes, at: float, now: float) -> bool:
    """running -> queued, due at ``at``; the attempt stays counted."""
    return fenced_update(
        conn,
        job_id,
        lease_token,
        "status = 'queued', lease_token = NULL, lease_expires_at = NULL, claims = 0,"
        " next_attempt_at = ?, last_error = ?, updated_at = ?",
        (at, error_message(error), now),
    )


def release(conn: Db, job_id: str, lease_token: str, now: float) -> bool:
    """running -> queued at once; the attempt is not counted (it never really ran)."""
    return fenced_update(
        conn,
        job_id,
        lease_token,
        "status = 'queued', lease_token = NULL, lease_expires_at = NULL,"
        " attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,"
        " claims = CASE WHEN claims > 0 THEN claims - 1 ELSE 0 END,"
        " next_attempt_at = ?, updated_at = ?",
        (now, now),
    )


def recover(conn: Db, now: float) -> int:
    """Expired leases (a crashed run) -> queued, due now. Returns how many."""
    count: int = conn.execute(
        "UPDATE jobs SET status = 'queued', lease_token = NULL, lease_expires_at = NULL,"
        " next_attempt_at = ?, updated_at = ? WHERE status = 'running' AND lease_expires_at <= ?",
        (now, now, now),
    ).rowcount
    return count


def due_webhooks(conn: Db, now: float, limit: int, lease_s: float) -> list[Job]:
    """Claim up to ``limit`` pending deliveries due now (oldest first): each is leased for
    ``lease_s`` (``webhook_next_at`` moved on), so no other gateway's webhook loop takes it
    meanwhile; :func:`webhook_attempted` records the outcome, and a lease that runs out
    (the delivering process died) makes the delivery due again."""
    rows = conn.execute(
        "SELECT * FROM jobs WHERE webhook_status = 'pending' AND webhook_next_at <= ?"
        f" ORDER BY webhook_next_at LIMIT ?{conn.dialect.skip_locked}",
        (now, limit),
    ).fetchall()
    jobs = [job_from_row(r) for r in rows]
    conn.executemany(
        "UPDATE jobs SET webhook_next_at = ? WHERE id = ?", [(now + lease_s, j.id) for j in jobs]
    )
    return jobs


def next_webhook_at(conn: Db, now: float) -> float | None:
    at: float | None = conn.execute(
        "SELECT MIN(webhook_next_at) FROM jobs WHERE webhook_status = 'pending'"
        " AND webhook_next_at > ?",
        (now,),
    ).fetchone()[0]
    return at


def webhook_attempted(conn: Db, job_id: str, to: WebhookStatus, next_at: float | None) -> None:
    """One delivery attempt recorded (``updated_at`` is the job's, and stays as it was)."""
    conn.execute(
        "UPDATE jobs SET webhook_status = ?, webhook_attempts = webhook_attempts + 1,"
        " webhook_next_at = ? WHERE id = ? AND webhook_status = 'pending'",
        (to.value, next_at, job_id),
    )


def sweep(conn: Db, before: float) -> int:
    """Delete jobs finished at or before ``before`` whose webhook is not still pending."""
    count: int = conn.execute(
        "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at <= ?"
        " AND webhook_status != 'pending'",
        (before,),
    ).rowcount
    return count


def sweep_responses(conn: Db, before: float) -> int:
    """Delete stored Responses created at or before ``before``."""
    count: int = conn.execute("DELETE FROM responses WHERE created_at <= ?", (before,)).rowcount
    return count


def oldest_response(conn: Db) -> float | None:
    at: float | None = conn.execute("SELECT MIN(created_at) FROM responses").fetchone()[0]
    return at


def oldest_finished(conn: Db) -> float | None:
    at: float | None = conn.execute(
        "SELECT MIN(finished_at) FROM jobs WHERE finished_at IS NOT NULL"
        " AND webhook_status != 'pending'"
    ).fetchone()[0]
    return at


# --- stored Responses (conversation state) ------------------------------------------------------


def save_response(conn: Db, record: StoredResponse) -> None:
    """Insert ``record``, replacing the tenant's record with the same id (a retried save)."""
    conn.execute(
        "INSERT INTO responses (tenant, id, created_at, input_items, response)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, id) DO UPDATE SET"
        " created_at = excluded.created_at, input_items = excluded.input_items,"
        " response = excluded.response",
        (
            storable(record.tenant),
            storable(record.id),
            record.created_at,
            record.input_items,
            record.response,
        ),
    )


def select_response(conn: Db, tenant: str, response_id: str, since: float) -> StoredResponse | None:
    """The tenant's record created after ``since`` (older ones are past retention)."""
    row = conn.execute(
        "SELECT * FROM responses WHERE tenant = ? AND id = ? AND created_at > ?",
        (storable(tenant), storable(response_id), since),
    ).fetchone()
    return None if row is None else response_from_row(row)


def delete_response(conn: Db, tenant: str, response_id: str, since: float) -> bool:
    """Delete the tenant's record created after ``since``; whether there was one."""
    deleted: int = conn.execute(
        "DELETE FROM responses WHERE tenant = ? AND id = ? AND created_at > ?",
        (storable(tenant), storable(response_id), since),
    ).rowcount
    return deleted > 0


def counts(conn: Db) -> dict[str, int]:
    rows = conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
    return {status: count for status, count in rows}


def error_message(envelope: bytes) -> str:
    """The ``error.message`` of an envelope, bounded and storable; never anything else of a
    body."""
    try:
        message = json.loads(envelope)["error"]["message"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return "the job failed"
    return storable(str(message)[:500]) or ""
