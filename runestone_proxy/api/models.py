"""The model catalogue in the Anthropic dialect: ``GET /v1/models`` and ``/v1/models/{id}``
as the Anthropic API answers them, for clients that send ``anthropic-version`` (the
Anthropic SDKs, Claude Code). The OpenAI shape stays in :mod:`.openai`, which serves both
paths and calls here when the header is present.

Anthropic's shapes (docs.anthropic.com, Models API; the SDK's ``types/model_info.py`` and
``pagination.py``): an item is ``{"type": "model", "id", "display_name", "created_at"}``
(RFC 3339; the epoch where the release date is unknown, as it is to a gateway), plus
``lifecycle``, which the SDK declares required. A page is ``{"data", "has_more",
"first_id", "last_id"}``, cut by the query's ``limit`` (1-1000, default 20), ``after_id``
and ``before_id``, so the SDK's auto-pagination walks a long catalogue page by page.
Pure: rows in, bytes out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs

from runestone_proxy.errors import InvalidParam

#: The header every Anthropic client sends (docs.anthropic.com: API versioning).
ANTHROPIC_VERSION = b"anthropic-version"
#: No release date is known here: the epoch, as the SDK's ``created_at`` docstring allows.
CREATED_AT = "1970-01-01T00:00:00Z"
DEFAULT_LIMIT = 20
MAX_LIMIT = 1000

#: (id, owner, alias target) as ``RoutingTable.listed_models`` gives them.
Row = tuple[str, str, str | None]


def model_info(row: Row) -> dict[str, Any]:
    """One model as Anthropic's ``ModelInfo``."""
    model_id = row[0]
    return {
        "type": "model",
        "id": model_id,
        "display_name": model_id,
        "created_at": CREATED_AT,
        "lifecycle": "active",
    }


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def info_body(row: Row) -> bytes:
    return _dumps(model_info(row))


def _limit(values: list[str]) -> int:
    text = values[-1] if values else ""
    if not text:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise InvalidParam(f"limit: must be an integer from 1 to {MAX_LIMIT}.", param="limit")
    return int(text)


def _index(ids: list[str], wanted: str, param: str) -> int:
    try:
        return ids.index(wanted)
    except ValueError:
        raise InvalidParam(f"{param}: no model with id `{wanted}`.", param=param) from None


def page_body(rows: Sequence[Row], query: str) -> bytes:
    """A page of ``rows`` as Anthropic's list answer, cut as ``query`` asks."""
    params = parse_qs(query, keep_blank_values=True)
    limit = _limit(params.get("limit", []))
    ids = [row[0] for row in rows]
    after = params.get("after_id", [""])[-1]
    before = params.get("before_id", [""])[-1]
    if after and before:
        raise InvalidParam("Set at most one of after_id and before_id.", param="before_id")
    if before:
        older = list(rows[: _index(ids, before, "before_id")])
        page, has_more = older[-limit:], len(older) > limit
    else:
        start = _index(ids, after, "after_id") + 1 if after else 0
        rest = rows[start:]
        page, has_more = list(rest[:limit]), len(rest) > limit
    return _dumps(
        {
            "data": [model_info(row) for row in page],
            "has_more": has_more,
            "first_id": page[0][0] if page else None,
            "last_id": page[-1][0] if page else None,
        }
    )
