"""The serving process's collector settings (server/heap.py), and the request objects that
must free themselves rather than wait for the collector.

``heap.tune`` changes process-wide state, so its test puts CPython's settings back. The
cycle test runs h2 requests over a real loopback socket with the collector told to keep
what it finds (``gc.DEBUG_SAVEALL``): an exchange that formed a reference cycle would be
found there after the requests ended.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import trio
from h2_helpers import H2Client, h2_serve

from runestone_proxy.api.http import Request, Responder
from runestone_proxy.config import Config
from runestone_proxy.server import heap
from runestone_proxy.server.frontend import Frontend
from runestone_proxy.server.h2stream import H2Stream


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_tune_freezes_what_is_alive_and_raises_the_young_threshold(restored_gc: None) -> None:
    older = gc.get_threshold()[1:]
    heap.tune()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, *older)
    assert gc.get_count()[0] < heap.YOUNG_THRESHOLD


async def echo(request: Request, responder: Responder) -> None:
    await responder.respond(200, [(b"content-type", b"text/plain")], await request.body())


async def test_an_h2_exchange_leaves_no_cycle_for_the_collector(nursery: trio.Nursery) -> None:
    gateway = Frontend(config=Config())
    gateway.router.add("POST", "/echo", echo)
    port = (await h2_serve(nursery, gateway)).port
    with trio.fail_after(10):
        async with await H2Client.connect(port) as client:
            sid = await client.request("POST", "/echo", body=b"warm")
            assert (await client.response(sid)).status == 200
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for n in range(20):
                    sid = await client.request("POST", "/echo", body=b"x" * n)
                    response = await client.response(sid)
                    assert response.status == 200
                    assert bytes(response.data) == b"x" * n
                gc.collect()
                left = [o for o in gc.garbage if isinstance(o, Request | H2Stream)]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
    assert left == []
