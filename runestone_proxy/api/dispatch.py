"""Dispatch: the one entry point both protocols hand their requests to.

:class:`Dispatcher` owns the route table, the current config (swapped whole on SIGHUP), the
lifecycle phase that readiness reports, and the component registry ``/health`` lists.
``dispatch`` resolves the route, runs the handler, turns errors from
:mod:`runestone_proxy.errors` into OpenAI's envelope, and never lets an unexpected exception
escape into the connection task. The request id helpers and the access line live here too.
The connections' own bookkeeping (open count, draining, the slow-request watch) is the
server's: ``server/frontend.py`` extends this class with it.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from typing import Any

import attrs
import structlog
import trio

from runestone_proxy import errors, logs, metrics
from runestone_proxy.api.anthropic import send_error as send_anthropic_error
from runestone_proxy.api.http import (
    JSON_HEADERS,
    HeaderList,
    Request,
    Responder,
    ResponseAborted,
)
from runestone_proxy.api.router import Router
from runestone_proxy.config import Config

_random_bits = random.Random().getrandbits
log = structlog.get_logger("runestone.gateway")
access_log = structlog.get_logger("runestone.access")


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


def new_request_id() -> str:
    """96 random bits: unique enough to trace a request, and no syscall per request (ids are
    not secrets, so the Mersenne Twister will do)."""
    return f"req_{_random_bits(96):024x}"


def valid_request_id(value: bytes) -> str | None:
    """A client-sent ``x-request-id`` we can echo safely (printable ASCII, bounded)."""
    if 0 < len(value) <= 200 and all(0x21 <= b <= 0x7E for b in value):
        return value.decode("ascii")
    return None


def request_id_from(headers: HeaderList) -> str:
    """The client's ``x-request-id`` when it is safe to echo, else a fresh one."""
    for name, value in headers:
        if name == b"x-request-id":
            return valid_request_id(value) or new_request_id()
    return new_request_id()


@attrs.define(eq=False)
class Dispatcher:
    config: Config
    router: Router = attrs.Factory(Router)
    phase: Phase = Phase.STARTING
    started_at: float = attrs.Factory(time.monotonic)
    #: name -> zero-arg callable returning {"status": "ok" | "degraded" | "down", ...}.
    components: dict[str, Callable[[], dict[str, Any]]] = attrs.Factory(dict)
    #: Called with the new Config after a validated SIGHUP swap (subsystems re-read theirs).
    reload_hooks: list[Callable[[Config], None]] = attrs.Factory(list)

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    def apply_config(self, config: Config) -> None:
        self.config = config
        for hook in self.reload_hooks:
            hook(config)

    async def dispatch(self, request: Request, responder: Responder) -> None:
        """Route and run one request. Errors become envelopes; nothing escapes."""
        try:
            handler, params = self.router.resolve(request.method, request.path)
            request.path_params = params
            await handler(request, responder)
        except errors.GatewayError as exc:
            await _answer_error(request, responder, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise  # the client went away mid-write: the connection layer closes, no crash
        except Exception:
            log.exception("request.crashed", request_id=request.request_id, path=request.path)
            if responder.started:
                raise ResponseAborted from None
            await _answer_error(request, responder, errors.GatewayError("The server had an error."))


async def _answer_error(request: Request, responder: Responder, exc: errors.GatewayError) -> None:
    """The error in the client's dialect: Anthropic's envelope for a client that sent
    ``anthropic-version`` (its SDKs always do), whatever the path (the models endpoints, an
    unknown URL, a 405); OpenAI's otherwise."""
    if request.header(b"anthropic-version") is not None:
        await send_anthropic_error(responder, exc, request.request_id)
    else:
        await send_error(responder, exc)


def log_access(
    dispatcher: Dispatcher, request: Request, status: int, sent_bytes: int, started: float
) -> None:
    """The one access line per request (no bodies, no query strings with secrets)."""
    metrics.count_request(status)
    if dispatcher.config.logging.access_log and logs.enabled("info"):
        access_log.info(
            "http.access",
            request_id=request.request_id,
            protocol=f"HTTP/{request.http_version}",
            method=request.method,
            path=request.path,
            status=status,
            bytes=sent_bytes,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
            client=request.client,
        )


async def send_error(responder: Responder, exc: errors.GatewayError) -> None:
    """Answer ``exc`` in OpenAI's envelope, unless a response already started."""
    if responder.started:
        return
    await responder.respond(exc.http_status, (*JSON_HEADERS, *exc.headers), exc.body())
