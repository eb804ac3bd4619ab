"""Stored Responses over HTTP (``api/responses_state.py``): the input-items page as plain
data, and the three handlers through the real route table against ``MemoryResponses``,
with an in-memory request and responder."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest

from runestone_proxy.api.http import BytesBody, HeaderList, Request
from runestone_proxy.api.responses_state import add_routes, input_items_page, item_id, listed_items
from runestone_proxy.api.router import Router
from runestone_proxy.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidParam,
    MethodNotAllowed,
)
from runestone_proxy.gateway.auth import Principal
from runestone_proxy.gateway.responses_store import MemoryResponses, StoredResponse

RID = "resp_0123456789abcdef01234567"


def message(text: str, **extra: Any) -> dict[str, Any]:
    content = [{"type": "input_text", "text": text}]
    return {"type": "message", "role": "user", "content": content, **extra}


ITEMS = [
    message("one"),
    {"type": "function_call_output", "call_id": "call_1", "output": "42"},
    message("three", id="msg_kept"),
    {"role": "user", "content": "four"},  # an easy input message: no type
    message("five"),
]
RECORD = StoredResponse(
    RID, "acme", 1.0, json.dumps(ITEMS).encode(), b'{"id":"' + RID.encode() + b'"}'
)


def page(query: str, record: StoredResponse = RECORD) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(input_items_page(record, query))
    return loaded


def texts(answer: dict[str, Any]) -> list[str]:
    out = []
    for item in answer["data"]:
        content = item.get("content", item.get("output"))
        out.append(content if isinstance(content, str) else content[0]["text"])
    return out


# --- ids and pages ------------------------------------------------------------------------------


def test_items_keep_their_ids_and_the_others_get_stable_ones() -> None:
    listed = listed_items(RID, RECORD.input_items)
    ids = [item["id"] for item in listed]
    assert ids[2] == "msg_kept"
    assert ids[0].startswith("msg_")
    assert ids[1].startswith("item_")
    assert ids[3].startswith("msg_")  # a role without a type is a message
    assert len(set(ids)) == 5
    assert ids == [item["id"] for item in listed_items(RID, RECORD.input_items)]
    assert ids[0] == item_id(RID, 0, ITEMS[0]) != item_id("resp_other", 0, ITEMS[0])
    assert {k: v for k, v in listed[0].items() if k != "id"} == ITEMS[0]


def test_bytes_that_are_not_a_list_of_objects_list_what_objects_there_are() -> None:
    assert listed_items(RID, b"not json") == []
    assert listed_items(RID, b'{"a":1}') == []
    assert [i["id"] for i in listed_items(RID, b'[1,{"id":"x"},"s"]')] == ["x"]


@pytest.mark.parametrize(
    ("query", "expected", "has_more"),
    [
        ("", ["five", "four", "three", "42", "one"], False),
        ("order=asc", ["one", "42", "three", "four", "five"], False),
        ("limit=2", ["five", "four"], True),
        ("order=asc&limit=2", ["one", "42"], True),
        ("limit=5", ["five", "four", "three", "42", "one"], False),
        (
            "limit=100&include=message.input_image.image_url",
            ["five", "four", "three", "42", "one"],
            False,
        ),
    ],
)
def test_pages(query: str, expected: list[str], has_more: bool) -> None:
    answer = page(query)
    assert answer["object"] == "list"
    assert texts(answer) == expected
    assert answer["has_more"] is has_more
    assert answer["first_id"] == answer["data"][0]["id"]
    assert answer["last_id"] == answer["data"][-1]["id"]


def test_after_walks_the_list_page_by_page_in_either_order() -> None:
    for order in ("asc", "desc"):
        seen: list[str] = []
        after = ""
        while True:
            answer = page(f"order={order}&limit=2&after={after}")
            seen += texts(answer)
            if not answer["has_more"]:
                break
            after = answer["last_id"]
        expected = ["one", "42", "three", "four", "five"]
        assert seen == (expected if order == "asc" else expected[::-1])


def test_after_the_last_item_is_an_empty_page() -> None:
    answer = page("order=asc&after=" + listed_items(RID, RECORD.input_items)[-1]["id"])
    assert answer == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=x", "limit"),
        ("limit=-1", "limit"),
        ("order=up", "order"),
        ("after=msg_nope", "after"),
    ],
)
def test_bad_queries_are_400_naming_the_parameter(query: str, param: str) -> None:
    with pytest.raises(InvalidParam) as info:
        page(query)
    assert info.value.param == param
    assert info.value.http_status == 400


# --- the handlers ---------------------------------------------------------------------------------


@attrs.define
class Answer:
    status: int = 0
    headers: HeaderList = ()
    body: bytes = b""

    @property
    def started(self) -> bool:
        return self.status != 0

    async def respond(self, status: int, headers: HeaderList, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def start(self, status: int, headers: HeaderList) -> None:
        raise AssertionError("not streamed")

    async def send(self, data: bytes) -> None:
        raise AssertionError("not streamed")

    def json(self) -> Any:
        return json.loads(self.body)


def authenticate(request: Request) -> Principal:
    tenant = request.header(b"x-tenant")
    if tenant is None:
        raise AuthenticationFailed("No key.")
    return Principal(tenant.decode(), "sk-...", "k")


@pytest.fixture
def store() -> MemoryResponses:
    return MemoryResponses(clock=lambda: 2.0)


@pytest.fixture
def router(store: MemoryResponses) -> Router:
    router = Router()
    add_routes(router, store, authenticate)
    return router


async def call(router: Router, method: str, target: str, tenant: str | None = "acme") -> Answer:
    path, _, query = target.partition("?")
    handler, params = router.resolve(method, path)
    headers = [] if tenant is None else [(b"x-tenant", tenant.encode())]
    request = Request(method, path, query, headers, "1.1", BytesBody(b""), path_params=params)
    answer = Answer()
    try:
        await handler(request, answer)
    except GatewayError as exc:
        await answer.respond(exc.http_status, (), exc.body())
    return answer


def not_found(rid: str) -> dict[str, Any]:
    message = f"Response with id '{rid}' not found."
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }


async def test_get_answers_the_stored_response_as_it_was(
    router: Router, store: MemoryResponses
) -> None:
    await store.save_response(RECORD)
    answer = await call(router, "GET", f"/v1/responses/{RID}")
    assert (answer.status, answer.body) == (200, RECORD.response)
    assert (b"content-type", b"application/json") in answer.headers


async def test_another_tenants_or_an_unknown_id_is_openais_404(
    router: Router, store: MemoryResponses
) -> None:
    await store.save_response(RECORD)
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/input_items")):
        for tenant, rid in (("globex", RID), ("acme", "resp_nope")):
            answer = await call(router, method, f"/v1/responses/{rid}{suffix}", tenant)
            assert (answer.status, answer.json()) == (404, not_found(rid))
    assert await store.get_response("acme", RID) == RECORD  # nothing deleted


async def test_no_key_is_401(router: Router) -> None:
    assert (await call(router, "GET", f"/v1/responses/{RID}", None)).status == 401


async def test_delete_answers_openais_deleted_object_once(
    router: Router, store: MemoryResponses
) -> None:
    await store.save_response(RECORD)
    answer = await call(router, "DELETE", f"/v1/responses/{RID}")
    assert (answer.status, answer.json()) == (
        200,
        {"id": RID, "object": "response.deleted", "deleted": True},
    )
    assert (await call(router, "DELETE", f"/v1/responses/{RID}")).status == 404
    assert (await call(router, "GET", f"/v1/responses/{RID}")).status == 404


async def test_input_items_route_pages(router: Router, store: MemoryResponses) -> None:
    await store.save_response(RECORD)
    answer = await call(router, "GET", f"/v1/responses/{RID}/input_items?limit=1&order=asc")
    assert answer.status == 200
    assert texts(answer.json()) == ["one"]
    assert (await call(router, "GET", f"/v1/responses/{RID}/input_items?limit=0")).status == 400


async def test_the_routes_live_beside_post_v1_responses() -> None:
    router = Router()

    async def create(request: Request, responder: Answer) -> None:
        raise AssertionError

    router.add("POST", "/v1/responses", create)  # type: ignore[arg-type]
    add_routes(router, MemoryResponses(), authenticate)
    assert router.resolve("POST", "/v1/responses")[0] is create
    assert router.resolve("GET", "/v1/responses/r1")[1] == {"response_id": "r1"}
    assert router.resolve("GET", "/v1/responses/r1/input_items")[1] == {"response_id": "r1"}
    with pytest.raises(MethodNotAllowed) as info:
        router.resolve("POST", "/v1/responses/r1")
    assert info.value.allow == ("DELETE", "GET", "HEAD")
    with pytest.raises(MethodNotAllowed):
        router.resolve("DELETE", "/v1/responses/r1/input_items")
