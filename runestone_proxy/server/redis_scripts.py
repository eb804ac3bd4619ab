"""The Lua scripts of the Redis state backend, and what their replies mean.

Every decision that must hold across processes runs inside Redis as one script, so it is
atomic (Redis runs one script at a time) and needs one round trip. Time is the server's
(``TIME``), so hosts with skewed clocks still share one window and one lease clock.

Keys (``P`` is ``[state] key_prefix``)::

    P slots:{tenant}   sorted set: member = one held slot ("{process}:{n}"), score = its
                       lease's expiry (ms); expired members are purged before counting
    P gslots           the same for the gateway-wide cap
    P rl:{key}:{rpm|rph|tpm}   hash: bucket index -> count (the window of rate_window.py)
    P waiting          sorted set of processes with a waiting request (score: expiry)
    P freed            pub/sub channel: a slot was released while someone waits

Windows are :mod:`runestone_proxy.gateway.rate_window`'s exactly: ``k + 1 = 61`` buckets of
``T / 60`` (1 s for a minute, 1 min for an hour); bucket ``b = floor(now / width)``; the
window at ``b`` is ``b - 60 .. b``, so no interval of length ``T`` holds more than the limit.
A hash holds at most 61 fields; older ones are deleted as they are read, and the key expires
one horizon after its last write.
"""

from __future__ import annotations

from typing import Any

import attrs

from runestone_proxy.gateway.rate_window import BUCKETS
from runestone_proxy.gateway.rate_wire import Headers, headers_for
from runestone_proxy.gateway.ratelimit import Denied, KeyLimits, Quota, Reservation, Which
from runestone_proxy.server.redis_client import Script

__all__ = [
    "ACQUIRE",
    "ADJUST",
    "RELEASE",
    "RENEW",
    "WAITING",
    "Adjust",
    "AdmitReply",
    "SharedReservation",
    "cancel_args",
    "decode_admit",
    "reconcile_args",
]

N = BUCKETS + 1
MINUTE_US = 1_000_000
HOUR_US = 60_000_000

_NOW = """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
"""

#: The key's windows (when ARGV[5..7] set limits) and a slot (when ARGV[2] names one).
#: KEYS: tenant slots, global slots, rpm, rph, tpm. ARGV: lease_ms, member, tenant_max,
#: global_max, rpm, rph, tpm (0: none), est_tokens. Reply: now_us, denied (0, or 1 rpm /
#: 2 rph / 3 tpm), its wait_us (-1: never fits), granted, tenant count, global count, then
#: per window its total and the time until it is empty (us).
ACQUIRE = Script(
    _NOW
    + """
local N = 61
local widths = {1000000, 60000000, 1000000}
local INF = 1e18
local out = {now_us, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
local scans = {}
for i = 1, 3 do
  local limit = tonumber(ARGV[4 + i])
  if limit > 0 then
    local width, key = widths[i], KEYS[2 + i]
    local b = math.floor(now_us / width)
    local flat = redis.call('HGETALL', key)
    local counts, total, newest = {}, 0, nil
    for f = 1, #flat, 2 do
      local j, c = tonumber(flat[f]), tonumber(flat[f + 1])
      if j <= b - N then
        redis.call('HDEL', key, flat[f])
      else
        counts[j] = c
        total = total + c
        if c > 0 and (newest == nil or j > newest) then newest = j end
      end
    end
    local requested = 1
    if i == 3 then requested = tonumber(ARGV[8]) end
    local excess = total + requested - limit
    if (i < 3 and total >= limit) or (i == 3 and excess > 0) then
      local wait = INF
      if requested <= limit then
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
if out[2] ~= 0 then
  if out[3] >= INF then out[3] = -1 end
else
  for i = 1, 3 do
    local s = scans[i]
    if s ~= nil and s[6] > 0 then
      redis.call('HINCRBY', s[1], string.format('%d', s[3]), s[6])
      redis.call('PEXPIRE', s[1], math.ceil(N * s[2] / 1000))
      s[4] = s[4] + s[6]
      s[5] = s[3]
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
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
  local tc, gc = redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])
  if ARGV[2] ~= '' and tc < tonumber(ARGV[3]) and gc < tonumber(ARGV[4]) then
    local expiry = now_ms + tonumber(ARGV[1])
    redis.call('ZADD', KEYS[1], expiry, ARGV[2])
    redis.call('ZADD', KEYS[2], expiry, ARGV[2])
    out[4], tc, gc = 1, tc + 1, gc + 1
  end
  out[5], out[6] = tc, gc
end
return out
"""
)

#: Settle window counts (:data:`ADJUST`'s body) for KEYS[first..], ARGV from ``at``.
_ADJUST = """
local function adjust(first, at)
  for i = first, #KEYS do
    local j = at + 3 * (i - first)
    local bucket, delta, width = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2])
    if delta > 0 then
      redis.call('HINCRBY', KEYS[i], string.format('%d', math.floor(now_us / width)), delta)
      redis.call('PEXPIRE', KEYS[i], math.ceil(61 * width / 1000))
    elseif delta < 0 then
      local have = tonumber(redis.call('HGET', KEYS[i], bucket) or '0')
      local take = math.min(-delta, have)
      if take > 0 then redis.call('HINCRBY', KEYS[i], bucket, -take) end
    end
  end
end
"""

#: Give a slot back; tell waiting processes; and settle the request's window counts as
#: :data:`ADJUST` does (one command at the end of a request, not two). KEYS: tenant slots,
#: global slots, waiting, then ADJUST's keys. ARGV: member, channel, tenant, then ADJUST's.
RELEASE = Script(
    _NOW
    + _ADJUST
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_ms)
if redis.call('ZCARD', KEYS[3]) > 0 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
adjust(4, 4)
return 1
"""
)

#: Extend this process's leases (re-adding one an outage let expire: it is still running).
#: KEYS: tenant slots, global slots. ARGV: lease_ms, members...
RENEW = Script(
    _NOW
    + """
local expiry = now_ms + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expiry, ARGV[i])
  redis.call('ZADD', KEYS[2], expiry, ARGV[i])
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


@attrs.frozen
class AdmitReply:
    now_us: int
    denied: Denied | None
    quota: Quota
    granted: bool
    tenant_count: int
    global_count: int


_WHICH: tuple[Which, ...] = ("rpm", "rph", "tpm")


def decode_admit(reply: list[int], limits: KeyLimits, est_tokens: int) -> AdmitReply:
    """:data:`ACQUIRE`'s reply as the values :mod:`.ratelimit` uses for headers and 429s."""
    now_us, which, wait_us, granted, tc, gc, t_m, r_m, t_h, r_h, t_t, r_t = reply
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
    denied = None
    if which:
        name = _WHICH[which - 1]
        limit = (rpm, rph, tpm)[which - 1]
        assert limit is not None
        used = (t_m, t_h, t_t)[which - 1]
        retry = float("inf") if wait_us < 0 else wait_us / 1e6
        denied = Denied(name, retry, limit, used, est_tokens if which == 3 else 1, quota)
    return AdmitReply(now_us, denied, quota, bool(granted), tc, gc)


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


def reconcile_args(res: SharedReservation, actual_tokens: int | None, prefix: str) -> Adjust | None:
    """:data:`ADJUST`'s keys and args settling a served request's token estimate (None:
    nothing to send). Only the first settling call counts."""
    if res.settled:
        return None
    res.settled = True
    if actual_tokens is None or res.limits.tpm is None:
        return None
    delta = actual_tokens - res.tokens
    if not delta:
        return None
    return [f"{prefix}rl:{res.key}:tpm"], [res.minute, delta, MINUTE_US]


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
