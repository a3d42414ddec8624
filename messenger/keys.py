"""Every Redis key and channel name the messenger uses, built from one prefix.

Layout (docs/protocol.md has the full description). Who may touch what is the point: clients
hold a Redis user that can only push to `requests`, read `users`, refresh heartbeat keys and
subscribe to inbox channels and `control` (docs/security.md); everything else is the
coordinator's alone.

    client-writable (RPUSH) or readable, public:
    {p}:requests        LIST  signed requests to the coordinator (clients push, cannot read)
    {p}:users           HASH  name -> JSON {"node", "since"}           the public user list (who)
    {p}:hb:{hb id}      STRING with a PX TTL, refreshed by its client   the heartbeat key
    {p}:inbox:{inbox id} CHANNEL replies and messages for one session
    {p}:control         CHANNEL coordinator -> every client (alive ticks, server stopping)
    {p}:presence        CHANNEL coordinator -> anyone: each logon and logoff, with its reason
    {p}:servers         HASH  coordinator id -> JSON {"host", "pid", "started", "until",
                        "active", "since"}: who serves and who stands by (status, health)
    {p}:canary:{id}     CHANNEL a coordinator's own subscription: gone means Redis restarted

    coordinator-only, private:
    {p}:inflight        LIST  the batch of requests being applied (taken over on a crash)
    {p}:sessions        HASH  sid -> JSON {"name", "node", "since", "key", "inbox", "hb"}
    {p}:names           HASH  name -> sid                                 one session per name
    {p}:nodes           HASH  node -> sid                                 one session per node
    {p}:deadlines       ZSET  `<sid>:<hb id>` scored by when to look at its heartbeat next (ms)
    {p}:gone:{sid}      STRING JSON {"key", "inbox"} of a removed session, for a while: its
                        client's late requests still get `you-are-not-logged-on`
    {p}:done:{req}      STRING the reply to a request already applied      makes requests idempotent
    {p}:rcpt:{req}      STRING `<receiver sid> <sender inbox>` of a message whose sender waits
                        for a receipt; only that receiver's `delivered` consumes it
    {p}:lease           STRING coordinator id with a PX TTL                 who is the active server
    {p}:coordinators    ZSET  coordinator id scored by until when it is alive (ms): the active
                        one and its standbys, so a coordinator that stops knows if one takes over
    {p}:acl             STRING fingerprint of the client users' rules       provisioned already?

Inbox and heartbeat ids are derived from the session's secret key (protocol.inbox_id,
protocol.heartbeat_id), so they are unguessable, and clients can list neither keys nor channels.
"""

from __future__ import annotations

from dataclasses import dataclass

# A field the user list always has (no user is named ""), so that it always exists as a hash.
USERS_PLACEHOLDER = ""


@dataclass(frozen=True)
class Keys:
    prefix: str = "messenger"

    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    @property
    def users(self) -> str:
        return f"{self.prefix}:users"

    @property
    def hb_prefix(self) -> str:
        return f"{self.prefix}:hb:"

    def hb(self, hb_id: str) -> str:
        return self.hb_prefix + hb_id

    @property
    def inbox_prefix(self) -> str:
        return f"{self.prefix}:inbox:"

    def inbox(self, inbox_id: str) -> str:
        return self.inbox_prefix + inbox_id

    @property
    def control(self) -> str:
        return f"{self.prefix}:control"

    @property
    def presence(self) -> str:
        return f"{self.prefix}:presence"

    @property
    def servers(self) -> str:
        return f"{self.prefix}:servers"

    def canary(self, coordinator_id: str) -> str:
        return f"{self.prefix}:canary:{coordinator_id}"

    @property
    def inflight(self) -> str:
        return f"{self.prefix}:inflight"

    @property
    def sessions(self) -> str:
        return f"{self.prefix}:sessions"

    @property
    def names(self) -> str:
        return f"{self.prefix}:names"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    @property
    def deadlines(self) -> str:
        return f"{self.prefix}:deadlines"

    @staticmethod
    def deadline_member(sid: str, hb_id: str) -> str:
        """A session's entry in `deadlines`: it names the heartbeat key, so the sweep need not
        read the session's record (scripts.deadline_member is the same in Lua)."""
        return f"{sid}:{hb_id}"

    @property
    def gone_prefix(self) -> str:
        return f"{self.prefix}:gone:"

    def gone(self, sid: str) -> str:
        return self.gone_prefix + sid

    def done(self, req_id: str) -> str:
        return f"{self.prefix}:done:{req_id}"

    @property
    def receipt_prefix(self) -> str:
        return f"{self.prefix}:rcpt:"

    def receipt(self, msg_id: str) -> str:
        return self.receipt_prefix + msg_id

    @property
    def lease(self) -> str:
        return f"{self.prefix}:lease"

    @property
    def coordinators(self) -> str:
        return f"{self.prefix}:coordinators"

    @property
    def acl(self) -> str:
        return f"{self.prefix}:acl"
