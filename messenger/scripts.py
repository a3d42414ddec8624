"""The Lua scripts that change the user list, each one atomic step in Redis.

Every check-then-write happens inside one script, so no race between two logons (or two
coordinators) can slip between the check and the write. Times come from Redis's own clock
(`TIME`) unless a caller passes `now` explicitly (unit tests with a fake clock), so hosts with
skewed clocks still agree on every deadline.

Request scripts share one frame: they refuse to act unless the caller holds the coordinator
lease (a fencing token: a paused old coordinator cannot act after losing it), they apply each
request at most once (a `done` key remembers the reply), and they do not apply a request that is
older than the reply timeout (its sender has given up). The reply is published to the sender's
inbox from inside the script, so a reply always matches what was applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ResponseError

from messenger.errors import LeaseLost
from messenger.keys import Keys
from messenger.protocol import Request

_PRELUDE = """
local function now_ms(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Remove one session from every index; names/nodes entries are only removed if they still
-- point at this sid, so an old session can never take a newer owner's entry with it.
local function remove_session(sessions, names, nodes, deadlines, hb_key, sid)
  local raw = redis.call('HGET', sessions, sid)
  if not raw then return nil end
  -- A corrupt entry (written by something else) must not make every sweep fail: remove what
  -- can be found; a names/nodes entry left pointing at nothing is overwritten by the next logon.
  local ok, s = pcall(cjson.decode, raw)
  if not ok or type(s) ~= 'table' or type(s.name) ~= 'string' or type(s.node) ~= 'string' then
    s = {name = '?', node = '?'}
  end
  if redis.call('HGET', names, s.name) == sid then redis.call('HDEL', names, s.name) end
  if redis.call('HGET', nodes, s.node) == sid then redis.call('HDEL', nodes, s.node) end
  redis.call('HDEL', sessions, sid)
  redis.call('ZREM', deadlines, sid)
  redis.call('DEL', hb_key)
  return s
end
"""

# KEYS[1] lease, KEYS[2] done key; ARGV[1] coordinator id, ARGV[2] req id, ARGV[3] sent ms,
# ARGV[4] max age ms (the sender's wait less a margin), ARGV[5] done ttl ms,
# ARGV[6] now ms or '', ARGV[7] reply channel.
_REQUEST_HEAD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER this coordinator does not hold the lease')
end
local done = redis.call('GET', KEYS[2])
if done then
  if done ~= 'expired' then
    redis.call('PUBLISH', ARGV[7], cjson.encode({t='reply', req=ARGV[2], r=done}))
  end
  return done
end
local now = now_ms(ARGV[6])
if now - tonumber(ARGV[3]) > tonumber(ARGV[4]) then
  redis.call('SET', KEYS[2], 'expired', 'PX', ARGV[5])
  return 'expired'
end
local reply
"""

_REQUEST_TAIL = """
redis.call('SET', KEYS[2], reply, 'PX', ARGV[5])
redis.call('PUBLISH', ARGV[7], cjson.encode({t='reply', req=ARGV[2], r=reply}))
return reply
"""

# KEYS[3] sessions, KEYS[4] names, KEYS[5] nodes, KEYS[6] deadlines, KEYS[7] hb key
# ARGV[8] sid, ARGV[9] name, ARGV[10] node, ARGV[11] heartbeat ttl ms, ARGV[12] inbox prefix,
# ARGV[13] hb key prefix
_LOGON = """
local sid, name, node, ttl = ARGV[8], ARGV[9], ARGV[10], tonumber(ARGV[11])
-- A session whose client holds no subscription on its inbox any more is dead for good: Redis
-- drops a closed connection's subscriptions at once, and clients never resubscribe. Clearing it
-- here (not only at its deadline) lets a node or name whose client crashed log on again at once,
-- while a hung client (its connection still open) keeps its session until the sweep.
-- An index entry whose session is gone is stale: the new session's entries overwrite it.
local function taken(owner)
  if not owner or redis.call('HEXISTS', KEYS[3], owner) == 0 then return false end
  if redis.call('PUBSUB', 'NUMSUB', ARGV[12] .. owner)[2] > 0 then return true end
  remove_session(KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[13] .. owner, owner)
  return false
end
if redis.call('HEXISTS', KEYS[3], sid) == 1 or taken(redis.call('HGET', KEYS[5], node)) then
  reply = 'already-logged-on'
elseif taken(redis.call('HGET', KEYS[4], name)) then
  reply = 'user-exists-at-other-node'
else
  redis.call('HSET', KEYS[3], sid, cjson.encode({name=name, node=node, since=now}))
  redis.call('HSET', KEYS[4], name, sid)
  redis.call('HSET', KEYS[5], node, sid)
  redis.call('ZADD', KEYS[6], now + ttl, sid)
  redis.call('SET', KEYS[7], '1', 'PX', ttl)
  reply = 'logged-on'
end
"""

# KEYS[3] sessions, KEYS[4] names; ARGV[8] sid, ARGV[9] to, ARGV[10] text, ARGV[11] inbox prefix
_MESSAGE = """
local raw = redis.call('HGET', KEYS[3], ARGV[8])
if not raw then
  reply = 'you-are-not-logged-on'
else
  local to_sid = redis.call('HGET', KEYS[4], ARGV[9])
  if not to_sid or redis.call('HEXISTS', KEYS[3], to_sid) == 0 then
    reply = 'receiver-not-found'
  else
    local ok, s = pcall(cjson.decode, raw)
    local from = ok and type(s) == 'table' and s.name or '?'
    local n = redis.call('PUBLISH', ARGV[11] .. to_sid,
                         cjson.encode({t='msg', from=from, text=ARGV[10]}))
    -- PUBLISH counts the subscribers that got it: 0 means the receiver's client is gone,
    -- and a message that reached nobody is never reported sent.
    if n > 0 then reply = 'sent' else reply = 'receiver-not-found' end
  end
end
"""

# KEYS[3] sessions, KEYS[4] names, KEYS[5] nodes, KEYS[6] deadlines, KEYS[7] hb key; ARGV[8] sid
_LOGOFF = """
if remove_session(KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[8]) then
  reply = 'logged-off'
else
  reply = 'not-logged-on'
end
"""

# KEYS[1] lease, KEYS[2] sessions, KEYS[3] names, KEYS[4] nodes, KEYS[5] deadlines
# ARGV[1] coordinator id, ARGV[2] now ms or '', ARGV[3] limit, ARGV[4] hb key prefix
# Returns {sid, name, node, ...} of the sessions removed. Its cost grows with the number of
# expired sessions, not with all sessions.
_SWEEP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER this coordinator does not hold the lease')
end
local now = now_ms(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, sid in ipairs(due) do
  local s = remove_session(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[4] .. sid, sid)
  if s then
    table.insert(out, sid); table.insert(out, s.name); table.insert(out, s.node)
  else
    redis.call('ZREM', KEYS[5], sid)
  end
end
return out
"""

# KEYS[1] sessions, KEYS[2] deadlines, KEYS[3] hb key, KEYS[4] lease
# ARGV[1] sid, ARGV[2] ttl ms, ARGV[3] now ms or ''
# Returns -1 if the session is gone (fenced: a stale client can never revive it or touch a
# newer owner's entries), else 1 if a coordinator holds the lease, 0 if none does.
_HEARTBEAT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
local now = now_ms(ARGV[3])
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[3], '1', 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
return redis.call('EXISTS', KEYS[4])
"""

# KEYS[1] lease; ARGV[1] coordinator id, ARGV[2] ttl ms. Returns 1 if still held.
_LEASE_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _run(script: AsyncScript, keys: list[str], args: list[str]) -> Any:
    try:
        return await script(keys=keys, args=args)
    except ResponseError as e:
        if str(e).startswith("NOTLEADER"):
            raise LeaseLost("this coordinator no longer holds the lease") from None
        raise


class Scripts:
    """The scripts registered on one redis client; each method is one round trip."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.keys = keys
        self._logon = redis.register_script(_PRELUDE + _REQUEST_HEAD + _LOGON + _REQUEST_TAIL)
        self._message = redis.register_script(_PRELUDE + _REQUEST_HEAD + _MESSAGE + _REQUEST_TAIL)
        self._logoff = redis.register_script(_PRELUDE + _REQUEST_HEAD + _LOGOFF + _REQUEST_TAIL)
        self._sweep = redis.register_script(_PRELUDE + _SWEEP)
        self._heartbeat = redis.register_script(_PRELUDE + _HEARTBEAT)
        self._lease_refresh = redis.register_script(_LEASE_REFRESH)
        self._lease_release = redis.register_script(_LEASE_RELEASE)

    @staticmethod
    def _now(now: int | None) -> str:
        return "" if now is None else str(now)

    async def request(
        self,
        coordinator: str,
        r: Request,
        *,
        timeout_ms: int,
        ttl_ms: int,
        now: int | None = None,
    ) -> str:
        """Apply one request (logon, message-to or logoff); return the reply word or `expired`.

        `timeout_ms` is how old (since XADD) the request may be and still be applied.
        """
        k = self.keys
        keys = [k.lease, k.done(r.req)]
        args = [
            coordinator,
            r.req,
            str(r.sent_ms),
            str(timeout_ms),
            str(2 * timeout_ms + 1000),
            self._now(now),
            k.inbox(r.sid),
        ]
        if r.kind == "logon":
            script = self._logon
            keys += [k.sessions, k.names, k.nodes, k.deadlines, k.hb(r.sid)]
            args += [r.sid, r.name, r.node, str(ttl_ms), k.inbox_prefix, k.hb_prefix]
        elif r.kind == "message-to":
            script = self._message
            keys += [k.sessions, k.names]
            args += [r.sid, r.to, r.text, k.inbox_prefix]
        else:
            script = self._logoff
            keys += [k.sessions, k.names, k.nodes, k.deadlines, k.hb(r.sid)]
            args += [r.sid]
        return _text(await _run(script, keys, args))

    async def sweep(
        self, coordinator: str, limit: int = 1000, now: int | None = None
    ) -> list[tuple[str, str, str]]:
        k = self.keys
        flat = cast(
            Sequence[Any],
            await _run(
                self._sweep,
                keys=[k.lease, k.sessions, k.names, k.nodes, k.deadlines],
                args=[coordinator, self._now(now), str(limit), k.hb_prefix],
            ),
        )
        items = [_text(v) for v in flat]
        return [(items[i], items[i + 1], items[i + 2]) for i in range(0, len(items), 3)]

    async def heartbeat(self, sid: str, ttl_ms: int, now: int | None = None) -> int:
        k = self.keys
        return int(
            await self._heartbeat(
                keys=[k.sessions, k.deadlines, k.hb(sid), k.lease],
                args=[sid, str(ttl_ms), self._now(now)],
            )
        )

    async def lease_refresh(self, coordinator: str, ttl_ms: int) -> bool:
        return bool(
            await self._lease_refresh(keys=[self.keys.lease], args=[coordinator, str(ttl_ms)])
        )

    async def lease_release(self, coordinator: str) -> bool:
        return bool(await self._lease_release(keys=[self.keys.lease], args=[coordinator]))
