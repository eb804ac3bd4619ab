"""How long a client may take to send a request body. No I/O.

A per-read timeout alone does not bound a slow client: one byte every half second keeps every
read short, and a few thousand such clients hold every connection slot (slowloris, R.U.D.Y.).
So a body is held to two bounds, both enforced by the wait that reads it:

* ``read_timeout_s`` between reads (nginx's ``client_body_timeout``): a client that stalls.
* a minimum rate after a grace period (Apache's ``mod_reqtimeout``, ``body=20,MinRate=500``):
  the body must be in by ``grace_s`` after it began, extended by one second per
  ``min_bytes_per_s`` bytes received so far. A client that keeps sending faster than the
  rate is never cut, however large its body; a trickle runs out of credit soon after the
  grace period.

The rate counts bytes received, not a declared ``Content-Length``: a client that announces
8 MiB and dribbles would otherwise buy itself hours. The same rule serves a chunked body,
whose size nobody knows up front.

:meth:`BodyPace.deadline` is the decision: the time by which the next read must have
returned. The caller puts it on the cancel scope its read already has (HTTP/1.1's body
reader, an HTTP/2 stream's wait for DATA), so the bound costs no scope, timer or task of its
own, and nothing at all for a body that arrived with its head.
"""

from __future__ import annotations

import attrs

__all__ = ["BodyPace"]


@attrs.frozen
class BodyPace:
    """The two bounds on a request body (see the module docstring); seconds and bytes/s."""

    read_timeout_s: float
    grace_s: float
    min_bytes_per_s: float

    def deadline(self, now: float, started: float, received: int) -> float:
        """When the read that starts at ``now`` must have returned, for a body whose reading
        began at ``started`` and that has brought ``received`` bytes so far."""
        by_rate = started + self.grace_s + received / self.min_bytes_per_s
        by_read = now + self.read_timeout_s
        return by_read if by_read < by_rate else by_rate

    def too_slow(self, now: float, started: float, received: int) -> bool:
        """Whether a read that timed out at ``now`` ran out of rate credit (rather than
        stalling past ``read_timeout_s``): for the 408's message."""
        return now >= started + self.grace_s + received / self.min_bytes_per_s
