"""OpenAI Responses input items -> OpenAI chat messages and parts. No I/O.

Owns the conversation half of the TRANSLATED Responses path (the top level, fields and their
fates are ``responses_request``'s): the items of ``input``
(https://platform.openai.com/docs/api-reference/responses/create#responses-create-input)
become chat messages (https://platform.openai.com/docs/api-reference/chat/create), each
content part a chat content part, checked as it goes; bad input raises
:class:`~runestone_proxy.errors.InvalidParam` (400) naming the path, e.g.
``input[2].content[0].file_id``. The fates of item and part types are the ``input[]`` and
``content[]`` entries of ``responses_request.FIELD_FATES``.

It also owns the two item-list helpers the gateway uses to keep conversation state for
``previous_response_id``: :func:`input_items` (a request's ``input`` as a list of items) and
:func:`output_to_input` (a stored response's ``output`` as input items for the next turn).

How this works: a ``message`` item (or an item with a ``role`` and no ``type``: the SDKs'
EasyInputMessage) becomes one chat message; ``developer`` becomes ``system``, which every
OpenAI-compatible server knows. A ``function_call`` item joins the assistant message just
before it (the text the model said before calling, or the previous call of the same turn),
else opens one, so a turn's calls are one assistant message with ``tool_calls`` as chat
expects. A ``function_call_output`` item becomes a ``tool`` message; images and files it
returned, which a ``tool`` message cannot carry, wait until the run of tool messages ends
(OpenAI wants them directly after the ``tool_calls``) and then follow in one ``user``
message, each group after a line naming its call. ``reasoning`` items are dropped: their
encrypted content means nothing to another model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from runestone_proxy.errors import InvalidParam
from runestone_proxy.providers.messages_blocks import Json, string_field

__all__ = [
    "ATTACHMENTS_ONLY",
    "HOSTED_ITEMS",
    "input_items",
    "items_to_chat",
    "output_to_input",
]

#: The tool message of an output that held only images or files (they follow in a user message).
ATTACHMENTS_ONLY: Final = "(no text; the attachments follow in the next message)"
#: Item types that record a tool OpenAI runs (or one whose tool type is refused); they are
#: refused by name. Any other ``*_call`` / ``*_call_output`` / ``mcp_*`` type is too.
HOSTED_ITEMS: Final = frozenset(
    {
        "web_search_call",
        "file_search_call",
        "computer_call",
        "computer_call_output",
        "code_interpreter_call",
        "image_generation_call",
        "local_shell_call",
        "local_shell_call_output",
        "shell_call",
        "shell_call_output",
        "apply_patch_call",
        "apply_patch_call_output",
        "custom_tool_call",
        "custom_tool_call_output",
        "tool_search_call",
        "tool_search_output",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "mcp_call",
    }
)
_DETAILS: Final = frozenset({"auto", "low", "high"})
_ROLES: Final = ("user", "assistant", "system", "developer")


# --- item lists (conversation state) ---------------------------------------------------------


def input_items(body: Mapping[str, Any]) -> list[Json]:
    """The request's ``input`` as a list of items: a string is one user message item with one
    ``input_text`` part; a list passes item by item (each an object with a ``type`` or a
    ``role``, copied one level deep); absent is no items."""
    raw = body.get("input")
    if raw is None:
        return []
    if isinstance(raw, str):
        part = {"type": "input_text", "text": raw}
        return [{"type": "message", "role": "user", "content": [part]}]
    if not isinstance(raw, list):
        raise InvalidParam("'input' must be a string or an array of items.", param="input")
    for i, item in enumerate(raw):
        _kind(item, f"input[{i}]")
    return [_as_item(item) for item in raw]


def _as_item(item: Mapping[str, Any]) -> Json:
    """One input item as ``input_items`` lists it, copied one level deep: the short form
    ``{"role", "content": "..."}`` becomes the message item OpenAI lists for it (``type``
    ``message``, the text as one ``input_text`` part, ``output_text`` for the assistant's)."""
    copied = dict(item)
    if "type" not in copied and "role" in copied:
        copied = {"type": "message", **copied}
        content = copied.get("content")
        if isinstance(content, str):
            kind = "output_text" if copied["role"] == "assistant" else "input_text"
            copied["content"] = [{"type": kind, "text": content}]
    return copied


def output_to_input(output: Sequence[Mapping[str, Any]]) -> list[Json]:
    """A stored response's ``output`` items as input items for the next turn.

    The Responses API takes its own output items back as input: ``message`` items (role
    ``assistant``, ``output_text`` / ``refusal`` parts), ``function_call`` and ``reasoning``
    items stay as they are (a translated turn later drops the reasoning). Items are copied
    one level deep; a message item without a role is the assistant's.
    """
    out: list[Json] = []
    for item in output:
        copied = dict(item)
        if copied.get("type") == "message":
            copied.setdefault("role", "assistant")
        out.append(copied)
    return out


# --- items -> chat messages ------------------------------------------------------------------


def items_to_chat(items: Sequence[Any]) -> list[Json]:
    """Input items -> chat messages, order kept (see the module docstring)."""
    out: list[Json] = []
    attached: list[Json] = []  # media from tool outputs, held until the tool messages end
    for i, item in enumerate(items):
        at = f"input[{i}]"
        kind = _kind(item, at)
        if attached and kind in ("message", "function_call"):
            out.append({"role": "user", "content": attached})
            attached = []
        if kind == "message":
            out.append(_message(item, at))
        elif kind == "function_call":
            _add_call(out, _function_call(item, at))
        elif kind == "function_call_output":
            call_id = string_field(item, "call_id", f"{at}.call_id")
            text, media = _tool_output(item.get("output"), f"{at}.output")
            out.append({"role": "tool", "tool_call_id": call_id, "content": text})
            if media:
                attached.append(_text(f"Attachments returned by tool call {call_id}:"))
                attached.extend(media)
        elif kind != "reasoning":
            raise _refuse_item(kind, at)
    if attached:
        out.append({"role": "user", "content": attached})
    return out


def _kind(item: Any, at: str) -> str:
    """The item's type; an item with a ``role`` and no ``type`` is a message."""
    if not isinstance(item, Mapping):
        raise InvalidParam(f"'{at}' must be an object.", param=at)
    kind = item.get("type")
    if kind is None and item.get("role") is not None:
        return "message"
    if not isinstance(kind, str):
        raise InvalidParam(f"'{at}' must be an item with a 'type' or a 'role'.", param=at)
    return kind


def _refuse_item(kind: str, at: str) -> InvalidParam:
    if kind == "item_reference":
        why = (
            "Runestone keeps no item store beyond previous_response_id; send the item itself"
            " or continue with previous_response_id"
        )
    elif (
        kind in HOSTED_ITEMS or kind.endswith(("_call", "_call_output")) or kind.startswith("mcp_")
    ):
        why = (
            f"'{kind}' items record a tool that only OpenAI runs (or a tool type this model"
            " cannot be given); they cannot be translated for a model OpenAI does not serve"
        )
    else:
        why = f"unknown item type '{kind}'"
    return InvalidParam(f"'{at}.type': {why}.", param=f"{at}.type")


def _message(item: Mapping[str, Any], at: str) -> Json:
    role, content = item.get("role"), item.get("content")
    if role not in _ROLES:
        raise InvalidParam(f"'{at}.role' must be one of {', '.join(_ROLES)}.", param=f"{at}.role")
    if role in ("system", "developer"):
        return {"role": "system", "content": _joined(content, f"{at}.content", _SYSTEM)}
    if role == "assistant":
        return {"role": "assistant", "content": _joined(content, f"{at}.content", _ASSISTANT)}
    if isinstance(content, str):
        return {"role": "user", "content": content}
    parts = []
    for j, part in enumerate(_parts(content, f"{at}.content")):
        here = f"{at}.content[{j}]"
        convert = _USER_PARTS.get(part["type"])
        if convert is None:
            raise _refuse_part(part["type"], here, "a user message")
        parts.append(convert(part, here))
    if len(parts) == 1 and parts[0]["type"] == "text":
        return {"role": "user", "content": parts[0]["text"]}
    return {"role": "user", "content": parts}


def _joined(content: Any, at: str, allowed: frozenset[str]) -> str:
    """A string, or the texts of ``allowed`` parts: a system or developer message's joined
    with a blank line, an assistant's (pieces of one answer) concatenated."""
    system = allowed is _SYSTEM
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(_parts(content, at)):
        here = f"{at}[{j}]"
        if part["type"] not in allowed:
            where = "a system or developer message" if system else "an assistant message"
            raise _refuse_part(part["type"], here, where)
        key = "refusal" if part["type"] == "refusal" else "text"
        texts.append(string_field(part, key, f"{here}.{key}"))
    return ("\n\n" if system else "").join(texts)


def _function_call(item: Mapping[str, Any], at: str) -> Json:
    fn = {
        "name": string_field(item, "name", f"{at}.name"),
        "arguments": string_field(item, "arguments", f"{at}.arguments"),
    }
    return {
        "id": string_field(item, "call_id", f"{at}.call_id"),
        "type": "function",
        "function": fn,
    }


def _add_call(out: list[Json], call: Json) -> None:
    """The call joins the assistant message just before it, else opens one."""
    if out and out[-1]["role"] == "assistant":
        out[-1].setdefault("tool_calls", []).append(call)
    else:
        out.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _tool_output(output: Any, at: str) -> tuple[str, list[Json]]:
    """(text for the tool message, image and file parts for the next user message)."""
    if isinstance(output, str):
        return output, []
    texts: list[str] = []
    media: list[Json] = []
    for j, part in enumerate(_parts(output, at)):
        here = f"{at}[{j}]"
        convert = _USER_PARTS.get(part["type"])
        if convert is None:
            raise _refuse_part(part["type"], here, "a function call output")
        converted = convert(part, here)
        if converted["type"] == "text":
            texts.append(converted["text"])
        else:
            media.append(converted)
    return "\n\n".join(texts) or (ATTACHMENTS_ONLY if media else ""), media


# --- content parts ---------------------------------------------------------------------------


def _parts(content: Any, at: str) -> list[Mapping[str, Any]]:
    if not isinstance(content, list):
        raise InvalidParam(f"'{at}' must be a string or an array of content parts.", param=at)
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            raise InvalidParam(f"'{at}[{j}]' must be a part with a 'type'.", param=f"{at}[{j}]")
    return content


def _refuse_part(kind: str, at: str, where: str) -> InvalidParam:
    known = kind in _USER_PARTS or kind in _ASSISTANT
    why = f"a '{kind}' part is not allowed in {where}" if known else f"unknown part type '{kind}'"
    return InvalidParam(f"'{at}.type': {why}.", param=f"{at}.type")


def _text(text: str) -> Json:
    return {"type": "text", "text": text}


def _no_file_id(part: Mapping[str, Any], at: str, key: str, hint: str) -> None:
    if part.get(key) is not None:
        raise InvalidParam(
            f"'{at}.{key}' cannot be translated: Runestone keeps no files and fetches nothing"
            f" for this model; {hint}.",
            param=f"{at}.{key}",
        )


def _input_text(part: Mapping[str, Any], at: str) -> Json:
    return _text(string_field(part, "text", f"{at}.text"))


def _input_image(part: Mapping[str, Any], at: str) -> Json:
    _no_file_id(part, at, "file_id", "send image_url (a URL or a data URL) instead")
    image: Json = {"url": string_field(part, "image_url", f"{at}.image_url")}
    detail = part.get("detail")
    if detail is not None and not isinstance(detail, str):
        raise InvalidParam(f"'{at}.detail' must be a string.", param=f"{at}.detail")
    if detail in _DETAILS:
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def _input_file(part: Mapping[str, Any], at: str) -> Json:
    hint = "send the file's content as file_data (a base64 data URL)"
    _no_file_id(part, at, "file_id", hint)
    _no_file_id(part, at, "file_url", hint)
    data = string_field(part, "file_data", f"{at}.file_data")
    name = part.get("filename")
    if name is not None and not isinstance(name, str):
        raise InvalidParam(f"'{at}.filename' must be a string.", param=f"{at}.filename")
    return {"type": "file", "file": {"filename": name or "document.pdf", "file_data": data}}


_USER_PARTS: Final[Mapping[str, Callable[[Mapping[str, Any], str], Json]]] = {
    "input_text": _input_text,
    "input_image": _input_image,
    "input_file": _input_file,
}
_SYSTEM: Final = frozenset({"input_text"})
_ASSISTANT: Final = frozenset({"output_text", "input_text", "refusal"})
