"""The one retry backoff: exponential with full jitter, for provider retries (failover) and
queued jobs and webhooks (overflow) alike.

Pure: the jitter source is passed in (``random.random`` in production, a constant or a seeded
``random.Random(n).random`` in tests), so the policy is tested with plain numbers.

Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"): after the ``n``-th
failed attempt, wait ``uniform(0, min(max_s, base_s * 2 ** (n - 1)))``. Spreading retries
over the whole range keeps a burst of clients that failed together from retrying together.
"""

from __future__ import annotations

from collections.abc import Callable

#: Past this exponent the ceiling is ``max_s`` for any sane ``base_s``; clamping it keeps
#: ``2.0 ** n`` finite (a float overflows at 2 ** 1024).
_MAX_EXPONENT = 62


def backoff_s(failed: int, base_s: float, max_s: float, rand: Callable[[], float]) -> float:
    """Seconds to wait after failed attempt number ``failed`` (counting from 1): full jitter
    over ``[0, min(max_s, base_s * 2 ** (failed - 1))]``. ``rand`` returns a float in [0, 1)."""
    ceiling = min(max_s, base_s * 2.0 ** min(max(failed - 1, 0), _MAX_EXPONENT))
    return rand() * ceiling
