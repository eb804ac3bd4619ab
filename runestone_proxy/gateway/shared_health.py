"""Deployment health shared by a fleet: the breakers' transitions and the hedging p95.

What :class:`~.deployments.Deployments` needs of a fleet, as an interface, and the pure
decisions of keeping a process's breakers in step with the fleet's.

- :class:`LocalHealth` (the embedded default): nothing is shared; ``on_transition`` does
  nothing and is only called when a breaker changes state (never per request).
- ``server/redis_health.RedisHealth`` (``[state] backend = "redis"``): transitions are
  published on Redis and applied by every process; TTFT samples are pooled.

Why local evidence with shared transitions
------------------------------------------
Each process decides on its own evidence (its consecutive failures, its error rate over
the window), exactly as the breaker's table in :mod:`.breaker` says; what is shared is the
verdict. So the request path is unchanged: recording a result is the same in-process
bookkeeping with no Redis command, and only a transition (rare) is queued for the sync
task. The price: a dead deployment is found by whichever process first sees
``failure_threshold`` failures in a row (with load spread over N processes, the fleet pays
at most N x that before it opens everywhere), and a low error rate spread thinly over many
processes may trip none of them. Fleet-wide counters would need a command per request or
a batched flush with a window of lag; a verdict reached by one process and applied by all
gets most of the benefit at none of the cost.

The fleet's state of a deployment is ``closed`` or ``open`` with the time left of its
cooldown (<= 0: a probe is due), an ``epoch`` counting its transitions, and the process
holding the probe's lease, if any. :func:`plan` compares it with the local breaker and says
what to do; the breaker's own methods (``apply_fleet``, ``grant_probe``) make the moves.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from runestone_proxy.gateway.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, State

if TYPE_CHECKING:
    from runestone_proxy.gateway.deployments import Deployment

__all__ = [
    "Action",
    "CountedSamples",
    "FleetBreaker",
    "LocalHealth",
    "SharedHealth",
    "fleet_p95_s",
    "plan",
]

#: Fewest pooled samples for a fleet p95 (the local rule's figure as well).
MIN_SAMPLES = 20


class SharedHealth(Protocol):
    """What the deployments tell a fleet, and what ``/health/providers`` shows of it."""

    def on_transition(self, deployment: Deployment, state: State) -> None:
        """A local verdict moved ``deployment``'s breaker to ``state`` (not per request)."""

    def describe(self, name: str) -> dict[str, Any]:
        """The fleet's view of deployment ``name``, for ``/health/providers``."""


@attrs.define(eq=False)
class LocalHealth:
    """The embedded default: breakers and latencies are this process's own."""

    def on_transition(self, deployment: Deployment, state: State) -> None:
        return None

    def describe(self, name: str) -> dict[str, Any]:
        return {"health": "local"}


@attrs.frozen
class FleetBreaker:
    """One deployment's breaker as the fleet holds it."""

    state: State  # CLOSED or OPEN
    #: Seconds of the cooldown left; <= 0: past it, the fleet's probe is due.
    remaining_s: float
    epoch: int
    #: Who holds the probe's lease: "here", "elsewhere" or None.
    prober: str | None = None

    @property
    def probing(self) -> bool:
        return self.state is OPEN and self.remaining_s <= 0


class Action(enum.Enum):
    NOTHING = "nothing"
    #: Take the fleet's state (a transition made elsewhere, or nothing known yet).
    APPLY = "apply"
    #: Tell the fleet this process's open breaker (opened while Redis was away).
    PUBLISH_OPEN = "publish_open"
    #: Ask for (or renew) the probe's lease.
    CLAIM = "claim"
    #: Give the lease back: granted, but no probe went out.
    RELEASE = "release"
    #: The lease is another's: wait for its verdict.
    YIELD = "yield"


def plan(
    local: Breaker,
    fleet: FleetBreaker,
    seen_epoch: int | None,
    now: float,
    granted_at: float | None,
    idle_grant_s: float,
) -> Action:
    """What one sync round does for one deployment (``seen_epoch`` None: just (re)joined).

    A transition elsewhere (the epoch moved) is applied first; a process rejoining after an
    outage takes the fleet's state, except that an open breaker it has and the fleet has
    not is published (failure evidence is never dropped). Then the probe: when the fleet's
    cooldown is over, a process that has demand asks for the lease; the holder renews it
    while its probe is out and gives it back if none went out; a half-open breaker whose
    lease went elsewhere waits for that verdict."""
    state = local.state
    if seen_epoch is None and fleet.state is CLOSED and state is not CLOSED:
        return Action.PUBLISH_OPEN
    if seen_epoch != fleet.epoch:
        return Action.APPLY
    if not fleet.probing:
        return Action.NOTHING
    if state is HALF_OPEN:
        if fleet.prober == "elsewhere":
            return Action.YIELD
        if local.probes_in_flight or (granted_at is not None and now - granted_at < idle_grant_s):
            return Action.CLAIM  # renew (or take back a lease that lapsed)
        return Action.RELEASE
    if state is OPEN and local.cooled(now) and local.probe_wanted and fleet.prober is None:
        return Action.CLAIM
    return Action.NOTHING


class CountedSamples(deque[float]):
    """A deployment's TTFT window that counts what was added, so the sync task can send
    the fleet only the new samples. Swapped in for the plain deque in shared mode only:
    the embedded default keeps the C ``append``."""

    total: int = 0
    sent: int = 0

    def append(self, value: float) -> None:
        super().append(value)
        self.total += 1

    def take_fresh(self) -> list[float]:
        """The samples added since the last call (at most the window's length)."""
        n = min(self.total - self.sent, len(self))
        self.sent = self.total
        return list(self)[len(self) - n :] if n > 0 else []


def fleet_p95_s(samples_ms: list[float]) -> float | None:
    """The 95th percentile (seconds) of the fleet's pooled TTFT samples, in milliseconds
    (the local rule: at least :data:`MIN_SAMPLES`, the sample at index ``0.95 n``)."""
    if len(samples_ms) < MIN_SAMPLES:
        return None
    ordered = sorted(samples_ms)
    return round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3) / 1000
