"""OpenAI chat ``messages`` -> Anthropic Messages API ``system`` and turns. No I/O.

Owns the content-block conversion of the Anthropic request translation
(:mod:`.anthropic_request` owns the top-level body): text, image, thinking, ``tool_use`` and
``tool_result`` blocks. Bad input raises :class:`~runestone_proxy.errors.InvalidParam` naming
the offending ``param`` the way OpenAI does (``messages[2].tool_calls``).

How this works: each OpenAI message becomes one ``(role, blocks)`` turn (``system`` and
``developer`` messages are lifted out into the top-level ``system``; ``tool`` messages become
``user`` turns holding a ``tool_result`` block), then consecutive turns of the same role are
merged, because the Messages API requires ``user`` and ``assistant`` turns to alternate
(https://docs.anthropic.com/en/api/messages, "messages"). A turn that ends up as one plain text
block is sent as a string, the short form the API accepts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from runestone_proxy.errors import InvalidParam

__all__ = ["IMAGE_MEDIA_TYPES", "Block", "plain", "strings", "translate_messages"]

Block = dict[str, Any]

#: "We currently support the base64 source type for images, and the image/jpeg, image/png,
#: image/gif, and image/webp media types." (https://docs.anthropic.com/en/docs/build-with-claude/vision)
IMAGE_MEDIA_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


def translate_messages(messages: list[Any]) -> tuple[list[Block], list[dict[str, Any]]]:
    """OpenAI ``messages`` -> (``system`` text blocks, alternating Anthropic turns)."""
    system: list[Block] = []
    turns: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise InvalidParam(f"{where} must be an object.", param=where)
        role = msg.get("role")
        if role in ("system", "developer"):
            # Anthropic has no system role inside ``messages``; the prompt is top-level.
            system.extend(_text_blocks(msg.get("content"), f"{where}.content"))
            continue
        if role == "user":
            blocks = _user_blocks(msg.get("content"), f"{where}.content")
        elif role == "assistant":
            blocks = _assistant_blocks(msg, where)
        elif role == "tool":
            role, blocks = "user", [_tool_result(msg, where)]
        else:
            raise InvalidParam(
                f"{where}.role must be one of system, developer, user, assistant, tool.",
                param=f"{where}.role",
            )
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        if turn["role"] == "user":
            # "tool_result blocks must come FIRST in the content array" of a user turn
            # (tool-use docs, "Handling tool use and tool result content blocks"); stable sort.
            turn["content"].sort(key=lambda b: b.get("type") != "tool_result")
        if len(turn["content"]) == 1 and plain(turn["content"][0]):
            turn["content"] = turn["content"][0]["text"]
    return system, turns


def plain(block: Block) -> bool:
    return block.keys() == {"type", "text"} and block["type"] == "text"


def _text_block(part: Mapping[str, Any], text: Any, where: str) -> Block:
    if not isinstance(text, str):
        raise InvalidParam(f"{where}.text must be a string.", param=f"{where}.text")
    block: Block = {"type": "text", "text": text}
    if "cache_control" in part:  # Anthropic prompt caching marker, passed through as given
        block["cache_control"] = part["cache_control"]
    return block


def _text_blocks(content: Any, where: str) -> list[Block]:
    """String or array of text parts (system, developer, tool content)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidParam(f"{where} must be a string or an array of parts.", param=where)
    blocks = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, Mapping) or part.get("type") != "text":
            raise InvalidParam(f"{at} must be a text part.", param=at)
        blocks.append(_text_block(part, part.get("text"), at))
    return blocks


def _user_blocks(content: Any, where: str) -> list[Block]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidParam(f"{where} must be a string or an array of parts.", param=where)
    blocks = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            blocks.append(_text_block(part, part.get("text"), at))
        elif kind == "image_url":
            blocks.append(_image_block(part.get("image_url"), at))
        else:
            raise InvalidParam(
                f"{at}: content part type {kind!r} is not supported by Anthropic.",
                param=f"{at}.type",
            )
    return blocks


def _image_block(image: Any, where: str) -> Block:
    """``image_url`` part -> image block with a base64 or url source (vision docs)."""
    url = image.get("url") if isinstance(image, Mapping) else image
    param = f"{where}.image_url.url"
    if not isinstance(url, str):
        raise InvalidParam(f"{param} must be a string.", param=param)
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    if url.startswith("data:"):
        # RFC 2397: data:[<mediatype>][;base64],<data>
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        if not comma or encoding != "base64" or media_type not in IMAGE_MEDIA_TYPES:
            raise InvalidParam(
                f"{param}: data URLs must be base64 {', '.join(sorted(IMAGE_MEDIA_TYPES))}.",
                param=param,
            )
        return {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }
    raise InvalidParam(f"{param} must be an http(s) or data URL.", param=param)


def _assistant_blocks(msg: Mapping[str, Any], where: str) -> list[Block]:
    # Thinking blocks go first: "the entire sequence of consecutive thinking blocks must match
    # the outputs generated by the model" and be passed back during tool use
    # (extended-thinking docs, "Preserving thinking blocks").
    blocks = _thinking_blocks(msg, where)
    content = msg.get("content")
    if isinstance(content, str):
        if content:  # Anthropic rejects empty text blocks
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in ("text", "refusal"):
                raise InvalidParam(f"{at} must be a text or refusal part.", param=at)
            text = _text_block(part, part.get(kind), at)
            if text["text"]:
                blocks.append(text)
    elif content is not None:
        raise InvalidParam(f"{where}.content must be a string, an array or null.", param=where)
    blocks.extend(_tool_uses(msg.get("tool_calls"), f"{where}.tool_calls"))
    return blocks


def _thinking_blocks(msg: Mapping[str, Any], where: str) -> list[Block]:
    """Previous-turn thinking: ``thinking_blocks``, or ``reasoning_content`` + signature."""
    raw = msg.get("thinking_blocks")
    param = f"{where}.thinking_blocks"
    if raw is None:
        text = msg.get("reasoning_content")
        signature = msg.get("reasoning_signature", msg.get("signature"))
        if isinstance(text, str) and text and isinstance(signature, str) and signature:
            return [{"type": "thinking", "thinking": text, "signature": signature}]
        # Without its signature Anthropic cannot verify the block and rejects it; the API
        # drops previous turns' thinking anyway, so an unsigned echo is left out.
        return []
    if not isinstance(raw, list):
        raise InvalidParam(f"{param} must be an array.", param=param)
    blocks: list[Block] = []
    for block in raw:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "thinking" and strings(block, "thinking", "signature"):
            blocks.append(
                {"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]}
            )
        elif kind == "redacted_thinking" and strings(block, "data"):
            blocks.append({"type": "redacted_thinking", "data": block["data"]})
        else:
            raise InvalidParam(
                f"{param}: each block must be thinking (thinking, signature) or "
                "redacted_thinking (data), as Anthropic returned it.",
                param=param,
            )
    return blocks


def strings(block: Mapping[str, Any], *keys: str) -> bool:
    return all(isinstance(block.get(k), str) for k in keys)


def _tool_uses(tool_calls: Any, param: str) -> list[Block]:
    """Assistant ``tool_calls`` -> ``tool_use`` blocks with ``input`` parsed from JSON."""
    if tool_calls is None:
        return []
    if not isinstance(tool_calls, list):
        raise InvalidParam(f"{param} must be an array.", param=param)
    blocks = []
    for j, call in enumerate(tool_calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not (
            isinstance(fn, Mapping) and isinstance(call.get("id"), str) and strings(fn, "name")
        ):
            raise InvalidParam(f"{param}[{j}] needs an id and function.name.", param=param)
        arguments = fn.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise InvalidParam(
                f"{param}[{j}].function.arguments must be a JSON object encoded as a string.",
                param=param,
            )
        blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"], "input": parsed})
    return blocks


def _tool_result(msg: Mapping[str, Any], where: str) -> Block:
    tool_call_id = msg.get("tool_call_id")
    if not isinstance(tool_call_id, str) or not tool_call_id:
        raise InvalidParam(f"{where}.tool_call_id is required.", param=f"{where}.tool_call_id")
    content = msg.get("content")
    block: Block = {"type": "tool_result", "tool_use_id": tool_call_id}
    if isinstance(content, str):
        block["content"] = content
    elif content is not None:
        block["content"] = _user_blocks(content, f"{where}.content")
    return block
