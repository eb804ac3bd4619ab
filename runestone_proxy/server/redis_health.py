"""Breakers and the hedging p95 shared by a fleet on Redis (``[state] backend = "redis"``).

The :class:`~runestone_proxy.gateway.shared_health.SharedHealth` of a fleet member. Nothing
here runs on a request's path: a breaker transition (rare) is queued and the sync task is
woken; everything else is that task's, on the limits' Redis connection (scripts and keys
in :mod:`.redis_health_scripts`). Why the evidence stays local and only the verdicts are
shared: :mod:`~runestone_proxy.gateway.shared_health`.

How this works
--------------
One task, :meth:`RedisHealth.run`, syncs in rounds: woken by a local transition, by a
message on ``<prefix>health`` (another process's transition), at the end of a cooldown, or
every :data:`SYNC_S` at the latest (so a process that missed a message converges). A round
is one pipeline: the queued transitions (``OPEN``/``CLOSE`` scripts, which ``PUBLISH``),
the new TTFT samples (``LPUSH`` + ``LTRIM``), then one ``READ`` of every deployment's
breaker and an ``LRANGE`` of every deployment's samples. Then, per deployment,
:func:`~runestone_proxy.gateway.shared_health.plan` says what to do: apply the fleet's
state, claim or renew the probe's lease (a second, rare pipeline), give it back, or wait.

- Opening: the process whose own evidence trips the breaker publishes it; every other
  process applies it with the fleet's cooldown (on Redis' clock), within a round trip of
  the message (measured in ``tests/e2e/test_e2e_redis_health.py``).
- Half-open: breakers are *gated*: past the cooldown a process that has had demand for the
  deployment claims the probe's lease (:data:`PROBE_LEASE_S`, renewed each round while its
  probe is out); the winner goes half-open, the others refuse and wait for its verdict.
  A prober that dies stops renewing: the lease lapses and another process claims it. A
  grant with no probe sent within :data:`IDLE_GRANT_S` is given back.
- Closing: the prober's success closes the breaker for the fleet; its failure reopens it.
- TTFT: each process adds its new samples to ``<prefix>ttft:<name>`` (the last
  :data:`TTFT_KEEP`) and sets ``Deployment.fleet_p95_s`` from the pooled list, which
  ``Failover._hedge_delay`` reads as before (a local number: no Redis on the request path).

Redis unavailable: breakers and the p95 are advisory, so whatever ``on_unavailable`` says,
each process falls back to its own (ungated breakers, local samples), logs
``health.fallback`` once per outage, and on the first good round after it logs
``health.recovered`` and rejoins: it takes the fleet's state, except that an open breaker
the fleet does not know is published.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import hiredis
import structlog
import trio

from runestone_proxy.config import Config
from runestone_proxy.gateway.breaker import CLOSED, HALF_OPEN, OPEN, State
from runestone_proxy.gateway.deployments import Deployment, Deployments, emit_transition
from runestone_proxy.gateway.shared_health import (
    Action,
    CountedSamples,
    FleetBreaker,
    fleet_p95_s,
    plan,
)
from runestone_proxy.server import redis_health_scripts as scripts
from runestone_proxy.server.redis_client import Arg, RedisClient, RedisUnavailable
from runestone_proxy.server.redis_limits import RedisLimits

log = structlog.get_logger("runestone.health")

#: The longest a process goes without reading the fleet's state.
SYNC_S = 0.5
#: The probe's lease; its holder renews it every round while its probe is out.
PROBE_LEASE_S = 2.0
#: A probe granted but not sent within this long is given back to the fleet.
IDLE_GRANT_S = 1.0
#: TTFT samples kept per deployment for the whole fleet (the local window's size).
TTFT_KEEP = 512
#: The sample lists expire when no process has added to them for this long.
TTFT_TTL_MS = 3_600_000


@attrs.define(eq=False)
class RedisHealth:
    """See the module docstring. ``run`` must be running (a companion of the limits)."""

    client: RedisClient
    deployments: Deployments
    prefix: str
    process_id: str
    #: The fleet's state as last read, per deployment.
    fleet: dict[str, FleetBreaker] = attrs.Factory(dict)
    #: The fleet's epoch each breaker was last in step with (absent: not since (re)joining).
    seen: dict[str, int] = attrs.Factory(dict)
    #: When this process was granted the probe, per deployment.
    granted_at: dict[str, float] = attrs.Factory(dict)
    pooled: dict[str, int] = attrs.Factory(dict)
    #: Local transitions not told to the fleet yet.
    pending: list[tuple[str, State]] = attrs.Factory(list)
    wake: trio.Event = attrs.Factory(trio.Event)
    #: True while the last round reached Redis (else: local fallback).
    synced: bool = False
    falling_back: bool = False
    synced_at: float = -math.inf

    @property
    def channel(self) -> str:
        return f"{self.prefix}health"

    def _keys(self, name: str) -> tuple[str, str]:
        return f"{self.prefix}brk:{name}", f"{self.prefix}brk:{name}:probe"

    # --- what the deployments tell us (never per request) ------------------------------------

    def on_transition(self, deployment: Deployment, state: State) -> None:
        if deployment.breaker.gated and state is not HALF_OPEN:
            self.pending.append((deployment.name, state))
            self.wake.set()

    def describe(self, name: str) -> dict[str, Any]:
        if not self.synced:
            return {"health": "local", "shared_state": "unavailable"}
        fleet = self.fleet.get(name)
        d = self.deployments.by_name.get(name)
        view: dict[str, Any] = {"health": "shared"}
        if fleet is not None:
            state = "half_open" if fleet.probing else fleet.state.value
            view["fleet"] = {
                "state": state,
                "cooldown_left_s": round(max(0.0, fleet.remaining_s), 3)
                if fleet.state is OPEN
                else 0.0,
                "prober": fleet.prober,
                "epoch": fleet.epoch,
                "ttft_ms_p95": None
                if d is None or d.fleet_p95_s is None
                else round(d.fleet_p95_s * 1000, 3),
                "ttft_samples": self.pooled.get(name, 0),
            }
        return view

    # --- the sync task ------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The sync rounds (see the module docstring); the channel's messages come through
        the limits' subscriber (``on_message``, registered by :func:`attach`)."""
        task_status.started()
        while True:
            with trio.move_on_after(self._sleep_s(trio.current_time())):
                await self.wake.wait()
            self.wake = trio.Event()
            await self.sync()

    def on_message(self, _payload: bytes | None) -> None:
        self.wake.set()  # a transition elsewhere (or a resubscribe: maybe missed some)

    def _sleep_s(self, now: float) -> float:
        """Until the next round: SYNC_S, or sooner where a cooldown ends (a probe is due)."""
        wake = now + SYNC_S
        if self.synced:
            for d in self.deployments.by_name.values():
                b = d.breaker
                if b.state is OPEN:
                    ends = b.opened_at + b.config.cooldown_s + 0.005
                    if now < ends < wake:
                        wake = ends
        return max(0.0, wake - now)

    async def sync(self) -> None:
        """One round: tell, read, apply (a second pipeline only for the probe's lease)."""
        by_name = dict(self.deployments.by_name)
        names = list(by_name)
        pending, self.pending = self.pending, []
        commands: list[tuple[Arg, ...]] = []
        pending = [(name, state) for name, state in pending if name in by_name]
        for name, state in pending:
            keys = self._keys(name)
            if state is OPEN:
                cooldown_ms = int(by_name[name].breaker.config.cooldown_s * 1000)
                args: tuple[Arg, ...] = (cooldown_ms, self.channel, name)
                commands.append(self.client.evalsha_args(scripts.OPEN, keys, args))
            else:
                commands.append(self.client.evalsha_args(scripts.CLOSE, keys, (self.channel, name)))
        for name in names:
            fresh = self._samples(by_name[name]).take_fresh()
            if fresh:
                key = f"{self.prefix}ttft:{name}"
                commands.append(("LPUSH", key, *(round(v, 1) for v in fresh)))
                commands.append(("LTRIM", key, 0, TTFT_KEEP - 1))
                commands.append(("PEXPIRE", key, TTFT_TTL_MS))
        told = len(commands)
        keys_read = [k for name in names for k in self._keys(name)]
        commands.append(self.client.evalsha_args(scripts.READ, keys_read, ()))
        commands += [("LRANGE", f"{self.prefix}ttft:{name}", 0, -1) for name in names]
        try:
            replies = await self.client.pipeline(commands)
        except RedisUnavailable as exc:
            self._fall_back(str(exc))
            return
        if await self._script_errors(replies):
            return
        now = trio.current_time()
        for (name, _), reply in zip(pending, replies, strict=False):
            if reply[0] == 1:  # our transition is the fleet's now: in step with it
                self.seen[name] = int(reply[-1])
        self._read(names, replies[told], replies[told + 1 :], by_name)
        if not self.synced:
            self._rejoin()
        await self._act(by_name, now)

    async def _script_errors(self, replies: list[Any]) -> bool:
        """An error reply: ``NOSCRIPT`` (Redis' scripts were flushed) loads them again for
        the next round; anything else is a bug here, logged, and the round falls back."""
        errors = [r for r in replies if isinstance(r, hiredis.ReplyError)]
        if not errors:
            return False
        if all(str(e).startswith("NOSCRIPT") for e in errors):
            try:
                await self.client.pipeline([("SCRIPT", "LOAD", s.source) for s in scripts.SCRIPTS])
            except RedisUnavailable as exc:
                self._fall_back(str(exc))
                return True
            self.wake.set()
            return True
        log.error("health.sync.failed", error=str(errors[0]))
        self._fall_back(str(errors[0]))
        return True

    def _samples(self, d: Deployment) -> CountedSamples:
        samples = d.ttft_ms
        if type(samples) is not CountedSamples:
            samples = d.ttft_ms = CountedSamples(samples, maxlen=samples.maxlen)
        return samples

    def _read(
        self,
        names: list[str],
        breakers: list[Any],
        samples: list[list[bytes]],
        by_name: dict[str, Deployment],
    ) -> None:
        for i, name in enumerate(names):
            state, left_ms, epoch, holder = breakers[4 * i : 4 * i + 4]
            prober = None
            if holder:
                prober = "here" if holder == self.process_id.encode() else "elsewhere"
            self.fleet[name] = FleetBreaker(
                OPEN if state == b"open" else CLOSED, int(left_ms) / 1000, int(epoch), prober
            )
            pooled = [float(v) for v in samples[i]]
            self.pooled[name] = len(pooled)
            by_name[name].fleet_p95_s = fleet_p95_s(pooled)

    def _rejoin(self) -> None:
        if self.falling_back:
            self.falling_back = False
            log.warning("health.recovered", backend="redis")
        self.synced = True
        self.seen.clear()

    async def _act(self, by_name: dict[str, Deployment], now: float) -> None:
        commands: list[tuple[Arg, ...]] = []
        claims: list[str] = []  # per command: the deployment claimed ("" for a release)
        for name, d in by_name.items():
            breaker, fleet = d.breaker, self.fleet[name]
            breaker.gated = True
            action = plan(
                breaker, fleet, self.seen.get(name), now, self.granted_at.get(name), IDLE_GRANT_S
            )
            if action is Action.APPLY:
                self._apply(d, fleet.state, fleet.remaining_s, now)
                self.seen[name] = fleet.epoch
            elif action is Action.PUBLISH_OPEN:
                self.pending.append((name, OPEN))
                self.wake.set()
            elif action is Action.CLAIM:
                args = (self.process_id, int(PROBE_LEASE_S * 1000))
                commands.append(self.client.evalsha_args(scripts.CLAIM, self._keys(name), args))
                claims.append(name)
            elif action is Action.RELEASE:
                probe = self._keys(name)[1]
                commands.append(
                    self.client.evalsha_args(scripts.RELEASE, (probe,), (self.process_id,))
                )
                claims.append("")  # not a claim: its reply is ignored
                self._apply(d, OPEN, 0.0, now)
            elif action is Action.YIELD:
                self._apply(d, OPEN, 0.0, now)
            elif breaker.state is OPEN and fleet.state is OPEN:
                # In step: keep the local cooldown ending with the fleet's (Redis' clock).
                breaker.apply_fleet(OPEN, fleet.remaining_s, now)
        if not commands:
            return
        try:
            replies = await self.client.pipeline(commands)
        except RedisUnavailable as exc:
            self._fall_back(str(exc))
            return
        now = trio.current_time()
        for name, reply in zip(claims, replies, strict=True):
            dep = self.deployments.by_name.get(name)
            if dep is None or name == "":
                continue
            if reply != 1:
                if dep.breaker.state is HALF_OPEN:  # a renewal refused: another has it
                    self._apply(dep, OPEN, 0.0, now)
                continue
            if dep.breaker.state is OPEN:
                moved = dep.breaker.grant_probe(now)
                if moved is not None:
                    self.granted_at[name] = now
                    emit_transition(name, moved, fleet=True)
                    self.deployments.notify()

    def _apply(self, d: Deployment, state: State, remaining_s: float, now: float) -> None:
        moved = d.breaker.apply_fleet(state, remaining_s, now)
        self.granted_at.pop(d.name, None)
        if moved is not None:
            emit_transition(d.name, moved, fleet=True)
        self.deployments.notify()

    def _fall_back(self, why: str) -> None:
        """Redis did not answer: every breaker and p95 is this process's own until it does."""
        self.synced = False
        self.granted_at.clear()
        for d in self.deployments.by_name.values():
            d.breaker.gated = False
            d.fleet_p95_s = None
        self.deployments.notify()  # waiters for a fleet probe may now probe themselves
        if not self.falling_back:
            self.falling_back = True
            log.warning("health.fallback", backend="redis", error=why)


def attach(config: Config, shared: RedisLimits, deployments: Deployments) -> RedisHealth:
    """The shared health on the limits' Redis connection, its task run beside the limits'."""
    for script in scripts.SCRIPTS:
        shared.client.register(script)
    health = RedisHealth(shared.client, deployments, config.state.key_prefix, shared.process_id)
    deployments.health = health
    shared.channels[health.channel] = health.on_message  # the limits' subscriber's, too
    shared.companions.append(health.run)
    return health
