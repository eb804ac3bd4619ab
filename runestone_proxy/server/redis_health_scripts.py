"""The Lua scripts of the shared breakers (:mod:`.redis_health`), and their keys.

Per deployment ``<name>``:

- ``<prefix>brk:<name>``: a hash ``state`` (``closed`` | ``open``), ``until`` (the end of
  the cooldown, Redis' clock in ms, so hosts with skewed clocks agree) and ``epoch`` (the
  fleet's transitions of that breaker so far: a process that saw epoch n knows it missed
  nothing while the hash still says n). Open and past ``until`` means a probe is due.
  The hash expires :data:`BREAKER_TTL_MS` after its last transition: a deployment no
  process has tripped or probed for that long (renamed, removed) leaves nothing behind,
  and one that comes back starts closed. A hash made anew starts its epoch from Redis'
  clock (ms), not from 0, so it never repeats an epoch a process saw in the one that
  expired.
- ``<prefix>brk:<name>:probe``: the process holding the probe, as a lease (``PX``).
- ``<prefix>ttft:<name>``: the fleet's last TTFT samples (ms), newest first, trimmed.

Every transition ``PUBLISH``es the deployment's name on ``<prefix>health``; the receivers
read the hashes again (one script for all of them, :data:`READ`).
"""

from __future__ import annotations

from runestone_proxy.server.redis_client import Script

__all__ = ["BREAKER_TTL_MS", "CLAIM", "CLOSE", "OPEN", "READ", "RELEASE", "SCRIPTS"]

#: A breaker's hash lives this long after its last transition (7 days: far past any
#: cooldown, so an open breaker never expires while it matters).
BREAKER_TTL_MS = 7 * 24 * 3600 * 1000

#: Sets the breaker's expiry (after each transition).
_EXPIRE = f"redis.call('PEXPIRE', KEYS[1], {BREAKER_TTL_MS})\n"

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: KEYS: breaker, probe. ARGV: cooldown ms, channel, name.
#: Opens the breaker for the fleet, unless it is open and cooling already (then the fleet's
#: cooldown stands). Returns {opened 1/0, ms of cooldown left, epoch}.
OPEN = Script(
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'until', 'epoch')
local epoch = tonumber(h[3]) or now
local untl = tonumber(h[2]) or 0
if h[1] == 'open' and untl > now then
  return {0, untl - now, epoch}
end
epoch = epoch + 1
local cooldown = tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'open', 'until', now + cooldown, 'epoch', epoch)
"""
    + _EXPIRE
    + """redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {1, cooldown, epoch}
"""
)

#: KEYS: breaker, probe. ARGV: channel, name.
#: A probe succeeded: closes the breaker for the fleet if it is open past its cooldown (a
#: reopening since, by another probe's failure, stands). Returns {closed 1/0, epoch}.
CLOSE = Script(
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'until', 'epoch')
local epoch = tonumber(h[3]) or 0
if h[1] ~= 'open' or (tonumber(h[2]) or 0) > now then
  return {0, epoch}
end
epoch = epoch + 1
redis.call('HSET', KEYS[1], 'state', 'closed', 'until', 0, 'epoch', epoch)
"""
    + _EXPIRE
    + """redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return {1, epoch}
"""
)

#: KEYS: breaker, probe. ARGV: process id, lease ms.
#: Takes (or renews) the probe's lease when a probe is due and nobody else holds it: 1/0.
CLAIM = Script(
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'until')
if h[1] ~= 'open' or (tonumber(h[2]) or 0) > now then
  return 0
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""
)

#: KEYS: probe. ARGV: process id. Gives the lease back if it is this process's.
RELEASE = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 0
"""
)

#: KEYS: breaker and probe of each deployment, in pairs. Returns, per deployment, its state,
#: ms of cooldown left (<= 0: a probe is due), epoch and the probe's holder ('' if none).
READ = Script(
    _NOW
    + """
local out = {}
for i = 1, #KEYS, 2 do
  local h = redis.call('HMGET', KEYS[i], 'state', 'until', 'epoch')
  out[#out + 1] = h[1] or 'closed'
  out[#out + 1] = (tonumber(h[2]) or 0) - now
  out[#out + 1] = tonumber(h[3]) or 0
  out[#out + 1] = redis.call('GET', KEYS[i + 1]) or ''
end
return out
"""
)

SCRIPTS = (OPEN, CLOSE, CLAIM, RELEASE, READ)
