"""OpenAI ``chat.completions`` request body -> Anthropic Messages API request body. No I/O.

Owns the request direction of the Anthropic translator (:mod:`.anthropic`): messages, system
prompt, content parts, tools, sampling parameters and extended thinking. Everything here is a
pure function over dicts; bad input raises :class:`~runestone_proxy.errors.InvalidParam` naming
the offending ``param`` the way OpenAI does (``messages[2].tool_calls``).

How this works: each OpenAI message becomes one ``(role, blocks)`` turn (``system`` and
``developer`` messages are lifted out into the top-level ``system``; ``tool`` messages become
``user`` turns holding a ``tool_result`` block), then consecutive turns of the same role are
merged, because the Messages API requires ``user`` and ``assistant`` turns to alternate
(https://docs.anthropic.com/en/api/messages, "messages"). A turn that ends up as one plain text
block is sent as a string, the short form the API accepts.

OpenAI fields with no Anthropic equivalent (``frequency_penalty``, ``presence_penalty``,
``seed``, ``logit_bias``, ``store``, ...) are dropped: the Messages API rejects unknown fields.
Fields whose absence would change the answer the client asked for (``n > 1``, ``logprobs``,
``response_format`` other than text) are refused with a 400 instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from runestone_proxy.errors import InvalidParam

Block = dict[str, Any]

#: ``reasoning_effort`` -> ``thinking.budget_tokens``. Anthropic's minimum budget is 1,024
#: tokens and ``max_tokens`` must exceed it
#: (https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking).
REASONING_BUDGETS: Final[Mapping[str, int | None]] = {
    "none": None,
    "minimal": 1024,
    "low": 1024,
    "medium": 4096,
    "high": 16384,
}
MIN_THINKING_BUDGET: Final = 1024

#: "We currently support the base64 source type for images, and the image/jpeg, image/png,
#: image/gif, and image/webp media types." (https://docs.anthropic.com/en/docs/build-with-claude/vision)
IMAGE_MEDIA_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

# OpenAI's ``tool_choice`` strings -> Anthropic's ``tool_choice`` objects
# (https://docs.anthropic.com/en/docs/build-with-claude/tool-use, "Forcing tool use").
_TOOL_CHOICES: Final[Mapping[str, str]] = {"auto": "auto", "none": "none", "required": "any"}


def build_body(
    body: Mapping[str, Any], *, model: str, stream: bool, default_max_tokens: int
) -> dict[str, Any]:
    """The JSON object to POST to ``/v1/messages`` for one OpenAI chat request."""
    _refuse_unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParam("'messages' must be a non-empty array.", param="messages")
    system, turns = translate_messages(messages)
    out: dict[str, Any] = {"model": model, "messages": turns}
    if system:
        out["system"] = system[0]["text"] if len(system) == 1 and _plain(system[0]) else system
    max_tokens, thinking = _budget(body, default_max_tokens)
    out["max_tokens"] = max_tokens
    if thinking is not None:
        out["thinking"] = thinking
    out.update(_sampling(body))
    tools = body.get("tools")
    if tools is not None:
        out["tools"] = _tools(tools)
    choice = _tool_choice(body, has_tools=bool(out.get("tools")))
    if choice is not None:
        out["tool_choice"] = choice
    if stream:
        out["stream"] = True
    return out


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidParam("Anthropic returns one choice per request; 'n' must be 1.", param="n")
    if body.get("logprobs"):
        raise InvalidParam("Anthropic does not return logprobs.", param="logprobs")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise InvalidParam(
            "The Anthropic translator supports only response_format {'type': 'text'}.",
            param="response_format",
        )


# --- messages --------------------------------------------------------------------------------


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
        if len(turn["content"]) == 1 and _plain(turn["content"][0]):
            turn["content"] = turn["content"][0]["text"]
    return system, turns


def _plain(block: Block) -> bool:
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
        if kind == "thinking" and _strings(block, "thinking", "signature"):
            blocks.append(
                {"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]}
            )
        elif kind == "redacted_thinking" and _strings(block, "data"):
            blocks.append({"type": "redacted_thinking", "data": block["data"]})
        else:
            raise InvalidParam(
                f"{param}: each block must be thinking (thinking, signature) or "
                "redacted_thinking (data), as Anthropic returned it.",
                param=param,
            )
    return blocks


def _strings(block: Mapping[str, Any], *keys: str) -> bool:
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
            isinstance(fn, Mapping) and isinstance(call.get("id"), str) and _strings(fn, "name")
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


# --- parameters ------------------------------------------------------------------------------


def _budget(body: Mapping[str, Any], default_max_tokens: int) -> tuple[int, Block | None]:
    """(``max_tokens``, ``thinking``). Anthropic requires ``max_tokens``; it includes thinking."""
    explicit = _positive_int(body, "max_completion_tokens")
    if explicit is None:
        explicit = _positive_int(body, "max_tokens")
    thinking = body.get("thinking")
    budget = 0
    if thinking is not None:
        if not (isinstance(thinking, Mapping) and isinstance(thinking.get("type"), str)):
            raise InvalidParam("'thinking' must be an object with a 'type'.", param="thinking")
        thinking = dict(thinking)
        if isinstance(thinking.get("budget_tokens"), int):
            budget = thinking["budget_tokens"]
    elif (effort := body.get("reasoning_effort")) is not None:
        if effort not in REASONING_BUDGETS:
            raise InvalidParam(
                f"'reasoning_effort' must be one of {', '.join(REASONING_BUDGETS)}.",
                param="reasoning_effort",
            )
        wanted = REASONING_BUDGETS[effort]
        if wanted is not None:
            budget = wanted if explicit is None else min(wanted, explicit - 1)
            if budget < MIN_THINKING_BUDGET:
                raise InvalidParam(
                    "max_tokens must exceed 1024 when reasoning_effort is set: "
                    "Anthropic's minimum thinking budget is 1024 tokens.",
                    param="max_completion_tokens",
                )
            thinking = {"type": "enabled", "budget_tokens": budget}
    if explicit is not None:
        return explicit, thinking
    return default_max_tokens + budget, thinking


def _positive_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParam(f"'{key}' must be a positive integer.", param=key)
    return value


def _number(body: Mapping[str, Any], key: str, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise InvalidParam(f"'{key}' must be a number between 0 and {high:g}.", param=key)
    return float(value)


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    temperature = _number(body, "temperature", 2.0)
    if temperature is not None:
        # OpenAI accepts 0..2, Anthropic 0..1 ("Ranges from 0.0 to 1.0", Messages API).
        out["temperature"] = min(temperature, 1.0)
    top_p = _number(body, "top_p", 1.0)
    if top_p is not None:
        out["top_p"] = top_p
    top_k = body.get("top_k")  # not OpenAI's, but Anthropic's own; clients send it knowingly
    if top_k is not None:
        out["top_k"] = _positive_int(body, "top_k")
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if stop:
            out["stop_sequences"] = list(stop)
    elif stop is not None:
        raise InvalidParam("'stop' must be a string or an array of strings.", param="stop")
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise InvalidParam("'user' must be a string.", param="user")
        out["metadata"] = {"user_id": user}
    return out


def _tools(tools: Any) -> list[Block]:
    """OpenAI function tools -> ``{"name", "description", "input_schema"}`` (tool-use docs)."""
    if not isinstance(tools, list):
        raise InvalidParam("'tools' must be an array.", param="tools")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if (
            not isinstance(fn, Mapping)
            or tool.get("type") != "function"
            or not _strings(fn, "name")
        ):
            raise InvalidParam(f"{at} must be a function tool with a name.", param=at)
        schema = fn.get("parameters")
        if schema is not None and not isinstance(schema, Mapping):
            raise InvalidParam(f"{at}.function.parameters must be an object.", param=at)
        block: Block = {
            "name": fn["name"],
            "input_schema": dict(schema) if schema else {"type": "object", "properties": {}},
        }
        if isinstance(fn.get("description"), str):
            block["description"] = fn["description"]
        out.append(block)
    return out


def _tool_choice(body: Mapping[str, Any], *, has_tools: bool) -> Block | None:
    raw = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidParam("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls")
    if not has_tools:
        return None  # Anthropic's tool_choice is meaningless without tools
    choice: Block | None
    if raw is None:
        choice = None
    elif isinstance(raw, str) and raw in _TOOL_CHOICES:
        choice = {"type": _TOOL_CHOICES[raw]}
    elif (
        isinstance(raw, Mapping)
        and raw.get("type") == "function"
        and isinstance(raw.get("function"), Mapping)
        and _strings(raw["function"], "name")
    ):
        choice = {"type": "tool", "name": raw["function"]["name"]}
    else:
        raise InvalidParam(
            "'tool_choice' must be auto, none, required or a named function.", param="tool_choice"
        )
    if parallel is False:
        # "disable_parallel_tool_use=true" lives inside tool_choice (tool-use docs).
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    return choice
