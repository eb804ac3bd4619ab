"""The overflow queue's pure rules: the state table, backoff with full jitter, settling a
run, fencing, round-robin order, job views and webhook signatures. No event loop."""

from __future__ import annotations

import json

import pytest

from runestone_proxy.errors import InvalidParam, RateLimited, UpstreamTimeout
from runestone_proxy.gateway import job_results, overflow, webhooks
from runestone_proxy.gateway.overflow import (
    Action,
    Complete,
    Fail,
    InvalidTransition,
    Job,
    JobOutcome,
    JobStatus,
    Retry,
    WebhookStatus,
)

Q, R, S, F = JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED
D = JobStatus.DEAD


def test_the_table_allows_exactly_the_documented_moves() -> None:
    allowed = {
        (Q, Action.CLAIM): R,
        (R, Action.COMPLETE): S,
        (R, Action.RETRY): Q,
        (R, Action.FAIL): F,
        (R, Action.RELEASE): Q,
        (R, Action.EXPIRE): Q,
        (Q, Action.BURY): D,
        (R, Action.BURY): D,
    }
    for status in JobStatus:
        for action in Action:
            if (status, action) in allowed:
                assert overflow.transition(status, action) is allowed[(status, action)]
            else:
                with pytest.raises(InvalidTransition):
                    overflow.transition(status, action)


def test_terminal_statuses_have_no_way_out() -> None:
    assert overflow.TERMINAL == {S, F, D}
    assert not [key for key in overflow.TRANSITIONS if key[0] in overflow.TERMINAL]


def _settle(outcome: JobOutcome, attempts: int, rand: float = 0.5) -> overflow.Settle:
    return overflow.settle(
        outcome, attempts, max_attempts=5, base_s=1.0, max_s=60.0, now=100.0, rand=lambda: rand
    )


def test_settle_decides_complete_retry_or_fail() -> None:
    assert _settle(JobOutcome(200, b"{}"), 1) == Complete()
    assert _settle(JobOutcome(502, b"{}", retryable=True), 1) == Retry(100.5)
    assert _settle(JobOutcome(502, b"{}", retryable=True), 3) == Retry(102.0)
    assert _settle(JobOutcome(502, b"{}", retryable=True), 5) == Fail()  # attempts used up
    assert _settle(JobOutcome(400, b"{}", retryable=False), 1) == Fail()


def test_settle_honours_retry_after_when_longer_than_the_backoff() -> None:
    asked = JobOutcome(429, b"{}", retryable=True, retry_after_s=30.0)
    assert _settle(asked, 1) == Retry(130.0)
    short = JobOutcome(429, b"{}", retryable=True, retry_after_s=0.1)
    assert _settle(short, 1) == Retry(100.5)


def test_webhook_settle() -> None:
    def decide(delivered: bool, attempts: int) -> tuple[WebhookStatus, float | None]:
        return webhooks.webhook_settle(
            delivered, attempts, max_attempts=3, base_s=2.0, max_s=60.0, now=10.0, rand=lambda: 1
        )

    assert decide(True, 1) == (WebhookStatus.DELIVERED, None)
    assert decide(False, 1) == (WebhookStatus.PENDING, 12.0)
    assert decide(False, 2) == (WebhookStatus.PENDING, 14.0)
    assert decide(False, 3) == (WebhookStatus.FAILED, None)
    for before, after in [(WebhookStatus.PENDING, s) for s in WebhookStatus if s.value != "none"]:
        assert (before, after) in overflow.WEBHOOK_TRANSITIONS


def test_fencing_needs_running_and_the_same_token() -> None:
    assert overflow.fenced(R, "abc", "abc")
    assert not overflow.fenced(R, "abc", "abd")
    assert not overflow.fenced(R, None, "abc")
    assert not overflow.fenced(Q, "abc", "abc")
    assert not overflow.fenced(S, "abc", "abc")


def test_round_robin_starts_after_the_last_tenant_served() -> None:
    tenants = ["a", "b", "c"]
    assert overflow.round_robin(tenants, None) == ["a", "b", "c"]
    assert overflow.round_robin(tenants, "a") == ["b", "c", "a"]
    assert overflow.round_robin(tenants, "c") == ["a", "b", "c"]
    assert overflow.round_robin(tenants, "bb") == ["c", "a", "b"]  # served one left the set


def test_outcome_from_error_keeps_status_body_and_retryability() -> None:
    limited = overflow.outcome_from_error(RateLimited("slow down", retry_after_s=3))
    assert (limited.status, limited.retryable, limited.retry_after_s) == (429, True, 3)
    assert json.loads(limited.body)["error"]["code"] == "rate_limit_exceeded"
    bad = overflow.outcome_from_error(InvalidParam("nope", param="model"))
    assert (bad.status, bad.retryable, bad.retry_after_s) == (400, False, None)
    assert overflow.outcome_from_error(UpstreamTimeout("late")).status == 504


def _job(status: JobStatus, result: bytes | None) -> Job:
    return Job(
        id="job_1",
        tenant="t",
        request_id="req_1",
        endpoint="chat",
        body=b"sha256:00",
        webhook_url=None,
        idempotency_key=None,
        status=status,
        attempts=2,
        lease_token=None,
        lease_expires_at=None,
        next_attempt_at=1.0,
        created_at=1.0,
        updated_at=2.0,
        finished_at=2.0,
        result=result,
        result_status=200,
        last_error="upstream broke",
        webhook_status=WebhookStatus.NONE,
        webhook_attempts=0,
        webhook_next_at=None,
    )


def test_job_view_shows_result_or_error() -> None:
    done = overflow.job_view(_job(S, b'{"choices":[]}'))
    assert done["result"] == {"choices": []}
    assert done["error"] is None
    assert done["object"] == "runestone.job"
    assert done["status"] == "succeeded"
    envelope = b'{"error":{"message":"m","type":"server_error","param":null,"code":"x"}}'
    failed = overflow.job_view(_job(F, envelope))
    assert failed["error"]["error"]["code"] == "x"
    assert failed["result"] is None
    queued = overflow.job_view(_job(Q, None))
    assert queued["result"] is None
    assert queued["error"] is None


def test_webhook_body_carries_the_envelope_as_result_when_failed() -> None:
    envelope = b'{"error":{"message":"m","type":"server_error","param":null,"code":"x"}}'
    body = json.loads(webhooks.webhook_body(_job(F, envelope)))
    assert body["result"] == json.loads(envelope)
    assert body["id"] == "job_1"


def test_signature_round_trip_and_tampering() -> None:
    secret, body = b"s3cret", b'{"id":"job_1"}'
    header = webhooks.sign(secret, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=")
    assert webhooks.verify(secret, header, body, now=1_700_000_010)
    assert not webhooks.verify(secret, header, body + b" ", now=1_700_000_010)
    assert not webhooks.verify(b"other", header, body, now=1_700_000_010)
    assert not webhooks.verify(secret, header, body, now=1_700_009_999)  # too old
    assert not webhooks.verify(secret, "garbage", body, now=1_700_000_000)


def test_digest_and_ids() -> None:
    assert overflow.digest(b"hello").startswith(b"sha256:2cf24dba")
    assert overflow.new_job_id() != overflow.new_job_id()
    assert overflow.new_job_id().startswith("job_")
    assert "body" not in repr(overflow.NewJob("t", "r", "chat", b"secret prompt"))
    assert b"secret prompt".decode() not in repr(
        overflow.NewJob("t", "r", "chat", b"secret prompt")
    )


def test_storable_outcomes_are_bounded_and_failures_always_envelopes() -> None:
    ok = JobOutcome(200, b'{"id":"x"}')
    assert job_results.storable_outcome(ok, 10) is ok
    big = job_results.storable_outcome(ok, 9)
    assert (big.status, big.retryable) == (502, False)
    assert json.loads(big.body)["error"]["code"] == "result_too_large"
    envelope = JobOutcome(500, b'{"error":{"message":"m","type":"t"}}', retryable=True)
    assert job_results.storable_outcome(envelope, 1000) is envelope
    for garbage in (b"\xff\xfe", b"[1]", b'{"error":"text"}', b"", b"[" * 100_000):
        wrapped = job_results.storable_outcome(JobOutcome(503, garbage, retryable=True), 1_000_000)
        assert (wrapped.status, wrapped.retryable) == (503, True)
        assert json.loads(wrapped.body)["error"]["message"] == "The job failed with status 503."
    assert json.loads(job_results.dead_body(3))["error"]["code"] == "job_dead"
    assert json.loads(job_results.unstorable_body())["error"]["code"] == "job_outcome_unstorable"


# --- the webhook URL rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example/cb?token=abc",
        "http://127.0.0.1:9/",
        "HTTPS://Hooks.Example:8443/a#frag",  # scheme and host are case-insensitive
        "http://[::1]:8080/hook",
        "https://user:pw@hooks.example/",  # httpx sends userinfo as basic auth
        "https://bücher.example/rückruf",  # IDNA host, percent-encoded path on the wire
        "https://h.example/" + "a" * (webhooks.MAX_WEBHOOK_URL - 18),  # at the bound
    ],
)
def test_webhook_url_rule_takes_absolute_http_urls(url: str) -> None:
    assert webhooks.webhook_url_ok(url)
    assert webhooks.check_webhook_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://example.com/",
        "file:///etc/passwd",
        "mailto:ops@example.com",
        "//hooks.example/cb",  # not absolute
        "/v1/cb",
        "https://",  # no host
        "http://:80/",
        "http://hooks.example:0/",  # no port 0
        "http://hooks.example:65536/",  # past the last port
        "http://hooks.example:80a/",
        "http://[::1/",  # a broken IPv6 literal (urlsplit raises)
        "http://hooks.exa\nmple/",  # urlsplit would drop the newline and judge another URL
        "http://hooks.example/\tcb",
        "http://hooks.example/a b",
        "http://hooks.example/\x7f",
        "http://hooks.example/\u2028",
        "http://hooks.example/\ud800",
        "https://h.example/" + "a" * (webhooks.MAX_WEBHOOK_URL - 17),  # one past the bound
    ],
)
def test_webhook_url_rule_refuses_what_cannot_be_posted_to(url: str) -> None:
    assert not webhooks.webhook_url_ok(url)
    with pytest.raises(InvalidParam) as info:
        webhooks.check_webhook_url(url)
    assert (info.value.param, info.value.code) == ("webhook_url", "invalid_value")


def test_no_webhook_url_is_no_webhook_and_anything_but_a_string_is_refused() -> None:
    assert webhooks.check_webhook_url(None) is None
    for value in [1, ["https://h.example/"], {"url": "x"}, b"https://h.example/"]:
        with pytest.raises(InvalidParam):
            webhooks.check_webhook_url(value)


def test_a_webhook_no_retry_can_fix_fails_at_once() -> None:
    decided = webhooks.webhook_settle(
        False, 1, max_attempts=8, base_s=1.0, max_s=60.0, now=0.0, rand=lambda: 1, retryable=False
    )
    assert decided == (WebhookStatus.FAILED, None)
