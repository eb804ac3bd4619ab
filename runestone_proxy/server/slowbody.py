"""The request-body bounds of :mod:`runestone_proxy.protocol.slowclient`, from the config.

Shared by HTTP/1.1 (:mod:`.h1conn`, the body reader) and HTTP/2 (:mod:`.h2stream`, a
stream's wait for DATA): both put :meth:`BodyPace.deadline` on the cancel scope their read
already has, and answer what :func:`body_timeout` returns when it fires (408).
"""

from __future__ import annotations

import trio

from runestone_proxy import errors
from runestone_proxy.config import LimitsConfig
from runestone_proxy.protocol.slowclient import BodyPace

__all__ = ["BodyPace", "body_pace", "body_timeout"]


def body_pace(limits: LimitsConfig) -> BodyPace:
    return BodyPace(limits.body_timeout_s, limits.body_grace_s, limits.body_min_rate_bytes_per_s)


def body_timeout(pace: BodyPace, started: float, received: int) -> errors.RequestTimeout:
    """The 408 for a body read that timed out now: too slow overall, or stalled."""
    if pace.too_slow(trio.current_time(), started, received):
        return errors.RequestTimeout(
            f"The request body arrived too slowly (below {pace.min_bytes_per_s:g} bytes/s "
            f"after {pace.grace_s:g} s)."
        )
    return errors.RequestTimeout("Timed out reading the request body.")
