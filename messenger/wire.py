"""A pipeline for the coordinator's hot path, packed by hiredis.

redis-py's asyncio client packs every command in Python (its sync client uses hiredis's packer):
with a batch of scripts of 18 arguments each, packing was 38 % of the coordinator's CPU (py-spy,
docs/performance.md). This sends a batch of commands as one write packed by `hiredis`, then reads
the replies in order on the same pooled connection, exactly as redis-py's own pipeline does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ResponseError


async def pipeline(redis: Redis, commands: Sequence[Sequence[str]]) -> list[Any]:
    """Send `commands` in one write and return each reply, or the ResponseError it got, in
    order. A lost connection raises (and the connection is dropped, so no reply it still owes
    can be read by a later command)."""
    pool = redis.connection_pool
    conn = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        packed = b"".join(hiredis.pack_command(tuple(c)) for c in commands)  # type: ignore[arg-type]
        await conn.send_packed_command(packed)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response())
            except ResponseError as e:
                replies.append(e)
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)
    return replies
