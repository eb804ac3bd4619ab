"""Anthropic Messages turns and content blocks -> OpenAI chat messages and parts. No I/O.

Owns the conversation half of the TRANSLATED Messages path (the top level, fields and their
fates are ``messages_request``'s): ``system`` and each turn of ``messages``
(https://docs.anthropic.com/en/api/messages) become chat messages
(https://platform.openai.com/docs/api-reference/chat/create), every content block a chat
content part, checked as it goes; bad input raises
:class:`~runestone_proxy.errors.InvalidParam` (400) naming the path, e.g.
``messages[2].content[0].source``. The fates of the block types are the ``content[]``
entries of ``messages_request.FIELD_FATES``.

How this works: ``system`` becomes the first ``system`` message; each Anthropic turn becomes
one or more OpenAI messages. An assistant turn becomes one assistant message whose
``tool_calls`` carry its ``tool_use`` blocks. A user turn's ``tool_result`` blocks become one
``tool`` message each, emitted first (OpenAI wants tool messages directly after the
assistant's ``tool_calls``); images and PDFs a tool returned, which a ``tool`` message cannot
carry, open the user message that follows, after a line naming the tool call. Each block type
has one converter in ``_PARTS`` (text, image, document, search_result), shared by user turns,
tool results and document ``content`` sources.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Final

from runestone_proxy.errors import InvalidParam

__all__ = [
    "ATTACHMENTS_ONLY",
    "Json",
    "compact_json",
    "string_field",
    "system_to_chat",
    "turns_to_chat",
]

Json = dict[str, Any]

#: The tool message of a result that held only images or PDFs (they follow in a user message).
ATTACHMENTS_ONLY: Final = "(no text; the attachments follow in the next message)"
_SKIPPED: Final = frozenset({"thinking", "redacted_thinking"})


def string_field(obj: Mapping[str, Any], key: str, at: str) -> str:
    """``obj[key]``, which must be a string; ``at`` names it in the 400."""
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidParam(f"'{at}' must be a string.", param=at)
    return value


def compact_json(obj: object) -> str:
    """JSON without spaces, non-ASCII kept (tool call arguments, the estimate's schemas)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# --- system and turns ------------------------------------------------------------------------


def _texts(content: Any, at: str) -> str:
    """A string, or text blocks joined with a blank line (``system``, system turns)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidParam(f"'{at}' must be a string or an array of text blocks.", param=at)
    texts = []
    for j, block in enumerate(content):
        if not isinstance(block, Mapping) or block.get("type") != "text":
            raise InvalidParam(f"'{at}[{j}]' must be a text block.", param=f"{at}[{j}]")
        texts.append(string_field(block, "text", f"{at}[{j}].text"))
    return "\n\n".join(texts)


def system_to_chat(raw: Any) -> list[Json]:
    """``system`` -> the first system message (none when absent or empty)."""
    if raw is None:
        return []
    text = _texts(raw, "system")
    return [{"role": "system", "content": text}] if text else []


def turns_to_chat(raw: Any) -> list[Json]:
    """``messages`` -> chat messages, order kept; at least one turn is required."""
    if not isinstance(raw, list) or not raw:
        raise InvalidParam("'messages' must be a non-empty array.", param="messages")
    out: list[Json] = []
    for i, msg in enumerate(raw):
        at = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise InvalidParam(f"'{at}' must be an object.", param=at)
        role, content = msg.get("role"), msg.get("content")
        if role == "system":
            out.append({"role": "system", "content": _texts(content, f"{at}.content")})
        elif role == "user":
            out.extend(_user_turn(content, f"{at}.content"))
        elif role == "assistant":
            out.extend(_assistant_turn(content, f"{at}.content"))
        else:
            raise InvalidParam(
                f"'{at}.role' must be user, assistant or system.", param=f"{at}.role"
            )
    return out


def _blocks(content: Any, at: str) -> list[Mapping[str, Any]]:
    if not isinstance(content, list):
        raise InvalidParam(f"'{at}' must be a string or an array of content blocks.", param=at)
    for j, block in enumerate(content):
        if not isinstance(block, Mapping) or not isinstance(block.get("type"), str):
            raise InvalidParam(f"'{at}[{j}]' must be a block with a 'type'.", param=f"{at}[{j}]")
    return content


def _refuse_block(kind: str, at: str, where: str) -> InvalidParam:
    hosted = kind in ("server_tool_use", "container_upload") or kind.startswith("mcp_")
    if hosted or (kind.endswith("_tool_result") and kind != "tool_result"):
        why = f"'{kind}' belongs to a tool only Anthropic runs; it cannot be translated"
    elif kind in ("text", "image", "document", "search_result", "tool_use", "tool_result"):
        why = f"a '{kind}' block is not allowed in {where}"
    else:
        why = f"unknown content block type '{kind}'"
    return InvalidParam(f"'{at}.type': {why}.", param=f"{at}.type")


def _assistant_turn(content: Any, at: str) -> list[Json]:
    if isinstance(content, str):
        return [{"role": "assistant", "content": content}]
    texts: list[str] = []
    calls: list[Json] = []
    for j, block in enumerate(_blocks(content, at)):
        kind, here = block["type"], f"{at}[{j}]"
        if kind == "text":
            texts.append(string_field(block, "text", f"{here}.text"))
        elif kind == "tool_use":
            args = block.get("input")
            if not isinstance(args, Mapping):
                raise InvalidParam(f"'{here}.input' must be an object.", param=f"{here}.input")
            call = {
                "name": string_field(block, "name", f"{here}.name"),
                "arguments": compact_json(args),
            }
            calls.append({"id": string_field(block, "id", f"{here}.id"), "type": "function"})
            calls[-1]["function"] = call
        elif kind not in _SKIPPED:
            raise _refuse_block(kind, here, "an assistant turn")
    if not texts and not calls:
        return []  # only thinking: nothing an OpenAI-compatible model can read
    msg: Json = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        msg["tool_calls"] = calls
    return [msg]


def _user_turn(content: Any, at: str) -> list[Json]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tools: list[Json] = []
    attached: list[Json] = []  # parts a tool returned that a tool message cannot carry
    parts: list[Json] = []
    for j, block in enumerate(_blocks(content, at)):
        kind, here = block["type"], f"{at}[{j}]"
        if kind == "tool_result":
            text, media = _tool_result(block, here)
            call_id = string_field(block, "tool_use_id", f"{here}.tool_use_id")
            tools.append({"role": "tool", "tool_call_id": call_id, "content": text})
            if media:
                attached.append(_part(f"Attachments returned by tool call {call_id}:"))
                attached.extend(media)
        elif (convert := _PARTS.get(kind)) is not None:
            parts.extend(convert(block, here))
        else:
            raise _refuse_block(kind, here, "a user turn")
    parts = attached + parts
    if not parts and tools:
        return tools
    if len(parts) == 1 and parts[0]["type"] == "text":
        return [*tools, {"role": "user", "content": parts[0]["text"]}]
    return [*tools, {"role": "user", "content": parts or ""}]


def _tool_result(block: Mapping[str, Any], at: str) -> tuple[str, list[Json]]:
    """(text for the tool message, image and file parts for the next user message)."""
    content = block.get("content")
    texts: list[str] = []
    media: list[Json] = []
    if isinstance(content, str):
        texts.append(content)
    elif content is not None:
        for j, inner in enumerate(_blocks(content, f"{at}.content")):
            kind, here = inner["type"], f"{at}.content[{j}]"
            if kind == "tool_reference":
                continue
            if kind not in ("text", "image", "document", "search_result"):
                raise _refuse_block(kind, here, "a tool result")
            for part in _PARTS[kind](inner, here):
                if part["type"] == "text":
                    texts.append(part["text"])
                else:
                    media.append(part)
    text = "\n\n".join(texts) or (ATTACHMENTS_ONLY if media else "")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise InvalidParam(f"'{at}.is_error' must be a boolean.", param=f"{at}.is_error")
    if is_error:
        text = f"Error: {text}" if text else "Error"
    return text, media


# --- content parts ---------------------------------------------------------------------------


def _part(text: str) -> Json:
    return {"type": "text", "text": text}


def _source(block: Mapping[str, Any], at: str) -> tuple[str, Mapping[str, Any]]:
    source = block.get("source")
    if not isinstance(source, Mapping) or not isinstance(source.get("type"), str):
        raise InvalidParam(f"'{at}.source' must be an object with a 'type'.", param=f"{at}.source")
    return source["type"], source


def _refuse_source(kind: str, at: str, hint: str) -> InvalidParam:
    return InvalidParam(
        f"'{at}.source': a '{kind}' source cannot be translated; {hint}.", param=f"{at}.source"
    )


def _text_block(block: Mapping[str, Any], at: str) -> list[Json]:
    return [_part(string_field(block, "text", f"{at}.text"))]


def _image_block(block: Mapping[str, Any], at: str) -> list[Json]:
    kind, source = _source(block, at)
    if kind == "base64":
        media_type = string_field(source, "media_type", f"{at}.source.media_type")
        data = string_field(source, "data", f"{at}.source.data")
        url = f"data:{media_type};base64,{data}"
    elif kind == "url":
        url = string_field(source, "url", f"{at}.source.url")
    else:
        raise _refuse_source(kind, at, "send the image as base64 or a url")
    return [{"type": "image_url", "image_url": {"url": url}}]


def _document_block(block: Mapping[str, Any], at: str) -> list[Json]:
    kind, source = _source(block, at)
    header = [block[k] for k in ("title", "context") if isinstance(block.get(k), str) and block[k]]
    if kind == "text":
        return [_part("\n\n".join([*header, string_field(source, "data", f"{at}.source.data")]))]
    parts = [_part("\n\n".join(header))] if header else []
    if kind == "base64":
        if source.get("media_type") != "application/pdf":
            raise InvalidParam(
                "A base64 document must be application/pdf.", param=f"{at}.source.media_type"
            )
        data = string_field(source, "data", f"{at}.source.data")
        pdf = {"filename": "document.pdf", "file_data": f"data:application/pdf;base64,{data}"}
        return [*parts, {"type": "file", "file": pdf}]
    if kind == "content":
        inner = source.get("content")
        if isinstance(inner, str):
            return [*parts, _part(inner)]
        for j, piece in enumerate(_blocks(inner, f"{at}.source.content")):
            here = f"{at}.source.content[{j}]"
            if piece["type"] not in ("text", "image"):
                raise _refuse_block(piece["type"], here, "a document")
            parts.extend(_PARTS[piece["type"]](piece, here))
        return parts
    raise _refuse_source(kind, at, "Runestone fetches nothing; send the PDF as base64")


def _search_result_block(block: Mapping[str, Any], at: str) -> list[Json]:
    title = string_field(block, "title", f"{at}.title")
    source = string_field(block, "source", f"{at}.source")
    text = _texts(block.get("content"), f"{at}.content")
    return [_part(f"{title}\n{source}\n\n{text}")]


_PARTS: Final[Mapping[str, Callable[[Mapping[str, Any], str], list[Json]]]] = {
    "text": _text_block,
    "image": _image_block,
    "document": _document_block,
    "search_result": _search_result_block,
}
