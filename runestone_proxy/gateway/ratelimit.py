"""Per-key rate limits: requests per minute and per hour, tokens per minute. Pure: the
caller passes the time (``trio.current_time()``); nothing here awaits or reads a clock.

Each limit is a sliding window of counts (:mod:`.rate_window`, which says why it is strict:
no interval of the limit's length ever holds more than the limit).

Tokens are reserved at admission (``max_tokens`` or the default output budget, plus the
prompt at ~4 characters per token, :func:`estimate_tokens`) and reconciled when the
response or stream ends (:func:`reconcile`): unused tokens are refunded to the bucket they
were reserved in (if it is still in the window), extra tokens are charged to the current
bucket. A denied request is not counted (unlike OpenAI, which counts failed requests), nor
is one the gateway admitted past these limits but never served (refused for tenant capacity,
or abandoned by its client while waiting for a slot: :func:`cancel` gives its reservation
back), so a client that retries too early, as the SDK does on every 429, is not locked out
for longer. Token counts: :mod:`.token_estimate`.

Headers (:mod:`.rate_wire`): with both RPM and RPH set, the requests trio reports the more
binding one (fewer remaining; RPM on a tie).

:class:`RateLimiter` holds the per-key state (a dict, swept of keys idle longer than their
longest window, so memory stays bounded), raises 429 :class:`RateLimited` with
``retry-after`` and OpenAI's ``rate_limit_exceeded`` envelope, and emits ``ratelimit.check``
and ``ratelimit.block``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import attrs

from runestone_proxy import telemetry
from runestone_proxy.config import AuthKeyConfig
from runestone_proxy.gateway.rate_window import BUCKETS, HOUR_S, MINUTE_S, Window
from runestone_proxy.gateway.rate_wire import Headers, error_for, headers_for
from runestone_proxy.gateway.token_estimate import estimate_tokens

if TYPE_CHECKING:
    from runestone_proxy.gateway.auth import Principal

Which = Literal["rpm", "rph", "tpm"]


@attrs.frozen
class KeyLimits:
    """One key's limits; None means unlimited."""

    rpm: int | None = None
    rph: int | None = None
    tpm: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.rpm is None and self.rph is None and self.tpm is None

    @classmethod
    def from_config(cls, key: AuthKeyConfig) -> KeyLimits:
        return cls(key.rpm, key.rph, key.tpm)


UNLIMITED = KeyLimits()


# --- per key ----------------------------------------------------------------------------------


@attrs.define(slots=True, eq=False)
class KeyState:
    rpm: Window | None = None
    rph: Window | None = None
    tpm: Window | None = None
    #: After this time every window is empty and the state may be dropped.
    expires_at: float = 0.0


@attrs.frozen
class Quota:
    """What the headers report after a check."""

    limit_requests: int | None = None
    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0


@attrs.define(slots=True, eq=False)
class Reservation:
    """Tokens reserved at admission; :func:`reconcile` settles it once."""

    state: KeyState | None
    quota: Quota
    key: str = ""
    tokens: int = 0
    #: The tokens window's bucket the reservation was counted in.
    bucket: int = 0
    settled: bool = False
    #: When it was made, and the request windows (RPM, RPH) it counted one request in.
    at: float = 0.0
    counted: tuple[Window, ...] = ()


NO_RESERVATION = Reservation(None, Quota(), settled=True)


@attrs.frozen
class Denied:
    which: Which
    retry_after_s: float  # math.inf: the request can never fit (larger than the limit)
    limit: int
    used: int
    requested: int
    quota: Quota


def _quota(state: KeyState, limits: KeyLimits, now: float) -> Quota:
    rpm, rph, tpm = limits.rpm, limits.rph, limits.tpm
    m = state.rpm if rpm is not None else None
    h = state.rph if rph is not None else None
    limit_r: int | None = None
    left_r, reset_r = 0, 0.0
    if m is not None and rpm is not None:
        limit_r, left_r = rpm, max(0, rpm - m.total)
    if h is not None and rph is not None and (limit_r is None or rph - h.total < left_r):
        limit_r, left_r, m = rph, max(0, rph - h.total), h
    if m is not None:
        reset_r = m.reset_s(now)
    t = state.tpm
    if t is None or tpm is None:
        return Quota(limit_r, left_r, reset_r)
    return Quota(limit_r, left_r, reset_r, tpm, max(0, tpm - t.total), t.reset_s(now))


def _advanced(window: Window | None, span_s: float, now: float) -> Window:
    if window is None:
        return Window.over(span_s, now)
    window.advance(int(now // window.width_s))
    return window


def reserve(
    state: KeyState, limits: KeyLimits, now: float, est_tokens: int = 0, key: str = ""
) -> Reservation | Denied:
    """Count one request (and reserve ``est_tokens``) if every limit allows it; otherwise
    count nothing and say which limit denies it for longest, and for how long."""
    rpm, rph, tpm = limits.rpm, limits.rph, limits.tpm
    m = h = t = None
    over = False
    if rpm is not None:
        m = state.rpm = _advanced(state.rpm, MINUTE_S, now)
        over = m.total >= rpm
    if rph is not None:
        h = state.rph = _advanced(state.rph, HOUR_S, now)
        over = over or h.total >= rph
    if tpm is not None:
        t = state.tpm = _advanced(state.tpm, MINUTE_S, now)
        over = over or t.total + est_tokens > tpm
    if over:
        return _denied(state, limits, now, est_tokens)
    bucket = tokens = 0
    if m is not None:
        m.add(m.last, 1)
    if h is not None:
        h.add(h.last, 1)
    if t is not None:
        t.add(t.last, est_tokens)
        bucket, tokens = t.last, est_tokens
    horizon = _HOUR_HORIZON_S if h is not None else _MINUTE_HORIZON_S
    if state.expires_at < now + horizon:
        state.expires_at = now + horizon
    counted = tuple(w for w in (m, h) if w is not None)
    return Reservation(
        state, _quota(state, limits, now), key, tokens, bucket, at=now, counted=counted
    )


_MINUTE_HORIZON_S = MINUTE_S * (BUCKETS + 1) / BUCKETS
_HOUR_HORIZON_S = HOUR_S * (BUCKETS + 1) / BUCKETS


def _denied(state: KeyState, limits: KeyLimits, now: float, est_tokens: int) -> Denied:
    """The limit that denies the request for longest (so retrying then will succeed)."""
    checks: tuple[tuple[Which, Window | None, int | None, int], ...] = (
        ("rpm", state.rpm, limits.rpm, 1),
        ("rph", state.rph, limits.rph, 1),
        ("tpm", state.tpm, limits.tpm, est_tokens),
    )
    worst: tuple[Which, float, int, int, int] | None = None
    for which, window, limit, requested in checks:
        if window is None or limit is None:
            continue
        wait = window.wait_s(limit, requested, now)
        if wait > 0 and (worst is None or wait > worst[1]):
            worst = (which, wait, limit, window.total, requested)
    assert worst is not None
    return Denied(*worst, _quota(state, limits, now))


def reconcile(reservation: Reservation, actual_tokens: int | None, now: float) -> None:
    """Settle a reservation with the tokens really used (None: unknown, keep the estimate).
    Safe to call more than once; only the first call counts."""
    if reservation.settled:
        return
    reservation.settled = True
    state = reservation.state
    if state is None or actual_tokens is None or state.tpm is None:
        return
    window = state.tpm
    window.advance(window.bucket(now))
    delta = actual_tokens - reservation.tokens
    if delta < 0:
        window.refund(reservation.bucket, -delta)
    elif delta > 0:
        window.add(window.last, delta)
        state.expires_at = max(state.expires_at, now + window.horizon_s)


def cancel(reservation: Reservation, now: float) -> None:
    """Undo a reservation whose request was never served (refused for capacity, or its
    client left while it waited): it stops counting against RPM/RPH and its tokens are
    released. Like :func:`reconcile`, only the first settling call counts."""
    if reservation.settled:
        return
    reservation.settled = True
    for window in reservation.counted:
        window.advance(window.bucket(now))
        window.refund(window.bucket(reservation.at), 1)
    state = reservation.state
    if state is not None and state.tpm is not None and reservation.tokens:
        state.tpm.advance(state.tpm.bucket(now))
        state.tpm.refund(reservation.bucket, reservation.tokens)


# --- the stateful wrapper ---------------------------------------------------------------------


@attrs.define(eq=False)
class RateLimiter:
    """Per-key windows, swept of idle keys. Call :meth:`check` at admission and
    :meth:`reconcile` when the response or stream ends (``finally``)."""

    keys: dict[str, KeyState] = attrs.Factory(dict)
    sweep_interval_s: float = MINUTE_S
    next_sweep: float = -math.inf

    def admit(
        self,
        principal: Principal,
        body: Mapping[str, Any],
        output_tokens: int,
        now: float,
        request_id: str | None = None,
    ) -> tuple[Reservation, Headers]:
        """:meth:`check` for one API request by ``principal``, its token estimate taken from
        ``body`` (only when the key has a TPM limit: the estimate costs a walk of the body)."""
        limits = principal.limits
        estimate = estimate_tokens(body, output_tokens) if limits.tpm else 0
        return self.check(
            principal.key_id,
            limits,
            now,
            estimate,
            tenant=principal.tenant,
            key_mask=principal.key_mask,
            request_id=request_id,
        )

    def check(
        self,
        key_id: str,
        limits: KeyLimits,
        now: float,
        est_tokens: int = 0,
        *,
        tenant: str = "-",
        key_mask: str = "-",
        request_id: str | None = None,
    ) -> tuple[Reservation, Headers]:
        """Reserve, returning the reservation and the response's ``x-ratelimit-*`` headers;
        or raise 429 :class:`RateLimited` (with ``retry-after`` and the headers)."""
        if limits.unlimited:
            return NO_RESERVATION, ()
        if now >= self.next_sweep:
            self.sweep(now)
        state = self.keys.get(key_id)
        if state is None:
            state = self.keys[key_id] = KeyState()
        result = reserve(state, limits, now, est_tokens, key_id)
        if isinstance(result, Denied):
            telemetry.emit(
                "ratelimit.block",
                tenant=tenant,
                key_mask=key_mask,
                request_id=request_id,
                limit=result.which,
                retry_after_s=None if math.isinf(result.retry_after_s) else result.retry_after_s,
            )
            raise error_for(result, key_mask)
        quota = result.quota
        telemetry.emit(
            "ratelimit.check",
            tenant=tenant,
            key_mask=key_mask,
            request_id=request_id,
            remaining_requests=quota.remaining_requests if quota.limit_requests else None,
            remaining_tokens=quota.remaining_tokens if quota.limit_tokens else None,
        )
        return result, headers_for(quota)

    def reconcile(self, reservation: Reservation, actual_tokens: int | None, now: float) -> None:
        """Settle ``reservation`` (see :func:`reconcile`); ``None``: usage unknown."""
        reconcile(reservation, actual_tokens, now)
        state = reservation.state
        if state is not None and state.expires_at > now:
            # A long stream may outlive its key's idle sweep: keep an extra charge counted.
            self.keys.setdefault(reservation.key, state)

    def cancel(self, reservation: Reservation, limits: KeyLimits, now: float) -> Headers:
        """Give back an unserved request's reservation (see :func:`cancel`); returns the
        ``x-ratelimit-*`` headers as they stand afterwards, for its 429."""
        cancel(reservation, now)
        state = reservation.state
        return () if state is None else headers_for(_quota(state, limits, now))

    def sweep(self, now: float) -> None:
        """Drop keys whose windows are all empty."""
        self.next_sweep = now + self.sweep_interval_s
        for key in [k for k, s in self.keys.items() if s.expires_at <= now]:
            del self.keys[key]
