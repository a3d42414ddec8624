"""The `messenger` command: thin click wiring over Coordinator, Client and the local socket."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from click.core import ParameterSource
from redis.exceptions import RedisError
from rich.text import Text

from messenger import __version__, acl, entry, local, options, output, private, status
from messenger.client import Client, UserList, list_users
from messenger.connection import connect, describe, redact, resolve_url, server_file
from messenger.coordinator import Coordinator
from messenger.embedded import EmbeddedRedis
from messenger.errors import ConfigError, MessengerError, NoConnection, NoResponse, Rejected
from messenger.options import Kind
from messenger.protocol import MessageEvent, PresenceEvent, Reply, User, printable, validate_name
from messenger.settings import Settings
from messenger.spinner import Spinner

if TYPE_CHECKING:
    from messenger.metrics import Metrics, MetricsServer

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("messenger")


# The help of each setting option (messenger/options.py has them all, what each takes and how
# they resolve). Each may come before the command's name or after it (`messenger --node n1 who`
# = `messenger who --node n1`), and each reads MESSENGER_<NAME> from the environment.
_HELP: dict[str, str] = {
    "--redis-url": "Redis to use (redis://[[user]:password@]host:port[/db], or rediss:// for "
    "TLS; redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db] "
    "for the primary that Redis Sentinels name). Default: the embedded Redis of a "
    "`messenger server` on this host.",
    "--node": "This node's name (default: the host name).",
    "--prefix": "Prefix of every Redis key (default: messenger).",
    "--heartbeat-interval": "Seconds between a client's heartbeats (default 1).",
    "--heartbeat-ttl": "Seconds without a heartbeat before a client is logged off (default 3).",
    "--reply-timeout": "Seconds to wait for the server's reply (default 5).",
    "--runtime-dir": "Directory for node sockets and the embedded server's address.",
    "--tls-ca-file": "PEM CA certificate(s) to verify a rediss:// Redis's certificate with "
    "(besides the system's CAs).",
    "--tls-cert-file": "PEM client certificate for a rediss:// Redis that requires one "
    "(with --tls-key-file).",
    "--tls-key-file": "PEM private key (unencrypted) of --tls-cert-file.",
}
_TYPES: dict[Kind, Any] = {
    Kind.TEXT: None,
    Kind.SECONDS: float,
    Kind.DIR: click.Path(file_okay=False, path_type=Path),
    Kind.FILE: click.Path(dir_okay=False, path_type=Path),
}


def _add_options(func: F, *, envvar: bool) -> F:
    for option, kind in reversed(options.OPTIONS.items()):
        kwargs: dict[str, Any] = {"type": _TYPES[kind], "help": _HELP[option]}
        if envvar:
            kwargs |= {"envvar": options.envvar(option), "show_envvar": True}
        func = click.option(option, default=None, **kwargs)(func)
    return click.option("-v", "--verbose", is_flag=True, help="Log more.")(func)


def common_options(func: F) -> F:
    """The settings options of a command: given after the command's name, they win over the
    same option given before it (on the group), which wins over the environment."""
    func = _add_options(func, envvar=True)

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        ctx = click.get_current_context()
        before = ctx.parent.params if ctx.parent is not None else {}
        after = {}
        for name in options.NAMES:
            value = kwargs.pop(name)
            # Not typed: read from the environment by click (which checked it), or None;
            # resolve() reads the environment itself.
            if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE:
                after[name] = value
        kwargs["verbose"] = bool(kwargs["verbose"] or before.get("verbose"))
        kwargs["settings"] = options.resolve(before, after)
        return func(**kwargs)

    return wrapper  # type: ignore[return-value]


def echo(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


def json_option(func: F) -> F:
    """`--json`: one JSON object per line on stdout, the outcome included (docs/cli-json.md)."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print JSON objects, one per line (docs/cli-json.md).",
    )(func)


def _json(on: bool) -> None:
    entry.JSON.on = on


class OneLineFormatter(logging.Formatter):
    """Every log record is one line, with control characters escaped: names, texts and error
    messages that came from Redis or a client can neither forge log lines nor drive a terminal.
    (A traceback, appended after the message, keeps its lines.)"""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def _setup_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if entry.JSON.on:  # --json: each record a JSON object (time, level, logger, message)
        handler.setFormatter(output.JsonFormatter())
    else:
        handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="messenger")
@functools.partial(_add_options, envvar=False)
def cli(**_settings: Any) -> None:
    """A robust messenger: one coordinator, one client per node, Redis in between.

    Replies are the Erlang seed's words, each alone on a line. Exit codes: 0 done, 1 refused
    (e.g. receiver-not-found), 2 bad input, 3 noconnection, 4 No response from server.

    Options may come before the command or after it: `messenger --node n1 who` is
    `messenger who --node n1`. Each also reads MESSENGER_<NAME> from the environment.
    """


@cli.command()
# The server's own options (like `who --json`), not settings every command shares.
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    envvar="MESSENGER_METRICS_PORT",
    show_envvar=True,
    help="Serve Prometheus metrics over HTTP on this port (0: one the OS picks, logged). "
    "Default: no metrics.",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    envvar="MESSENGER_METRICS_HOST",
    show_envvar=True,
    help="Address the metrics server listens on (0.0.0.0: every interface).",
)
@json_option
@common_options
def server(
    *,
    as_json: bool,
    settings: Settings,
    verbose: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run the coordinator (the seed's server).

    With no Redis URL it starts an embedded redis-server on 127.0.0.1 and publishes its address
    for the clients of this host, so they need no configuration. --json: its log records (on
    stderr) are JSON objects.
    """
    _json(as_json)
    _setup_logging(logging.DEBUG if verbose else logging.INFO)
    embedded: EmbeddedRedis | None = None
    path = server_file(settings)
    url = settings.redis_url
    # First of all: a port that cannot be had is refused before anything is started.
    metrics, metrics_server = _start_metrics(metrics_host, metrics_port)
    try:
        if url is None and settings.tls is not None:
            # Refused before anything starts: the embedded Redis speaks plain TCP on 127.0.0.1.
            raise ConfigError(
                "--tls-ca-file, --tls-cert-file and --tls-key-file need a rediss:// "
                "--redis-url; the embedded Redis does not use TLS"
            )
        client_password = settings.client_password
        if url is None:
            local.ensure_runtime_dir(settings)
            _refuse_second_embedded(settings)
            # Two credentials: the coordinator's own (the embedded Redis's admin password, kept
            # in this process only) and the clients' (in the server file, for this host's
            # clients). docs/security.md says why they differ.
            embedded = EmbeddedRedis().start()
            url = embedded.url
            client_password = client_password or secrets.token_hex(16)
            clients_url = acl.client_url(
                "127.0.0.1", embedded.port, settings.prefix, client_password
            )
            private.write_file(
                path,
                json.dumps({"url": clients_url, "pid": os.getpid(), "redis_pid": embedded.pid}),
            )
            log.info(
                "embedded redis-server (pid %d) on 127.0.0.1:%d; address in %s",
                embedded.pid,
                embedded.port,
                path,
            )
        redis = connect(url, socket_timeout=max(5.0, settings.reply_timeout), tls=settings.tls)
        coordinator = Coordinator(redis, settings, client_password=client_password, metrics=metrics)
        asyncio.run(_serve(coordinator))
    finally:
        if metrics_server is not None:
            metrics_server.close()
        if embedded is not None:
            path.unlink(missing_ok=True)
            embedded.stop()
            log.info("embedded redis-server stopped")


def _start_metrics(host: str, port: int | None) -> tuple[Metrics | None, MetricsServer | None]:
    """The coordinator's metrics and their HTTP server, or (None, None) without a port."""
    if port is None:
        return None, None
    # Imported here: prometheus-client is the server's alone, and only with --metrics-port.
    from messenger.metrics import Metrics

    metrics = Metrics()
    try:
        metrics_server = metrics.serve(host, port)
    except OSError as e:
        # A name that does not resolve, or an address that is not this host's, is the host's
        # fault; anything else (taken, privileged) the port's.
        blame = (
            "--metrics-host (or MESSENGER_METRICS_HOST)"
            if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL
            else "--metrics-port (or MESSENGER_METRICS_PORT)"
        )
        why = e.strerror or str(e)
        raise ConfigError(f"{blame}: cannot listen on {host!r} port {port}: {why}") from None
    shown_host, shown_port = metrics_server.address
    if ":" in shown_host:
        shown_host = f"[{shown_host}]"
    log.info("metrics on http://%s:%d/metrics", shown_host, shown_port)
    return metrics, metrics_server


def _refuse_second_embedded(settings: Settings) -> None:
    """One embedded Redis per runtime directory: a second would orphan the first's clients."""
    try:
        url = resolve_url(settings)
    except MessengerError:
        return  # no server file (or an unreadable one, which start-up will replace)

    async def alive() -> bool:
        redis = connect(url, socket_timeout=1.0, tls=settings.tls)
        try:
            return bool(await redis.ping())
        except RedisError:
            return False  # a file left by a server that died
        finally:
            await redis.aclose()

    if asyncio.run(alive()):
        raise ConfigError(
            f"a messenger server with an embedded Redis already runs on this host (see "
            f"{server_file(settings)}); stop it, or pass its --redis-url to use the same Redis"
        )


async def _serve(coordinator: Coordinator) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await coordinator.run(stop)
    finally:
        await coordinator.redis.aclose()


@cli.command()
@click.argument("name")
@json_option
@common_options
def logon(name: str, *, as_json: bool, settings: Settings, verbose: bool) -> None:
    """Log NAME on at this node and stay in the foreground.

    Prints the server's reply, then every incoming message as `Message from NAME: TEXT`, until
    logged off (`messenger logoff`, Ctrl-C) or stopped.
    """
    _json(as_json)
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    validate_name(name)
    asyncio.run(_logon(name, settings))


def _show_message(event: MessageEvent) -> None:
    if entry.JSON.on:
        output.say_json({"event": "message", "from": event.sender, "text": event.text})
    else:
        output.say(output.message_line(event.sender, event.text))


async def _logon(name: str, settings: Settings) -> None:
    local.ensure_runtime_dir(settings)

    def on_event(event: MessageEvent | PresenceEvent) -> None:
        if isinstance(event, MessageEvent):
            _show_message(event)
            client.acknowledge(event.msg_id)  # printed: that is its sender's `delivered`

    spinner = Spinner("logging on").start()
    try:
        if await local.client_alive(settings):
            raise Rejected(Reply.ALREADY_LOGGED_ON)
        # Held until `logged-on` is printed: a message may come with the logon.
        client = Client.for_settings(settings, name, on_event=on_event, hold=True)
    except BaseException:
        spinner.stop()
        raise
    try:
        try:
            await client.logon()
            # Ready for `message` and `logoff` before anyone can see `logged-on` and use them.
            await client.start_serving()
        finally:
            spinner.stop()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Ctrl-C or a polite kill is a logoff, not a crash (installed before anyone can
            # see `logged-on` and react to it).
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(client.leave()))
        if entry.JSON.on:
            output.say_json({"reply": Reply.LOGGED_ON.value})
        else:
            output.reply(Reply.LOGGED_ON, ok=True)
        client.release()  # a message that came with the logon prints after it
        reason = await client.finished
    finally:
        await client.close()
    if reason is not None:
        raise reason
    if entry.JSON.on:
        output.say_json({"reply": Reply.LOGGED_OFF.value, "exit": 0})
    else:
        output.reply(Reply.LOGGED_OFF, ok=True)


@cli.command()
@click.argument("name")
@json_option
@common_options
def chat(name: str, *, as_json: bool, settings: Settings, verbose: bool) -> None:
    """Log NAME on at this node and chat: an input line at the bottom, messages above it.

    `@bob hello` or `/msg bob hello` sends (the reply shows next to the line, then a
    `delivered` mark once bob's client has shown it); /who, /help, /logoff (or Ctrl-D).
    Tab completes names, Up recalls history, Ctrl-C clears the line. `messenger message` and
    `logoff` from other terminals of this node still work. On a pipe (stdin or stdout not a
    terminal): one command per input line, the reply words alone on their lines, the end of
    input logs off. Ends, and exits, as `messenger logon` does. --json: line mode, every
    output line a JSON object (docs/chat.md lists them). See docs/chat.md.
    """
    from messenger import chat as chat_mode  # prompt_toolkit: only for this command

    _json(as_json)
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    validate_name(name)
    asyncio.run(chat_mode.run(name, settings, as_json=as_json))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("to")
@click.argument("text", nargs=-1, required=True)
@click.option(
    "--wait",
    is_flag=True,
    help="After `sent`, wait for the receiver's client to show the message: prints "
    "`delivered`, or `not-delivered` (exit 1) when --wait-timeout passes first.",
)
@click.option(
    "--wait-timeout",
    type=click.FloatRange(min=0.001, max=3600.0),
    default=None,
    metavar="SECONDS",
    help="How long --wait waits for the receipt after `sent` (default: the reply timeout). "
    "Implies --wait.",
)
@json_option
@common_options
def message(
    to: str,
    text: tuple[str, ...],
    *,
    wait: bool,
    wait_timeout: float | None,
    as_json: bool,
    settings: Settings,
    verbose: bool,
) -> None:
    """Send TEXT to user TO through this node's client (words are joined by spaces)."""
    _json(as_json)
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    if wait or wait_timeout is not None:
        receipt_ms = max(1, int((wait_timeout or settings.reply_timeout) * 1000))
        request = local.message_request(settings, to, text, receipt_ms=receipt_ms)
    else:
        request = entry.request(settings, "message", (to, *text))
    _call_client(settings, request)


@cli.command()
@json_option
@common_options
def logoff(*, as_json: bool, settings: Settings, verbose: bool) -> None:
    """Log off this node's user; its `logon` process exits 0."""
    _json(as_json)
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    _call_client(settings, entry.request(settings, "logoff", ()))


def _call_client(settings: Settings, request: dict[str, str]) -> None:
    # What `entry` runs itself for the plain forms of these commands (no click, no asyncio).
    code = entry.call_client(settings, request)
    if code:
        sys.exit(code)


def _redis(settings: Settings) -> Any:
    return connect(resolve_url(settings), socket_timeout=settings.reply_timeout, tls=settings.tls)


async def _closed(redis: Any) -> None:
    with contextlib.suppress(RedisError, OSError):
        await redis.aclose()


def _skipped(unreadable: int, what: str) -> None:
    if unreadable:
        click.echo(f"messenger: skipped {unreadable} {what} that do not decode", err=True)


@cli.command()
@click.option(
    "--watch",
    is_flag=True,
    help="Then print each logon and logoff as it happens, with its reason, until Ctrl-C.",
)
@json_option
@common_options
def who(*, watch: bool, as_json: bool, settings: Settings, verbose: bool) -> None:
    """List the logged-on users, their nodes and since when.

    On a terminal with a header (NAME NODE SINCE), and `nobody is logged on` (on stderr) when
    nobody is; on a pipe one `NAME  NODE` line per user and nothing else.
    """
    _json(as_json)
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    if watch:
        asyncio.run(_watch(settings))
        return
    with Spinner("asking Redis"):
        users, unreadable = asyncio.run(_who(settings))
    _skipped(unreadable, "session entries")
    _print_users(users)


def _print_users(users: list[User]) -> None:
    if entry.JSON.on:
        for user in users:
            output.say_json({"name": user.name, "node": user.node, "since": user.since})
        return
    # What Redis holds is printed escaped, like `Message from`: it must not drive the terminal.
    rows = [(printable(u.name), printable(u.node), output.local_time(u.since)) for u in users]
    if not sys.stdout.isatty():
        width = max((len(n) for n, _, _ in rows), default=0)
        for n, node, _ in rows:
            output.say(f"{n.ljust(width)}  {node}")
        return
    if not rows:
        # Scripts see an empty stdout and exit 0; a person is told.
        output.say("nobody is logged on", err=True)
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(("NAME", "NODE"))]
    output.say(output.header("NAME".ljust(widths[0]), "NODE".ljust(widths[1]), "SINCE"))
    for n, node, since in rows:
        output.say(f"{n.ljust(widths[0])}  {node.ljust(widths[1])}  {since}")


async def _who(settings: Settings) -> UserList:
    redis = _redis(settings)
    try:
        return await list_users(redis, settings.prefix)
    except RedisError as e:
        raise status.noconnection(redis, e) from None
    finally:
        await _closed(redis)


def _show_presence(event: PresenceEvent) -> None:
    reason = event.reason or None
    if entry.JSON.on:
        output.say_json(
            {
                "event": event.kind,
                "name": event.name,
                "node": event.node,
                "at": event.at_ms,
                "reason": reason,
            }
        )
        return
    line = Text.assemble(
        output.local_time(event.at_ms),
        " ",
        (event.kind, output.OK_STYLE if event.kind == "logon" else output.REFUSED_STYLE),
        " ",
        (printable(event.name), "bold"),
        f" {printable(event.node)}",
        f" ({printable(reason)})" if reason else "",
    )
    output.say(line)


async def _watch(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # the end of watching, not a failure: exit 0

    def on_users(users: list[User], unreadable: int) -> None:
        _skipped(unreadable, "session entries")
        _print_users(users)

    redis = _redis(settings)
    try:
        await status.watch(
            redis,
            settings.prefix,
            on_users=on_users,
            on_event=_show_presence,
            stop=stop,
            reply_timeout=settings.reply_timeout,
        )
    finally:
        await _closed(redis)


@cli.command(name="status")
@json_option
@common_options
def status_(*, as_json: bool, settings: Settings, verbose: bool) -> None:
    """Say which Redis, which coordinator serves (and since when), which stand by, how many
    users are on, and this node's client."""
    _json(as_json)
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    url = redact(resolve_url(settings))
    if not entry.JSON.on:
        output.say(Text.assemble(("redis        ", "bold"), printable(url)))
    with Spinner("asking Redis"):
        found = asyncio.run(_status(settings))
    servers, now, users, unreadable, node = found
    _skipped(unreadable, "coordinator entries")
    holder = status.lease_holder(servers, now)
    if entry.JSON.on:
        output.say_json(
            {
                "redis": url,
                "redis_time": now,
                "active": holder.id if holder else None,
                "coordinators": [
                    {
                        "id": s.id,
                        "active": s is holder,
                        "since": s.since if s is holder else None,
                        "until": s.until,
                        "host": s.host,
                        "pid": s.pid,
                        "started": s.started,
                    }
                    for s in servers
                    if s.until > now
                ],
                "users": users,
                "node": node,
            }
        )
        return
    bold = "bold"
    for s in servers:
        if s.until <= now:
            continue  # its entry outlived it; the next coordinator's poll removes it
        where = f"{printable(s.id)} on {printable(s.host)}" + (f" (pid {s.pid})" if s.pid else "")
        if s is holder:
            output.say(
                Text.assemble(
                    ("coordinator  ", bold),
                    where,
                    ": ",
                    ("active", output.OK_STYLE),
                    f" since {output.local_time(s.since)} ({output.ago(s.since, now)})",
                )
            )
        else:
            output.say(Text.assemble(("standby      ", bold), where))
    if holder is None:
        output.say(
            Text.assemble(("coordinator  ", bold), ("none holds the lease", output.REFUSED_STYLE))
        )
    output.say(Text.assemble(("users        ", bold), f"{users} logged on"))
    client = node["client"]
    said = {
        "logged-on": f"{printable(str(node['user']))} is logged on",
        "not-logged-on": "no client runs here (not-logged-on)",
        "no-response": "a client that does not answer (stopped, or busy)",
    }[client]
    output.say(
        Text.assemble(
            ("this node    ", bold),
            f"{printable(str(node['name']))}: ",
            (said, output.OK_STYLE if client == "logged-on" else output.REFUSED_STYLE),
        )
    )


async def _node_state(settings: Settings) -> dict[str, Any]:
    """This node's client, from a `ping` on its socket."""
    state: dict[str, Any] = {"name": settings.node, "client": "not-logged-on", "user": None}
    try:
        answer = await local.call(settings, {"op": "ping"}, min(2.0, settings.reply_timeout))
    except Rejected:
        return state
    except (NoResponse, MessengerError, OSError):
        return state | {"client": "no-response"}
    name = answer.get("name")
    return state | {"client": "logged-on", "user": name if isinstance(name, str) else None}


async def _status(
    settings: Settings,
) -> tuple[list[status.Server], int, int, int, dict[str, Any]]:
    redis = _redis(settings)
    try:
        node = asyncio.ensure_future(_node_state(settings))
        try:
            now = await status.redis_now(redis)
            servers, unreadable = await status.read_servers(redis, settings.prefix)
            users, _ = await list_users(redis, settings.prefix)
        except RedisError as e:
            node.cancel()
            raise status.noconnection(redis, e) from None
        return servers, now, len(users), unreadable, await node
    finally:
        await _closed(redis)


@cli.command()
@json_option
@common_options
def health(*, as_json: bool, settings: Settings, verbose: bool) -> None:
    """Exit 0 if Redis answers and a coordinator holds the lease; else say why on stderr and
    exit 3 (noconnection). Takes at most the reply timeout (for healthchecks)."""
    _json(as_json)
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    with Spinner("asking Redis"):
        holder = asyncio.run(_health(settings))
    if entry.JSON.on:
        output.say_json(
            {"reply": "healthy", "coordinator": holder.id, "host": holder.host, "exit": 0}
        )
    else:
        output.reply("healthy", ok=True)


async def _health(settings: Settings) -> status.Server:
    redis = _redis(settings)
    try:
        async with asyncio.timeout(settings.reply_timeout):
            now = await status.redis_now(redis)
            servers, _ = await status.read_servers(redis, settings.prefix)
    except TimeoutError:
        raise NoConnection(
            f"Redis at {describe(redis)} did not answer within {settings.reply_timeout:g} s"
        ) from None
    except RedisError as e:
        raise status.noconnection(redis, e) from None
    finally:
        await _closed(redis)
    holder = status.lease_holder(servers, now)
    if holder is None:
        standbys = sum(1 for s in servers if s.until > now)
        raise NoConnection(
            f"Redis answers, but no coordinator holds the lease ({standbys} standing by)"
        )
    return holder


def main(argv: list[str] | None = None) -> None:
    """The click CLI: every MessengerError becomes its words and its exit code, never a
    traceback (`entry.main` runs the plain forms of `message` and `logoff` without it)."""
    sys.exit(entry.guarded(lambda: _run(argv)))


def _run(argv: list[str] | None) -> int:
    try:
        code = cli.main(args=argv, prog_name="messenger", standalone_mode=False)
    except click.exceptions.Abort:
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    return code if isinstance(code, int) else 0
