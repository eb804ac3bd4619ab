"""Webhooks, the rules (pure): which URL the gateway may POST a job's result to, what it
posts (:func:`webhook_body`), how it signs it (:func:`sign`; :func:`verify` is the
receiver's check), and what a delivery attempt leads to (:func:`webhook_settle`).

The webhook's state (:class:`~runestone_proxy.gateway.overflow.WebhookStatus`) is a column
of the job's row, so its table of transitions is beside the job's, in
:mod:`runestone_proxy.gateway.overflow`. The drainer's delivery
(:mod:`runestone_proxy.server.webhook_delivery`) decides with these and does the I/O.
Retries back off exponentially with full jitter (``gateway/backoff.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from urllib.parse import urlsplit

from runestone_proxy.errors import InvalidParam
from runestone_proxy.gateway.backoff import backoff_s
from runestone_proxy.gateway.overflow import Job, JobStatus, WebhookStatus, job_view

__all__ = [
    "MAX_WEBHOOK_URL",
    "check_webhook_url",
    "sign",
    "verify",
    "webhook_body",
    "webhook_settle",
    "webhook_url_ok",
]


MAX_WEBHOOK_URL = 2048


def webhook_url_ok(url: str) -> bool:
    """The one rule for a URL the gateway POSTs a result to, checked when a job is accepted
    and again before each delivery: absolute ``http``/``https`` with a host and a valid port,
    at most :data:`MAX_WEBHOOK_URL` characters, no whitespace or control character (RFC 3986
    §2 allows neither, and ``urlsplit`` drops tabs and newlines: it would judge another URL
    than the one posted)."""
    if not 0 < len(url) <= MAX_WEBHOOK_URL or not url.isprintable() or " " in url:
        return False
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError: not a number, or past 65535
    except ValueError:  # also a broken IPv6 literal
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


def check_webhook_url(value: object) -> str | None:
    """A request's ``webhook_url``: None (no webhook) or a URL :func:`webhook_url_ok` takes,
    else 400 ``invalid_value``."""
    if value is None or (isinstance(value, str) and webhook_url_ok(value)):
        return value
    raise InvalidParam("'webhook_url' must be an absolute http or https URL.", param="webhook_url")


def webhook_settle(
    delivered: bool,
    attempts: int,
    *,
    max_attempts: int,
    base_s: float,
    max_s: float,
    now: float,
    rand: Callable[[], float],
    retryable: bool = True,
) -> tuple[WebhookStatus, float | None]:
    """After delivery attempt number ``attempts``: the webhook's next state and due time.
    ``retryable=False``: no retry can succeed (a URL :func:`webhook_url_ok` refuses)."""
    if delivered:
        return WebhookStatus.DELIVERED, None
    if attempts >= max_attempts or not retryable:
        return WebhookStatus.FAILED, None
    return WebhookStatus.PENDING, now + backoff_s(attempts, base_s, max_s, rand)


def webhook_body(job: Job) -> bytes:
    """The webhook's JSON: the job view with ``result`` holding the OpenAI body or, for a
    failed job, the error envelope."""
    view = job_view(job)
    if job.status in (JobStatus.FAILED, JobStatus.DEAD):
        view["result"] = view["error"]
    return json.dumps(view, separators=(",", ":")).encode()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``x-runestone-signature``: ``t=<ts>,v1=<hex HMAC-SHA256(secret, "<ts>.<body>")>``."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: bytes, header: str, body: bytes, *, now: int, tolerance_s: int = 300) -> bool:
    """A receiver's check of :func:`sign` (used by the tests; handy for users)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).partition(",v1=")[2]
    return hmac.compare_digest(expected, fields.get("v1", ""))
