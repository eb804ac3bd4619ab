"""A rate limit on the wire: OpenAI's ``x-ratelimit-*`` headers and its 429. Pure.

Headers: OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, from a
:class:`~runestone_proxy.gateway.ratelimit.Quota`. ``reset`` is, as OpenAI defines it, the
time until the limit is back to its initial state, in OpenAI's (Go) duration format:
``20ms``, ``1s``, ``8.64s``, ``6m0s``, ``1h0m0s``. A denied request gets OpenAI's
``rate_limit_exceeded`` envelope (:func:`error_for`), ``"type": "tokens"`` for a
tokens-per-minute limit.
"""

from __future__ import annotations

import math
import re
import time
from typing import TYPE_CHECKING

from runestone_proxy.errors import RateLimited

if TYPE_CHECKING:
    from runestone_proxy.gateway.ratelimit import Denied, Quota, Which

__all__ = [
    "Headers",
    "TokensRateLimited",
    "anthropic_headers",
    "duration",
    "error_for",
    "headers_for",
    "parse_duration",
]

Headers = tuple[tuple[bytes, bytes], ...]


def duration(seconds: float) -> str:
    """OpenAI's reset format (Go's ``time.Duration``), rounded up to the millisecond."""
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms < 1000:
        return f"{ms}ms" if ms > 0 else "0s"
    secs, frac = divmod(ms, 1000)
    minutes, secs = divmod(secs, 60)
    text = f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60}m{text}s"
    if minutes:
        return f"{minutes}m{text}s"
    return f"{text}s"


def headers_for(quota: Quota) -> Headers:
    """OpenAI's ``x-ratelimit-*`` headers for a response (none for an unlimited key)."""
    requests: Headers = ()
    if quota.limit_requests is not None:
        requests = (
            (b"x-ratelimit-limit-requests", b"%d" % quota.limit_requests),
            (b"x-ratelimit-remaining-requests", b"%d" % quota.remaining_requests),
            (b"x-ratelimit-reset-requests", duration(quota.reset_requests_s).encode()),
        )
    if quota.limit_tokens is None:
        return requests
    return (
        *requests,
        (b"x-ratelimit-limit-tokens", b"%d" % quota.limit_tokens),
        (b"x-ratelimit-remaining-tokens", b"%d" % quota.remaining_tokens),
        (b"x-ratelimit-reset-tokens", duration(quota.reset_tokens_s).encode()),
    )


_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?(?:(\d+)ms)?")


def parse_duration(text: str) -> float | None:
    """Seconds in a :func:`duration` string (``20ms``, ``8.64s``, ``6m0s``, ``1h0m0s``)."""
    match = _DURATION.fullmatch(text)
    if match is None or not text:
        return None
    hours, minutes, secs, ms = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(secs or 0) + int(ms or 0) / 1000


#: OpenAI's header -> Anthropic's (https://docs.anthropic.com/en/api/rate-limits, "Response
#: headers"): the same numbers; Anthropic's ``reset`` is an RFC 3339 time, not a duration.
_ANTHROPIC_NAMES = {
    b"x-ratelimit-limit-requests": b"anthropic-ratelimit-requests-limit",
    b"x-ratelimit-remaining-requests": b"anthropic-ratelimit-requests-remaining",
    b"x-ratelimit-reset-requests": b"anthropic-ratelimit-requests-reset",
    b"x-ratelimit-limit-tokens": b"anthropic-ratelimit-tokens-limit",
    b"x-ratelimit-remaining-tokens": b"anthropic-ratelimit-tokens-remaining",
    b"x-ratelimit-reset-tokens": b"anthropic-ratelimit-tokens-reset",
}


def anthropic_headers(headers: Headers, now: float) -> Headers:
    """The key's ``x-ratelimit-*`` headers in Anthropic's names (``anthropic-ratelimit-*``),
    resets as RFC 3339 UTC times from ``now`` (epoch seconds); other headers unchanged."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        renamed = _ANTHROPIC_NAMES.get(name)
        if renamed is None:
            out.append((name, value))
        elif renamed.endswith(b"-reset"):
            seconds = parse_duration(value.decode("ascii", "replace"))
            if seconds is not None:
                at = time.gmtime(math.ceil(now + seconds))
                out.append((renamed, time.strftime("%Y-%m-%dT%H:%M:%SZ", at).encode()))
        else:
            out.append((renamed, value))
    return tuple(out)


class TokensRateLimited(RateLimited):
    """429 for a tokens-per-minute limit: OpenAI's envelope says ``"type": "tokens"``."""

    error_type = "tokens"


_NAMES: dict[Which, str] = {
    "rpm": "requests per min (RPM)",
    "rph": "requests per hour (RPH)",
    "tpm": "tokens per min (TPM)",
}


def error_for(denied: Denied, key_mask: str = "-") -> RateLimited:
    """The 429 OpenAI would send (the SDK retries it after ``retry-after``), carrying the
    ``x-ratelimit-*`` headers too. A request larger than its TPM limit can never run: like
    OpenAI's "Request too large", it gets no ``retry-after``."""
    cls = TokensRateLimited if denied.which == "tpm" else RateLimited
    who = f"key {key_mask} on " if key_mask != "-" else ""
    headers = headers_for(denied.quota)
    if math.isinf(denied.retry_after_s):
        return cls(
            f"Request too large for {who}{_NAMES[denied.which]}: Limit {denied.limit}, "
            f"Requested {denied.requested}. The input or output tokens must be reduced in "
            "order to run successfully.",
            headers=headers,
        )
    return cls(
        f"Rate limit reached for {who}{_NAMES[denied.which]}: Limit {denied.limit}, "
        f"Used {denied.used}, Requested {denied.requested}. "
        f"Please try again in {duration(denied.retry_after_s)}.",
        retry_after_s=denied.retry_after_s,
        headers=headers,
    )
