"""Circuit breakers, one per provider deployment. Pure: time is passed in, nothing awaits.

The state table (the only transitions there are)::

    state       event                                   next state
    ---------   -------------------------------------   ----------
    closed      success                                 closed
    closed      failure, < threshold and rate ok        closed
    closed      failure_threshold consecutive failures  open
    closed      error rate >= threshold over window     open
    open        cooldown elapsed (on allow/ready_at)    half_open
    half_open   probe succeeded                         closed
    half_open   probe failed                            open (cooldown restarts)

While open, the deployment is skipped by routing. Half-open admits at most
``half_open_probes`` requests at once; the rest are told when to come back (``ready_at``),
so a request whose every candidate is open can wait for the earliest probe slot within its
deadline instead of failing at once. Callers emit ``circuit.*`` telemetry from the
transitions ``on_result``/``allow`` report.
"""

from __future__ import annotations

import enum
from collections import deque

import attrs

from runestone_proxy.config import BreakerConfig


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


TRANSITIONS: frozenset[tuple[State, State]] = frozenset(
    {
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
        (State.HALF_OPEN, State.OPEN),
    }
)


@attrs.define
class Breaker:
    config: BreakerConfig
    state: State = State.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probes_in_flight: int = 0
    #: (time, ok) of recent results, for the error rate over ``window_s``.
    recent: deque[tuple[float, bool]] = attrs.Factory(deque)

    def _move(self, to: State, now: float) -> State:
        assert (self.state, to) in TRANSITIONS, (self.state, to)
        self.state = to
        if to is State.OPEN:
            self.opened_at = now
            self.probes_in_flight = 0
        elif to is State.CLOSED:
            self.consecutive_failures = 0
            self.recent.clear()
        return to

    def ready_at(self, now: float) -> float:
        """When this deployment will next admit a request (``now`` if it does now)."""
        if self.state is State.OPEN:
            return max(now, self.opened_at + self.config.cooldown_s)
        if self.state is State.HALF_OPEN and self.probes_in_flight >= self.config.half_open_probes:
            return now + self.config.cooldown_s  # a probe is out; its result decides
        return now

    def allow(self, now: float) -> tuple[bool, State | None]:
        """May a request go out now? Takes a probe slot when half-open.

        Returns (allowed, the state moved to, if the call caused a transition)."""
        moved = None
        if self.state is State.OPEN:
            if now < self.opened_at + self.config.cooldown_s:
                return False, None
            moved = self._move(State.HALF_OPEN, now)
        if self.state is State.HALF_OPEN:
            if self.probes_in_flight >= self.config.half_open_probes:
                return False, moved
            self.probes_in_flight += 1
        return True, moved

    def on_result(self, now: float, ok: bool) -> State | None:
        """Record one outcome; returns the new state if it changed."""
        if self.state is State.HALF_OPEN:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
            return self._move(State.CLOSED if ok else State.OPEN, now)
        if self.state is State.OPEN:
            return None  # a straggler from before the breaker opened
        self.recent.append((now, ok))
        horizon = now - self.config.window_s
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        if ok:
            self.consecutive_failures = 0
            return None
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.config.failure_threshold:
            return self._move(State.OPEN, now)
        if len(self.recent) >= self.config.min_requests:
            failures = sum(1 for _, good in self.recent if not good)
            if failures / len(self.recent) >= self.config.error_rate_threshold:
                return self._move(State.OPEN, now)
        return None

    def release_probe(self) -> None:
        """A probe ended without a verdict (e.g. the client went away): free its slot."""
        if self.state is State.HALF_OPEN and self.probes_in_flight:
            self.probes_in_flight -= 1

    def error_rate(self, now: float) -> float:
        horizon = now - self.config.window_s
        window = [ok for t, ok in self.recent if t >= horizon]
        return 0.0 if not window else sum(1 for ok in window if not ok) / len(window)
