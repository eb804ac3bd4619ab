"""Circuit breakers, one per provider deployment. Pure: time is passed in, nothing awaits.

The state table (the only transitions there are)::

    state       event                                   next state
    ---------   -------------------------------------   ----------
    closed      success                                 closed
    closed      failure, < threshold and rate ok        closed
    closed      failure_threshold consecutive failures  open
    closed      error rate >= threshold over window     open
    open        cooldown elapsed (on allow/ready_at)    half_open
                (gated: when granted the fleet's probe)
    half_open   probe succeeded                         closed
    half_open   probe failed                            open (cooldown restarts)

Shared by a fleet (``[state] backend = "redis"``, :mod:`.shared_health`), the fleet's
verdicts are events of the same table, applied by :meth:`Breaker.apply_fleet`::

    closed      the fleet opened it                     open (the fleet's cooldown)
    half_open   the fleet reopened it (a probe failed)  open (the fleet's cooldown)
    open        the fleet closed it (a probe succeeded) closed
    half_open   the fleet closed it                     closed
    half_open   the fleet's probe is another's          open (cooldown elapsed: wait)

A *gated* breaker (a fleet member while Redis answers) does not move to half-open by
itself when the cooldown ends: one process of the fleet probes (``grant_probe``), the
others wait for its verdict. Until granted, ``allow`` refuses and notes ``probe_wanted``.

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


#: The states as module names: on Python 3.11 every ``State.X`` is a descriptor call
#: (~70 ns), and the breaker is asked and told on every request.
CLOSED, OPEN, HALF_OPEN = State.CLOSED, State.OPEN, State.HALF_OPEN

_ALLOWED: tuple[bool, State | None] = (True, None)


TRANSITIONS: frozenset[tuple[State, State]] = frozenset(
    {
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
        (State.HALF_OPEN, State.OPEN),
        # The fleet's verdict, applied (:meth:`Breaker.apply_fleet`): another process's
        # probe succeeded while this one waited, open.
        (State.OPEN, State.CLOSED),
    }
)


@attrs.define
class Breaker:
    config: BreakerConfig
    state: State = CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probes_in_flight: int = 0
    #: Times of recent results and of recent failures, oldest first, for the error rate
    #: over ``window_s``: two deques of floats rather than one of (time, ok) pairs, so that
    #: recording a result (every request) allocates nothing and the failure count is a
    #: ``len``. Entries older than the window are dropped as results come in.
    results: deque[float] = attrs.Factory(deque)
    failures: deque[float] = attrs.Factory(deque)
    #: A fleet member's breaker: past the cooldown it waits for :meth:`grant_probe`.
    gated: bool = False
    #: A request asked while gated and past the cooldown: this process wants the probe.
    probe_wanted: bool = False

    def _move(self, to: State, now: float) -> State:
        assert (self.state, to) in TRANSITIONS, (self.state, to)
        self.state = to
        self.probe_wanted = False
        if to is OPEN:
            self.opened_at = now
            self.probes_in_flight = 0
        elif to is CLOSED:
            self.consecutive_failures = 0
            self.results.clear()
            self.failures.clear()
        return to

    def ready_at(self, now: float) -> float:
        """When this deployment will next admit a request (``now`` if it does now)."""
        if self.state is OPEN:
            ready = self.opened_at + self.config.cooldown_s
            if self.gated and ready <= now:
                return now + self.config.cooldown_s  # the fleet's probe decides
            return max(now, ready)
        if self.state is HALF_OPEN and self.probes_in_flight >= self.config.half_open_probes:
            return now + self.config.cooldown_s  # a probe is out; its result decides
        return now

    def allow(self, now: float) -> tuple[bool, State | None]:
        """May a request go out now? Takes a probe slot when half-open.

        Returns (allowed, the state moved to, if the call caused a transition)."""
        if self.state is CLOSED:
            return _ALLOWED  # every request asks: answer without building a tuple
        moved = None
        if self.state is OPEN:
            if now < self.opened_at + self.config.cooldown_s:
                self.probe_wanted = True  # demand: a reason to ask for the fleet's probe
                return False, None
            if self.gated:  # one process of the fleet probes: wait for the grant
                self.probe_wanted = True
                return False, None
            moved = self._move(HALF_OPEN, now)
        if self.state is HALF_OPEN:
            if self.probes_in_flight >= self.config.half_open_probes:
                return False, moved
            self.probes_in_flight += 1
        return True, moved

    def on_result(self, now: float, ok: bool) -> State | None:
        """Record one outcome; returns the new state if it changed."""
        if self.state is not CLOSED:
            if self.state is HALF_OPEN:
                self.probes_in_flight = max(0, self.probes_in_flight - 1)
                return self._move(CLOSED if ok else OPEN, now)
            return None  # open: a straggler from before the breaker opened
        config = self.config
        horizon = now - config.window_s
        results = self.results
        results.append(now)
        while results[0] < horizon:
            results.popleft()
        if ok:
            self.consecutive_failures = 0
            return None
        failures = self.failures
        failures.append(now)
        while failures[0] < horizon:
            failures.popleft()
        self.consecutive_failures += 1
        if self.consecutive_failures >= config.failure_threshold:
            return self._move(OPEN, now)
        if len(results) >= config.min_requests:
            if len(failures) / len(results) >= config.error_rate_threshold:
                return self._move(OPEN, now)
        return None

    def cooled(self, now: float) -> bool:
        """Open, and past its cooldown: a fleet member may ask for the probe."""
        return self.state is OPEN and now >= self.opened_at + self.config.cooldown_s

    def grant_probe(self, now: float) -> State | None:
        """This process won the fleet's probe: open past its cooldown -> half-open."""
        self.probe_wanted = False
        if not self.cooled(now):
            return None
        return self._move(HALF_OPEN, now)

    def apply_fleet(self, state: State, remaining_s: float, now: float) -> State | None:
        """Apply the fleet's state: ``CLOSED``, or ``OPEN`` with ``remaining_s`` of its
        cooldown left (<= 0: past it, a probe is due). Returns the state moved to, if the
        state changed (an open breaker only re-times its cooldown to the fleet's)."""
        if state is CLOSED:
            if self.state is CLOSED:
                return None
            self.probes_in_flight = 0
            return self._move(CLOSED, now)
        moved = None
        if self.state is not OPEN:
            moved = self._move(OPEN, now)
        cooldown = self.config.cooldown_s
        self.opened_at = now - cooldown + max(0.0, min(remaining_s, cooldown))
        return moved

    def release_probe(self) -> None:
        """A probe ended without a verdict (e.g. the client went away): free its slot."""
        if self.state is HALF_OPEN and self.probes_in_flight:
            self.probes_in_flight -= 1

    def error_rate(self, now: float) -> float:
        horizon = now - self.config.window_s
        total = sum(1 for t in self.results if t >= horizon)
        return 0.0 if not total else sum(1 for t in self.failures if t >= horizon) / total
