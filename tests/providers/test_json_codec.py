"""The provider JSON codec (``providers/json_codec.py``): compact UTF-8 out, a checked
object in."""

from __future__ import annotations

import pytest

from runestone_proxy.errors import UpstreamProtocolError
from runestone_proxy.providers.json_codec import dumps, loads_object


def test_dumps_is_compact_utf8() -> None:
    assert dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()


def test_loads_object_returns_the_object() -> None:
    assert loads_object(b'{"id": "x"}', "body") == {"id": "x"}


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"{not json", "body is not valid JSON"),
        (b'"\xff"', "body is not valid JSON"),
        (b"[1, 2]", "body is not a JSON object"),
    ],
)
def test_loads_object_refuses_what_is_not_an_object(data: bytes, says: str) -> None:
    with pytest.raises(UpstreamProtocolError, match=says):
        loads_object(data, "body")
