"""Reading OpenAI chat chunks and answers cheaply: what the dialect encoders share. No I/O.

The Messages and Responses encoders (``messages_stream``, ``responses_stream``) and their
whole-answer twins read the same OpenAI shapes (https://platform.openai.com/docs/api-reference/chat/streaming):

* :func:`loads_chunk`: one chunk's JSON, at about half ``json.loads``' cost;
* :func:`plain_text`: the common chunk (one choice, a text delta, nothing else) read from
  its bytes: the delta's JSON string literal, forwarded as it is, with no decode and no
  encode (anything else is None: the full parse decides);
* :func:`chunk_choice` / :func:`choice_zero`: choice 0 of a chunk / of a whole answer;
* :func:`json_string`: a str as the JSON string literal the encoders splice into frames.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from json.encoder import encode_basestring, encode_basestring_ascii
from typing import Any, Literal

from runestone_proxy.errors import UpstreamProtocolError

__all__ = [
    "choice_zero",
    "chunk_choice",
    "delta_pieces",
    "json_string",
    "literal_text",
    "loads_chunk",
    "plain_text",
    "tool_key",
]

_raw_decode = json.JSONDecoder().raw_decode


def loads_chunk(payload: bytes) -> Any:
    """``json.loads`` for one chunk: ``raw_decode`` on the decoded text skips the encoding
    sniffing and wrapper layers (anything it does not take, such as leading whitespace,
    goes to ``json.loads``, which decides). Not JSON: :class:`UpstreamProtocolError`."""
    try:
        try:
            text = payload.decode()
            obj, end = _raw_decode(text)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            return json.loads(payload)
        if end != len(text) and text[end:].strip():
            raise ValueError("extra data")
    except (ValueError, UnicodeDecodeError):
        raise UpstreamProtocolError("stream chunk is not valid JSON") from None
    return obj


#: A chunk whose only delta is text: ``"delta":{"content":"..."}`` (``"role"`` first
#: allowed), the string a well-formed JSON literal (no raw control characters, only JSON's
#: escapes), so its bytes can be forwarded without a decode and an encode.
_TEXT_DELTA = re.compile(
    rb'"delta":\{(?:"role":"assistant",)?"content":'
    rb'("(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*")\}'
)


def plain_text(payload: bytes) -> bytes | None:
    """The text delta's JSON string literal, if ``payload`` is a plain text chunk of one
    choice (no tool call, no finish reason, no usage, no error); else None."""
    if (
        payload.count(b'"index"') != 1
        or b'"usage":{' in payload
        or b'"error"' in payload
        or (b'"finish_reason"' in payload and b'"finish_reason":null' not in payload)
    ):
        return None
    match = _TEXT_DELTA.search(payload)
    return None if match is None else match.group(1)


def literal_text(literal: bytes) -> str:
    """The str a :func:`plain_text` literal holds."""
    text: str = _raw_decode(literal.decode())[0]
    return text


def chunk_choice(choices: Any) -> dict[str, Any] | None:
    """A chunk's choice 0, or None (a usage chunk has none)."""
    if isinstance(choices, list):
        for item in choices:
            if isinstance(item, dict) and item.get("index", 0) == 0:
                return item
    return None


#: The kinds of piece a chat delta carries (:func:`delta_pieces`).
Piece = Literal["reasoning", "text", "refusal", "tool"]


def delta_pieces(delta: Mapping[str, Any]) -> list[tuple[Piece, Any]]:
    """A chat delta's pieces, in the order the dialect encoders take them: ``reasoning``
    (``reasoning_content``, DeepSeek/vLLM, or ``reasoning``, OpenRouter/Groq), ``text``,
    ``refusal``, then each ``tool`` call piece (a legacy ``function_call`` as a piece of
    index ``"function_call"``)."""
    pieces: list[tuple[Piece, Any]] = []
    reasoning = delta.get("reasoning_content") or delta.get("reasoning")
    if reasoning and isinstance(reasoning, str):
        pieces.append(("reasoning", reasoning))
    content = delta.get("content")
    if content and isinstance(content, str):
        pieces.append(("text", content))
    refusal = delta.get("refusal")
    if refusal and isinstance(refusal, str):
        pieces.append(("refusal", refusal))
    calls = delta.get("tool_calls")
    if calls and isinstance(calls, list):
        pieces.extend(("tool", piece) for piece in calls if isinstance(piece, dict))
    legacy = delta.get("function_call")
    if legacy and isinstance(legacy, dict):
        pieces.append(("tool", {"index": "function_call", "function": legacy}))
    return pieces


def tool_key(piece: Mapping[str, Any], last: object) -> object:
    """Which call a tool call piece continues: OpenAI's ``index``; for a server that sends
    none, a new ``id`` is a new call, else the ``last`` call continues."""
    key: object = piece.get("index")
    if not isinstance(key, (int, str)):
        given = piece.get("id")
        key = given if isinstance(given, str) and given else last
    return key


def choice_zero(choices: Any) -> Mapping[str, Any]:
    """A whole answer's choice 0; an answer without one broke OpenAI's format."""
    found = chunk_choice(choices)
    if found is None:
        raise UpstreamProtocolError("chat completion: no choice 0")
    return found


def json_string(text: str) -> bytes:
    """``text`` as a JSON string literal, UTF-8; ``\\u`` escapes only for a lone surrogate
    (as ``json_codec.dumps``)."""
    try:
        return encode_basestring(text).encode()
    except UnicodeEncodeError:
        return encode_basestring_ascii(text).encode()
