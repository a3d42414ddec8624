"""The Lua scripts that change the user list, each one atomic step in Redis.

Every check-then-write happens inside one script, so no race between two logons (or two
coordinators) can slip between the check and the write. Times come from Redis's own clock
(`TIME`) unless a caller passes `now` explicitly (unit tests with a fake clock), so hosts with
skewed clocks still agree on every deadline.

Request scripts share one frame: they refuse to act unless the caller holds the coordinator
lease (a fencing token: a paused old coordinator cannot act after losing it), they apply each
request at most once (a `done` key remembers the reply), and they do not apply a request that is
older than its sender's wait (its sender has given up) or that claims to come from the future.
The reply is published to the sender's inbox from inside the script, so a reply always matches
what was applied. Only the coordinator runs these: clients have no right to EVAL anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from messenger import wire
from messenger.crashes import RedisRestarted
from messenger.errors import LeaseLost
from messenger.keys import Keys
from messenger.protocol import Request, heartbeat_id

# Every request script gets the same KEYS, so that the prelude can name them:
# KEYS[1] lease, [2] done key, [3] sessions, [4] names, [5] nodes, [6] users, [7] deadlines.
# ARGV[1] coordinator id, [2] req id, [3] sent ms, [4] max age ms, [5] max ms in the future,
# [6] done ttl ms, [7] now ms or '', [8] reply channel, [9] gone-key prefix, [10] gone ttl ms;
# then the kind's own arguments from ARGV[11].
_PRELUDE = """
local function now_ms(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function record(raw)
  -- A corrupt entry must not make a script fail: every field is checked before use.
  local ok, s = pcall(cjson.decode, raw)
  if not ok or type(s) ~= 'table' then s = {} end
  for _, f in ipairs({'name', 'node', 'key', 'inbox', 'hb'}) do
    if type(s[f]) ~= 'string' then s[f] = nil end
  end
  return s
end
-- A session's entry in the deadlines ZSET names its heartbeat key too, so that the sweep can
-- look at the key without reading (and decoding) the session's record: `<sid>:<heartbeat id>`.
local function deadline_member(sid, hb_key)
  return sid .. ':' .. string.match(hb_key, '([^:]+)$')
end
-- Remove one session from every index; names/nodes/users entries are only removed if they
-- still point at this sid, so an old session can never take a newer owner's entry with it.
-- Its key and inbox are kept for a while under gone:<sid>, so that its client's late
-- requests can still be verified and told `you-are-not-logged-on`.
local function remove_session(sessions, names, nodes, users, deadlines, sid, gone, gone_ttl)
  local raw = redis.call('HGET', sessions, sid)
  if not raw then return nil end
  local s = record(raw)
  local name, node = s.name or '?', s.node or '?'
  if redis.call('HGET', names, name) == sid then
    redis.call('HDEL', names, name)
    redis.call('HDEL', users, name)
  end
  if redis.call('HGET', nodes, node) == sid then redis.call('HDEL', nodes, node) end
  redis.call('HDEL', sessions, sid)
  -- Its deadline: `<sid>:<heartbeat id>` (deadline_member), or the bare sid of older versions.
  if s.hb then redis.call('ZREM', deadlines, deadline_member(sid, s.hb)) end
  redis.call('ZREM', deadlines, sid)
  if s.hb then redis.call('DEL', s.hb) end
  if s.key and s.inbox then
    redis.call('SET', gone .. sid, cjson.encode({key = s.key, inbox = s.inbox}), 'PX', gone_ttl)
  end
  return {name = name, node = node}
end
"""

_REQUEST_HEAD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER this coordinator does not hold the lease')
end
local done = redis.call('GET', KEYS[2])
if done then
  if done ~= 'expired' then
    redis.call('PUBLISH', ARGV[8], cjson.encode({t='reply', req=ARGV[2], r=done}))
  end
  return done
end
local now = now_ms(ARGV[7])
local age = now - tonumber(ARGV[3])
if age > tonumber(ARGV[4]) or -age > tonumber(ARGV[5]) then
  redis.call('SET', KEYS[2], 'expired', 'PX', ARGV[6])
  return 'expired'
end
local gone, gone_ttl = ARGV[9], tonumber(ARGV[10])
local reply
"""

_REQUEST_TAIL = """
redis.call('SET', KEYS[2], reply, 'PX', ARGV[6])
redis.call('PUBLISH', ARGV[8], cjson.encode({t='reply', req=ARGV[2], r=reply}))
return reply
"""

# ARGV[11] sid, [12] name, [13] node, [14] heartbeat ttl ms, [15] key, [16] inbox channel,
# [17] heartbeat key
_LOGON = """
local sid, name, node, ttl = ARGV[11], ARGV[12], ARGV[13], tonumber(ARGV[14])
-- A session whose client holds no subscription on its inbox any more is dead for good: Redis
-- drops a closed connection's subscriptions at once, and clients never resubscribe. Clearing it
-- here (not only at its deadline) lets a node or name whose client crashed log on again at once,
-- while a hung client (its connection still open) keeps its session until the sweep.
-- An index entry whose session is gone is stale: the new session's entries overwrite it.
local function taken(owner)
  if not owner then return false end
  local raw = redis.call('HGET', KEYS[3], owner)
  if not raw then return false end
  local inbox = record(raw).inbox
  if inbox and redis.call('PUBSUB', 'NUMSUB', inbox)[2] > 0 then return true end
  remove_session(KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], owner, gone, gone_ttl)
  return false
end
if redis.call('HEXISTS', KEYS[3], sid) == 1 or taken(redis.call('HGET', KEYS[5], node)) then
  reply = 'already-logged-on'
elseif taken(redis.call('HGET', KEYS[4], name)) then
  reply = 'user-exists-at-other-node'
else
  redis.call('HSET', KEYS[3], sid, cjson.encode({name=name, node=node, since=now,
                                                 key=ARGV[15], inbox=ARGV[16], hb=ARGV[17]}))
  redis.call('HSET', KEYS[4], name, sid)
  redis.call('HSET', KEYS[5], node, sid)
  redis.call('HSET', KEYS[6], name, cjson.encode({node=node, since=now}))
  redis.call('ZADD', KEYS[7], now + ttl, deadline_member(sid, ARGV[17]))
  redis.call('SET', ARGV[17], '1', 'PX', ttl)
  reply = 'logged-on'
end
"""

# ARGV[11] sid, [12] to, [13] text
_MESSAGE = """
local raw = redis.call('HGET', KEYS[3], ARGV[11])
if not raw then
  reply = 'you-are-not-logged-on'
else
  local to_sid = redis.call('HGET', KEYS[4], ARGV[12])
  local to_raw = to_sid and redis.call('HGET', KEYS[3], to_sid)
  local inbox = to_raw and record(to_raw).inbox
  if not inbox then
    reply = 'receiver-not-found'
  else
    local n = redis.call('PUBLISH', inbox,
                         cjson.encode({t='msg', from=record(raw).name or '?', text=ARGV[13]}))
    -- PUBLISH counts the subscribers that got it: 0 means the receiver's client is gone,
    -- and a message that reached nobody is never reported sent.
    if n > 0 then reply = 'sent' else reply = 'receiver-not-found' end
  end
end
"""

# ARGV[11] sid
_LOGOFF = """
if remove_session(KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[11], gone, gone_ttl) then
  reply = 'logged-off'
else
  reply = 'not-logged-on'
end
"""

# KEYS[1] lease, [2] sessions, [3] names, [4] nodes, [5] users, [6] deadlines
# ARGV[1] coordinator id, [2] now ms or '', [3] limit, [4] gone-key prefix, [5] gone ttl ms,
# [6] heartbeat-key prefix
# Looks only at the sessions that are due, at most `limit` of them: one whose heartbeat key
# still lives is due again when that key would expire (its PTTL); one whose key is gone is logged
# off. So the cost grows with the sessions due, not with all sessions, and clients write nothing
# but their own key. A live session costs a PTTL and its share of one ZADD: its deadline's
# member names its heartbeat key, so its record is not read (every live session is due about
# every TTL - interval, so this is most of what the sweep does). The caller keeps the limit
# small and calls again while a call comes back full: Redis serves nobody else while a script
# runs. Returns {looked at, sid, name, node, ...}: how many were due, then the sessions removed.
_SWEEP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER this coordinator does not hold the lease')
end
local now = now_ms(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out, again = {#due}, {}
for _, member in ipairs(due) do
  local sid, hb_id = string.match(member, '^([^:]+):([^:]+)$')
  local hb
  if sid then
    hb = ARGV[6] .. hb_id
  else  -- a deadline of an older version: the member is the sid
    sid = member
    local raw = redis.call('HGET', KEYS[2], sid)
    hb = raw and record(raw).hb
  end
  local left = hb and redis.call('PTTL', hb) or -2
  if left > 0 then
    table.insert(again, now + left); table.insert(again, member)
  else
    local s = remove_session(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], sid,
                             ARGV[4], tonumber(ARGV[5]))
    redis.call('ZREM', KEYS[6], member)
    if s then
      table.insert(out, sid); table.insert(out, s.name); table.insert(out, s.node)
    end
  end
end
if #again > 0 then redis.call('ZADD', KEYS[6], unpack(again)) end
return out
"""

# KEYS[1] lease, [2] sessions, [3] names, [4] nodes, [5] users, [6] deadlines
# ARGV[1] coordinator id, [2] gone-key prefix, [3] gone ttl ms, [4] the coordinator's canary
# channel or '', then pairs of sid, inbox.
# The crash fast path (messenger/crashes.py): each suspect is removed only if it still is that
# session and its inbox still has no subscriber, checked here atomically, and only while the
# canary still has its subscriber: a Redis that restarted since the suspects were found has
# every inbox empty, and nobody is judged by it. Returns {sid, what, name, node, ...}: what is
# 'crashed' (removed), 'gone' (no such session) or 'alive'.
_CRASHED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER this coordinator does not hold the lease')
end
if ARGV[4] ~= '' and redis.call('PUBSUB', 'NUMSUB', ARGV[4])[2] == 0 then
  return redis.error_reply('NOCANARY the canary subscription is gone')
end
local out = {}
for i = 5, #ARGV, 2 do
  local sid, inbox = ARGV[i], ARGV[i + 1]
  local raw = redis.call('HGET', KEYS[2], sid)
  local what, name, node = 'gone', '', ''
  if raw and record(raw).inbox == inbox then
    if redis.call('PUBSUB', 'NUMSUB', inbox)[2] > 0 then
      what = 'alive'
    else
      local s = remove_session(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], sid,
                               ARGV[2], tonumber(ARGV[3]))
      what, name, node = 'crashed', s.name, s.node
    end
  end
  table.insert(out, sid); table.insert(out, what); table.insert(out, name)
  table.insert(out, node)
end
return out
"""

# KEYS[1] lease, then heartbeat keys; ARGV[1] coordinator id, [2] ms to add.
# After Redis was away, nobody could refresh a heartbeat key meanwhile: each key still alive gets
# that time back (never a new key, never less than it had), so its client has its whole TTL to
# come back. Returns how many keys were extended.
_GRANT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER this coordinator does not hold the lease')
end
local n = 0
for i = 2, #KEYS do
  local left = redis.call('PTTL', KEYS[i])
  if left > 0 then
    redis.call('PEXPIRE', KEYS[i], left + tonumber(ARGV[2])); n = n + 1
  end
end
return n
"""

# KEYS[1] lease, [2] requests, [3] inflight
# ARGV[1] coordinator id, [2] most entries, [3] most bytes, [4] longest entry
# The next batch: what is in flight already (left by a coordinator that died, or being
# retried), then entries moved from the queue. Bounded by count and bytes, and an entry longer
# than any valid request is dropped here, unread by the coordinator. Returns {dropped, ...}.
_TAKE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER this coordinator does not hold the lease')
end
local most, budget, longest = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out, dropped, seen = {0}, 0, 0
for i, e in ipairs(redis.call('LRANGE', KEYS[3], 0, most - 1)) do
  -- BLMOVE (the coordinator's wait for work) moves one entry in unchecked
  if #e > longest then
    redis.call('LSET', KEYS[3], i - 1, ''); e = ''; dropped = dropped + 1
  end
  table.insert(out, e); seen = seen + #e
end
while #out <= most and seen < budget do
  local e = redis.call('LPOP', KEYS[2])
  if not e then break end
  seen = seen + #e
  if #e > longest then
    dropped = dropped + 1
  else
    redis.call('RPUSH', KEYS[3], e); table.insert(out, e)
  end
end
out[1] = dropped
return out
"""

# KEYS[1] lease, [2] inflight; ARGV[1] coordinator id, [2] how many were applied
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER this coordinator does not hold the lease')
end
redis.call('LTRIM', KEYS[2], tonumber(ARGV[2]), -1)
return 1
"""

# KEYS[1] lease, [2] control channel, [3] coordinators
# ARGV[1] coordinator id, [2] ttl ms, [3] alive event.
# Every coordinator, active or standby, says here that it is alive until now + ttl. Then it takes
# the lease if nobody holds it, renews it if it holds it; returns 1 if it holds it now, and then
# the tick tells every client that a coordinator is there.
_LEASE_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif holder ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"""

# KEYS[1] lease, [2] control channel, [3] coordinators; ARGV[1] coordinator id, [2] stopping
# event. A coordinator that stops leaves the list; if it held the lease it gives it up, and
# tells the clients to stop only when no standby is there to take over (then a standby takes
# the lease at its next poll, and the clients never notice). Returns the standbys alive, or -1
# if this coordinator did not hold the lease (it says nothing to anyone then).
_LEASE_RELEASE = """
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local standbys = redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf')
if standbys == 0 then redis.call('PUBLISH', KEYS[2], ARGV[2]) end
return standbys
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _rows(flat: Sequence[Any], width: int) -> list[list[str]]:
    """A script's flat reply {a1, b1, a2, b2, ...} cut into rows of `width` strings."""
    items = [_text(v) for v in flat]
    return [items[i : i + width] for i in range(0, len(items), width)]


async def _run(script: AsyncScript, keys: list[str], args: list[str]) -> Any:
    try:
        return await script(keys=keys, args=args)
    except ResponseError as e:
        if str(e).startswith("NOTLEADER"):
            raise LeaseLost("this coordinator no longer holds the lease") from None
        raise


@dataclass(frozen=True)
class Job:
    """One request to apply: where its reply goes, how old it may be (`timeout_ms`) and how far
    in the future (`skew_ms`), and for a logon the session's heartbeat TTL."""

    request: Request
    reply_to: str
    timeout_ms: int
    skew_ms: int
    ttl_ms: int


class Scripts:
    """The scripts registered on one redis client; each method is one round trip."""

    def __init__(self, redis: Redis, keys: Keys, *, gone_ttl_ms: int = 300_000) -> None:
        self._redis = redis
        self.keys = keys
        self.gone_ttl_ms = gone_ttl_ms

        def frame(body: str) -> str:
            return _PRELUDE + _REQUEST_HEAD + body + _REQUEST_TAIL

        self._logon = redis.register_script(frame(_LOGON))
        self._message = redis.register_script(frame(_MESSAGE))
        self._logoff = redis.register_script(frame(_LOGOFF))
        self._sweep = redis.register_script(_PRELUDE + _SWEEP)
        self._crashed = redis.register_script(_PRELUDE + _CRASHED)
        self._grant = redis.register_script(_GRANT)
        self._take = redis.register_script(_TAKE)
        self._finish = redis.register_script(_FINISH)
        self._lease_hold = redis.register_script(_LEASE_HOLD)
        self._lease_release = redis.register_script(_LEASE_RELEASE)

    def _indexes(self) -> list[str]:
        """The KEYS of the scripts that remove sessions (sweep, crashed)."""
        k = self.keys
        return [k.lease, k.sessions, k.names, k.nodes, k.users, k.deadlines]

    @staticmethod
    def _now(now: int | None) -> str:
        return "" if now is None else str(now)

    def _request_call(
        self, coordinator: str, job: Job, now: int | None
    ) -> tuple[AsyncScript, list[str], list[str]]:
        """The script, keys and arguments that apply one request."""
        k, r = self.keys, job.request
        keys = [k.lease, k.done(r.req), k.sessions, k.names, k.nodes, k.users, k.deadlines]
        args = [
            coordinator,
            r.req,
            str(r.sent_ms),
            str(job.timeout_ms),
            str(job.skew_ms),
            str(2 * job.timeout_ms + 1000),
            self._now(now),
            job.reply_to,
            k.gone_prefix,
            str(self.gone_ttl_ms),
            r.sid,
        ]
        if r.kind == "logon":
            script = self._logon
            args += [
                r.name,
                r.node,
                str(job.ttl_ms),
                r.key,
                job.reply_to,
                k.hb(heartbeat_id(r.key)),
            ]
        elif r.kind == "message-to":
            script = self._message
            args += [r.to, r.text]
        else:
            script = self._logoff
        return script, keys, args

    async def requests(
        self, coordinator: str, jobs: Sequence[Job], now: int | None = None
    ) -> list[str | ResponseError]:
        """Apply many requests in order, in one round trip (a pipeline of EVALSHAs): the reply
        word (or `expired`) of each, or the error it failed with. Raises LeaseLost if this
        coordinator does not hold the lease (then none was applied: each script checks it)."""
        calls = [self._request_call(coordinator, job, now) for job in jobs]
        commands = [
            ["EVALSHA", script.sha, str(len(keys)), *keys, *args] for script, keys, args in calls
        ]
        for attempt in (1, 2):
            results = await wire.pipeline(self._redis, commands)
            if attempt == 1 and any(isinstance(res, NoScriptError) for res in results):
                # A Redis that restarted or failed over has an empty script cache (and a
                # fresh one before the first use). The requests whose script did run are
                # replays the second time: their `done` keys make them no-ops.
                for script in {id(c[0]): c[0] for c in calls}.values():
                    await self._redis.script_load(script.script)
                continue
            break
        out: list[str | ResponseError] = []
        for res in results:
            if isinstance(res, ResponseError):
                if str(res).startswith("NOTLEADER"):
                    raise LeaseLost("this coordinator no longer holds the lease")
                out.append(res)
            elif isinstance(res, Exception):
                raise res  # a lost connection: the batch stays in flight for the next try
            else:
                out.append(_text(res))
        return out

    async def sweep(
        self, coordinator: str, limit: int = 100, now: int | None = None
    ) -> tuple[int, list[tuple[str, str, str]]]:
        """Look at up to `limit` due sessions (see _SWEEP); returns how many were due, and
        (sid, name, node) of those logged off. Fewer than `limit` due: none is left."""
        k = self.keys
        flat = cast(
            Sequence[Any],
            await _run(
                self._sweep,
                keys=self._indexes(),
                args=[
                    coordinator,
                    self._now(now),
                    str(limit),
                    k.gone_prefix,
                    str(self.gone_ttl_ms),
                    k.hb_prefix,
                ],
            ),
        )
        removed = [(sid, name, node) for sid, name, node in _rows(flat[1:], 3)]
        return int(flat[0]), removed

    async def crashed(
        self, coordinator: str, suspects: Sequence[tuple[str, str]], canary: str = ""
    ) -> list[tuple[str, str, str, str]]:
        """Remove the suspects (sid, inbox) whose inbox still has no subscriber; returns
        (sid, what, name, node) for each: what is `crashed`, `gone` or `alive`. Raises
        RedisRestarted, removing nobody, if `canary` (unless "") has no subscriber."""
        k = self.keys
        try:
            flat = cast(
                Sequence[Any],
                await _run(
                    self._crashed,
                    keys=self._indexes(),
                    args=[
                        coordinator,
                        k.gone_prefix,
                        str(self.gone_ttl_ms),
                        canary,
                        *(item for pair in suspects for item in pair),
                    ],
                ),
            )
        except ResponseError as e:
            if str(e).startswith("NOCANARY"):
                raise RedisRestarted(
                    "Redis lost this coordinator's subscription (it restarted or failed over)"
                ) from None
            raise
        return [(sid, what, name, node) for sid, what, name, node in _rows(flat, 4)]

    async def grant(self, coordinator: str, hb_keys: Sequence[str], ms: int) -> int:
        """Give every heartbeat key still alive `ms` more (see _GRANT)."""
        keys = [self.keys.lease, *hb_keys]
        return int(await _run(self._grant, keys=keys, args=[coordinator, str(ms)]))

    async def take(
        self, coordinator: str, *, most: int, budget: int, longest: int
    ) -> tuple[int, list[str]]:
        """The next batch of request entries, and how many oversized ones were dropped."""
        k = self.keys
        flat = cast(
            Sequence[Any],
            await _run(
                self._take,
                keys=[k.lease, k.requests, k.inflight],
                args=[coordinator, str(most), str(budget), str(longest)],
            ),
        )
        return int(flat[0]), [_text(v) for v in flat[1:]]

    async def finish(self, coordinator: str, applied: int) -> None:
        """Forget the first `applied` entries in flight: they are done."""
        k = self.keys
        await _run(self._finish, keys=[k.lease, k.inflight], args=[coordinator, str(applied)])

    async def lease_hold(self, coordinator: str, ttl_ms: int, alive: str) -> bool:
        """Say this coordinator is alive; take or renew the lease (and tick). False if another
        coordinator holds it."""
        k = self.keys
        return bool(
            await self._lease_hold(
                keys=[k.lease, k.control, k.coordinators], args=[coordinator, str(ttl_ms), alive]
            )
        )

    async def lease_release(self, coordinator: str, stopping: str) -> int:
        """Leave; give the lease up if held, publishing `stopping` only if no standby is left.
        Returns the standbys alive, or -1 if this coordinator did not hold the lease."""
        k = self.keys
        return int(
            await self._lease_release(
                keys=[k.lease, k.control, k.coordinators], args=[coordinator, stopping]
            )
        )
