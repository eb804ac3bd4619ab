"""The stored-Responses interface's pure rules (``gateway/responses_store.py``): a record's
size and cap, retention, and what a record's repr leaves out. The contract suite that runs
against every implementation lives in tests/server/test_store_responses.py."""

from __future__ import annotations

from runestone_proxy.gateway.responses_store import MemoryResponses, StoredResponse, expired, fits

RECORD = StoredResponse("resp_1", "a", 100.0, b'["a secret prompt"]', b'{"a":"secret answer"}')


def test_the_size_is_the_input_and_the_response() -> None:
    assert RECORD.size == len(b'["a secret prompt"]') + len(b'{"a":"secret answer"}')
    assert fits(RECORD, RECORD.size)
    assert not fits(RECORD, RECORD.size - 1)


def test_retention_ends_at_created_at_plus_retention() -> None:
    assert not expired(RECORD, 109.9, 10.0)
    assert expired(RECORD, 110.0, 10.0)


def test_a_records_repr_carries_no_text() -> None:
    assert "secret" not in repr(RECORD)
    assert "resp_1" in repr(RECORD)


async def test_memory_responses_follow_the_clock() -> None:
    now = [100.0]
    store = MemoryResponses(retention_s=10.0, clock=lambda: now[0])
    await store.save_response(RECORD)
    assert await store.get_response("a", "resp_1") == RECORD
    now[0] = 110.0
    assert await store.get_response("a", "resp_1") is None
    assert not await store.delete_response("a", "resp_1")
