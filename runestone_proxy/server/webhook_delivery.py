"""Delivering one job's webhook: :class:`WebhookDelivery` POSTs the signed result to the
job's URL and records the attempt in the store. The drainer's webhook loop
(:mod:`.drainer`) claims the due deliveries (leased, so of several gateways on one database
exactly one delivers each) and starts one of these per job.

The rules are the pure ones of :mod:`runestone_proxy.gateway.webhooks`: the URL is checked
again before each POST (the rule the job was accepted under; a URL it refuses is never
posted to and fails at once), the body is the job view, the signature an HMAC over the
timestamp and the body (``x-runestone-signature``, when a secret is set), and the next
state and due time come from ``webhook_settle``. A cold path (httpx); no receiver, however
slow or broken, stops the loop: each POST is bounded by ``webhook_timeout_s`` and every
failure is named and retried. Logs carry the receiver's host, never the URL's query (it may
hold a token).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import attrs
import httpx
import structlog
import trio

from runestone_proxy.config import OverflowConfig
from runestone_proxy.errors import GatewayError
from runestone_proxy.gateway.overflow import Job, WebhookStatus
from runestone_proxy.gateway.webhooks import sign, webhook_body, webhook_settle, webhook_url_ok
from runestone_proxy.server.store import Store

__all__ = ["WebhookDelivery"]

log = structlog.get_logger("runestone.drainer")


@attrs.define(eq=False)
class WebhookDelivery:
    store: Store
    config: OverflowConfig
    secret: bytes | None = attrs.field(repr=False)
    #: Wall clock for the next attempt's due time; tests on a MockClock pass their own.
    clock: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random

    async def deliver(self, client: httpx.AsyncClient, job: Job) -> WebhookStatus | None:
        """One attempt: POST, then record it. Returns the webhook's new state, None if the
        store could not record it (it stays pending there: it is sent again)."""
        url = job.webhook_url
        assert url is not None
        valid = webhook_url_ok(url)  # the rule the job was accepted under, applied again
        answer = await self._post(client, job, url) if valid else "invalid_url"
        delivered = isinstance(answer, int) and 200 <= answer < 300
        to, next_at = webhook_settle(
            delivered,
            job.webhook_attempts + 1,
            max_attempts=self.config.webhook_max_attempts,
            base_s=self.config.backoff_base_s,
            max_s=self.config.backoff_max_s,
            now=self.clock(),
            rand=self.rand,
            retryable=valid,
        )
        try:
            await self.store.webhook_attempted(job.id, to, next_at)
        except GatewayError as exc:  # still pending in the store: it is sent again
            log.error("overflow.webhook.record_failed", job_id=job.id, error=exc.message)
            return None
        log.info(
            f"overflow.webhook.{to.value}",
            job_id=job.id,
            tenant=job.tenant,
            attempt=job.webhook_attempts + 1,
            answer=answer,
            host=urlsplit(url).hostname if valid else None,  # never the query: it may hold a token
        )
        return to

    async def _post(self, client: httpx.AsyncClient, job: Job, url: str) -> int | str:
        """POST the signed result: the receiver's status, or the name of what went wrong."""
        body = webhook_body(job)
        headers = {"content-type": "application/json", "x-runestone-job-id": job.id}
        if self.secret is not None:
            headers["x-runestone-signature"] = sign(self.secret, int(time.time()), body)
        try:
            with trio.fail_after(self.config.webhook_timeout_s):
                response = await client.post(url, content=body, headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL, trio.TooSlowError) as exc:
            return type(exc).__name__
        except Exception as exc:  # a cold path: never let one receiver stop the loop
            log.exception("overflow.webhook.crashed", job_id=job.id)
            return type(exc).__name__
        return response.status_code
