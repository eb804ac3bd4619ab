"""The drainer: capacity-bound, fair claiming; retries with backoff; the lease bound; release
on shutdown; signed webhooks with retries; the retention sweep; recovery at start.

Test rules: ``autojump_clock`` (``MockClock(autojump_threshold=0)``) everywhere, with the
store ``inline`` (SQLite on the loop thread, so the clock cannot jump while a worker thread
is busy) and the drainer's wall clock set to ``trio.current_time``. Timing assertions are
therefore exact: a job that waits for nothing finishes at the instant its runner does, and
retries happen exactly at their backoff deadlines. Webhooks go through
``httpx.MockTransport``; the real-socket receiver is in tests/e2e.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from runestone_proxy import telemetry
from runestone_proxy.config import OverflowConfig
from runestone_proxy.errors import InvalidParam, RateLimited, ServiceUnavailable
from runestone_proxy.gateway.overflow import Job, JobOutcome, JobStatus, NewJob
from runestone_proxy.gateway.webhooks import verify
from runestone_proxy.server.drainer import Drainer, Runner, run_drainer
from runestone_proxy.server.store import Store

OK = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'
BODY = b'{"model":"mock-1","messages":[{"role":"user","content":"private words"}]}'
SECRET = "whsec_test"


@attrs.define
class FakeCapacity:
    """Per-tenant slots, plus an optional global cap (where fairness shows)."""

    per_tenant: int = 1
    total: int = 1_000
    in_flight: Counter[str] = attrs.Factory(Counter)
    peak: Counter[str] = attrs.Factory(Counter)
    _freed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    def has_capacity(self, tenant: str) -> bool:
        return self.in_flight[tenant] < self.per_tenant and self.in_flight.total() < self.total

    @asynccontextmanager
    async def job_slot(self, tenant: str) -> AsyncIterator[None]:
        while not self.has_capacity(tenant):
            await self._freed.park()
        self.in_flight[tenant] += 1
        self.peak[tenant] = max(self.peak[tenant], self.in_flight[tenant])
        try:
            yield
        finally:
            self.in_flight[tenant] -= 1
            self._freed.unpark_all()

    async def wait_freed(self) -> None:
        await self._freed.park()


@attrs.define
class Harness:
    store: Store
    drainer: Drainer
    capacity: FakeCapacity
    events: telemetry.Recorder

    async def enqueue(self, tenant: str = "a", **kw: Any) -> Job:
        job = NewJob(tenant, f"req_{tenant}", "chat", BODY, **kw)
        return (await self.store.enqueue(job, now=trio.current_time())).job

    settled: trio.Event = attrs.Factory(trio.Event)

    def on_event(self, event: str, fields: dict[str, Any]) -> None:
        if event in ("overflow.drain.stop", "overflow.job.dead"):
            self.settled.set()
            self.settled = trio.Event()

    async def wait_for(self, job_id: str, tenant: str, *statuses: JobStatus) -> Job:
        """The job once it reached one of ``statuses`` (checked after every settled run)."""
        while True:
            settled = self.settled
            job = await self.store.get(job_id, tenant)
            assert job is not None
            if job.status in statuses:
                return job
            await settled.wait()

    async def wait_for_webhook(self, job_id: str, tenant: str, *statuses: str) -> Job:
        """Webhook attempts emit nothing to wait on: look every virtual second."""
        while True:
            job = await self.store.get(job_id, tenant)
            assert job is not None
            if job.webhook_status.value in statuses:
                return job
            await trio.sleep(1)


@asynccontextmanager
async def harness(
    tmp_path: Path,
    runner: Runner,
    capacity: FakeCapacity | None = None,
    transport: httpx.MockTransport | None = None,
    **overflow: Any,
) -> AsyncIterator[Harness]:
    config = OverflowConfig(database=str(tmp_path / "q.db"), **overflow)
    store = Store(tmp_path / "q.db", config, inline=True)
    capacity = capacity or FakeCapacity()
    recorder = telemetry.Recorder()
    removers = [telemetry.add_handler(recorder)]
    try:
        with trio.fail_after(3600):  # virtual seconds: a stuck test fails, it does not hang
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                drainer = await nursery.start(
                    lambda task_status: run_drainer(
                        store,
                        runner,
                        capacity,
                        config,
                        env={config.webhook_secret_env: SECRET},
                        clock=trio.current_time,
                        rand=random.Random(42).random,
                        transport=transport or httpx.MockTransport(lambda r: httpx.Response(200)),
                        task_status=task_status,
                    )
                )
                h = Harness(store, drainer, capacity, recorder)
                removers.append(telemetry.add_handler(h.on_event))
                yield h
                nursery.cancel_scope.cancel()
    finally:
        for remove in removers:
            remove()


def sleeper(seconds: float, log: list[tuple[str, float]] | None = None) -> Runner:
    async def run(job: Job) -> JobOutcome:
        if log is not None:
            log.append((job.tenant, trio.current_time()))
        await trio.sleep(seconds)
        return JobOutcome(200, OK)

    return run


async def test_drains_everything_within_each_tenants_capacity(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path, sleeper(1.0), FakeCapacity(per_tenant=2)) as h:
        jobs = [await h.enqueue(t) for t in ("a", "a", "a", "a", "b", "b")]
        start = trio.current_time()
        done = [await h.wait_for(j.id, j.tenant, JobStatus.SUCCEEDED) for j in jobs]
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.05)  # 2 waves of a
        assert dict(h.capacity.peak) == {"a": 2, "b": 2}
        assert all(j.result == OK and j.attempts == 1 for j in done)
        starts = h.events.named("overflow.drain.start")
        stops = h.events.named("overflow.drain.stop")
        assert len(starts) == len(stops) == 6
        assert {"tenant", "job_id", "request_id", "attempt", "queue_depth"} <= set(starts[0])
        assert {s["result"] for s in stops} == {"succeeded"}
        assert "private words" not in repr(h.events.events)


async def test_an_enqueue_wakes_an_idle_drainer_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path, sleeper(0.5)) as h:
        await trio.sleep(1000)  # idle: no deadline, nothing to do
        before = trio.current_time()
        job = await h.enqueue()
        await h.wait_for(job.id, "a", JobStatus.SUCCEEDED)
        assert trio.current_time() - before == pytest.approx(0.5, abs=0.02)


async def test_fair_across_tenants_under_a_global_cap(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    runs: list[tuple[str, float]] = []
    capacity = FakeCapacity(per_tenant=5, total=1)
    async with harness(tmp_path, sleeper(1.0, runs), capacity) as h:
        jobs = [await h.enqueue("a") for _ in range(6)] + [await h.enqueue("b") for _ in range(2)]
        for job in jobs:
            await h.wait_for(job.id, job.tenant, JobStatus.SUCCEEDED)
    print(runs)
    assert [t for t, _ in runs][:5] == ["a", "b", "a", "b", "a"]


async def test_retryable_failures_back_off_then_succeed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    times: list[float] = []

    async def flaky(job: Job) -> JobOutcome:
        times.append(trio.current_time())
        if len(times) < 3:
            return JobOutcome(502, b'{"error":{"message":"bad gateway"}}', retryable=True)
        return JobOutcome(200, OK)

    async with harness(tmp_path, flaky, backoff_base_s=2.0, backoff_max_s=60.0) as h:
        job = await h.enqueue()
        done = await h.wait_for(job.id, "a", JobStatus.SUCCEEDED)
    rng = random.Random(42)
    expected = [2.0 * rng.random(), 4.0 * rng.random()]  # full jitter, same seed
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx(expected, abs=0.02)
    assert done.attempts == 3
    assert done.result == OK
    results = [s["result"] for s in h.events.named("overflow.drain.stop")]
    assert results == ["retry", "retry", "succeeded"]


async def test_retry_after_is_honoured(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    times: list[float] = []

    async def limited(job: Job) -> JobOutcome:
        times.append(trio.current_time())
        if len(times) == 1:
            raise RateLimited("slow down", retry_after_s=30)
        return JobOutcome(200, OK)

    async with harness(tmp_path, limited, backoff_base_s=1.0) as h:
        job = await h.enqueue()
        await h.wait_for(job.id, "a", JobStatus.SUCCEEDED)
    assert times[1] - times[0] == pytest.approx(30.0, abs=0.02)


async def test_gives_up_after_max_attempts_with_the_last_error(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    calls = 0

    async def broken(job: Job) -> JobOutcome:
        nonlocal calls
        calls += 1
        envelope = {"error": {"message": f"attempt {calls} broke", "type": "server_error"}}
        return JobOutcome(503, json.dumps(envelope).encode(), retryable=True)

    async with harness(tmp_path, broken, max_attempts=3) as h:
        job = await h.enqueue()
        failed = await h.wait_for(job.id, "a", JobStatus.FAILED)
    assert calls == 3
    assert failed.attempts == 3
    assert failed.last_error == "attempt 3 broke"
    assert failed.result_status == 503


async def test_non_retryable_errors_and_crashes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    crashes = 0

    async def runner(job: Job) -> JobOutcome:
        nonlocal crashes
        if job.tenant == "bad":
            raise InvalidParam("no such thing", param="model")
        crashes += 1
        if crashes == 1:
            raise RuntimeError("a bug")
        return JobOutcome(200, OK)

    async with harness(tmp_path, runner) as h:
        bad = await h.enqueue("bad")
        buggy = await h.enqueue("buggy")
        failed = await h.wait_for(bad.id, "bad", JobStatus.FAILED)
        assert failed.attempts == 1
        assert failed.result_status == 400
        recovered = await h.wait_for(buggy.id, "buggy", JobStatus.SUCCEEDED)
        assert recovered.attempts == 2  # a crash is a retryable 500


async def test_a_run_is_bounded_by_its_lease(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def hangs_once(job: Job) -> JobOutcome:
        if job.attempts == 1:
            await trio.sleep_forever()
        return JobOutcome(200, OK)

    async with harness(tmp_path, hangs_once, lease_s=10.0, backoff_base_s=0.5) as h:
        job = await h.enqueue()
        start = trio.current_time()
        done = await h.wait_for(job.id, "a", JobStatus.SUCCEEDED)
        assert done.attempts == 2
        assert 10.0 <= trio.current_time() - start <= 10.6
        first_stop = h.events.named("overflow.drain.stop")[0]
        assert (first_stop["status"], first_stop["result"]) == (504, "retry")


async def test_shutdown_puts_a_running_job_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    started = trio.Event()

    async def slow(job: Job) -> JobOutcome:
        started.set()
        await trio.sleep_forever()
        raise AssertionError

    config = OverflowConfig(database=str(tmp_path / "q.db"))
    store = Store(tmp_path / "q.db", config, inline=True)
    with trio.fail_after(60):
        await _shutdown_scenario(store, config, slow, started)


async def _shutdown_scenario(
    store: Store, config: OverflowConfig, slow: Runner, started: trio.Event
) -> None:
    async with trio.open_nursery() as outer:
        await outer.start(store.run)
        job = (await store.enqueue(NewJob("a", "r", "chat", BODY), now=0.0)).job
        async with trio.open_nursery() as inner:
            await inner.start(
                lambda task_status: run_drainer(
                    store,
                    slow,
                    FakeCapacity(),
                    config,
                    env={},
                    clock=trio.current_time,
                    task_status=task_status,
                )
            )
            await started.wait()
            inner.cancel_scope.cancel()  # the drainer goes first, the store stays open
        back = await store.get(job.id, "a")
        assert back is not None
        assert (back.status, back.attempts) == (JobStatus.QUEUED, 0)
        outer.cancel_scope.cancel()


async def test_expired_leases_are_recovered_and_run_at_start(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    config = OverflowConfig(database=str(tmp_path / "q.db"))
    store = Store(tmp_path / "q.db", config, inline=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        job = (await store.enqueue(NewJob("a", "r", "chat", BODY), now=0.0)).job
        claimed = await store.claim(["a"], 5.0, 0.0)  # a run that "crashed"
        assert claimed is not None
        nursery.cancel_scope.cancel()
    async with harness(tmp_path, sleeper(0)) as h:
        done = await h.wait_for(job.id, "a", JobStatus.SUCCEEDED)
        assert done.attempts == 2
        assert trio.current_time() >= 5.0


async def test_webhooks_are_signed_retried_and_recorded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    seen: list[tuple[float, httpx.Request]] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append((trio.current_time(), request))
        return httpx.Response(500 if len(seen) < 3 else 204)

    transport = httpx.MockTransport(receiver)
    async with harness(tmp_path, sleeper(0), transport=transport, backoff_base_s=1.0) as h:
        job = await h.enqueue(webhook_url="https://hooks.example/cb?token=abc")
        stored = await h.wait_for_webhook(job.id, "a", "delivered", "failed")
    assert stored.webhook_status.value == "delivered"
    assert stored.webhook_attempts == 3
    assert len(seen) == 3
    for _, request in seen:
        body = request.content
        assert request.headers["x-runestone-job-id"] == job.id
        assert request.headers["content-type"] == "application/json"
        signature = request.headers["x-runestone-signature"]
        assert verify(SECRET.encode(), signature, body, now=int(time.time()))
        payload = json.loads(body)
        assert payload["id"] == job.id
        assert payload["status"] == "succeeded"
        assert payload["result"] == json.loads(OK)
        assert payload["object"] == "runestone.job"
    assert seen[1][0] > seen[0][0]  # backed off, not hammered


async def test_webhooks_give_up_after_max_attempts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    transport = httpx.MockTransport(refuse)
    async with harness(tmp_path, sleeper(0), transport=transport, webhook_max_attempts=3) as h:
        job = await h.enqueue(webhook_url="http://127.0.0.1:9/")
        stored = await h.wait_for_webhook(job.id, "a", "delivered", "failed")
    assert stored.webhook_status.value == "failed"
    assert stored.webhook_attempts == 3


async def test_a_stored_webhook_url_the_rule_refuses_is_never_posted_to(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Delivery applies the accept-time rule again (a job stored before the rule, or by
    hand): such a URL fails at once, without a request and without retries."""
    posted: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        posted.append(request)
        return httpx.Response(204)

    transport = httpx.MockTransport(receiver)
    async with harness(tmp_path, sleeper(0), transport=transport, webhook_max_attempts=5) as h:
        job = await h.enqueue(webhook_url="http://hooks.exa\nmple/cb")
        stored = await h.wait_for_webhook(job.id, "a", "delivered", "failed")
    assert stored.webhook_status.value == "failed"
    assert stored.webhook_attempts == 1
    assert posted == []


async def test_finished_jobs_are_swept_after_retention(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path, sleeper(0), retention_s=100.0) as h:
        job = await h.enqueue()
        done = await h.wait_for(job.id, "a", JobStatus.SUCCEEDED)
        await trio.sleep(99)
        assert await h.store.get(job.id, "a") is not None
        await trio.sleep(2)
        assert await h.store.get(job.id, "a") is None
        assert done.finished_at is not None


# --- no job can take the drainer down, or crash-loop it ------------------------------------------


async def test_what_a_run_produced_is_stored_bounded_and_as_an_envelope(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def runner(job: Job) -> JobOutcome:
        if job.tenant == "huge":
            return JobOutcome(200, b'{"x":"' + b"y" * 1000 + b'"}')
        if job.tenant == "garbage":
            return JobOutcome(500, b"\xff not an envelope")
        raise InvalidParam("The model `gpt-\ud800` does not exist.", param="model")

    async with harness(tmp_path, runner) as h:
        h.drainer.max_result_bytes = 512
        jobs = [await h.enqueue(tenant) for tenant in ("huge", "garbage", "surrogate")]
        done = [await h.wait_for(j.id, j.tenant, JobStatus.FAILED) for j in jobs]
    huge, garbage, surrogate = (json.loads(j.result or b"")["error"] for j in done)
    assert (done[0].result_status, huge["code"]) == (502, "result_too_large")
    assert "512 bytes" in huge["message"]
    assert (done[1].result_status, garbage["code"]) == (500, "job_failed")
    assert surrogate["message"] == "The model `gpt-\ud800` does not exist."
    assert done[2].last_error == "The model `gpt-\\ud800` does not exist."  # stored escaped


@attrs.define
class RefusingStore:
    """The store, except that the ``writes`` of an outcome of tenant ``a``'s jobs raise
    ``error``: what a full disk, a broken row or a bug looks like to the drainer."""

    store: Store
    error: Exception
    writes: tuple[str, ...] = ("complete", "fail")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def _check(self, write: str, job_id: str) -> None:
        if write in self.writes and await self.store.get(job_id, "a") is not None:
            raise self.error

    async def complete(self, job_id: str, *args: Any) -> bool:
        await self._check("complete", job_id)
        return await self.store.complete(job_id, *args)

    async def fail(self, job_id: str, *args: Any) -> bool:
        await self._check("fail", job_id)
        return await self.store.fail(job_id, *args)


async def test_an_outcome_the_store_refuses_is_replaced_by_a_fixed_failure(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(tmp_path, sleeper(1)) as h:
        bug = RuntimeError("a bug while storing")
        h.drainer.store = RefusingStore(h.store, bug, ("complete",))  # type: ignore[assignment]
        refused, fine = await h.enqueue("a"), await h.enqueue("b")
        failed = await h.wait_for(refused.id, "a", JobStatus.FAILED)
        assert (await h.wait_for(fine.id, "b", JobStatus.SUCCEEDED)).attempts == 1
    assert json.loads(failed.result or b"")["error"]["code"] == "job_outcome_unstorable"
    assert failed.attempts == 1
    assert failed.claims == 0


async def test_a_job_whose_outcome_is_never_stored_is_dead_after_max_claims(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    runs: Counter[str] = Counter()

    async def runner(job: Job) -> JobOutcome:
        runs[job.tenant] += 1
        return JobOutcome(200, OK)

    async with harness(tmp_path, runner, lease_s=10.0, max_claims=3) as h:
        disk = ServiceUnavailable("The job store is unavailable: disk I/O error")
        h.drainer.store = RefusingStore(h.store, disk)  # type: ignore[assignment]
        doomed, fine = await h.enqueue("a"), await h.enqueue("b")
        assert (await h.wait_for(fine.id, "b", JobStatus.SUCCEEDED)).attempts == 1
        dead = await h.wait_for(doomed.id, "a", JobStatus.DEAD)
    assert runs == {"a": 3, "b": 1}
    assert (dead.attempts, dead.claims, dead.result_status) == (3, 3, 500)
    assert json.loads(dead.result or b"")["error"]["code"] == "job_dead"
    assert h.store.stats.dead == 1
    assert [e["job_id"] for e in h.events.named("overflow.job.dead")] == [doomed.id]
    stops = [e["result"] for e in h.events.named("overflow.drain.stop") if e["job_id"] == doomed.id]
    assert stops == ["stale"] * 3
