"""Server-sent events (text/event-stream): an incremental parser and an encoder. No I/O.

Implements the WHATWG HTML "event stream interpretation" rules.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class SSEEvent:
    """One dispatched event. ``data`` is the joined ``data:`` lines (bytes, UTF-8)."""

    data: bytes
    event: str = "message"
    id: str | None = None
    retry: int | None = None
