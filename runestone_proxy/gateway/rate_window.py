"""One sliding window of counts, for the per-key rate limits (:mod:`.ratelimit`). Pure: the
caller passes the time; nothing here awaits or reads a clock.

How this works
--------------
Each limit is a sliding window of counts kept in ``k + 1`` buckets (``k = 60``: one-second
buckets for the minute limits, one-minute buckets for the hour). A request at time ``t``
falls in bucket ``b = floor(t / width)``; the window at ``b`` is buckets ``b - k .. b``,
and a count leaves it when bucket ``b + k + 1`` begins. The window therefore spans between
``T`` and ``T + width`` of real time, which makes it strict: **no interval of length T
ever holds more than the limit** (any such interval touches at most ``k + 1`` buckets,
all of which the last admission's check counted). The price is at most one bucket of
lag before a count is forgotten (1 s of 60 s, 1 min of 60 min). We chose this over
GCRA/token buckets, which allow a full burst plus the refill inside one window (up to
about twice the limit per window), because operators read "rpm = 3" as "no fourth
request within a minute". Memory is a ring of 61 ints per limit per key, O(1) per check
in steady traffic.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["BUCKETS", "HOUR_S", "MINUTE_S", "Window"]

BUCKETS = 60
MINUTE_S = 60.0
HOUR_S = 3600.0


@attrs.define(slots=True, eq=False)
class Window:
    """Counts over the last ``len(ring)`` buckets of ``width_s`` (see the module docstring)."""

    width_s: float
    ring: list[int]
    #: The bucket index the ring was last advanced to.
    last: int
    total: int = 0

    @classmethod
    def over(cls, span_s: float, now: float, buckets: int = BUCKETS) -> Window:
        width = span_s / buckets
        return cls(width, [0] * (buckets + 1), int(now // width))

    def bucket(self, now: float) -> int:
        return int(now // self.width_s)

    def advance(self, b: int) -> None:
        """Forget the buckets that left the window by bucket ``b``."""
        gap = b - self.last
        if gap <= 0:
            return
        ring, n = self.ring, len(self.ring)
        if gap >= n:
            for i in range(n):
                ring[i] = 0
            self.total = 0
        else:
            for j in range(self.last + 1, b + 1):
                slot = j % n
                self.total -= ring[slot]
                ring[slot] = 0
        self.last = b

    def add(self, b: int, amount: int) -> None:
        self.ring[b % len(self.ring)] += amount
        self.total += amount

    def refund(self, at: int, amount: int) -> None:
        """Take back up to ``amount`` counted in bucket ``at``, if it is still in the window."""
        if at <= self.last - len(self.ring) or at > self.last:
            return
        slot = at % len(self.ring)
        taken = min(amount, self.ring[slot])
        self.ring[slot] -= taken
        self.total -= taken

    def wait_s(self, limit: int, requested: int, now: float) -> float:
        """How long until ``requested`` more fits under ``limit`` (0: now; inf: never)."""
        excess = self.total + requested - limit
        if excess <= 0:
            return 0.0
        if requested > limit:
            return math.inf
        n = len(self.ring)
        for j in range(self.last - n + 1, self.last + 1):
            excess -= self.ring[j % n]
            if excess <= 0:
                return max(0.0, (j + n) * self.width_s - now)
        return math.inf  # unreachable: the whole window leaves eventually

    def reset_s(self, now: float) -> float:
        """How long until the window is empty again."""
        if self.total <= 0:
            return 0.0
        n = len(self.ring)
        for j in range(self.last, self.last - n, -1):
            if self.ring[j % n]:
                return max(0.0, (j + n) * self.width_s - now)
        return 0.0

    @property
    def horizon_s(self) -> float:
        """How long a count can stay in the window."""
        return self.width_s * len(self.ring)
