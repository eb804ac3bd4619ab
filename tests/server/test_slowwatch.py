"""The per-process sweeper: callbacks run once due, unless discarded first; one failing
callback does not stop the others (it also carries the upstream pool's timeouts)."""

from __future__ import annotations

import trio

from runestone_proxy.server.slowwatch import SlowWatch


async def test_due_callbacks_run_and_discarded_ones_do_not() -> None:
    watch = SlowWatch(interval_s=0.01)
    ran: list[str] = []
    fired = trio.Event()

    def boom() -> None:
        ran.append("boom")
        raise RuntimeError("a broken callback")

    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        now = trio.current_time()
        watch.add("discarded", lambda: ran.append("discarded"), due=now)
        watch.discard("discarded")
        watch.add("boom", boom, due=now)
        watch.add("fired", fired.set, due=now)
        with trio.fail_after(5):
            await fired.wait()
        assert ran == ["boom"]
        assert watch.running  # the failure was logged, not raised
        assert not watch.pending
        nursery.cancel_scope.cancel()
    assert not watch.running
