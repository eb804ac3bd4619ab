"""JSON to and from provider bodies. No I/O.

Owns the two conversions every translator shares: :func:`dumps` writes compact UTF-8 JSON
(what OpenAI itself sends), :func:`loads_object` reads a provider's JSON object or raises
:class:`~runestone_proxy.errors.UpstreamProtocolError`.
"""

from __future__ import annotations

import json
from typing import Any

from runestone_proxy.errors import UpstreamProtocolError

__all__ = ["dumps", "loads_object"]


def dumps(obj: object) -> bytes:
    """Compact JSON, UTF-8 (what OpenAI itself sends).

    A client's escaped lone surrogate (``"\\ud800"``, valid JSON, not valid Unicode) cannot
    be written as UTF-8: only then is the object written again with ``\\u`` escapes, which
    carry the value on exactly as the client sent it (no cost for any other body)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def loads_object(data: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object from a provider, or raise :class:`UpstreamProtocolError`."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UpstreamProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise UpstreamProtocolError(f"{what} is not a JSON object")
    return obj
