"""Anthropic Messages request body -> OpenAI chat completions request body. No I/O.

Owns the request direction of the TRANSLATED Messages path: a ``/v1/messages`` body (the
Messages API, https://docs.anthropic.com/en/api/messages) routed to an OpenAI-compatible
provider or the mock becomes an ordinary chat body
(https://platform.openai.com/docs/api-reference/chat/create), and :func:`estimate_input_tokens`
answers ``/v1/messages/count_tokens`` for such providers. Bad input raises
:class:`~runestone_proxy.errors.InvalidParam` (400) naming the path, e.g.
``messages[2].content[0].source``.

Every Anthropic field has one fate, published in :data:`FIELD_FATES` (the README quotes it):
``mapped`` / ``copied`` to the OpenAI body, ``dropped`` (it only steers Anthropic's own
servers, so it means nothing elsewhere) or ``refused`` (honouring it is impossible on this
path and ignoring it would change the answer). The top-level loop reads the table itself:
``dropped`` and ``refused`` fields are handled by their entry, never by code of their own.

How this works: ``system`` becomes the first ``system`` message; each Anthropic turn becomes
one or more OpenAI messages. An assistant turn becomes one assistant message whose
``tool_calls`` carry its ``tool_use`` blocks. A user turn's ``tool_result`` blocks become one
``tool`` message each, emitted first (OpenAI wants tool messages directly after the
assistant's ``tool_calls``); images and PDFs a tool returned, which a ``tool`` message cannot
carry, open the user message that follows, after a line naming the tool call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Final

from runestone_proxy.errors import InvalidParam
from runestone_proxy.providers.base import RUNESTONE_FIELDS

__all__ = [
    "ESTIMATE_METHOD",
    "FIELD_FATES",
    "IMAGE_TOKENS",
    "MESSAGE_OVERHEAD_TOKENS",
    "estimate_input_tokens",
    "messages_to_chat",
]

Json = dict[str, Any]

#: What happens to each Anthropic field. Keys are top-level field names, or dotted paths
#: (``[]`` for "any element") for notable sub-fields and block types; each value starts
#: with its fate: ``mapped``, ``copied``, ``dropped`` or ``refused``.
FIELD_FATES: Final[Mapping[str, str]] = {
    "model": "copied: as given (the gateway replaces it with the routed model)",
    "max_tokens": "copied: to max_tokens, same value",
    "messages": "mapped: each turn to one or more chat messages, order kept",
    "system": "mapped: text (blocks joined with a blank line) -> the first system message",
    "stop_sequences": "mapped: to stop (OpenAI itself accepts at most 4)",
    "temperature": "copied: Anthropic's 0..1 lies inside OpenAI's 0..2",
    "top_p": "copied",
    "top_k": "dropped: OpenAI's chat API has no top_k",
    "stream": "copied; a stream also asks stream_options.include_usage for the usage",
    "metadata": "mapped: only user_id exists (see metadata.user_id)",
    "metadata.user_id": "mapped: to user, as is (Claude Code's JSON string too), cut to 256"
    " characters; OpenAI documents no limit for user",
    "tools": "mapped: custom tools to function tools; server tools refused",
    "tools[].strict": "mapped: to function.strict",
    "tools[].cache_control": "dropped: OpenAI-compatible servers have no cache breakpoints",
    "tools[].defer_loading": "dropped: every tool is sent up front",
    "tools[].input_examples": "dropped: OpenAI tools have no examples field",
    "tools[].eager_input_streaming": "dropped: a streaming hint for Anthropic's servers",
    "tools[].allowed_callers": "dropped: only Anthropic's code execution calls tools",
    "tools[].type=tool_search_tool_*": "dropped: no tool is deferred, nothing to search",
    "tools[].type=<server tool>": "refused: web_search_*, web_fetch_*, bash_*, text_editor_*,"
    " computer_*, code_execution_*, memory_* ... run on Anthropic's servers only",
    "tool_choice": "mapped: auto -> auto, any -> required, tool -> named function,"
    " none -> none; dropped when no tools are sent",
    "tool_choice.disable_parallel_tool_use": "mapped: true -> parallel_tool_calls false",
    "thinking": "mapped: enabled -> reasoning_effort by budget_tokens (< 4096 low,"
    " < 16384 medium, else high); adaptive uses output_config.effort; disabled -> none."
    " The gateway sends it only to models whose entry lists the 'reasoning' capability"
    " (dropped elsewhere)",
    "output_config": "mapped: effort and format (below); other keys dropped",
    "output_config.effort": "mapped: to reasoning_effort (xhigh, max -> high) unless thinking"
    " is disabled",
    "output_config.format": "mapped: json_schema -> response_format json_schema named"
    " 'output', strict",
    "output_format": "mapped: like output_config.format (the structured-outputs beta's name)",
    "context_management": "dropped: Anthropic edits its own context server-side; the full"
    " conversation is sent",
    "container": "dropped: only meaningful with code execution, which is refused",
    "mcp_servers": "refused: Runestone cannot call MCP servers on a translated path",
    "service_tier": "dropped: Anthropic's capacity tiers differ from OpenAI's",
    "speed": "dropped: Anthropic's fast mode",
    "inference_geo": "dropped: Anthropic's processing region",
    "betas": "dropped: Anthropic beta flags",
    "cache_control": "dropped: automatic prompt caching is Anthropic's",
    "diagnostics": "dropped: Anthropic's prompt-cache diagnostics",
    "user_profile_id": "dropped: Anthropic account attribution",
    "workspace_id": "dropped: Anthropic account attribution",
    "(runestone fields)": "dropped: never copied (the gateway reads them)",
    "(other fields)": "dropped: unknown to this translator",
    "messages[].role=system": "mapped: a system message at that position",
    "content[].cache_control": "dropped: everywhere",
    "content[].citations": "dropped: OpenAI-compatible servers cannot cite",
    "content[].type=text": "mapped: text part (an assistant's texts are concatenated)",
    "content[].type=image": "mapped: image_url part; base64 -> data URL, url kept, file refused",
    "content[].type=document": "mapped: base64 PDF -> file part; text and content sources ->"
    " text (title and context first); url and file sources refused (Runestone fetches"
    " nothing)",
    "content[].type=search_result": "mapped: text part (title, source, then the text)",
    "content[].type=tool_use": "mapped: assistant tool_calls, arguments = compact JSON input",
    "content[].type=tool_result": "mapped: one tool message each, before the rest of the"
    " turn; text blocks joined; images and PDFs open the next user message",
    "content[].type=tool_result.is_error": "mapped: the tool message starts with 'Error: '",
    "content[].type=tool_reference": "dropped: every tool is already sent",
    "content[].type=thinking": "dropped: Anthropic signatures mean nothing elsewhere",
    "content[].type=redacted_thinking": "dropped: as thinking",
    "content[].type=<hosted tool block>": "refused: server_tool_use, *_tool_result, mcp_*,"
    " container_upload belong to tools only Anthropic runs",
    "content[].type=<other>": "refused: unknown block type",
}

#: ``thinking.budget_tokens`` below each bound -> that ``reasoning_effort``.
EFFORT_BY_BUDGET: Final = ((4096, "low"), (16384, "medium"))
#: ``output_config.effort`` -> ``reasoning_effort`` (OpenAI's scale stops at high).
EFFORTS: Final[Mapping[str, str]] = {
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}
TOOL_CHOICES: Final[Mapping[str, str]] = {"auto": "auto", "any": "required", "none": "none"}
MAX_USER_CHARS: Final = 256
#: The tool message of a result that held only images or PDFs (they follow in a user message).
ATTACHMENTS_ONLY: Final = "(no text; the attachments follow in the next message)"
_SKIPPED: Final = frozenset({"thinking", "redacted_thinking"})
_EMPTY: Final[tuple[object, ...]] = (None, [], {})


def messages_to_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI chat completions body for one Anthropic Messages request body."""
    out: Json = {}
    if "model" in body:
        out["model"] = _string(body, "model", "model")
    messages = _system(body.get("system"))
    messages += _messages(body.get("messages"))
    out["messages"] = messages
    for key, value in body.items():
        if key in _HANDLED or key in RUNESTONE_FIELDS:
            continue
        fate = FIELD_FATES.get(key, FIELD_FATES["(other fields)"])
        if fate.startswith("refused") and value not in _EMPTY:
            raise InvalidParam(f"'{key}' is not supported here: {fate[9:]}.", param=key)
    if (max_tokens := _count(body, "max_tokens")) is not None:
        out["max_tokens"] = max_tokens
    for key in ("temperature", "top_p"):
        if (value := body.get(key)) is not None:
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise InvalidParam(f"'{key}' must be a number between 0 and 1.", param=key)
            out[key] = value
    if (stop := body.get("stop_sequences")) is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise InvalidParam(
                "'stop_sequences' must be an array of strings.", param="stop_sequences"
            )
        if stop:
            out["stop"] = list(stop)
    if (user := _user_id(body.get("metadata"))) is not None:
        out["user"] = user
    if (stream := body.get("stream")) is not None:
        if not isinstance(stream, bool):
            raise InvalidParam("'stream' must be a boolean.", param="stream")
        out["stream"] = stream
        if stream:
            out["stream_options"] = {"include_usage": True}
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    out.update(_tool_choice(body.get("tool_choice"), has_tools=bool(tools)))
    if (effort := _reasoning_effort(body)) is not None:
        out["reasoning_effort"] = effort
    if (fmt := _response_format(body)) is not None:
        out["response_format"] = fmt
    return out


# --- top level -------------------------------------------------------------------------------


def _string(obj: Mapping[str, Any], key: str, at: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidParam(f"'{at}' must be a string.", param=at)
    return value


def _count(body: Mapping[str, Any], key: str, at: str | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParam(f"'{at or key}' must be a positive integer.", param=at or key)
    return value


def _user_id(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidParam("'metadata' must be an object.", param="metadata")
    user = metadata.get("user_id")
    if user is None:
        return None
    if not isinstance(user, str):
        raise InvalidParam("'metadata.user_id' must be a string.", param="metadata.user_id")
    return user[:MAX_USER_CHARS]


def _reasoning_effort(body: Mapping[str, Any]) -> str | None:
    """``thinking`` and ``output_config.effort`` -> ``reasoning_effort`` (or None)."""
    thinking = body.get("thinking")
    kind, budget = None, None
    if thinking is not None:
        if not isinstance(thinking, Mapping) or not isinstance(thinking.get("type"), str):
            raise InvalidParam("'thinking' must be an object with a 'type'.", param="thinking")
        kind = thinking["type"]
        if kind not in ("enabled", "adaptive", "disabled", "between_tools"):
            raise InvalidParam(f"Unknown thinking type {kind!r}.", param="thinking.type")
        budget = _count(thinking, "budget_tokens", "thinking.budget_tokens")
        if kind == "enabled" and budget is None:
            raise InvalidParam("'thinking.budget_tokens' is required.", param="thinking")
    effort = _output_config(body).get("effort")
    if effort is not None and effort not in EFFORTS:
        raise InvalidParam(
            f"'output_config.effort' must be one of {', '.join(EFFORTS)}.",
            param="output_config.effort",
        )
    if kind == "disabled":
        return None
    if effort is not None:
        return EFFORTS[effort]
    if kind == "enabled" and budget is not None:
        return next((e for bound, e in EFFORT_BY_BUDGET if budget < bound), "high")
    return None


def _output_config(body: Mapping[str, Any]) -> Mapping[str, Any]:
    config = body.get("output_config")
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise InvalidParam("'output_config' must be an object.", param="output_config")
    return config


def _response_format(body: Mapping[str, Any]) -> Json | None:
    fmt, at = _output_config(body).get("format"), "output_config.format"
    if fmt is None:
        fmt, at = body.get("output_format"), "output_format"
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping) or fmt.get("type") != "json_schema":
        raise InvalidParam(f"'{at}' must be {{'type': 'json_schema', 'schema': ...}}.", param=at)
    schema = fmt.get("schema")
    if not isinstance(schema, Mapping):
        raise InvalidParam(f"'{at}.schema' must be an object.", param=f"{at}.schema")
    # Anthropic's structured outputs always conform to the schema: OpenAI's strict mode.
    return {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": dict(schema), "strict": True},
    }


def _tools(raw: Any) -> list[Json]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidParam("'tools' must be an array.", param="tools")
    out: list[Json] = []
    for i, tool in enumerate(raw):
        at = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise InvalidParam(f"'{at}' must be an object.", param=at)
        kind = tool.get("type")
        if isinstance(kind, str) and kind.startswith("tool_search_tool_"):
            continue
        if kind not in (None, "custom"):
            raise InvalidParam(
                f"'{at}' is Anthropic's server tool {kind!r} ({tool.get('name')!r}): it runs on"
                " Anthropic's servers only, and this model is not served by Anthropic.",
                param=at,
            )
        fn: Json = {"name": _string(tool, "name", f"{at}.name")}
        if tool.get("description") is not None:
            fn["description"] = _string(tool, "description", f"{at}.description")
        schema = tool.get("input_schema")
        if not isinstance(schema, Mapping):
            raise InvalidParam(
                f"'{at}.input_schema' must be an object.", param=f"{at}.input_schema"
            )
        fn["parameters"] = dict(schema)
        if (strict := tool.get("strict")) is not None:
            if not isinstance(strict, bool):
                raise InvalidParam(f"'{at}.strict' must be a boolean.", param=f"{at}.strict")
            fn["strict"] = strict
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(raw: Any, *, has_tools: bool) -> Json:
    if raw is None:
        return {}
    kind = raw.get("type") if isinstance(raw, Mapping) else None
    if kind not in (*TOOL_CHOICES, "tool"):
        raise InvalidParam(
            "'tool_choice' must be an object of type auto, any, tool or none.", param="tool_choice"
        )
    parallel = raw.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidParam(
            "'tool_choice.disable_parallel_tool_use' must be a boolean.",
            param="tool_choice.disable_parallel_tool_use",
        )
    choice: Any = TOOL_CHOICES.get(kind)
    if kind == "tool":
        choice = {
            "type": "function",
            "function": {"name": _string(raw, "name", "tool_choice.name")},
        }
    if not has_tools:
        return {}  # OpenAI refuses tool_choice and parallel_tool_calls without tools
    out: Json = {"tool_choice": choice}
    if parallel:
        out["parallel_tool_calls"] = False
    return out


#: Top-level fields the code above maps; every other field is settled by its FIELD_FATES.
_HANDLED: Final = frozenset(
    {"model", "system", "messages", "max_tokens", "temperature", "top_p", "stop_sequences"}
    | {"metadata", "stream", "tools", "tool_choice", "thinking", "output_config", "output_format"}
)


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
        texts.append(_string(block, "text", f"{at}[{j}].text"))
    return "\n\n".join(texts)


def _system(raw: Any) -> list[Json]:
    if raw is None:
        return []
    text = _texts(raw, "system")
    return [{"role": "system", "content": text}] if text else []


def _messages(raw: Any) -> list[Json]:
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
            texts.append(_string(block, "text", f"{here}.text"))
        elif kind == "tool_use":
            args = block.get("input")
            if not isinstance(args, Mapping):
                raise InvalidParam(f"'{here}.input' must be an object.", param=f"{here}.input")
            call = {"name": _string(block, "name", f"{here}.name"), "arguments": _compact(args)}
            calls.append({"id": _string(block, "id", f"{here}.id"), "type": "function"})
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
            call_id = _string(block, "tool_use_id", f"{here}.tool_use_id")
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


def _compact(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


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
    return [_part(_string(block, "text", f"{at}.text"))]


def _image_block(block: Mapping[str, Any], at: str) -> list[Json]:
    kind, source = _source(block, at)
    if kind == "base64":
        media_type = _string(source, "media_type", f"{at}.source.media_type")
        data = _string(source, "data", f"{at}.source.data")
        url = f"data:{media_type};base64,{data}"
    elif kind == "url":
        url = _string(source, "url", f"{at}.source.url")
    else:
        raise _refuse_source(kind, at, "send the image as base64 or a url")
    return [{"type": "image_url", "image_url": {"url": url}}]


def _document_block(block: Mapping[str, Any], at: str) -> list[Json]:
    kind, source = _source(block, at)
    header = [block[k] for k in ("title", "context") if isinstance(block.get(k), str) and block[k]]
    if kind == "text":
        return [_part("\n\n".join([*header, _string(source, "data", f"{at}.source.data")]))]
    parts = [_part("\n\n".join(header))] if header else []
    if kind == "base64":
        if source.get("media_type") != "application/pdf":
            raise InvalidParam(
                "A base64 document must be application/pdf.", param=f"{at}.source.media_type"
            )
        data = _string(source, "data", f"{at}.source.data")
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
    title = _string(block, "title", f"{at}.title")
    source = _string(block, "source", f"{at}.source")
    text = _texts(block.get("content"), f"{at}.content")
    return [_part(f"{title}\n{source}\n\n{text}")]


_PARTS: Final[Mapping[str, Callable[[Mapping[str, Any], str], list[Json]]]] = {
    "text": _text_block,
    "image": _image_block,
    "document": _document_block,
    "search_result": _search_result_block,
}


# --- count_tokens ----------------------------------------------------------------------------

#: The name of the heuristic :func:`estimate_input_tokens` applies.
ESTIMATE_METHOD: Final = "chars/4"
#: Tokens added per chat message (role, separators), whatever its content.
MESSAGE_OVERHEAD_TOKENS: Final = 4
#: Tokens per image or PDF part: Anthropic's vision guide puts a ~1.15 megapixel image at
#: about 1,600 tokens ((width * height) / 750); a PDF is counted as one such page.
IMAGE_TOKENS: Final = 1600


def estimate_input_tokens(body: Mapping[str, Any]) -> int:
    """The ``chars/4`` estimate ``count_tokens`` answers for providers without a counter.

    The body is translated first (so it is validated exactly like a Messages call, and what
    is counted is what the provider would be sent). Then: every character of text in the
    system prompt and the messages (text parts, tool calls' names and JSON arguments, tool
    results) and in the tool definitions (name, description, JSON of the parameters schema),
    divided by 4 and rounded up; plus :data:`MESSAGE_OVERHEAD_TOKENS` per chat message and
    :data:`IMAGE_TOKENS` per image or PDF. An estimate, not a tokenizer: it errs high for
    code and low for PDFs of many pages.
    """
    chat = messages_to_chat(body)
    chars = 0
    media = 0
    for msg in chat["messages"]:
        content = msg.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if part["type"] == "text":
                    chars += len(part["text"])
                else:
                    media += 1
        for call in msg.get("tool_calls", ()):
            chars += len(call["function"]["name"]) + len(call["function"]["arguments"])
    for tool in chat.get("tools", ()):
        fn = tool["function"]
        chars += len(fn["name"]) + len(fn.get("description", ""))
        chars += len(_compact(fn["parameters"]))
    overhead = MESSAGE_OVERHEAD_TOKENS * len(chat["messages"])
    return math.ceil(chars / 4) + overhead + IMAGE_TOKENS * media
