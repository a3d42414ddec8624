"""What the click commands print: colour on a terminal only (rich), JSON lines for `--json`.

Colour: rich, and only where stdout (or stderr, for what goes there) is a terminal that is not
`TERM=dumb`, and `NO_COLOR` is not set (to any value, empty too); never on a pipe or a file,
whatever FORCE_COLOR says. Everything that came from outside this process (Redis, this node's
client) is escaped by `printable` first and handed to rich as `Text`, never as markup, so no
`[bold]` in a name or a message can style anything, nor an escape sequence reach the terminal.

JSON: one object per line on stdout (docs/cli-json.md), ASCII only, so a text's control
characters arrive escaped by JSON (`\\u001b`) and raw to whoever decodes it.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from messenger import entry
from messenger.rules import printable

OK_STYLE = "green"
REFUSED_STYLE = "red"


def console(stream: TextIO | None = None) -> Console:
    """A rich console on `stream` (stdout) that colours only a real colour terminal."""
    stream = stream if stream is not None else sys.stdout
    tty = entry.colour(stream)
    return Console(
        file=stream,
        force_terminal=tty,
        no_color=not tty,
        color_system="auto" if tty else None,
        highlight=False,
        markup=False,
        emoji=False,
        soft_wrap=True,  # a long line stays one line: rich must not break what it prints
    )


def say(text: Text | str, *, err: bool = False) -> None:
    """One line on stdout (or stderr); `text` is plain text or a Text, never markup."""
    stream = sys.stderr if err else sys.stdout
    console(stream).print(text if isinstance(text, Text) else Text(text), end="\n")
    stream.flush()


def say_json(obj: dict[str, Any]) -> None:
    entry.say_json(obj)


def reply(word: str, *, ok: bool) -> None:
    """A reply word alone on a line, green or red on a colour terminal (escaped already)."""
    entry.say_reply(word, ok=ok)


def message_line(sender: str, text: str) -> Text:
    """The seed's `Message from NAME: TEXT`, the sender bold, both escaped."""
    return Text.assemble("Message from ", (printable(sender), "bold"), ": ", printable(text))


def local_time(ms: int | None) -> str:
    """A time in ms since the epoch as this host's local time (`2026-12-02 13:04:05`)."""
    if ms is None:
        return "?"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def iso_time(seconds: float) -> str:
    """A time as ISO 8601 with milliseconds and the UTC offset, for JSON log records."""
    when = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return when.isoformat(timespec="milliseconds")


def ago(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "?"
    return f"{max(0, now_ms - ms) // 1000} s ago"


def header(*cells: str) -> Text:
    return Text("  ".join(cells), style="bold")


class JsonFormatter(logging.Formatter):
    """Each log record as one JSON object: time, level, logger, message (and the traceback as
    `exc`, when there is one). JSON escapes what the message holds, so no line can be forged."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj).replace("\x7f", "\\u007f")
