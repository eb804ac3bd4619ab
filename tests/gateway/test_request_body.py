"""The request validator as a pure function over bytes (issue 10, item 7): a body is either
a parsed, validated, routed request or a :class:`GatewayError` with a 4xx status whose body
is OpenAI's envelope, whatever the bytes. ``validator`` is what ``Service.accept`` runs
before any answer (live or 202): ``parse_object`` then ``Service.route``.

Hypothesis runs derandomized (fixed seed) so the suite is reproducible.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.config import Config, ModelConfig, ProviderConfig
from runestone_proxy.errors import GatewayError, InvalidJSON
from runestone_proxy.gateway.request_body import (
    MAX_DEPTH,
    _careful_object,
    _fast_object,
    parse_object,
)
from runestone_proxy.gateway.routing import RoutingTable
from runestone_proxy.gateway.service import Route, Service
from runestone_proxy.providers.base import Endpoint
from runestone_proxy.providers.json_codec import dumps

CONFIG = Config(
    providers=(ProviderConfig("mock", "mock"),),
    models=(
        ModelConfig("mock-1", "mock", capabilities=("chat", "streaming", "completions")),
        ModelConfig("mock-embed-1", "mock", capabilities=("embeddings",)),
    ),
)
API = SimpleNamespace(
    routing=RoutingTable.build(CONFIG, {}), policy="default", default_output_tokens=256
)
ENDPOINTS: tuple[Endpoint, ...] = ("chat", "completions", "embeddings")
FUZZ = settings(derandomize=True, max_examples=200, deadline=None)


def validator(endpoint: Endpoint, raw: bytes) -> tuple[dict[str, Any], Route]:
    body = parse_object(raw)
    return body, Service.route(API, endpoint, body, len(raw))  # type: ignore[arg-type]


def check(endpoint: Endpoint, raw: bytes) -> dict[str, Any] | None:
    """The property: a parsed request, or a 4xx GatewayError whose body is the envelope."""
    try:
        body, _ = validator(endpoint, raw)
    except GatewayError as exc:
        refused: GatewayError | None = exc
    else:
        refused = None
    if refused is not None:
        assert 400 <= refused.http_status < 500, refused
        error = json.loads(refused.body())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert isinstance(error["message"], str)
        assert error["message"]
        return None
    # What parsed is exactly what json reads, and every re-encode for a provider works.
    assert body == json.loads(raw)
    assert json.loads(dumps(body)) == body
    return body


# --- strategies ------------------------------------------------------------------------------

#: Strings with the hostile kinds of text: lone surrogates, controls, non-BMP characters.
characters = st.characters(codec=None, exclude_categories=()) | st.sampled_from(
    ["\ud800", "\udfff", "\U0001f600", "\x00", '"', "\\"]
)
texts = st.text(characters, max_size=20)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=30,
)
FIELDS = (
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "stream_options",
    "max_tokens",
    "provider",
    "model_family",
    "capabilities",
    "max_cost_per_token",
    "tenant_id",
    "webhook_url",
)
field_values = st.sampled_from(["mock-1", "mock-embed-1", "mock", "nope", "\ud800"]) | values
bodies = st.dictionaries(st.sampled_from(FIELDS) | texts, field_values, max_size=8)


def encode(body: Any, ascii_only: bool) -> bytes:
    text = json.dumps(body, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")  # ensure_ascii=False: raw surrogates, bad UTF-8


# --- properties ------------------------------------------------------------------------------


@FUZZ
@given(st.sampled_from(ENDPOINTS), st.binary(max_size=300))
def test_any_bytes_are_a_request_or_a_4xx_envelope(endpoint: Endpoint, raw: bytes) -> None:
    check(endpoint, raw)


@FUZZ
@given(st.sampled_from(ENDPOINTS), bodies, st.booleans())
def test_any_json_object_is_a_request_or_a_4xx_envelope(
    endpoint: Endpoint, body: dict[str, Any], ascii_only: bool
) -> None:
    check(endpoint, encode(body, ascii_only))


@FUZZ
@given(
    st.sampled_from(ENDPOINTS),
    bodies,
    st.lists(
        st.tuples(
            st.integers(0, 10_000),
            st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"\\ud800", b",", b"\xff"]),
            st.integers(1, 2000),
        ),
        max_size=4,
    ),
)
def test_spliced_json_is_a_request_or_a_4xx_envelope(
    endpoint: Endpoint, body: dict[str, Any], splices: list[tuple[int, bytes, int]]
) -> None:
    raw = bytearray(encode({"model": "mock-1", **body}, ascii_only=True))
    for at, piece, times in splices:
        raw[at:at] = piece * times
    check(endpoint, bytes(raw))


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.integers(1, 3 * MAX_DEPTH) | st.integers(900, 1100) | st.just(100_000), st.booleans())
def test_depth_is_capped_without_recursion_errors(depth: int, objects: bool) -> None:
    """The body object is level 1; nesting inside it counts from there."""
    opener, closer = (b'{"a":', b"}") if objects else (b"[", b"]")
    inner = opener * (depth - 1) + b"1" + closer * (depth - 1)
    raw = b'{"model": "mock-1", "prompt": "x", "x": ' + inner + b"}"
    if depth <= MAX_DEPTH:
        assert check("completions", raw) is not None
    else:
        with pytest.raises(InvalidJSON, match="nested more than"):
            parse_object(raw)


@FUZZ
@given(bodies.filter(bool), st.data())
def test_a_duplicate_top_level_key_is_refused_by_name(body: dict[str, Any], data: Any) -> None:
    key = data.draw(st.sampled_from(sorted(body)))
    raw = encode(body, ascii_only=True)
    raw = raw[:-1] + (b", " if len(body) else b"") + encode({key: 1}, ascii_only=True)[1:]
    with pytest.raises(InvalidJSON) as caught:
        parse_object(raw)
    assert caught.value.param == key[:100]
    assert caught.value.code == "duplicate_parameter"


# --- examples --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"[]",
        b'"x"',
        b"1",
        b"null",
        b"\xef\xbb\xbf{}",  # a UTF-8 BOM
        '{"model":"mock-1"}'.encode("utf-16"),
        b'{"model":"mock-1"} {}',
        b'{"model": NaN}',
        b'{"model": Infinity}',
        b'{"model": "mock-1", "prompt": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8
        b'{"model": "mock-1",}',
    ],
)
def test_bodies_that_are_not_one_utf8_json_object(raw: bytes) -> None:
    with pytest.raises(InvalidJSON):
        parse_object(raw)


def test_nested_duplicates_are_the_providers_and_whitespace_is_fine() -> None:
    raw = b' \n{"model": "mock-1", "stream_options": {"a": 1, "a": 2}}\r\n'
    assert parse_object(raw) == {"model": "mock-1", "stream_options": {"a": 2}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "mock-\ud800"}, "model"),
        ({"provider": "mo\udfffck"}, "provider"),
        ({"tenant_id": "\ud800"}, "tenant_id"),
        ({"model_family": "\ud800"}, "model_family"),
        ({"webhook_url": "http://\ud800"}, "webhook_url"),
        ({"capabilities": ["chat", "\ud800"]}, "capabilities[1]"),
        ({"tenant_id": 5}, "tenant_id"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"max_tokens": True}, "max_tokens"),
    ],
)
def test_the_strings_and_numbers_runestone_uses_are_checked(
    body: dict[str, Any], param: str
) -> None:
    raw = json.dumps({"model": "mock-1", "prompt": "x", **body}).encode()
    with pytest.raises(GatewayError) as caught:
        validator("completions", raw)
    assert caught.value.http_status == 400
    assert caught.value.param == param


def test_a_lone_surrogate_elsewhere_is_carried_and_re_encoded_as_an_escape() -> None:
    raw = b'{"model": "mock-1", "prompt": "a\\ud800b", "user": "\\udfff"}'
    body, _ = validator("completions", raw)
    assert body["prompt"] == "a\ud800b"
    assert dumps(body) == b'{"model":"mock-1","prompt":"a\\ud800b","user":"\\udfff"}'


def test_nan_is_refused_even_inside() -> None:
    with pytest.raises(InvalidJSON):
        parse_object(b'{"model": "mock-1", "x": [1, {"y": -Infinity}]}')


# --- the fast path (small bodies without \u or \/ escapes) --------------------------------


@FUZZ
@given(bodies, st.booleans(), st.data())
def test_the_fast_path_vouches_only_for_what_the_careful_path_accepts(
    body: dict[str, Any], ascii_only: bool, data: Any
) -> None:
    """Whatever the fast path returns, the careful path returns too; where the careful path
    finds a duplicate, the fast path declines."""
    raw = encode(body, ascii_only)
    if body and data.draw(st.booleans()):  # repeat a key, spelled as json.dumps spells it
        key = data.draw(st.sampled_from(sorted(body)))
        raw = raw[:-1] + b", " + encode({key: 1}, ascii_only)[1:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    fast = _fast_object(raw, text)
    try:
        careful: dict[str, Any] | None = _careful_object(text)
    except InvalidJSON:
        careful = None
    if fast is not None:
        assert fast == careful


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "mock-1", "mod\\u0065l": "other"}',  # one key, two spellings
        b'{"a\\/b": 1, "a/b": 2}',
        '{"modèle": 1, "modèle": 2}'.encode(),
        b'{"a\\"b": 1, "a\\"b": 2}',
    ],
)
def test_duplicates_spelled_with_escapes_or_odd_characters_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidJSON) as caught:
        parse_object(raw)
    assert caught.value.code == "duplicate_parameter"


def test_a_key_also_found_deeper_or_as_a_value_is_not_a_duplicate() -> None:
    raw = b'{"model": "mock-1", "messages": [{"role": "user", "content": "model"}], '
    raw += b'"x": {"model": 1}}'
    assert _fast_object(raw, raw.decode()) is None  # the fast path cannot tell; careful can
    assert parse_object(raw)["x"] == {"model": 1}


def test_a_plain_small_body_takes_the_fast_path() -> None:
    raw = b'{"model": "mock-1", "messages": [{"role": "user", "content": "hi"}], "n": 1}'
    assert _fast_object(raw, raw.decode()) == json.loads(raw)
