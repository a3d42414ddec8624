"""A bot that logs on and answers every message with the same text.

    python examples/echo_bot.py echo --node bot-1      # beside a running `messenger server`

Then, from any logged-on node: `messenger message echo hello` and its user sees
`Message from echo: hello`. Configuration is the CLI's: MESSENGER_REDIS_URL and the other
MESSENGER_* variables, or the embedded server of this host. Ctrl-C logs the bot off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import messenger
from messenger.errors import MessengerError


async def echo(name: str, node: str | None) -> None:
    async with messenger.connect(name, node=node) as session:
        print(f"{session.name} is logged on at {session.node}", flush=True)
        async for msg in session:  # ends when logged off, or raises why the session ended
            reply = await session.send(msg.sender, msg.text)
            print(f"echoed to {msg.sender}: {reply}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="echo", help="the bot's user name")
    parser.add_argument("--node", help="its node (default: MESSENGER_NODE, else the host name)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a polite kill logs off too
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: connect() logs off on the way out
            asyncio.run(echo(args.name, args.node))
    except MessengerError as e:
        print(e.message, file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
