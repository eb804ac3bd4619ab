"""The Lua scripts of the Redis state backend, and what their replies mean.

Every decision that must hold across processes runs inside Redis as one script, so it is
atomic (Redis runs one script at a time) and needs one round trip. Time is the server's
(``TIME``), so hosts with skewed clocks still share one window and one lease clock.

Keys (``P`` is ``[state] key_prefix``)::

    P slots:{tenant}   sorted set: member = one held slot ("{process}:{n}"), score = its
                       lease's expiry (ms); expired members are purged before counting
    P gslots           the same for the gateway-wide cap
    P kslots:{key}     the same for an API key's own ``max_concurrent``
    P rl:{key}:{rpm|rph|tpm}   hash: bucket index -> count, and the window's running
                               total (the window of rate_window.py: redis_window.py)
    P waiting          sorted set of processes with a waiting request (score: expiry)
    P freed            pub/sub channel: a slot was released while someone waits

Windows are :mod:`runestone_proxy.gateway.rate_window`'s exactly: ``k + 1 = 61`` buckets of
``T / 60`` (1 s for a minute, 1 min for an hour); bucket ``b = floor(now / width)``; the
window at ``b`` is ``b - 60 .. b``, so no interval of length ``T`` holds more than the limit.
A hash holds at most 61 bucket fields and three of its own (:mod:`.redis_window`: a running
total, so an admission does not read every bucket); older buckets are deleted as the window
passes them, and the key expires one horizon after its last write.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import attrs

from runestone_proxy import telemetry
from runestone_proxy.gateway.auth import key_at_capacity
from runestone_proxy.gateway.rate_window import BUCKETS
from runestone_proxy.gateway.rate_wire import Headers, error_for, headers_for
from runestone_proxy.gateway.ratelimit import (
    NO_RESERVATION,
    Denied,
    KeyLimits,
    Quota,
    Reservation,
    Which,
)
from runestone_proxy.server.redis_client import Script
from runestone_proxy.server.redis_window import WINDOW_LUA

if TYPE_CHECKING:
    from runestone_proxy.gateway.auth import Principal

__all__ = [
    "ACQUIRE",
    "ADJUST",
    "KEY_FULL",
    "RELEASE",
    "RENEW",
    "WAITING",
    "Adjust",
    "Settle",
    "SharedReservation",
    "admitted",
    "cancel_args",
    "decode_admit",
    "reconcile_settle",
    "settle_args",
]

N = BUCKETS + 1
MINUTE_US = 1_000_000
HOUR_US = 60_000_000

_NOW = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
"""

#: The key's windows (when ARGV[4..6] set limits), the key's own slot (when ARGV[7] caps it)
#: and a tenant slot (when ARGV[10] is 1). KEYS: tenant slots, global slots, rpm, rph, tpm,
#: key slots. ARGV: lease_ms, tenant_max, global_max, rpm, rph, tpm, key_max (0: none), then
#: the per-request ones (last, so that the rest is encoded once: :mod:`.redis_plan`): member,
#: est_tokens, try_tenant. Reply: now_us, denied (0, or 1 rpm / 2 rph / 3 tpm / 4 the key's
#: max_concurrent), its wait_us (-1: never fits), granted (the tenant slot), tenant count,
#: global count, then per window its total and the time until it is empty (us). The key's
#: slot is taken (member in KEYS[6]) whenever ARGV[7] > 0 and nothing is denied; nothing is
#: counted or taken when something is.
ACQUIRE = Script(
    _NOW
    + WINDOW_LUA
    + """
local widths = {1000000, 60000000, 1000000}
local INF = 1e18
local out = {now_us, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
local scans = {}
for i = 1, 3 do
  local limit = tonumber(ARGV[3 + i])
  if limit > 0 then
    local width, key = widths[i], KEYS[2 + i]
    local b = math.floor(now_us / width)
    local total, newest = advance(key, b, width)
    local requested = 1
    if i == 3 then requested = tonumber(ARGV[9]) end
    local excess = total + requested - limit
    if (i < 3 and total >= limit) or (i == 3 and excess > 0) then
      local wait = INF
      if requested <= limit then
        local counts = window_counts(key)
        for j = b - N + 1, b do
          excess = excess - (counts[j] or 0)
          if excess <= 0 then wait = math.max(0, (j + N) * width - now_us); break end
        end
      end
      if wait > 0 and (out[2] == 0 or wait > out[3]) then out[2], out[3] = i, wait end
    end
    scans[i] = {key, width, b, total, newest, requested}
  end
end
local key_max = tonumber(ARGV[7])
if out[2] ~= 0 then
  if out[3] >= INF then out[3] = -1 end
elseif key_max > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[6]) >= key_max then out[2] = 4 end
end
if out[2] == 0 then
  for i = 1, 3 do
    local s = scans[i]
    if s ~= nil and s[6] > 0 then
      s[4], s[5] = window_add(s[1], s[3], s[6], s[2])
    end
  end
end
for i = 1, 3 do
  local s = scans[i]
  if s ~= nil then
    out[5 + 2 * i] = s[4]
    if s[5] ~= nil and s[4] > 0 then out[6 + 2 * i] = (s[5] + N) * s[2] - now_us end
  end
end
if out[2] == 0 then
  local expiry = now_ms + tonumber(ARGV[1])
  if key_max > 0 then redis.call('ZADD', KEYS[6], expiry, ARGV[8]) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
  local tc, gc = redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])
  if ARGV[10] == '1' and tc < tonumber(ARGV[2]) and gc < tonumber(ARGV[3]) then
    redis.call('ZADD', KEYS[1], expiry, ARGV[8])
    redis.call('ZADD', KEYS[2], expiry, ARGV[8])
    out[4], tc, gc = 1, tc + 1, gc + 1
  end
  out[5], out[6] = tc, gc
end
return out
"""
)

#: Settle window counts (:data:`ADJUST`'s body) for KEYS[first..], ARGV from ``at``.
_ADJUST = (
    WINDOW_LUA
    + """
local function adjust(first, at)
  for i = first, #KEYS do
    local j = at + 3 * (i - first)
    local bucket, delta, width = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
    if delta > 0 then
      window_add(KEYS[i], math.floor(now_us / width), delta, width)
    elseif delta < 0 then
      window_refund(KEYS[i], bucket, -delta)
    end
  end
end
"""
)

#: Give a request's slots back (the tenant's, with the global one, and the key's); tell
#: waiting processes when a tenant slot freed; and settle the request's window counts as
#: :data:`ADJUST` does (one command at the end of a request, not two). KEYS: tenant slots,
#: global slots, waiting, key slots, then ADJUST's keys. ARGV: channel, tenant, tenant slot's
#: member ('' none), key slot's member ('' none), then ADJUST's.
RELEASE = Script(
    _NOW
    + _ADJUST
    + """
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
  if redis.call('ZCARD', KEYS[3]) > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
end
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[4], ARGV[4]) end
adjust(5, 5)
return 1
"""
)

#: Extend this process's leases in every set of KEYS (re-adding one an outage let expire: it
#: is still running). KEYS: a tenant's slots and the global ones, or a key's slots. ARGV:
#: lease_ms, members...
RENEW = Script(
    _NOW
    + """
local expiry = now_ms + tonumber(ARGV[1])
for i = 2, #ARGV do
  for k = 1, #KEYS do redis.call('ZADD', KEYS[k], expiry, ARGV[i]) end
end
return #ARGV - 1
"""
)

#: This process has (ARGV[3] = 1) or no longer has (0) a waiting request.
#: KEYS: waiting. ARGV: lease_ms, process id, on.
WAITING = Script(
    _NOW
    + """
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[1]), ARGV[2])
else
  redis.call('ZREM', KEYS[1], ARGV[2])
end
return 1
"""
)

#: Settle window counts: per key (bucket, delta, width_us): a positive delta is added to
#: the current bucket (tokens used beyond the estimate), a negative one refunded from
#: ``bucket`` (where the reservation counted it), never below zero.
ADJUST = Script(_NOW + _ADJUST + "adjust(1, 1)\nreturn 1\n")


_WHICH: tuple[Which, ...] = ("rpm", "rph", "tpm")
#: :data:`ACQUIRE`'s ``denied`` for the key's own ``max_concurrent``.
KEY_FULL = 4


def decode_admit(
    reply: list[int], limits: KeyLimits, est_tokens: int
) -> tuple[Quota, Denied | None]:
    """:data:`ACQUIRE`'s reply as the values :mod:`.ratelimit` uses for headers and 429s:
    the quota, and the window that denied the request (None when none did: a
    :data:`KEY_FULL` is the caller's to read from ``reply[1]``)."""
    _, which, wait_us, _, _, _, t_m, r_m, t_h, r_h, t_t, r_t = reply
    rpm, rph, tpm = limits.rpm, limits.rph, limits.tpm
    limit_r: int | None = None
    left_r, reset_r = 0, 0.0
    if rpm is not None:
        limit_r, left_r, reset_r = rpm, max(0, rpm - t_m), r_m / 1e6
    if rph is not None and (limit_r is None or rph - t_h < left_r):
        limit_r, left_r, reset_r = rph, max(0, rph - t_h), r_h / 1e6
    if tpm is None:
        quota = Quota(limit_r, left_r, reset_r)
    else:
        quota = Quota(limit_r, left_r, reset_r, tpm, max(0, tpm - t_t), r_t / 1e6)
    if not which or which == KEY_FULL:
        return quota, None
    name = _WHICH[which - 1]
    limit = (rpm, rph, tpm)[which - 1]
    assert limit is not None
    used = (t_m, t_h, t_t)[which - 1]
    retry = float("inf") if wait_us < 0 else wait_us / 1e6
    return quota, Denied(name, retry, limit, used, est_tokens if which == 3 else 1, quota)


def admitted(
    reply: list[int], principal: Principal, estimate: int, request_id: str
) -> tuple[Reservation, Headers]:
    """:data:`ACQUIRE`'s reply for a request: its reservation and ``x-ratelimit-*`` headers
    (with ``ratelimit.check``), or the 429 it earned, raised (a window's, with
    ``ratelimit.block``; or the key's ``max_concurrent``, as the in-process KeySlots says it)."""
    limits = principal.limits
    quota, denied = decode_admit(reply, limits, estimate)
    if denied is not None:
        retry = None if math.isinf(denied.retry_after_s) else denied.retry_after_s
        telemetry.emit(
            "ratelimit.block",
            tenant=principal.tenant,
            key_mask=principal.key_mask,
            request_id=request_id,
            limit=denied.which,
            retry_after_s=retry,
        )
        raise error_for(denied, principal.key_mask)
    unlimited = limits.unlimited
    if reply[1] == KEY_FULL:
        error = key_at_capacity(principal)
        if not unlimited:
            error.headers = (*error.headers, *headers_for(quota))
        raise error
    if unlimited:
        return NO_RESERVATION, ()
    telemetry.emit(
        "ratelimit.check",
        tenant=principal.tenant,
        key_mask=principal.key_mask,
        request_id=request_id,
        remaining_requests=quota.remaining_requests if quota.limit_requests else None,
        remaining_tokens=quota.remaining_tokens if quota.limit_tokens else None,
    )
    now_us = reply[0]
    minute = now_us // MINUTE_US
    reservation = SharedReservation(
        None,
        quota,
        principal.key_id,
        estimate,
        minute,
        limits=limits,
        minute=minute,
        hour=now_us // HOUR_US,
    )
    return reservation, headers_for(quota)


# --- settling a reservation ------------------------------------------------------------------


@attrs.define(slots=True, eq=False)
class SharedReservation(Reservation):
    """A reservation counted in Redis: the buckets it counted in, to refund it there."""

    limits: KeyLimits = attrs.field(factory=KeyLimits)
    minute: int = 0
    hour: int = 0
    #: The tenant's slot taken with it (a ``RedisSlot``), while held: a settle made before
    #: the slot is released rides on the release's command.
    slot: Any = None


Adjust = tuple[list[str], list[int]]
#: A served request's tpm settle: (the minute bucket its estimate was counted in, tokens
#: used minus the estimate). Rides on the slots' release (:mod:`.redis_commands`), else
#: :func:`settle_args` makes it an :data:`ADJUST` of its own.
Settle = tuple[int, int]


def reconcile_settle(res: SharedReservation, actual_tokens: int | None) -> Settle | None:
    """The tpm settle of a served request's token estimate (None: nothing to send). Only
    the first settling call counts."""
    if res.settled:
        return None
    res.settled = True
    if actual_tokens is None or res.limits.tpm is None:
        return None
    delta = actual_tokens - res.tokens
    if not delta:
        return None
    return res.minute, delta


def settle_args(res: SharedReservation, settle: Settle, prefix: str) -> Adjust:
    """:data:`ADJUST`'s keys and args for ``settle`` on its own."""
    return [f"{prefix}rl:{res.key}:tpm"], [settle[0], settle[1], MINUTE_US]


def cancel_args(
    res: SharedReservation, limits: KeyLimits, prefix: str
) -> tuple[Adjust | None, Headers]:
    """:data:`ADJUST`'s keys and args giving an unserved request's counts back, and the
    ``x-ratelimit-*`` headers as they stand after (from the admission's, plus the refund:
    no round trip for them)."""
    q = res.quota
    if res.settled:
        return None, headers_for(q)
    res.settled = True
    rl = f"{prefix}rl:{res.key}:"
    keys: list[str] = []
    args: list[int] = []
    for name, bucket, width, amount in (
        ("rpm", res.minute, MINUTE_US, 1 if limits.rpm else 0),
        ("rph", res.hour, HOUR_US, 1 if limits.rph else 0),
        ("tpm", res.minute, MINUTE_US, res.tokens if limits.tpm else 0),
    ):
        if amount:
            keys.append(rl + name)
            args += [bucket, -amount, width]
    after = Quota(
        q.limit_requests,
        min(q.remaining_requests + 1, q.limit_requests or 0),
        q.reset_requests_s,
        q.limit_tokens,
        min(q.remaining_tokens + res.tokens, q.limit_tokens or 0),
        q.reset_tokens_s,
    )
    return ((keys, args) if keys else None), headers_for(after)
