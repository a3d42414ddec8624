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

import json
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
-- The public presence channel ('': say nothing), set by each script from its arguments.
local PRESENCE = ''
-- A logon or logoff, for anyone listening: only what the public user list shows (name, node,
-- when) and why it ended, never a session's id, key or inbox. Built by hand where the name and
-- node are what the rules allow (protocol.NAME_RULE, NODE_RULE), by cjson otherwise.
local function announce(kind, name, node, now, reason)
  if PRESENCE == '' then return end
  local event
  if string.match(name, '^[%w_.-]+$') and string.match(node, '^[%w_.@-]+$') then
    event = '{"t":"presence","ev":"' .. kind .. '","name":"' .. name .. '","node":"' .. node
            .. '","at":"' .. now .. '"'
    if reason then event = event .. ',"reason":"' .. reason .. '"' end
    event = event .. '}'
  else
    event = cjson.encode({t = 'presence', ev = kind, name = name, node = node,
                          at = tostring(now), reason = reason})
  end
  redis.call('PUBLISH', PRESENCE, event)
end
-- Remove one session from every index; names/nodes/users entries are only removed if they
-- still point at this sid, so an old session can never take a newer owner's entry with it.
-- Its key and inbox are kept for a while under gone:<sid>, so that its client's late
-- requests can still be verified and told `you-are-not-logged-on`. `reason` (protocol.REASONS)
-- goes out on the presence channel if the user left the user list.
local function remove_session(sessions, names, nodes, users, deadlines, sid, gone, gone_ttl,
                              reason, now)
  local raw = redis.call('HGET', sessions, sid)
  if not raw then return nil end
  local s = record(raw)
  local name, node = s.name or '?', s.node or '?'
  if redis.call('HGET', names, name) == sid then
    redis.call('HDEL', names, name)
    redis.call('HDEL', users, name)
    announce('logoff', name, node, now, reason)
  end
  if redis.call('HGET', nodes, node) == sid then redis.call('HDEL', nodes, node) end
  redis.call('HDEL', sessions, sid)
  -- Its deadline: `<sid>:<heartbeat id>` (deadline_member), or the bare sid of older versions.
  if s.hb then redis.call('ZREM', deadlines, deadline_member(sid, s.hb)) end
  redis.call('ZREM', deadlines, sid)
  -- (When the server stops, its clients have just been told so: a heartbeat key deleted under
  -- them could make one say `you-are-not-logged-on` instead of `noconnection`. Those keys
  -- expire within a TTL.)
  if s.hb and reason ~= 'server' then redis.call('DEL', s.hb) end
  if s.key and s.inbox then
    redis.call('SET', gone .. sid, cjson.encode({key = s.key, inbox = s.inbox}), 'PX', gone_ttl)
  end
  return {name = name, node = node}
end
"""

# KEYS[1] lease, [2] sessions, [3] names, [4] nodes, [5] users, [6] deadlines, [7] requests,
# [8] inflight, then the `done` key of each request, in order.
# ARGV[1] coordinator id, [2] now ms or '', [3] gone-key prefix, [4] gone ttl ms, [5] max ms in
# the future, [6] entries to trim from inflight, [7] most entries to take, [8] most bytes to take,
# [9] longest entry, [10] control channel, [11] alive event, [12] requests n, [13] refusals m,
# [14] presence channel, [15] receipt-key prefix; then m pairs (inbox, refusal event) and the n
# requests, each: kind ('L', 'M', 'W', 'O' or 'D'), req id, sent ms, max age ms, reply channel,
# sid, then the kind's own:
#   L: name, node, heartbeat ttl ms, key, heartbeat key;  M: the sender's name, to, text as a
#   JSON string;  W (a message whose sender waits for a receipt): as M, then the receipt's ttl
#   ms;  O: none;  D (a receipt): the message's id.
#
# One batch of the coordinator's, all in one atomic step: apply its requests in order, publish
# its refusals, forget (trim) the entries it came from, and take the next batch. So a batch
# is either applied and forgotten, or not at all (then it stays in flight for the next try), and
# the coordinator needs one round trip a batch. Returns {n, reply 1..n, dropped, replaced,
# entry...}: each reply is the request's word, `expired`, or `!` and the error it failed with (the
# others still apply); then how many oversized entries the take dropped, how many dead sessions
# its logons removed (presence reason `replaced`), and the next batch's entries.
_BATCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER this coordinator does not hold the lease')
end
local S, NAMES, NODES, USERS, DEADLINES = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now = now_ms(ARGV[2])
local gone, gone_ttl, skew = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
PRESENCE = ARGV[14]
local RECEIPTS = ARGV[15]

-- Built by hand, not by cjson: req ids are hex and replies are fixed words (protocol.py).
local function reply_event(req, word)
  return '{"t":"reply","req":"' .. req .. '","r":"' .. word .. '"}'
end

-- A session whose client holds no subscription on its inbox any more is dead for good: Redis
-- drops a closed connection's subscriptions at once, and clients never resubscribe. Clearing it
-- here (not only at its deadline) lets a node or name whose client crashed log on again at once,
-- while a hung client (its connection still open) keeps its session until the sweep.
-- An index entry whose session is gone is stale: the new session's entries overwrite it.
local replaced = 0  -- dead sessions a logon removed (taken), for the coordinator's metrics
local function taken(owner)
  if not owner then return false end
  local raw = redis.call('HGET', S, owner)
  if not raw then return false end
  local inbox = record(raw).inbox
  if inbox and redis.call('PUBSUB', 'NUMSUB', inbox)[2] > 0 then return true end
  if remove_session(S, NAMES, NODES, USERS, DEADLINES, owner, gone, gone_ttl, 'replaced', now) then
    replaced = replaced + 1
  end
  return false
end

local function logon(sid, name, node, ttl, key, inbox, hb)
  if redis.call('HEXISTS', S, sid) == 1 or taken(redis.call('HGET', NODES, node)) then
    return 'already-logged-on'
  elseif taken(redis.call('HGET', NAMES, name)) then
    return 'user-exists-at-other-node'
  end
  redis.call('HSET', S, sid, cjson.encode({name=name, node=node, since=now,
                                            key=key, inbox=inbox, hb=hb}))
  redis.call('HSET', NAMES, name, sid)
  redis.call('HSET', NODES, node, sid)
  redis.call('HSET', USERS, name, cjson.encode({node=node, since=now}))
  redis.call('ZADD', DEADLINES, now + ttl, deadline_member(sid, hb))
  redis.call('SET', hb, '1', 'PX', ttl)
  announce('logon', name, node, now)
  return 'logged-on'
end

-- The receiver's inbox from its record: the field itself, found without decoding the record
-- (names, nodes and keys cannot hold a quote, so `"inbox":"` only begins that field), or the
-- decoded record's where that fails (an escaped character, an odd record).
local function inbox_of(raw)
  return string.match(raw, '"inbox":"([^"%\\\\]+)"') or record(raw).inbox
end

-- The sender's name comes from the coordinator (from the session's record or its logon): the
-- session only has to be there still. With `receipt_ttl` the sender waits for a receipt: the
-- message carries its id (the request's), and `rcpt:<id>` remembers, for that long, which
-- session it went to and where the receipt goes; only that session can consume it (delivered).
local function message(sid, req, reply_to, from, to, text_json, receipt_ttl)
  if redis.call('HEXISTS', S, sid) == 0 then return 'you-are-not-logged-on' end
  local to_sid = redis.call('HGET', NAMES, to)
  local to_raw = to_sid and redis.call('HGET', S, to_sid)
  local inbox = to_raw and inbox_of(to_raw)
  if not inbox then return 'receiver-not-found' end
  -- A name is letters, digits and `_.-` (protocol.NAME_RULE), so it needs no JSON escaping;
  -- one that is not (a corrupt record) is not quoted.
  if not string.match(from, '^[%w_.-]+$') then from = '?' end
  local id = ''
  if receipt_ttl then id = ',"id":"' .. req .. '"' end
  local event = '{"t":"msg","from":"' .. from .. '","text":' .. text_json .. id .. '}'
  local n = redis.call('PUBLISH', inbox, event)
  -- PUBLISH counts the subscribers that got it: 0 means the receiver's client is gone,
  -- and a message that reached nobody is never reported sent.
  if n == 0 then return 'receiver-not-found' end
  if receipt_ttl then
    redis.call('SET', RECEIPTS .. req, to_sid .. ' ' .. reply_to, 'PX', receipt_ttl)
  end
  return 'sent'
end

-- A receipt: session `sid` says it showed message `msg`. Told to the message's sender only if
-- the message went to this very session (a session that did not get it cannot make one up)
-- and the sender still waits; once. No reply and no `done` key: a receipt answers nothing.
local function delivered(sid, msg)
  local raw = redis.call('GET', RECEIPTS .. msg)
  if not raw then return 'no-receipt' end
  local to_sid, sender_inbox = string.match(raw, '^(%x+) (.+)$')
  if to_sid ~= sid then return 'not-yours' end
  redis.call('DEL', RECEIPTS .. msg)
  redis.call('PUBLISH', sender_inbox, '{"t":"receipt","msg":"' .. msg .. '"}')
  return 'delivered'
end

local function logoff(sid)
  if remove_session(S, NAMES, NODES, USERS, DEADLINES, sid, gone, gone_ttl, 'logoff', now) then
    return 'logged-off'
  end
  return 'not-logged-on'
end

-- One request, applied at most once (its `done` key remembers the reply), and only while its
-- sender still waits for it and if it does not claim to come from the future.
local function apply(done_key, at)
  local kind, req, reply_to = ARGV[at], ARGV[at + 1], ARGV[at + 4]
  if kind == 'D' then return delivered(ARGV[at + 5], ARGV[at + 6]) end
  local done = redis.call('GET', done_key)
  if done then
    if done ~= 'expired' then redis.call('PUBLISH', reply_to, reply_event(req, done)) end
    return done
  end
  local max_age = tonumber(ARGV[at + 3])
  local done_ttl = 2 * max_age + 1000
  local age = now - tonumber(ARGV[at + 2])
  if age > max_age or -age > skew then
    redis.call('SET', done_key, 'expired', 'PX', done_ttl)
    return 'expired'
  end
  local sid, reply = ARGV[at + 5], nil
  if kind == 'L' then
    reply = logon(sid, ARGV[at + 6], ARGV[at + 7], tonumber(ARGV[at + 8]), ARGV[at + 9],
                  reply_to, ARGV[at + 10])
  elseif kind == 'M' then
    reply = message(sid, req, reply_to, ARGV[at + 6], ARGV[at + 7], ARGV[at + 8])
  elseif kind == 'W' then
    reply = message(sid, req, reply_to, ARGV[at + 6], ARGV[at + 7], ARGV[at + 8],
                    tonumber(ARGV[at + 9]))
  else
    reply = logoff(sid)
  end
  redis.call('SET', done_key, reply, 'PX', done_ttl)
  redis.call('PUBLISH', reply_to, reply_event(req, reply))
  return reply
end

local n, m = tonumber(ARGV[12]), tonumber(ARGV[13])
local out, at, logged_on = {n}, 16 + 2 * m, false
local width = {L = 11, M = 9, W = 10, O = 6, D = 7}
for r = 1, n do
  local ok, reply = pcall(apply, KEYS[8 + r], at)
  if not ok then
    reply = '!' .. tostring(type(reply) == 'table' and reply.err or reply)
  elseif reply == 'logged-on' then
    logged_on = true
  end
  table.insert(out, reply)
  at = at + (width[ARGV[at]] or 6)
end
for i = 16, 15 + 2 * m, 2 do redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
-- A tick, so that new clients learn at once how long they may go without one.
if logged_on and ARGV[11] ~= '' then redis.call('PUBLISH', ARGV[10], ARGV[11]) end

local trim = tonumber(ARGV[6])
if trim > 0 then redis.call('LTRIM', KEYS[8], trim, -1) end

-- The next batch: what is in flight already (left by a coordinator that died, or moved in by
-- BLMOVE, the coordinator's wait for work, unchecked), then entries moved from the queue.
-- Bounded by count and bytes, and an entry longer than any valid request is dropped here,
-- unread by the coordinator.
local most, budget, longest = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local dropped_at, dropped, seen, entries = #out + 1, 0, 0, 0
table.insert(out, 0)
table.insert(out, replaced)
if most > 0 then
  for i, e in ipairs(redis.call('LRANGE', KEYS[8], 0, most - 1)) do
    if #e > longest then
      redis.call('LSET', KEYS[8], i - 1, ''); e = ''; dropped = dropped + 1
    end
    table.insert(out, e); seen = seen + #e; entries = entries + 1
  end
  while entries < most and seen < budget do
    local e = redis.call('LPOP', KEYS[7])
    if not e then break end
    seen = seen + #e
    if #e > longest then
      dropped = dropped + 1
    else
      redis.call('RPUSH', KEYS[8], e); table.insert(out, e); entries = entries + 1
    end
  end
end
out[dropped_at] = dropped
return out
"""

# KEYS[1] lease, [2] sessions, [3] names, [4] nodes, [5] users, [6] deadlines
# ARGV[1] coordinator id, [2] now ms or '', [3] limit, [4] gone-key prefix, [5] gone ttl ms,
# [6] heartbeat-key prefix, [7] presence channel
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
PRESENCE = ARGV[7]
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
                             ARGV[4], tonumber(ARGV[5]), 'timeout', now)
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
# channel or '', [5] presence channel, then pairs of sid, inbox.
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
PRESENCE = ARGV[5]
local now = now_ms(nil)
local out = {}
for i = 6, #ARGV, 2 do
  local sid, inbox = ARGV[i], ARGV[i + 1]
  local raw = redis.call('HGET', KEYS[2], sid)
  local what, name, node = 'gone', '', ''
  if raw and record(raw).inbox == inbox then
    if redis.call('PUBSUB', 'NUMSUB', inbox)[2] > 0 then
      what = 'alive'
    else
      local s = remove_session(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], sid,
                               ARGV[2], tonumber(ARGV[3]), 'crash', now)
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

# KEYS[1] lease, [2] control channel, [3] coordinators, [4] servers
# ARGV[1] coordinator id, [2] ttl ms, [3] alive event, [4] what the coordinator says of itself
# (a JSON object: host, pid, started).
# Every coordinator, active or standby, says here that it is alive until now + ttl. Then it takes
# the lease if nobody holds it, renews it if it holds it; returns 1 if it holds it now, and then
# the tick tells every client that a coordinator is there. The public `servers` hash says the
# same for `messenger status` and `health` (clients cannot read the lease): each coordinator's
# entry, its `until` and whether it is the active one (and since when, Redis's clock), written
# in the same step as the lease itself, so `active` with a future `until` means the lease is held.
_LEASE_HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[3], until_ms, ARGV[1])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('HDEL', KEYS[4], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
-- Never empty, so a client's RPUSH cannot make it a list (acl.py: a client may name it).
redis.call('HSETNX', KEYS[4], '', '{}')
local holder = redis.call('GET', KEYS[1])
local since = ''
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  since = now
elseif holder == ARGV[1] then
  since = string.match(redis.call('HGET', KEYS[4], ARGV[1]) or '', '"since":"(%d+)"') or now
end
local active = 'false'
if since ~= '' then active = 'true' end
redis.call('HSET', KEYS[4], ARGV[1], '{"until":"' .. until_ms .. '","active":' .. active
           .. ',"since":"' .. since .. '",' .. string.sub(ARGV[4], 2))
if holder and holder ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 1
"""

# KEYS[1] lease, [2] control channel, [3] coordinators, [4] servers; ARGV[1] coordinator id,
# [2] stopping event. A coordinator that stops leaves the list; if it held the lease it gives it
# up, and tells the clients to stop only when no standby is there to take over (then a standby takes
# the lease at its next poll, and the clients never notice). Returns the standbys alive, or -1
# if this coordinator did not hold the lease (it says nothing to anyone then).
_LEASE_RELEASE = """
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local standbys = redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf')
if standbys == 0 then redis.call('PUBLISH', KEYS[2], ARGV[2]) end
return standbys
"""


# KEYS[1] lease, [2] sessions, [3] names, [4] nodes, [5] users, [6] deadlines, [7] coordinators
# ARGV[1] limit, [2] gone-key prefix, [3] gone ttl ms, [4] presence channel.
# The last coordinator has stopped (and told every client so): its sessions end with it, so
# the user list does not show users whose clients are gone. Up to `limit` sessions a call;
# returns how many were removed, or -1 (removing nobody) if a coordinator is there again.
_CLEAR = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('ZCOUNT', KEYS[7], '(' .. now, '+inf') > 0 then
  return -1
end
PRESENCE = ARGV[4]
local n = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[6], 0, tonumber(ARGV[1]) - 1)) do
  local sid = string.match(member, '^([^:]+)')
  remove_session(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], sid, ARGV[2], tonumber(ARGV[3]),
                 'server', now)
  redis.call('ZREM', KEYS[6], member)
  n = n + 1
end
return n
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


_KIND_CODES = {"logon": "L", "message-to": "M", "logoff": "O", "delivered": "D"}


@dataclass(frozen=True)
class Batch:
    """What one batch script did: the reply of each request (its word, `expired`, or the error
    it failed with), and the next batch taken: its entries, and how many were dropped."""

    replies: list[str | ResponseError]
    dropped: int
    entries: list[str]
    replaced: int = 0  # dead sessions its logons removed


@dataclass(frozen=True)
class Job:
    """One request to apply: where its reply goes, how old it may be (`timeout_ms`) and how far
    in the future (`skew_ms`), and for a logon the session's heartbeat TTL."""

    request: Request
    reply_to: str
    timeout_ms: int
    skew_ms: int
    ttl_ms: int
    # A message's sender's name, as the coordinator knows it from the session's record or its
    # logon ("": not known, so the session is gone and the message is not sent).
    sender: str = ""


class Scripts:
    """The scripts registered on one redis client; each method is one round trip."""

    def __init__(self, redis: Redis, keys: Keys, *, gone_ttl_ms: int = 300_000) -> None:
        self._redis = redis
        self.keys = keys
        self.gone_ttl_ms = gone_ttl_ms

        self._batch = redis.register_script(_PRELUDE + _BATCH)
        self._sweep = redis.register_script(_PRELUDE + _SWEEP)
        self._crashed = redis.register_script(_PRELUDE + _CRASHED)
        self._grant = redis.register_script(_GRANT)
        self._lease_hold = redis.register_script(_LEASE_HOLD)
        self._lease_release = redis.register_script(_LEASE_RELEASE)
        self._clear = redis.register_script(_PRELUDE + _CLEAR)

    def _indexes(self) -> list[str]:
        """The KEYS of the scripts that remove sessions (sweep, crashed)."""
        k = self.keys
        return [k.lease, k.sessions, k.names, k.nodes, k.users, k.deadlines]

    @staticmethod
    def _now(now: int | None) -> str:
        return "" if now is None else str(now)

    def _request_args(self, job: Job) -> list[str]:
        """One request's arguments in a batch (see _BATCH)."""
        r = job.request
        args = [
            _KIND_CODES[r.kind],
            r.req,
            str(r.sent_ms),
            str(job.timeout_ms),
            job.reply_to,
            r.sid,
        ]
        if r.kind == "logon":
            args += [r.name, r.node, str(job.ttl_ms), r.key, self.keys.hb(heartbeat_id(r.key))]
        elif r.kind == "message-to":
            # The script puts it in the message event as it is: JSON-encoded here, once.
            args += [job.sender, r.to, json.dumps(r.text, ensure_ascii=False)]
            if r.receipt_ms:
                args[0] = "W"
                args.append(str(r.receipt_ms))
        elif r.kind == "delivered":
            args.append(r.msg)
        return args

    async def batch(
        self,
        coordinator: str,
        jobs: Sequence[Job] = (),
        *,
        refusals: Sequence[tuple[str, str]] = (),
        trim: int = 0,
        most: int = 0,
        budget: int = 0,
        longest: int = 0,
        alive: str = "",
        now: int | None = None,
    ) -> Batch:
        """One round trip (see _BATCH): publish `refusals` (inbox, event), apply `jobs` in
        order, forget the first `trim` entries in flight, then take up to `most` entries (and
        `budget` bytes) as the next batch. Raises LeaseLost if this coordinator does not hold
        the lease: then nothing was done (the script checks it first)."""
        k = self.keys
        keys = [k.lease, k.sessions, k.names, k.nodes, k.users, k.deadlines, k.requests]
        keys += [k.inflight, *(k.done(job.request.req) for job in jobs)]
        args = [
            coordinator,
            self._now(now),
            k.gone_prefix,
            str(self.gone_ttl_ms),
            str(jobs[0].skew_ms if jobs else 0),
            str(trim),
            str(most),
            str(budget),
            str(longest),
            k.control,
            alive,
            str(len(jobs)),
            str(len(refusals)),
            k.presence,
            k.receipt_prefix,
            *(item for pair in refusals for item in pair),
        ]
        for job in jobs:
            args += self._request_args(job)
        command = ["EVALSHA", self._batch.sha, str(len(keys)), *keys, *args]
        # Packed by hiredis (messenger/wire.py): a batch is hundreds of arguments.
        (flat,) = await wire.pipeline(self._redis, [command])
        if isinstance(flat, NoScriptError):
            # A Redis that restarted or failed over has an empty script cache (and a fresh one
            # before the first use). Nothing ran: the same batch is sent again.
            await self._redis.script_load(self._batch.script)
            (flat,) = await wire.pipeline(self._redis, [command])
        if isinstance(flat, ResponseError):
            if str(flat).startswith("NOTLEADER"):
                raise LeaseLost("this coordinator no longer holds the lease")
            raise flat
        items = [_text(v) for v in cast(Sequence[Any], flat)]
        n = int(items[0])
        replies: list[str | ResponseError] = [
            ResponseError(word[1:]) if word.startswith("!") else word for word in items[1 : n + 1]
        ]
        return Batch(replies, int(items[n + 1]), items[n + 3 :], int(items[n + 2]))

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
                    k.presence,
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
                        k.presence,
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
        got = await self.batch(coordinator, most=most, budget=budget, longest=longest)
        return got.dropped, got.entries

    async def finish(self, coordinator: str, applied: int) -> None:
        """Forget the first `applied` entries in flight: they are done."""
        await self.batch(coordinator, trim=applied)

    async def lease_hold(
        self, coordinator: str, ttl_ms: int, alive: str, about: str = "{}"
    ) -> bool:
        """Say this coordinator is alive (and `about` it, a JSON object, in the public servers
        hash); take or renew the lease (and tick). False if another coordinator holds it."""
        k = self.keys
        return bool(
            await self._lease_hold(
                keys=[k.lease, k.control, k.coordinators, k.servers],
                args=[coordinator, str(ttl_ms), alive, about],
            )
        )

    async def lease_release(self, coordinator: str, stopping: str) -> int:
        """Leave; give the lease up if held, publishing `stopping` only if no standby is left.
        Returns the standbys alive, or -1 if this coordinator did not hold the lease."""
        k = self.keys
        return int(
            await self._lease_release(
                keys=[k.lease, k.control, k.coordinators, k.servers], args=[coordinator, stopping]
            )
        )

    async def clear(self, limit: int = 100) -> int:
        """After the last coordinator stopped: remove up to `limit` sessions (see _CLEAR);
        returns how many, or -1 if a coordinator is there again."""
        k = self.keys
        return int(
            await self._clear(
                keys=[*self._indexes(), k.coordinators],
                args=[str(limit), k.gone_prefix, str(self.gone_ttl_ms), k.presence],
            )
        )
