"""Request bodies, pure: parse once, strictly, and check the fields Runestone reads.

The request service (:mod:`.service`) runs these for a live request and for a queued job
alike (:func:`parse_object`, :func:`validate`, :func:`check_runestone_fields`), so both
refuse the same bodies; no I/O here. :func:`check_idempotency_key` is the one header rule
the service applies itself.

What a generation body must be (the README's "Request bodies" says the same to users):

* UTF-8 JSON text (RFC 8259 §8.1) whose top level is an object; the ``Content-Type`` header
  is not consulted, so ``curl -d '{...}'`` without ``-H 'content-type: application/json'``
  works. A BOM, UTF-16, invalid UTF-8, ``NaN``/``Infinity`` or trailing data is a 400.
* No duplicate keys at the top level, where Runestone's own fields live: a body forwarded
  byte for byte must not mean one ``model`` to the router and another to a provider that
  keeps the first of two keys. Deeper objects are the provider's to judge.
* At most :data:`MAX_DEPTH` levels of nesting, so that nothing after the parse (the token
  estimate, a re-encode for a provider) can run out of recursion; a body too deep for
  Python's own parser is the same 400, never a ``RecursionError``.
* Escaped lone surrogates (``"\\ud800"``) are accepted where Runestone only carries the
  value (a re-encode writes them back as ``\\u`` escapes, see ``providers/json_codec.dumps``),
  and refused (400 naming the param) in the strings Runestone itself uses: ``model``,
  ``provider``, ``model_family``, ``capabilities``, ``tenant_id``, ``webhook_url``.

How it stays cheap (this runs on every request). A body of at most :data:`FAST_MAX_BYTES`
with no ``\\u`` or ``\\/`` escape anywhere is parsed by the C decoder alone, and each
top-level key is then looked for in the raw bytes: without those two escapes a key has one
spelling, so a key found exactly once cannot be a duplicate (about 0.1 us a key). Anything
else (a larger body, an escape, a key also spelled deeper down) takes the careful path: the
top-level object is read by the json module's own pure-Python object reader
(``json.decoder.JSONObject``) with the C scanner for every value, so only the top level pays
for keeping its pairs (about 1.5-2 us per request, independent of size) and duplicates
anywhere below cost nothing. The depth walk runs only when the body holds more than
:data:`MAX_DEPTH` opening brackets (two ``bytes.count`` passes, ~0.3 ns per byte each; a body
of ``2 * MAX_DEPTH`` bytes or less skips even those).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from json.decoder import JSONObject  # type: ignore[attr-defined]  # public, untyped
from typing import Any

from runestone_proxy.errors import InvalidJSON, InvalidParam
from runestone_proxy.providers.base import RUNESTONE_FIELDS, Endpoint

#: The deepest nesting accepted (the body object itself is level 1). A chat body with image
#: parts is 6 deep; a tool's JSON schema adds 2 per nested object.
MAX_DEPTH = 128

_UNPARSABLE = "We could not parse the JSON body of your request: it must be one JSON object."
_TOO_DEEP = f"The JSON body of your request is nested more than {MAX_DEPTH} levels deep."
_WHITESPACE = re.compile(r"[ \t\n\r]*")

#: Bodies up to this size may take the fast path (past it, counting keys in the raw bytes
#: costs more than reading the top level in Python; measured: 13 KB, 38 us against 18).
FAST_MAX_BYTES = 4096
#: A key whose JSON spelling is the key itself: printable ASCII, no quote, no backslash.
_PLAIN_KEY = re.compile(r"[ !#-\[\]-~]*")
#: Plain keys seen before -> their quoted bytes (``_quoted``).
_QUOTED: dict[str, bytes] = {}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _keep_pairs(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return pairs


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_SCAN = _DECODER.scan_once  # type: ignore[attr-defined]  # the C scanner, set up by __init__


def parse_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body (see the module docstring); 400 :class:`InvalidJSON` if it is not
    a UTF-8 JSON object with unique top-level keys, nested at most :data:`MAX_DEPTH` deep."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJSON(
            f"The request body is not valid UTF-8 (at byte {exc.start}). {_UNPARSABLE}"
        ) from None
    body = _fast_object(raw, text) if len(raw) <= FAST_MAX_BYTES else None
    if body is None:
        body = _careful_object(text)
    if (
        len(raw) > 2 * MAX_DEPTH
        and raw.count(b"{") + raw.count(b"[") > MAX_DEPTH
        and _deeper_than(body, MAX_DEPTH)
    ):
        raise InvalidJSON(_TOO_DEEP)
    return body


def _fast_object(raw: bytes, text: str) -> dict[str, Any] | None:
    """The body, if the C decoder and a count of each top-level key in ``raw`` can vouch for
    it (see the module docstring); None when only the careful path can tell."""
    if b"\\u" in raw or b"\\/" in raw:
        return None
    try:
        body = _DECODER.decode(text)
    except (ValueError, RecursionError):
        return None  # the careful path names the problem
    if type(body) is not dict:
        return None
    for key in body:
        quoted = _QUOTED.get(key)
        if quoted is None:
            if _PLAIN_KEY.fullmatch(key) is None:
                return None
            quoted = _quoted(key)
        if raw.count(quoted) != 1:
            return None
    return body


def _quoted(key: str) -> bytes:
    """``"key"`` as bytes, remembered for the next body (bounded: keys are client input)."""
    if len(_QUOTED) >= 1024:
        _QUOTED.clear()
    quoted = _QUOTED[key] = b'"%b"' % key.encode()
    return quoted


def _careful_object(text: str) -> dict[str, Any]:
    try:
        pairs = _top_level_pairs(text)
    except RecursionError:
        raise InvalidJSON(_TOO_DEEP) from None
    except ValueError:  # JSONDecodeError, a rejected constant
        raise InvalidJSON(_UNPARSABLE) from None
    if pairs is None:
        raise InvalidJSON("The request body must be a JSON object.")
    body = dict(pairs)
    if len(body) != len(pairs):
        raise _duplicate(pairs)
    return body


def _top_level_pairs(text: str) -> list[tuple[str, Any]] | None:
    """The top-level object's (key, value) pairs in order; None for valid JSON that is not
    an object. Raises ValueError (or RecursionError) for anything that is not JSON."""
    start = _WHITESPACE.match(text).end()  # type: ignore[union-attr]  # matches ""
    if text[start : start + 1] != "{":
        _DECODER.decode(text)  # raises for invalid JSON; else it is an array, a string...
        return None
    pairs, end = JSONObject((text, start + 1), True, _SCAN, None, _keep_pairs, {})
    if _WHITESPACE.match(text, end).end() != len(text):  # type: ignore[union-attr]
        raise ValueError("extra data after the JSON object")
    return pairs  # type: ignore[no-any-return]


def _duplicate(pairs: list[tuple[str, Any]]) -> InvalidJSON:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            shown = key[:100]
            return InvalidJSON(
                f"The request body has the key {shown!r} more than once; each top-level "
                "parameter may appear only once.",
                param=shown,
                code="duplicate_parameter",
            )
        seen.add(key)
    raise AssertionError("no duplicate")  # pragma: no cover


def _deeper_than(body: dict[str, Any], limit: int) -> bool:
    """Whether ``body`` nests more than ``limit`` levels: one pass per level over the
    containers only (never recursive, so a deep body cannot hurt the check itself)."""
    level: list[Any] = [body]
    for _ in range(limit):
        below = []
        for node in level:
            for child in node.values() if type(node) is dict else node:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        if not below:
            return False
        level = below
    return True


# --- the fields Runestone itself reads -------------------------------------------------------

_REQUIRED = {
    "chat": "messages",
    "completions": "prompt",
    "embeddings": "input",
    "messages": "messages",
    "count_tokens": "messages",
    "responses": "input",
}
#: The endpoints whose required field is a list of role-tagged messages.
_MESSAGE_LISTS = frozenset({"chat", "messages", "count_tokens"})


def validate(endpoint: Endpoint, body: Mapping[str, Any]) -> None:
    """400 for a body that lacks what ``endpoint`` needs (``model``, the messages, the prompt
    or the input) or whose ``stream``/``stream_options`` have the wrong type."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidParam("you must provide a model parameter", param="model")
    field = _REQUIRED[endpoint]
    value = body.get(field)
    if value is None:
        raise InvalidParam(
            f"Missing required parameter: '{field}'.",
            param=field,
            code="missing_required_parameter",
        )
    if endpoint == "messages":
        # Anthropic requires max_tokens ("max_tokens: Field required"); a translated path
        # needs it as much as the native one.
        max_tokens = body.get("max_tokens")
        if type(max_tokens) is not int or max_tokens < 1:
            raise InvalidParam(
                "max_tokens: Field required (a positive integer).", param="max_tokens"
            )
    if endpoint == "responses" and not isinstance(value, str | list):
        raise InvalidParam("'input' must be a string or an array of items.", param="input")
    if endpoint in _MESSAGE_LISTS:
        if not isinstance(value, list) or not value:
            raise InvalidParam("'messages' must be a non-empty array.", param="messages")
        for index, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidParam(
                    f"Invalid message at index {index}: each message needs a 'role'.",
                    param=f"messages[{index}]",
                )
    for flag in ("stream",):
        if flag in body and not isinstance(body[flag], bool):
            raise InvalidParam(f"'{flag}' must be a boolean.", param=flag)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidParam("'stream_options' must be an object.", param="stream_options")


#: The string-valued ones among :data:`~runestone_proxy.providers.base.RUNESTONE_FIELDS`.
_STRING_FIELDS = ("provider", "model_family", "tenant_id", "webhook_url")
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def check_runestone_fields(body: Mapping[str, Any]) -> None:
    """400 for a bad value in a field Runestone reads beyond :func:`validate`'s: the
    routing extras' types, the token limits (TPM reservation), and valid Unicode in every
    string Runestone uses (``model`` included). Everything else is the provider's to judge."""
    model = body["model"]  # validate() made it a non-empty string
    if not model.isascii():
        _check_unicode(model, "model")
    if not RUNESTONE_FIELDS.isdisjoint(body):  # most bodies carry none of Runestone's own
        _check_extras(body)
    for name in _TOKEN_FIELDS:
        value = body.get(name)
        if value is not None and (type(value) is not int):
            raise InvalidParam(f"'{name}' must be an integer.", param=name)


def _check_extras(body: Mapping[str, Any]) -> None:
    for name in _STRING_FIELDS:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidParam(f"'{name}' must be a string.", param=name)
        if not value.isascii():
            _check_unicode(value, name)
    capabilities = body.get("capabilities")
    if isinstance(capabilities, list):
        for index, item in enumerate(capabilities):
            if isinstance(item, str) and not item.isascii():
                _check_unicode(item, f"capabilities[{index}]")


def _check_unicode(value: str, param: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParam(
            f"'{param}' contains an unpaired UTF-16 surrogate escape; it must be valid Unicode.",
            param=param,
        ) from None


_MAX_IDEMPOTENCY_KEY = 255


def check_idempotency_key(value: bytes | None) -> str | None:
    """The ``Idempotency-Key`` header's value: 1-255 printable ASCII characters, else 400."""
    if value is None:
        return None
    if not 0 < len(value) <= _MAX_IDEMPOTENCY_KEY or not all(0x20 <= b <= 0x7E for b in value):
        raise InvalidParam(
            f"The Idempotency-Key header must be 1 to {_MAX_IDEMPOTENCY_KEY} printable "
            "ASCII characters.",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return value.decode("ascii")
