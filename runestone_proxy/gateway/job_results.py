"""What a finished job run is stored as: bounded, and always an error envelope when it failed.

Pure, like :mod:`runestone_proxy.gateway.overflow` (whose state table says why a job can
end ``dead``). The drainer passes every outcome through :func:`storable_outcome` before it
settles the job, stores :func:`unstorable_body` when the store refuses an outcome, and the
store buries a job with :func:`dead_body`: fixed text, so those writes need nothing of the
job's own.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from runestone_proxy.gateway.overflow import JobOutcome, error_envelope


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _is_envelope(body: bytes) -> bool:
    """Is ``body`` OpenAI's ``{"error": {...}}``? (Not JSON, or nested past the parser's
    depth, is not.)"""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and isinstance(value.get("error"), dict)


def storable_outcome(outcome: JobOutcome, max_bytes: int) -> JobOutcome:
    """``outcome`` as it may be stored: a body over ``max_bytes`` becomes a 502
    ``result_too_large`` failure, and a failure whose body is not an OpenAI error envelope
    (a provider answering garbage) gets one. Any other bytes are stored as they are."""
    if len(outcome.body) > max_bytes:
        message = (
            f"The job's result ({len(outcome.body)} bytes) is larger than the "
            f"{max_bytes} bytes a job may store."
        )
        return JobOutcome(502, _dumps(error_envelope(message, "result_too_large")))
    if outcome.ok:
        return outcome
    if _is_envelope(outcome.body):
        return outcome
    message = f"The job failed with status {outcome.status}."
    body = _dumps(error_envelope(message))
    return attrs.evolve(outcome, body=body)


DEAD_MESSAGE = (
    "The job was given up: it was claimed {claims} times without an outcome being recorded "
    "(its outcome could not be stored, or the gateway stopped while it ran)."
)


def unstorable_body() -> bytes:
    """What replaces an outcome that could not be stored (fixed text: always storable)."""
    message = "The job's outcome could not be stored."
    return _dumps(error_envelope(message, "job_outcome_unstorable"))


def dead_body(claims: int) -> bytes:
    """A ``dead`` job's result: fixed text, so burying needs nothing of the job's own."""
    return _dumps(error_envelope(DEAD_MESSAGE.format(claims=claims), "job_dead"))
