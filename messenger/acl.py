"""The Redis users clients get: what a client host may do, and nothing more (docs/security.md).

A client host holds a client credential, and its owner may use it with any Redis client, not
only `messenger`. So the credential must allow exactly what a client needs: push requests (not
read them), read the public user and server lists, subscribe to inbox channels (whose names are
secrets derived from session keys), `control` and `presence`, and refresh heartbeat keys (whose
names are secrets too). No PUBLISH, no EVAL, no KEYS/SCAN/PUBSUB/PSUBSCRIBE/MONITOR, nothing
of the coordinator's keys.

Redis 6.2 has no ACL selectors: a user's commands apply to all of its key patterns. A single user
allowed both RPUSH (on the queue) and PEXPIRE (on heartbeat keys) could PEXPIRE the queue away,
so the heartbeat gets a user of its own, `<client user>-hb`, with the same password: that user
can PEXPIRE keys under `{p}:hb:` and nothing else. Every command the client user has is harmless
on every key it may name: RPUSH on the user list (a hash, kept non-empty) or HGETALL on the
queue (a list) fails with WRONGTYPE.

The coordinator provisions both users when it becomes active, idempotently: a fingerprint of the
rules and the password, kept in a key only the coordinator can read, says whether they are in
place already, so a restart or a standby taking over does not rewrite them (rewriting a user's
channel rules can drop its connected subscribers).
"""

from __future__ import annotations

import hashlib
import json
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from redis.asyncio import Redis

from messenger.connection import Address, on_replicas
from messenger.keys import USERS_PLACEHOLDER, Keys

HEARTBEAT_SUFFIX = "-hb"
# What redis-py sends on connecting (SELECT, CLIENT SETNAME) and the pub/sub health PING.
_CONNECTION = ["+ping", "+select", "+client|setname"]


def client_user(prefix: str) -> str:
    """The client user of one messenger (one key prefix)."""
    return f"{prefix}-client"


def heartbeat_user(user: str) -> str:
    return user + HEARTBEAT_SUFFIX


def users_of(prefix: str) -> tuple[str, str]:
    return client_user(prefix), heartbeat_user(client_user(prefix))


def client_rules(keys: Keys) -> list[str]:
    return [
        "resetkeys",
        "resetchannels",
        "-@all",
        *_CONNECTION,
        "+rpush",
        "+hgetall",
        "+subscribe",
        "+unsubscribe",
        "+time",
        f"~{keys.requests}",
        f"~{keys.users}",
        f"~{keys.servers}",
        f"&{keys.inbox_prefix}*",
        f"&{keys.control}",
        f"&{keys.presence}",
    ]


def heartbeat_rules(keys: Keys) -> list[str]:
    return ["resetkeys", "resetchannels", "-@all", *_CONNECTION, "+pexpire", f"~{keys.hb_prefix}*"]


def heartbeat_url(url: str) -> str | None:
    """The URL of the heartbeat user that goes with a client URL; None if the URL names no
    user (then it is an operator's own credential, which may do everything anyway)."""
    parts = urlsplit(url)
    if not parts.username or parts.username == "default":
        return None
    user = quote(heartbeat_user(unquote(parts.username)), safe="")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    password = userinfo.partition(":")[2]  # as quoted in the URL
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{hostport}"))


def client_url(host: str, port: int, prefix: str, password: str, *, db: int = 0) -> str:
    user = quote(client_user(prefix), safe="")
    return f"redis://{user}:{quote(password, safe='')}@{host}:{port}/{db}"


def _fingerprint(keys: Keys, password: str) -> str:
    secret = hashlib.sha256(password.encode()).hexdigest()
    rules = {"client": client_rules(keys), "heartbeat": heartbeat_rules(keys), "pw": secret}
    return hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()


async def provision(redis: Redis, keys: Keys, password: str) -> bool:
    """Create or update the client users (a coordinator's admin connection); True if it had
    to. The password travels as its SHA-256 only."""
    user = client_user(keys.prefix)
    wanted = _fingerprint(keys, password)
    # The user list is a hash that is never empty, so a client's RPUSH can never turn it into
    # a list (which would make every logon fail with WRONGTYPE).
    await redis.hsetnx(keys.users, USERS_PLACEHOLDER, "{}")
    await redis.hsetnx(keys.servers, USERS_PLACEHOLDER, "{}")  # the same for the servers list
    in_place = await redis.get(keys.acl) == wanted
    if in_place and all([await redis.acl_getuser(u) for u in (user, heartbeat_user(user))]):
        return False
    for command in setuser_commands(keys, password):
        await redis.execute_command(*command)  # type: ignore[no-untyped-call]
    await redis.set(keys.acl, wanted)
    return True


def setuser_commands(keys: Keys, password: str) -> list[tuple[str, ...]]:
    """The ACL SETUSER of each client user, whole (`reset` first): the same on the primary and
    on every replica, since Redis replicates data but not ACL users."""
    user = client_user(keys.prefix)
    secret = "#" + hashlib.sha256(password.encode()).hexdigest()
    return [
        ("ACL", "SETUSER", name, "reset", "on", secret, *rules)
        for name, rules in (
            (user, client_rules(keys)),
            (heartbeat_user(user), heartbeat_rules(keys)),
        )
    ]


async def provision_replicas(
    redis: Redis, keys: Keys, password: str, timeout: float
) -> list[tuple[Address, str]]:
    """The client users on every replica the sentinels name ([] without Sentinel), so that a
    replica promoted by a failover lets the clients in at once, before a coordinator has
    served there: each replica's address, with "" or why it could not be done."""
    return await on_replicas(redis, setuser_commands(keys, password), timeout)
