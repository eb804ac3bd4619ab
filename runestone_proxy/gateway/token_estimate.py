"""The two token counts a tokens-per-minute limit settles: the estimate reserved at admission
(:func:`estimate_tokens`) and the usage an answer reports (:func:`usage_tokens`), which
:func:`~runestone_proxy.gateway.ratelimit.reconcile` charges or refunds the difference of.
Pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["estimate_tokens", "int_after", "output_tokens", "prompt_tokens", "usage_tokens"]


def _chars(value: object) -> int:
    """Characters of text in a prompt, messages or input (a token id counts as 4)."""
    if type(value) is str:
        return len(value)
    total = 0
    if type(value) is list:
        for item in value:
            total += len(item) if type(item) is str else _chars(item)
    elif type(value) is dict:
        for item in value.values():
            total += len(item) if type(item) is str else _chars(item)
    elif type(value) is int:
        total = 4
    return total


def estimate_tokens(body: Mapping[str, Any], default_output_tokens: int) -> int:
    """Tokens to reserve for a request: :func:`prompt_tokens` plus :func:`output_tokens`
    (pass ``default_output_tokens=0`` for embeddings, which produce none)."""
    return prompt_tokens(body) + output_tokens(body, default_output_tokens)


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """The prompt (``messages``, ``prompt`` or ``input``) at ~4 characters per token."""
    chars = _chars(body.get("messages")) + _chars(body.get("prompt")) + _chars(body.get("input"))
    return -(-chars // 4)


def output_tokens(body: Mapping[str, Any], default_output_tokens: int) -> int:
    """The completion's cap: ``max_completion_tokens`` / ``max_tokens`` (chat, Messages) or
    ``max_output_tokens`` (Responses), else ``default_output_tokens``."""
    output = (
        body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    )
    if not isinstance(output, int) or isinstance(output, bool) or output <= 0:
        return default_output_tokens
    return output


def usage_tokens(payload: bytes) -> int | None:
    """The tokens an answer reports, found without parsing the JSON; None when absent:
    ``usage.total_tokens`` (OpenAI's shapes), else the sum of an Anthropic Message's
    ``input_tokens``, ``output_tokens`` and cache counts (the Messages dialect)."""
    total = int_after(payload, b'"total_tokens"')
    if total is not None or b'"output_tokens"' not in payload:
        return total
    counts = [int_after(payload, key) for key in _ANTHROPIC_USAGE]
    known = [c for c in counts if c is not None]
    return sum(known) if known else None


#: The counts an Anthropic Message's ``usage`` adds up to (input excludes the cached part).
_ANTHROPIC_USAGE = (
    b'"input_tokens"',
    b'"output_tokens"',
    b'"cache_read_input_tokens"',
    b'"cache_creation_input_tokens"',
)


def int_after(payload: bytes, key: bytes) -> int | None:
    """The integer after the last ``key:`` in ``payload``, or None."""
    at = payload.rfind(key)
    if at < 0:
        return None
    i = payload.find(b":", at + len(key))
    if i < 0:
        return None
    i += 1
    while i < len(payload) and payload[i] in b" \t\r\n":
        i += 1
    j = i
    while j < len(payload) and 0x30 <= payload[j] <= 0x39:
        j += 1
    return int(payload[i:j]) if j > i else None
