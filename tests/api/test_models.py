"""The Anthropic-shaped model catalogue (``api/models.py``): items and pages, as plain data."""

from __future__ import annotations

import json

import pytest

from runestone_proxy.api.models import info_body, page_body
from runestone_proxy.errors import InvalidParam

ROWS = [(f"m{i}", "mock", None) for i in range(5)]


def page(query: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(page_body(ROWS, query))
    return loaded


def ids(answer: dict[str, object]) -> list[str]:
    data = answer["data"]
    assert isinstance(data, list)
    return [item["id"] for item in data]


def test_an_item_is_anthropic_model_info() -> None:
    assert json.loads(info_body(("fast", "runestone", "openai:gpt-4o"))) == {
        "type": "model",
        "id": "fast",
        "display_name": "fast",
        "created_at": "1970-01-01T00:00:00Z",
        "lifecycle": "active",
    }


@pytest.mark.parametrize(
    ("query", "expected", "has_more"),
    [
        ("", ["m0", "m1", "m2", "m3", "m4"], False),
        ("limit=2", ["m0", "m1"], True),
        ("limit=2&after_id=m1", ["m2", "m3"], True),
        ("limit=2&after_id=m2", ["m3", "m4"], False),
        ("after_id=m4", [], False),
        ("limit=2&before_id=m4", ["m2", "m3"], True),
        ("limit=2&before_id=m2", ["m0", "m1"], False),
        ("before_id=m0", [], False),
        ("limit=1000", ["m0", "m1", "m2", "m3", "m4"], False),
    ],
)
def test_pages(query: str, expected: list[str], has_more: bool) -> None:
    answer = page(query)
    assert ids(answer) == expected
    assert answer["has_more"] is has_more
    assert answer["first_id"] == (expected[0] if expected else None)
    assert answer["last_id"] == (expected[-1] if expected else None)


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=two", "limit"),
        ("limit=-1", "limit"),
        ("after_id=nope", "after_id"),
        ("before_id=nope", "before_id"),
        ("after_id=m1&before_id=m3", "before_id"),
    ],
)
def test_bad_queries_are_400_naming_the_parameter(query: str, param: str) -> None:
    with pytest.raises(InvalidParam) as info:
        page(query)
    assert info.value.param == param
