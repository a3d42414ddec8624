"""`messenger chat NAME`: this node's client with an input line (docs/chat.md).

The client runs exactly as `messenger logon` runs it (the same connections, the node socket for
`messenger message` and `logoff` from other terminals, SIGTERM is a logoff), with its messages
and the public presence events coming here instead of being printed as they are. On a terminal
(stdin and stdout both) a prompt_toolkit input line sits at the bottom and every incoming line
prints above it, never through what is being typed; anywhere else (pipes, scripts) it is a plain
line protocol, one command per input line, one reply per output line, optionally as JSON.

Nothing that came from Redis or another client reaches the terminal unescaped (`printable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prompt_toolkit import PromptSession, print_formatted_text
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout
from redis.exceptions import RedisError

from messenger import entry, local
from messenger.client import Client, format_message, list_users
from messenger.connection import explain
from messenger.errors import MessengerError, Rejected
from messenger.protocol import MessageEvent, PresenceEvent, Reply, User, printable
from messenger.settings import Settings

# How long a sent line waits for its receiver's receipt before it is left unmarked.
RECEIPT_MS = 30_000

HELP = """\
commands:
  @NAME TEXT        send TEXT to NAME (also /msg NAME TEXT)
  /query NAME       talk to NAME: a line without @ goes to NAME (/query alone: stop)
  /who              who is logged on, and where
  /logoff           log off and quit (also Ctrl-D; on a pipe, the end of input)
  /help             this
keys: Tab completes names and commands, Up/Down walk the history, Ctrl-C clears the line"""

COMMANDS = ("/msg", "/query", "/who", "/logoff", "/help")


@dataclass
class Parsed:
    """One input line: `op` is send, text (a line without @ or /: for the /query target),
    query (`to` "": end it), who, logoff, help, empty or error."""

    op: str
    to: str = ""
    text: str = ""
    error: str = ""


def parse(line: str) -> Parsed:
    line = line.strip()
    if not line:
        return Parsed("empty")
    if line.startswith("@"):
        to, _, text = line[1:].partition(" ")
        if not to or not text.strip():
            return Parsed("error", error="usage: @NAME TEXT")
        return Parsed("send", to=to, text=text.strip())
    if not line.startswith("/"):
        return Parsed("text", text=line)
    word, _, rest = line.partition(" ")
    if word == "/query":
        to, _, extra = rest.strip().partition(" ")
        if extra.strip():
            return Parsed("error", error="usage: /query NAME (or /query alone to stop)")
        return Parsed("query", to=to)
    if word == "/msg":
        to, _, text = rest.strip().partition(" ")
        if not to or not text.strip():
            return Parsed("error", error="usage: /msg NAME TEXT")
        return Parsed("send", to=to, text=text.strip())
    if word in ("/who", "/logoff", "/help"):
        return Parsed(word[1:])
    if word in ("/quit", "/exit"):
        return Parsed("logoff")
    return Parsed("error", error=f"unknown command {printable(word)}; /help lists the commands")


@dataclass
class Chat:
    """What both modes share: the client, who is on, and how a line is shown.

    `show(kind, text, fields)`: kind is one of message, presence, reply, receipt, who, query,
    info, error; `text` the plain (escaped) line; `fields` what --json prints.
    """

    client: Client
    show: Callable[[str, str, dict[str, Any]], None]
    query: str = ""  # whom a line without @ goes to (/query); "": nobody
    names: dict[str, str] = field(default_factory=dict)  # name -> node, for completion and /who
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def on_event(self, event: MessageEvent | PresenceEvent) -> None:
        if isinstance(event, MessageEvent):
            self.show(
                "message",
                format_message(event.sender, event.text),
                {"from": event.sender, "text": event.text},
            )
            self.client.acknowledge(event.msg_id)  # shown: that is its sender's `delivered`
            return
        fields = {  # as `who --watch --json` prints them (docs/cli-json.md)
            "event": event.kind,
            "name": event.name,
            "node": event.node,
            "at": event.at_ms,
            "reason": event.reason or None,
        }
        if event.kind == "logon":
            self.names[event.name] = event.node
            line = f"* {printable(event.name)} is on ({printable(event.node)})"
        else:
            if self.names.get(event.name) == event.node:
                del self.names[event.name]
            why = event.reason or "logoff"
            line = f"* {printable(event.name)} left ({printable(why)}, {printable(event.node)})"
        self.show("presence", line, fields)

    async def start(self, users: Iterable[User]) -> None:
        self.names.update((u.name, u.node) for u in users)
        self.client.release()  # what came with the logon, now that `logged-on` is shown

    async def who(self) -> None:
        """Who is on, from the public list now (what presence said, if Redis cannot say)."""
        try:
            got = await list_users(self.client.redis, self.client.settings.prefix)
        except (RedisError, OSError) as e:
            why = explain(e) if isinstance(e, RedisError) else str(e)
            self.show("error", f"could not read the list ({printable(why)})", {"error": why})
            listed = sorted(self.names.items())
        else:
            listed = [(u.name, u.node) for u in got.users]
            self.names.clear()
            self.names.update(listed)
        rows = [(printable(n), printable(node)) for n, node in listed]
        width = max((len(n) for n, _ in rows), default=0)
        text = "\n".join(f"  {n.ljust(width)}  {node}" for n, node in rows) or "  nobody"
        self.show("who", text, {"users": [{"name": n, "node": node} for n, node in listed]})

    def send(self, to: str, text: str, *, wait: bool) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._send(to, text, wait=wait))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _send(self, to: str, text: str, *, wait: bool) -> None:
        shown = f"{printable(to)}: {printable(text)}"
        fields: dict[str, Any] = {"to": to, "text": text}
        try:
            reply, receipt = await self.client.send_with_receipt(to, text, receipt_ms=RECEIPT_MS)
        except MessengerError as e:
            # The client stops on noconnection and the like: the chat then ends with its word.
            self.show("reply", f"→ {shown}  {e.message}", fields | {"reply": e.message})
            return
        self.show("reply", f"→ {shown}  {reply.value}", fields | {"reply": reply.value})
        if receipt is None:
            return
        receipt.add_done_callback(lambda f: self._receipt(shown, fields, f.result()))

    def _receipt(self, shown: str, fields: dict[str, Any], delivered: bool) -> None:
        # Never invented: True only when the receiver's own client said it showed the line.
        if not delivered and self.client.finished.done():
            return  # the chat is ending: its waits were cut short, nothing was learnt
        if delivered:
            self.show("receipt", f"✓ delivered {shown}", fields | {"receipt": "delivered"})
        else:
            self.show("receipt", f"? no receipt for {shown}", fields | {"receipt": "not-delivered"})

    async def logoff(self) -> None:
        await self.client.leave()


# --- running the client -------------------------------------------------------------------------


async def run(name: str, settings: Settings, *, as_json: bool = False) -> None:
    """Chat as NAME until logged off (returns) or until the client ends (raises its reason, the
    words and exit code `messenger logon` ends with)."""
    tty = not as_json and sys.stdin.isatty() and sys.stdout.isatty()
    local.ensure_runtime_dir(settings)
    if await local.client_alive(settings):
        raise Rejected(Reply.ALREADY_LOGGED_ON)
    ui: Terminal | Lines = Terminal() if tty else Lines(as_json)
    # Made as `messenger logon` makes it: the same Redis users and timeouts. What comes is
    # held until the chat is there to show it (Chat.start).
    client = Client.for_settings(settings, name, presence=True, hold=True)
    chat = Chat(client, ui.show)
    client.on_event = chat.on_event
    try:
        await client.logon()
        await client.start_serving()
        loop = asyncio.get_running_loop()
        # A polite kill is a logoff (on a pipe Ctrl-C too; on a terminal Ctrl-C is a key).
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(client.leave()))
        ui.show("reply", Reply.LOGGED_ON.value, {"op": "logon"})
        try:
            users = (await list_users(client.redis, settings.prefix)).users
        except Exception:  # completion and /who start from presence alone then
            users = []
        await chat.start(users)
        reason = await ui.run(chat)
    finally:
        ui.close()
        await client.close()
    if reason is not None:
        raise reason
    ui.show("reply", Reply.LOGGED_OFF.value, {"op": "logoff"})


async def _until_finished(chat: Chat, loop_body: asyncio.Task[None]) -> MessengerError | None:
    """Run the input loop until the client ends (logoff from here or elsewhere, or a fault)."""
    finished = chat.client.finished
    waits: set[asyncio.Future[Any]] = {finished, loop_body}
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if not finished.done():  # input ended (Ctrl-D, EOF, /logoff): log off
        await chat.logoff()
    loop_body.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await loop_body
    return await finished


async def _do(chat: Chat, line: str, *, wait: bool) -> bool:
    """One input line; False once it asked to log off."""
    p = parse(line)
    if p.op == "text" and not chat.query:
        p = Parsed("error", error="to send, start with @NAME (or /query NAME); /help says more")
    elif p.op == "text":
        p = Parsed("send", to=chat.query, text=p.text)
    if p.op == "send":
        task = chat.send(p.to, p.text, wait=wait)
        if wait:
            await task
    elif p.op == "query":
        chat.query = p.to
        if p.to:
            said = f"talking to {printable(p.to)}: a line without @ goes to them (/query to stop)"
        else:
            said = "no longer talking to anyone: start a line with @NAME to send"
        chat.show("query", said, {"to": p.to or None})
    elif p.op == "who":
        await chat.who()
    elif p.op == "help":
        chat.show("info", HELP, {"help": HELP})
    elif p.op == "logoff":
        return False
    elif p.op == "error":
        chat.show("error", p.error, {"error": p.error})
    return True


def _json_line(kind: str, text: str, fields: dict[str, Any]) -> dict[str, Any]:
    """What --json prints for a line (docs/chat.md): the conventions of docs/cli-json.md."""
    if kind == "reply" and "op" in fields:  # the logon's reply, and the outcome of the logoff
        return {"reply": text} | ({"exit": 0} if fields["op"] == "logoff" else {})
    if kind == "presence":
        return fields
    return {"event": kind, **fields}


class Lines:
    """Pipes and scripts: a line per command in, a line per reply out (or a JSON object)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def show(self, kind: str, text: str, fields: dict[str, Any]) -> None:
        try:
            if self.as_json:
                entry.say_json(_json_line(kind, text, fields))
            elif kind == "reply" and "op" in fields:  # logged-on, logged-off: as `logon` says them
                entry.say_reply(text, ok=True)
            elif kind == "reply":  # the reply word alone, as `messenger message` prints it
                entry.say_reply(printable(fields["reply"]), ok=fields["reply"] == Reply.SENT)
            elif kind == "receipt":
                to, said = printable(fields["to"]), printable(fields["text"])
                entry.say(f"{fields['receipt']} {to}: {said}")
            else:
                entry.say(text)
        except (BrokenPipeError, ValueError):
            pass  # whoever read stdout is gone; the chat ends with its input

    async def run(self, chat: Chat) -> MessengerError | None:
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def read() -> None:  # a daemon thread: a blocked read never holds the exit up
            for raw in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, raw)
            loop.call_soon_threadsafe(lines.put_nowait, None)

        threading.Thread(target=read, daemon=True, name="chat stdin").start()

        async def body() -> None:
            while (line := await lines.get()) is not None:
                # In order: a script reads each command's reply before the next is done (its
                # receipt, `delivered TO: TEXT`, comes whenever it comes).
                if not await _do(chat, line, wait=True):
                    return

        return await _until_finished(chat, asyncio.create_task(body()))

    def close(self) -> None:
        pass


class Terminal:
    """A person at a terminal: prompt_toolkit's input line at the bottom."""

    def __init__(self) -> None:
        pass

    def show(self, kind: str, text: str, fields: dict[str, Any]) -> None:
        style = {
            "presence": "fg:ansibrightblack",
            "receipt": "fg:ansigreen"
            if fields.get("receipt") == "delivered"
            else "fg:ansibrightblack",
            "error": "fg:ansired",
            "message": "bold",
        }.get(kind, "")
        if kind == "reply" and fields.get("reply", "sent") != "sent":
            style = "fg:ansired"
        # `text` is escaped already; print_formatted_text prints above a running prompt.
        print_formatted_text(FormattedText([(style, text)]))

    async def run(self, chat: Chat) -> MessengerError | None:
        session: PromptSession[str] = PromptSession(
            history=InMemoryHistory(),
            completer=NameCompleter(chat.names),
            complete_while_typing=False,
        )

        async def body() -> None:
            while True:
                # `alice> `, or `alice→bob> ` while a /query is on: where a plain line goes.
                to = f"→{printable(chat.query)}" if chat.query else ""
                try:
                    line = await session.prompt_async(f"{chat.client.name}{to}> ")
                except KeyboardInterrupt:
                    continue  # Ctrl-C clears the line, as in irssi and weechat
                except EOFError:
                    return  # Ctrl-D
                if not await _do(chat, line, wait=False):
                    return

        # Anything else printed meanwhile goes above the prompt too: stdout, and the log lines
        # (a reconnection's warnings) whose handler holds the real stderr.
        with patch_stdout(raw=True):
            handlers = [
                (h, h.stream)
                for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and h.stream is sys.__stderr__
            ]
            for handler, _ in handlers:
                handler.setStream(sys.stderr)
            try:
                return await _until_finished(chat, asyncio.create_task(body()))
            finally:
                for handler, stream in handlers:
                    handler.setStream(stream)

    def close(self) -> None:
        pass


class NameCompleter(Completer):
    """Tab: logged-on names after `@`, `/msg ` or `/query `, command names after `/`."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        before = document.text_before_cursor
        if before.startswith("@") and " " not in before:
            word, prefix = before[1:], "@"
            choices: Iterable[str] = sorted(self.names)
        elif before.startswith(("/msg ", "/query ")) and before.count(" ") == 1:
            word, prefix = before.split(" ", 1)[1], ""
            choices = sorted(self.names)
        elif before.startswith("/") and " " not in before:
            word, prefix, choices = before, "", COMMANDS
        else:
            return
        for choice in choices:
            if choice.startswith(word) and choice.isprintable():
                yield Completion(choice + " ", start_position=-len(word), display=prefix + choice)
