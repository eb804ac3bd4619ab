"""OpenAI Responses request body -> OpenAI chat completions request body. No I/O.

Owns the request direction of the TRANSLATED Responses path: a ``/v1/responses`` body (the
Responses API, https://platform.openai.com/docs/api-reference/responses/create) routed to a
provider that does not speak it (an OpenAI-compatible chat server, Anthropic through its chat
translator, the mock) becomes an ordinary chat body
(https://platform.openai.com/docs/api-reference/chat/create). Bad input raises
:class:`~runestone_proxy.errors.InvalidParam` (400) naming the path, e.g. ``tools[2]`` or
``input[3].content[0].file_id``.

Every Responses field has one fate, published in :data:`FIELD_FATES`: ``mapped`` /
``copied`` to the chat body, ``dropped`` (it steers OpenAI's own servers or the gateway, so
it means nothing to the provider) or ``refused`` (honouring it is impossible on this path and
ignoring it would change the answer). The top-level loop reads the table itself: ``dropped``
and ``refused`` fields are handled by their entry, never by code of their own.

Conversation state is the gateway's: it expands ``previous_response_id`` (with
:func:`input_items` and :func:`output_to_input`) before this translator runs, and keeps
``store``. The items of ``input`` are converted by ``responses_items``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from runestone_proxy.errors import InvalidParam
from runestone_proxy.providers.base import RUNESTONE_FIELDS
from runestone_proxy.providers.messages_blocks import Json, string_field
from runestone_proxy.providers.responses_items import input_items, items_to_chat, output_to_input

__all__ = [
    "EFFORTS",
    "FIELD_FATES",
    "input_items",
    "output_to_input",
    "responses_to_chat",
]

#: What happens to each Responses field. Keys are top-level field names, or dotted paths
#: (``[]`` for "any element") for notable sub-fields and item / part / tool types; each value
#: starts with its fate: ``mapped``, ``copied``, ``dropped`` or ``refused``.
FIELD_FATES: Final[Mapping[str, str]] = {
    "model": "copied: as given (the gateway replaces it with the routed model)",
    "instructions": "mapped: the first system message (never carried over from a previous"
    " response)",
    "input": "mapped: a string -> one user message; items -> chat messages, order kept",
    "max_output_tokens": "mapped: to max_tokens (as max_completion_tokens to OpenAI itself)",
    "temperature": "copied",
    "top_p": "copied",
    "stream": "copied; a stream also asks stream_options.include_usage for the usage",
    "stream_options": "dropped: include_obfuscation is OpenAI's; the chat stream asks"
    " include_usage itself",
    "tools": "mapped: function tools to chat function tools; every other tool type refused",
    "tools[].type=<hosted tool>": "refused: web_search*, file_search, computer_use*,"
    " code_interpreter, image_generation, mcp, local_shell, shell, apply_patch, custom,"
    " tool_search ... run on OpenAI's servers (or need OpenAI's grammar) only",
    "tool_choice": "mapped: auto, none, required as is; {type: function, name} -> named"
    " function; allowed_tools -> only those tools are sent, mode as the choice; dropped when"
    " no tools are sent",
    "tool_choice.type=<hosted tool>": "refused: a hosted tool cannot be forced where it cannot run",
    "parallel_tool_calls": "copied: when tools are sent (chat servers refuse it without tools)",
    "max_tool_calls": "dropped: a chat turn makes one round of calls; the client runs them",
    "text": "mapped: format (below); verbosity dropped (OpenAI's)",
    "text.format": "mapped: text -> nothing; json_object -> response_format json_object;"
    " json_schema -> response_format json_schema {name, schema, strict, description}",
    "reasoning": "mapped: effort (below); summary, generate_summary and other keys dropped",
    "reasoning.effort": "mapped: to reasoning_effort (xhigh, max -> high). The gateway sends"
    " it only to models whose entry lists the 'reasoning' capability (dropped elsewhere)",
    "reasoning.summary": "dropped: a chat model returns no reasoning summary",
    "user": "mapped: to user (safety_identifier wins when both are set)",
    "safety_identifier": "mapped: to user",
    "metadata": "dropped: the provider is not told; the gateway echoes it in the response",
    "store": "dropped: the gateway's (it keeps the response for previous_response_id)",
    "previous_response_id": "refused: the gateway expands it into input before translation;"
    " reaching the translator is a gateway bug",
    "include": "dropped: extra output data (encrypted reasoning, logprobs, hosted tool"
    " results) that a translated answer does not have",
    "truncation": "dropped: the whole input is sent ('disabled'); a conversation too long for"
    " the model fails upstream",
    "service_tier": "dropped: OpenAI's processing tiers",
    "background": "refused: when true; Runestone has its own queue (send"
    " 'Prefer: respond-async' and poll /v1/jobs/{id})",
    "background_options": "dropped: options of OpenAI's background mode",
    "prompt": "refused: stored prompts live on OpenAI's servers",
    "conversation": "refused: conversations live on OpenAI's servers; use previous_response_id",
    "top_logprobs": "refused: a translated answer carries no log probabilities",
    "prompt_cache_key": "dropped: OpenAI's cache routing",
    "prompt_cache_retention": "dropped: OpenAI's cache policy",
    "prompt_cache_options": "dropped: OpenAI's cache policy",
    "context_management": "dropped: OpenAI compacts its own context server-side; the full"
    " conversation is sent",
    "moderation": "dropped: OpenAI's moderation policy",
    "access_programs": "dropped: OpenAI account programs",
    "image": "dropped: settings of OpenAI's image inputs",
    "(runestone fields)": "dropped: never copied (the gateway reads them)",
    "(other fields)": "dropped: unknown to this translator",
    "input[].type=message": "mapped: one chat message; an item with a role and no type too",
    "input[].role=developer": "mapped: a system message at that position (most"
    " OpenAI-compatible servers know only system)",
    "input[].role=system": "mapped: a system message at that position; parts joined with a"
    " blank line",
    "input[].role=assistant": "mapped: an assistant message, its parts' texts concatenated",
    "input[].type=function_call": "mapped: assistant tool_calls (id = call_id, arguments"
    " as sent); a turn's calls join the assistant message before them",
    "input[].type=function_call_output": "mapped: a tool message (tool_call_id = call_id);"
    " text parts joined; images and files follow the run of tool messages in a user message",
    "input[].type=reasoning": "dropped: encrypted reasoning means nothing to another model",
    "input[].type=item_reference": "refused: Runestone keeps no item store beyond"
    " previous_response_id",
    "input[].type=<hosted tool item>": "refused: web_search_call, file_search_call,"
    " computer_call, code_interpreter_call, image_generation_call, mcp_*, ... record tools"
    " only OpenAI runs",
    "input[].type=<other>": "refused: unknown item type",
    "input[].id": "dropped: item ids, status and phase are OpenAI's bookkeeping",
    "content[].type=input_text": "mapped: text part (a lone text part -> string content)",
    "content[].type=input_image": "mapped: image_url part (a URL or data URL; detail low,"
    " high, auto kept); file_id refused (Runestone keeps no files)",
    "content[].type=input_file": "mapped: file_data (a base64 data URL) -> file part;"
    " file_id and file_url refused (Runestone keeps no files and fetches nothing)",
    "content[].type=output_text": "mapped: assistant text; annotations and logprobs dropped",
    "content[].type=refusal": "mapped: assistant text (what the model said)",
    "content[].type=<other>": "refused: unknown part type",
}

#: ``reasoning.effort`` -> chat ``reasoning_effort`` (the chat scale stops at high).
EFFORTS: Final[Mapping[str, str]] = {
    "none": "none",
    "minimal": "minimal",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}
TOOL_CHOICES: Final = frozenset({"auto", "none", "required"})
_EMPTY: Final[tuple[object, ...]] = (None, False, [], {}, "")


def responses_to_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI chat completions body for one Responses request body."""
    for key, value in body.items():
        if key in _HANDLED or key in RUNESTONE_FIELDS:
            continue
        fate = FIELD_FATES.get(key, FIELD_FATES["(other fields)"])
        if fate.startswith("refused") and value not in _EMPTY:
            raise InvalidParam(f"'{key}' is not supported here: {fate[9:]}.", param=key)
    out: Json = {}
    if "model" in body:
        out["model"] = string_field(body, "model", "model")
    messages: list[Json] = []
    if (instructions := body.get("instructions")) is not None:
        if not isinstance(instructions, str):
            raise InvalidParam("'instructions' must be a string.", param="instructions")
        if instructions:
            messages.append({"role": "system", "content": instructions})
    messages += items_to_chat(input_items(body))
    if not messages:
        raise InvalidParam("'input' must not be empty.", param="input")
    out["messages"] = messages
    if (max_tokens := body.get("max_output_tokens")) is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidParam(
                "'max_output_tokens' must be a positive integer.", param="max_output_tokens"
            )
        out["max_tokens"] = max_tokens
    for key, top in (("temperature", 2), ("top_p", 1)):
        if (value := body.get(key)) is not None:
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 <= value <= top
            ):
                raise InvalidParam(f"'{key}' must be a number between 0 and {top}.", param=key)
            out[key] = value
    if (user := _user(body)) is not None:
        out["user"] = user
    if (stream := body.get("stream")) is not None:
        if not isinstance(stream, bool):
            raise InvalidParam("'stream' must be a boolean.", param="stream")
        out["stream"] = stream
        if stream:
            out["stream_options"] = {"include_usage": True}
    tools = _tools(body.get("tools"))
    choice, tools = _tool_choice(body.get("tool_choice"), tools)
    if tools:
        out["tools"] = tools
        out.update(choice)
        if (parallel := body.get("parallel_tool_calls")) is not None:
            if not isinstance(parallel, bool):
                raise InvalidParam(
                    "'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls"
                )
            out["parallel_tool_calls"] = parallel
    if (effort := _reasoning_effort(body.get("reasoning"))) is not None:
        out["reasoning_effort"] = effort
    if (fmt := _response_format(body.get("text"))) is not None:
        out["response_format"] = fmt
    return out


#: Top-level fields the code above maps; every other field is settled by its FIELD_FATES.
_HANDLED: Final = frozenset(
    {"model", "instructions", "input", "max_output_tokens", "temperature", "top_p", "user"}
    | {"safety_identifier", "stream", "tools", "tool_choice", "parallel_tool_calls"}
    | {"reasoning", "text"}
)


# --- top level -------------------------------------------------------------------------------


def _object(raw: Any, at: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidParam(f"'{at}' must be an object.", param=at)
    return raw


def _user(body: Mapping[str, Any]) -> str | None:
    for key in ("safety_identifier", "user"):
        if body.get(key) is not None:
            return string_field(body, key, key)
    return None


def _reasoning_effort(raw: Any) -> str | None:
    effort = _object(raw, "reasoning").get("effort")
    if effort is None:
        return None
    if effort not in EFFORTS:
        raise InvalidParam(
            f"'reasoning.effort' must be one of {', '.join(EFFORTS)}.", param="reasoning.effort"
        )
    return EFFORTS[effort]


def _response_format(raw: Any) -> Json | None:
    fmt = _object(raw, "text").get("format")
    if fmt is None:
        return None
    at = "text.format"
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise InvalidParam(
            f"'{at}' must be an object of type text, json_object or json_schema.", param=at
        )
    schema = fmt.get("schema")
    if not isinstance(schema, Mapping):
        raise InvalidParam(f"'{at}.schema' must be an object.", param=f"{at}.schema")
    spec: Json = {"name": string_field(fmt, "name", f"{at}.name"), "schema": dict(schema)}
    if (strict := fmt.get("strict")) is not None:
        if not isinstance(strict, bool):
            raise InvalidParam(f"'{at}.strict' must be a boolean.", param=f"{at}.strict")
        spec["strict"] = strict
    if fmt.get("description") is not None:
        spec["description"] = string_field(fmt, "description", f"{at}.description")
    return {"type": "json_schema", "json_schema": spec}


# --- tools -----------------------------------------------------------------------------------


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
        if kind != "function":
            raise InvalidParam(
                f"'{at}' is a tool of type {kind!r}: only function tools can be given to a"
                " model OpenAI does not serve (hosted tools run on OpenAI's servers only).",
                param=at,
            )
        fn: Json = {"name": string_field(tool, "name", f"{at}.name")}
        if tool.get("description") is not None:
            fn["description"] = string_field(tool, "description", f"{at}.description")
        params = tool.get("parameters")
        if params is not None:
            if not isinstance(params, Mapping):
                raise InvalidParam(
                    f"'{at}.parameters' must be an object.", param=f"{at}.parameters"
                )
            fn["parameters"] = dict(params)
        if (strict := tool.get("strict")) is not None:
            if not isinstance(strict, bool):
                raise InvalidParam(f"'{at}.strict' must be a boolean.", param=f"{at}.strict")
            fn["strict"] = strict
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(raw: Any, tools: list[Json]) -> tuple[Json, list[Json]]:
    """(the chat ``tool_choice`` field, the tools to send)."""
    at = "tool_choice"
    if raw is None:
        return {}, tools
    if isinstance(raw, str):
        if raw not in TOOL_CHOICES:
            raise InvalidParam(f"'{at}' must be auto, none, required or an object.", param=at)
        return {"tool_choice": raw}, tools
    kind = raw.get("type") if isinstance(raw, Mapping) else None
    if not isinstance(kind, str):
        raise InvalidParam(f"'{at}' must be a string or an object with a 'type'.", param=at)
    if kind == "function":
        name = string_field(raw, "name", f"{at}.name")
        return {"tool_choice": {"type": "function", "function": {"name": name}}}, tools
    if kind != "allowed_tools":
        raise InvalidParam(
            f"'{at}' forces a tool of type {kind!r}, which cannot run for a model OpenAI does"
            " not serve; only function tools can be chosen.",
            param=at,
        )
    mode = raw.get("mode")
    if mode not in ("auto", "required"):
        raise InvalidParam(f"'{at}.mode' must be auto or required.", param=f"{at}.mode")
    allowed = raw.get("tools")
    if not isinstance(allowed, list):
        raise InvalidParam(f"'{at}.tools' must be an array.", param=f"{at}.tools")
    names = set()
    for j, entry in enumerate(allowed):
        here = f"{at}.tools[{j}]"
        if not isinstance(entry, Mapping) or entry.get("type") != "function":
            raise InvalidParam(
                f"'{here}' must be a function tool {{'type': 'function', 'name': ...}}.",
                param=here,
            )
        names.add(string_field(entry, "name", f"{here}.name"))
    return {"tool_choice": mode}, [t for t in tools if t["function"]["name"] in names]
