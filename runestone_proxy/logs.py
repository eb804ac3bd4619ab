"""One structlog chain of pure processors: JSON lines in production, pretty on a TTY.

The chain adds a timestamp and level, redacts secrets (a second line of defence: callers
already pass masked keys), and renders. ``configure`` is called once by ``__main__`` and
again on SIGHUP when the level changes. The telemetry bridge turns ``emit()`` events into log
lines: most at debug, the ones an operator must see (breakers, auth failures) higher.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from runestone_proxy import telemetry

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_SECRET_FIELDS = frozenset(
    {
        "api_key",
        "authorization",
        "key",
        "token",
        "secret",
        "password",
        "x-api-key",
        "webhook_secret",
    }
)
# Bearer tokens and provider keys that slipped into free text: keep the last four characters.
_SECRET_TEXT = re.compile(
    r"\b(sk-(?:ant-)?|gsk_|Bearer\s+)([A-Za-z0-9_\-]{4,})([A-Za-z0-9_\-]{4})\b"
)

_LOUD_EVENTS = {
    "admin.key": "info",  # the audit trail of key changes
    "keys.loaded": "info",  # a process put the stored keys' change in force (version, keys)
    "keys.refresh.failed": "warning",  # the store did not answer the keys poll: keys are stale
    "budget.block": "info",  # a request refused for a budget (which one, spent, estimate)
    "admin.auth_failure": "warning",
    "auth.failure": "warning",
    "circuit.open": "warning",
    "circuit.half_open": "info",
    "circuit.close": "info",
    "config.reload.failed": "error",
}


def redact(
    _logger: object, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Mask secret-named fields and key-shaped substrings anywhere in string values."""
    for field, value in event.items():
        if field in _SECRET_FIELDS and isinstance(value, str | bytes):
            event[field] = telemetry.mask_key(value)
        elif isinstance(value, str) and ("sk-" in value or "Bearer" in value or "gsk_" in value):
            event[field] = _SECRET_TEXT.sub(r"\1...\3", value)
    return event


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    global _enabled_level
    _enabled_level = _LEVELS[level]
    stream = stream if stream is not None else sys.stderr
    pretty = fmt == "console" or (fmt == "auto" and stream.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=True)
        if pretty
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (print() writes the line and its newline separately): the
        # workers of server.workers > 1 share one stderr, and a pipe keeps writes of up to
        # PIPE_BUF (4 KiB) whole, so their JSON lines never interleave.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


_enabled_level = logging.INFO
_telemetry_log = structlog.get_logger("runestone.telemetry")


def enabled(level: str) -> bool:
    """Whether a line at ``level`` would be written: lets hot paths skip building fields."""
    return _LEVELS[level] >= _enabled_level


def telemetry_to_log(event: str, fields: dict[str, Any]) -> None:
    """The telemetry handler that writes events as log lines."""
    level = _LOUD_EVENTS.get(event, "debug")
    if _LEVELS[level] < _enabled_level:
        return  # most events are debug: skip the logger entirely on the hot path
    getattr(_telemetry_log, level)(event, **fields)


def get_logger(name: str = "runestone") -> Any:
    return structlog.get_logger(name)
