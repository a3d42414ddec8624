"""The `messenger` command's entry point (the console script and `python -m messenger`).

`messenger message TO TEXT...` and `messenger logoff` are what people and scripts run most, and
all they do is one call to this node's client on its unix socket; importing click, redis and
asyncio for that would cost them some 200 ms of start-up. So in their plain form (their words,
and setting options written `--name VALUE` or `--name=VALUE`, anywhere) they run here, on
light modules only: `options`, `local`, `rules`, `settings`. Any other command line (another
command, --help, --version, -v, `--`, a word that starts with `-`, a value click would refuse)
goes to the click CLI in `cli`, whose `message` and `logoff` make the very same calls.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence

from messenger import local, options
from messenger.errors import MessengerError, NoConnection, NoResponse, Rejected
from messenger.settings import Settings

COMMANDS = ("message", "logoff")


class Plain:
    """A command line the light path runs: `command`, the setting options given before its
    name and after it (setting name -> value), and its other words (`message`: TO, TEXT...)."""

    __slots__ = ("after", "before", "command", "words")

    def __init__(
        self, command: str, before: dict[str, object], after: dict[str, object], words: list[str]
    ) -> None:
        self.command = command
        self.before = before
        self.after = after
        self.words = words


def parse(args: Sequence[str]) -> Plain | None:
    """The command line as the light path runs it, or None: then it is click's to run."""
    before: dict[str, object] = {}
    after: dict[str, object] = {}
    words: list[str] = []
    command: str | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            got = _option(args, i)
            if got is None:
                return None
            name, value, i = got
            (before if command is None else after)[name] = value
        elif command is None:
            if arg not in COMMANDS:
                return None
            command = arg
            i += 1
        else:
            words.append(arg)
            i += 1
    if command is None or (len(words) < 2 if command == "message" else len(words) > 0):
        return None  # click says what is missing or too much
    for option, kind in options.OPTIONS.items():
        # click reads a command's options from the environment when they are not given after
        # its name, and refuses a value of the wrong kind even if the same option was given
        # before the name: it says so, not this.
        raw = os.environ.get(options.envvar(option))
        if raw and options.setting(option) not in after and not options.accepts(kind, raw):
            return None
    return Plain(command, before, after, words)


def _option(args: Sequence[str], i: int) -> tuple[str, object, int] | None:
    """The setting option at args[i] (`--name VALUE` or `--name=VALUE`): its setting, its
    value and where the next argument is; None if it is not one, or its value is not plain."""
    option, equals, value = args[i].partition("=")
    kind = options.OPTIONS.get(option)
    if kind is None:
        return None
    if not equals:
        if i + 1 == len(args):
            return None
        i += 1
        value = args[i]
    if not value or value.startswith("-") or not options.accepts(kind, value):
        return None
    return options.setting(option), options.convert(kind, value), i + 1


def request(settings: Settings, command: str, words: Sequence[str]) -> dict[str, str]:
    """The request `messenger COMMAND WORDS...` makes of this node's client."""
    if command == "message":
        return local.message_request(settings, words[0], tuple(words[1:]))
    return {"op": "logoff"}


def call_client(settings: Settings, request: dict[str, str]) -> int:
    """Send `request` to this node's client and print its reply: the exit code."""
    reply, receipt, code = local.command(settings, request)
    if JSON.on:
        say_json({"reply": reply, **({"receipt": receipt} if receipt else {}), "exit": code})
        return code
    say_reply(reply, ok=code == 0 or bool(receipt))
    if receipt:
        say_reply(receipt, ok=code == 0)
    return code


def run(plain: Plain) -> int:
    settings = options.resolve(plain.before, plain.after)
    return call_client(settings, request(settings, plain.command, plain.words))


class JSON:
    """Whether this command prints JSON lines (`--json`, which only the click CLI takes)."""

    on = False


def say(line: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def say_json(obj: dict[str, object]) -> None:
    """One JSON object on one line of stdout: ASCII only (json escapes every control
    character and everything past ASCII; DEL too, here), so it cannot drive a terminal."""
    say(json.dumps(obj).replace("\x7f", "\\u007f"))


# The SGR codes rich writes for these styles (messenger.output colours the rest with rich; the
# light path writes these two itself rather than load rich for them).
_GREEN, _RED, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[0m"


def colour(stream: object) -> bool:
    """Whether `stream` gets colour: a terminal (not a dumb one), and no NO_COLOR (any value)."""
    isatty = getattr(stream, "isatty", None)
    return (
        isatty is not None
        and bool(isatty())
        and "NO_COLOR" not in os.environ
        and os.environ.get("TERM", "").lower() not in ("dumb", "unknown")
    )


def say_reply(word: str, *, ok: bool) -> None:
    """A reply word alone on its line: green if it did what was asked, red if not (on a colour
    terminal; `word` is escaped already)."""
    if colour(sys.stdout):
        word = f"{_GREEN if ok else _RED}{word}{_RESET}"
    say(word)


def guarded(command: Callable[[], int]) -> int:
    """Run a command to its exit code: a MessengerError becomes its words and its exit code,
    an OSError an `Error:` line, never a traceback. With --json, the outcome is also a JSON line
    on stdout (`{"reply", "exit", "error"}`, or `{"error", "exit"}` if it is no reply word)."""
    try:
        return command()
    except MessengerError as e:
        detail = getattr(e, "detail", "")
        if isinstance(e, (Rejected, NoConnection, NoResponse)):
            if JSON.on:
                say_json(
                    {"reply": e.message, "exit": e.exit_code}
                    | ({"error": detail} if detail else {})
                )
            else:
                say_reply(e.message, ok=False)
            if detail:
                say(f"messenger: {detail}", err=True)
        else:
            if JSON.on:
                say_json({"error": e.message, "exit": e.exit_code})
            say(f"Error: {e.message}", err=True)
        return e.exit_code
    except OSError as e:  # the machine said no: a path, a permission, a socket
        if JSON.on:
            say_json({"error": str(e), "exit": 1})
        say(f"Error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (`argv`, else sys.argv's) and exit with its code."""
    args = list(sys.argv[1:] if argv is None else argv)
    plain = parse(args)
    if plain is None:
        from messenger import cli  # click, redis, asyncio: only for what needs them

        cli.main(args)
    else:
        sys.exit(guarded(lambda: run(plain)))
