"""The Lua scripts of the budgets on Redis (:mod:`.redis_budgets`), and their keys.

Keys (``P`` is ``[state] key_prefix``; one account per scope, owner and period)::

    P bud:{key|tenant}:{owner}:{day|month}:{2026-12-05|2026-12}
        hash: seeded (1 once the ledger's total is in), usd / tok (spent this period),
        hu / ht (the estimates of the holds below, summed), lu / lt (real costs charged
        before the seed: the seed adds them)
    ... the same key + ":holds"
        sorted set: member = one request's hold "{process}:{n}|{usd}|{tokens}" (its
        estimate rides in the name, so an expired hold can be taken out of hu / ht without
        another key), score = its lease's expiry (ms, server time)

Both expire a day after their period ends. Amounts are kept as ``%.17g`` strings written by
the scripts (``HSET``, not ``HINCRBYFLOAT``, whose long double arithmetic would round
differently from the gateway's doubles): every number round-trips exactly.

The period's day or month in the key is the gateway's clock (UTC), as the ledger buckets
its records; hold leases run on Redis's clock (``TIME``), like the slots' leases.
"""

from __future__ import annotations

from runestone_proxy.server.redis_client import Script

__all__ = ["RENEW_HOLDS", "RESERVE", "SEED", "SETTLE", "fmt"]


def fmt(value: float) -> str:
    """A number as the scripts write it (``%.17g``: exact for a double)."""
    return f"{value:.17g}"


_COMMON = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function fmt(x) return string.format('%.17g', x) end
local function amounts(member)
  local _, _, u, k = string.find(member, '|([^|]*)|([^|]*)$')
  return tonumber(u), tonumber(k)
end
-- Take the expired holds of account a (holds h) out of its held sums.
local function purge(a, h)
  local gone = redis.call('ZRANGEBYSCORE', h, '-inf', now_ms)
  if #gone == 0 then return end
  local f = redis.call('HMGET', a, 'hu', 'ht')
  local hu, ht = tonumber(f[1] or '0'), tonumber(f[2] or '0')
  for _, m in ipairs(gone) do
    local u, k = amounts(m)
    hu, ht = hu - u, ht - k
  end
  redis.call('ZREMRANGEBYSCORE', h, '-inf', now_ms)
  if redis.call('ZCARD', h) == 0 then hu, ht = 0, 0 end
  redis.call('HSET', a, 'hu', fmt(hu), 'ht', fmt(ht))
end
-- Charge a real cost to account a: its spend once seeded, else the late sums.
local function charge(a, usd, tok, ttl)
  if usd == 0 and tok == 0 then return end
  local f = redis.call('HMGET', a, 'seeded', 'usd', 'tok', 'lu', 'lt')
  if f[1] then
    redis.call('HSET', a, 'usd', fmt(tonumber(f[2]) + usd), 'tok', fmt(tonumber(f[3]) + tok))
  else
    local lu, lt = tonumber(f[4] or '0'), tonumber(f[5] or '0')
    redis.call('HSET', a, 'lu', fmt(lu + usd), 'lt', fmt(lt + tok))
    redis.call('PEXPIRE', a, ttl)
  end
end
"""

#: Check and hold a request's estimate in every budget, in one atomic step.
#: KEYS: account 1, holds 1, ..., account n, holds n.
#: ARGV: member, estimate usd, estimate tokens, lease_ms, then n TTLs (ms), then per budget
#: (account index, 'u' or 't', amount).
#: Reply: {0} + per account {usd, held usd, tok, held tok} as before the hold: held;
#: {c, ...the same}: refused by the c-th budget, nothing held; {-1, i, j, ...}: accounts
#: i, j, ... are not seeded yet (seed them, then ask again).
RESERVE = Script(
    _COMMON
    + """
local n = #KEYS / 2
local vals, unseeded = {}, {-1}
for i = 1, n do
  local a = KEYS[2 * i - 1]
  purge(a, KEYS[2 * i])
  local f = redis.call('HMGET', a, 'seeded', 'usd', 'tok', 'hu', 'ht')
  if not f[1] then unseeded[#unseeded + 1] = i end
  vals[i] = {tonumber(f[2] or '0'), tonumber(f[3] or '0'),
             tonumber(f[4] or '0'), tonumber(f[5] or '0')}
end
if #unseeded > 1 then return unseeded end
local eu, et = tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {0}
local c = 0
for j = 5 + n, #ARGV, 3 do
  c = c + 1
  local v, amount = vals[tonumber(ARGV[j])], tonumber(ARGV[j + 2])
  local used, total
  if ARGV[j + 1] == 'u' then used = v[1] + v[3]; total = used + eu
  else used = v[2] + v[4]; total = used + et end
  if total > amount or used >= amount then out[1] = c; break end
end
for i = 1, n do
  local v = vals[i]
  out[#out + 1] = fmt(v[1]); out[#out + 1] = fmt(v[3])
  out[#out + 1] = fmt(v[2]); out[#out + 1] = fmt(v[4])
end
if out[1] == 0 then
  local expiry = now_ms + tonumber(ARGV[4])
  for i = 1, n do
    local v, h = vals[i], KEYS[2 * i]
    redis.call('ZADD', h, expiry, ARGV[1])
    redis.call('PEXPIRE', h, ARGV[4 + i])
    redis.call('HSET', KEYS[2 * i - 1], 'hu', fmt(v[3] + eu), 'ht', fmt(v[4] + et))
  end
end
return out
"""
)

#: The ledger's total for an account's period, once (the first seed wins: SET NX), plus
#: the real costs charged to it meanwhile. KEYS: account. ARGV: usd, tokens, ttl_ms.
#: Reply: 1 seeded now, 0 it already was.
SEED = Script(
    _COMMON
    + """
local a = KEYS[1]
local f = redis.call('HMGET', a, 'seeded', 'lu', 'lt')
if f[1] then return 0 end
local usd = tonumber(ARGV[1]) + tonumber(f[2] or '0')
local tok = tonumber(ARGV[2]) + tonumber(f[3] or '0')
redis.call('HSET', a, 'seeded', '1', 'usd', fmt(usd), 'tok', fmt(tok))
redis.call('HDEL', a, 'lu', 'lt')
redis.call('PEXPIRE', a, ARGV[3])
return 1
"""
)

#: A request ended: take its hold out of each account it held in, charge its real cost to
#: the accounts of the periods it ended in. KEYS: account 1, holds 1, ..., account n,
#: holds n, then m accounts to charge. ARGV: member, n, usd, tokens, then m TTLs (ms).
#: With n = 0 it only charges (costs Redis could not take when they were made).
SETTLE = Script(
    _COMMON
    + """
local n = tonumber(ARGV[2])
local eu, et = amounts(ARGV[1])
for i = 1, n do
  local a, h = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call('ZREM', h, ARGV[1]) == 1 then
    local f = redis.call('HMGET', a, 'hu', 'ht')
    local hu, ht = tonumber(f[1] or '0') - eu, tonumber(f[2] or '0') - et
    if redis.call('ZCARD', h) == 0 then hu, ht = 0, 0 end
    redis.call('HSET', a, 'hu', fmt(hu), 'ht', fmt(ht))
  end
end
local usd, tok = tonumber(ARGV[3]), tonumber(ARGV[4])
for k = 2 * n + 1, #KEYS do charge(KEYS[k], usd, tok, ARGV[4 + k - 2 * n]) end
return 1
"""
)

#: Extend this process's holds' leases; a hold an outage let expire is put back (its
#: request is still running). KEYS: account, holds. ARGV: lease_ms, members...
RENEW_HOLDS = Script(
    _COMMON
    + """
local a, h = KEYS[1], KEYS[2]
purge(a, h)
local expiry = now_ms + tonumber(ARGV[1])
local back_u, back_t = 0, 0
for i = 2, #ARGV do
  if not redis.call('ZSCORE', h, ARGV[i]) then
    local u, k = amounts(ARGV[i])
    back_u, back_t = back_u + u, back_t + k
  end
  redis.call('ZADD', h, expiry, ARGV[i])
end
if back_u ~= 0 or back_t ~= 0 then
  local f = redis.call('HMGET', a, 'hu', 'ht')
  redis.call('HSET', a, 'hu', fmt(tonumber(f[1] or '0') + back_u),
             'ht', fmt(tonumber(f[2] or '0') + back_t))
end
return 1
"""
)
