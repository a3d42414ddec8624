"""Every Redis key and channel name the messenger uses, built from one prefix.

Layout (docs/protocol.md has the full description):

    {p}:sessions        HASH  sid -> JSON {"name", "node", "since"}     the user list
    {p}:names           HASH  name -> sid                                 one session per name
    {p}:nodes           HASH  node -> sid                                 one session per node
    {p}:deadlines       ZSET  sid scored by heartbeat deadline (ms)       what the sweep reads
    {p}:hb:{sid}        STRING with a PX TTL, refreshed by the client      the heartbeat key
    {p}:requests        STREAM of requests to the coordinator (consumer group "coordinators")
    {p}:done:{req}      STRING the reply to a request already applied      makes requests idempotent
    {p}:lease           STRING coordinator id with a PX TTL                 who is the active server
    {p}:inbox:{sid}     CHANNEL replies and messages for one session
    {p}:control         CHANNEL coordinator -> every client (server stopping)
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "coordinators"


@dataclass(frozen=True)
class Keys:
    prefix: str = "messenger"

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

    @property
    def hb_prefix(self) -> str:
        return f"{self.prefix}:hb:"

    def hb(self, sid: str) -> str:
        return self.hb_prefix + sid

    @property
    def requests(self) -> str:
        return f"{self.prefix}:requests"

    def done(self, req_id: str) -> str:
        return f"{self.prefix}:done:{req_id}"

    @property
    def lease(self) -> str:
        return f"{self.prefix}:lease"

    @property
    def inbox_prefix(self) -> str:
        return f"{self.prefix}:inbox:"

    def inbox(self, sid: str) -> str:
        return self.inbox_prefix + sid

    @property
    def control(self) -> str:
        return f"{self.prefix}:control"
