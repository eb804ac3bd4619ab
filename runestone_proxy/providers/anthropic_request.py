"""OpenAI ``chat.completions`` request body -> Anthropic Messages API request body. No I/O.

Owns the request direction of the Anthropic translator (:mod:`.anthropic`): the top-level
body (system prompt, tools and ``tool_choice``, sampling parameters, ``max_tokens`` and
extended thinking); the messages and their content blocks are converted in
:mod:`.anthropic_messages`. Everything here is a pure function over dicts; bad input raises
:class:`~runestone_proxy.errors.InvalidParam` naming the offending ``param`` the way OpenAI
does.

OpenAI fields with no Anthropic equivalent (``frequency_penalty``, ``presence_penalty``,
``seed``, ``logit_bias``, ``store``, ...) are dropped: the Messages API rejects unknown fields.
Fields whose absence would change the answer the client asked for (``n > 1``, ``logprobs``,
``response_format`` other than text) are refused with a 400 instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from runestone_proxy.errors import InvalidParam
from runestone_proxy.providers.anthropic_messages import Block, plain, strings, translate_messages

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
        out["system"] = system[0]["text"] if len(system) == 1 and plain(system[0]) else system
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
        if not isinstance(fn, Mapping) or tool.get("type") != "function" or not strings(fn, "name"):
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
        and strings(raw["function"], "name")
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
