"""The telemetry spine: ``emit(event, **fields)`` fans out to every registered handler.

Event names are dotted (``router.decide``, ``provider.request.stop``; the full list is in
design.md). Handlers are plain callables ``(event, fields) -> None``: the structlog bridge,
the metrics registry, and in tests a recorder. Emitting with no handlers costs an empty loop,
so hot paths may emit freely; nothing emits per SSE chunk.

No event ever carries a prompt, a completion or a whole API key: callers pass ids, counts
and masked keys (:func:`mask_key`), and the log chain redacts again as a second line of
defence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

TelemetryHandler = Callable[[str, dict[str, Any]], None]

#: A tuple, replaced whole when a handler is added or removed: ``emit`` (per request,
#: several times) iterates it without copying, and a handler that adds or removes one
#: does not disturb the loop in progress.
_handlers: tuple[TelemetryHandler, ...] = ()


def emit(event: str, **fields: Any) -> None:
    """Send ``event`` to every handler. A failing handler never breaks the caller."""
    for handler in _handlers:
        try:
            handler(event, fields)
        except Exception:  # telemetry must never fail a request
            continue


def add_handler(handler: TelemetryHandler) -> Callable[[], None]:
    """Register ``handler``; returns a function that removes it again."""
    global _handlers
    _handlers = (*_handlers, handler)

    def remove() -> None:
        global _handlers
        if handler in _handlers:
            index = _handlers.index(handler)
            _handlers = _handlers[:index] + _handlers[index + 1 :]

    return remove


def mask_key(key: str | bytes | None) -> str:
    """``sk-abc...wxyz`` -> ``sk-...wxyz``: enough to tell keys apart, never enough to use."""
    if key is None:
        return "-"
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    if len(text) <= 8:
        return "..." + text[-2:] if len(text) > 2 else "***"
    prefix = text[:3] if text.startswith("sk-") else text[:2]
    return f"{prefix}...{text[-4:]}"


@attrs.define
class Recorder:
    """A handler that keeps events in memory: for tests, and for /health summaries."""

    events: list[tuple[str, dict[str, Any]]] = attrs.Factory(list)

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]
