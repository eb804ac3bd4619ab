"""The rate windows of the Redis state backend: Lua functions that :mod:`.redis_scripts`'
``ACQUIRE`` and ``ADJUST`` (and ``RELEASE``'s settle) share. No I/O of its own.

A window is :mod:`runestone_proxy.gateway.rate_window`'s, kept in one hash per key and
limit (``P rl:{key}:{rpm|rph|tpm}``): ``N = 61`` buckets of ``T / 60``, bucket
``b = floor(now / width)``, the window at ``b`` being ``b - 60 .. b``. Fields:

    "{j}"  the count of bucket j (j >= 0)
    "-1"   the running total: the sum of every bucket field the hash holds
    "-2"   the bucket the hash was last advanced to
    "-3"   the newest bucket with a count (for the time until the window is empty)

Why running totals: the first version read the whole hash (``HGETALL``, up to 61 fields
per limit, three limits per admission) on every admission, which cost redis-server 45-50
us of its one thread per request: the ceiling of a whole fleet's admissions with key
limits set. Now an admission reads three fields per limit; a bucket leaving the window is
read and deleted once (amortised: one per second of traffic per minute window), and a
window idle for a whole span is deleted in one command. In steady traffic an admission
costs three commands per limit (read the total, count the request in its bucket and in the
total); the key's expiry is set when a bucket is first written, which keeps it at least a
horizon past that bucket's start. Only a denial reads every bucket (to say how long until
the request would fit). redis-server's CPU per admission with three full windows went from
84.7 to 32.5 us (README, "Shared limits on Redis").

Compatibility: the meta fields are negative, so a gateway of the previous version (which
deletes every field at or below ``b - 61`` as it reads) drops them; this version then finds
no total and counts the hash once, as the previous one did. During a rolling upgrade, counts
an old gateway adds between two of its own admissions on the key are missed by the totals
until it next reads the window.
"""

from __future__ import annotations

__all__ = ["WINDOW_LUA"]

#: Lua functions (after the caller's ``now_us``): ``advance(key, b, width)`` -> total,
#: newest (nil: none), last; ``window_add(key, b, amount, width)``; ``window_refund(key, bucket,
#: amount)``; ``window_counts(key)`` -> {bucket = count}.
WINDOW_LUA = """
local N = 61
local function field(j) return string.format('%d', j) end
local function save_meta(key, total, last, newest, width)
  if newest == nil then
    redis.call('HSET', key, '-1', field(total), '-2', field(last))
    redis.call('HDEL', key, '-3')
  else
    redis.call('HSET', key, '-1', field(total), '-2', field(last), '-3', field(newest))
  end
  redis.call('PEXPIRE', key, math.ceil(N * width / 1000))
end
local function advance(key, b, width)
  local meta = redis.call('HMGET', key, '-1', '-2', '-3')
  local total, last, newest = tonumber(meta[1]), tonumber(meta[2]), tonumber(meta[3])
  if total == nil or last == nil then
    total, last, newest = 0, b, nil
    local flat = redis.call('HGETALL', key)
    for f = 1, #flat, 2 do
      local j, c = tonumber(flat[f]), tonumber(flat[f + 1])
      if j ~= nil and j >= 0 then
        if j <= b - N then
          redis.call('HDEL', key, flat[f])
        else
          total = total + c
          if j > last then last = j end
          if c > 0 and (newest == nil or j > newest) then newest = j end
        end
      end
    end
    if #flat > 0 then save_meta(key, total, last, newest, width) end
    return total, newest, last
  end
  if b <= last then return total, newest, last end
  if b - last >= N then
    redis.call('DEL', key)
    return 0, nil, b
  end
  for j = last - N + 1, b - N do
    local f = field(j)
    local c = tonumber(redis.call('HGET', key, f) or '0')
    if c ~= 0 then
      redis.call('HDEL', key, f)
      total = total - c
    end
  end
  if newest ~= nil and newest <= b - N then newest = nil end
  save_meta(key, total, b, newest, width)
  return total, newest, b
end
local function window_add(key, b, amount, width)
  local total, newest, last = advance(key, b, width)
  redis.call('HINCRBY', key, field(b), amount)
  if newest ~= nil and b <= newest then
    -- The bucket was written before: its first write set the key's expiry, at least one
    -- horizon past the bucket's start, which is when its counts leave the window.
    redis.call('HINCRBY', key, '-1', amount)
  else
    newest = b
    save_meta(key, total + amount, last, newest, width)
  end
  return total + amount, newest
end
local function window_refund(key, bucket, amount)
  local have = tonumber(redis.call('HGET', key, bucket) or '0')
  local take = math.min(amount, have)
  if take <= 0 then return end
  redis.call('HINCRBY', key, bucket, -take)
  if redis.call('HEXISTS', key, '-1') == 0 then return end
  redis.call('HINCRBY', key, '-1', -take)
  local j = tonumber(bucket)
  if take == have and j == tonumber(redis.call('HGET', key, '-3') or '-1') then
    for k = j - 1, j - N + 1, -1 do
      if tonumber(redis.call('HGET', key, field(k)) or '0') > 0 then
        redis.call('HSET', key, '-3', field(k))
        return
      end
    end
    redis.call('HDEL', key, '-3')
  end
end
local function window_counts(key)
  local flat, counts = redis.call('HGETALL', key), {}
  for f = 1, #flat, 2 do
    local j = tonumber(flat[f])
    if j ~= nil and j >= 0 then counts[j] = tonumber(flat[f + 1]) end
  end
  return counts
end
"""
