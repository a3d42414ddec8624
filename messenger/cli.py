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

from messenger import __version__, acl, entry, local, options, private
from messenger.client import Client, UserList, list_users
from messenger.connection import connect, describe, explain, resolve_url, server_file
from messenger.coordinator import Coordinator
from messenger.embedded import EmbeddedRedis
from messenger.errors import ConfigError, MessengerError, NoConnection, Rejected
from messenger.options import Kind
from messenger.protocol import Reply, printable, validate_name
from messenger.settings import Settings

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


class OneLineFormatter(logging.Formatter):
    """Every log record is one line, with control characters escaped: names, texts and error
    messages that came from Redis or a client can neither forge log lines nor drive a terminal.
    (A traceback, appended after the message, keeps its lines.)"""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def _setup_logging(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
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
@common_options
def server(
    *, settings: Settings, verbose: bool, metrics_port: int | None, metrics_host: str
) -> None:
    """Run the coordinator (the seed's server).

    With no Redis URL it starts an embedded redis-server on 127.0.0.1 and publishes its address
    for the clients of this host, so they need no configuration.
    """
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
@common_options
def logon(name: str, *, settings: Settings, verbose: bool) -> None:
    """Log NAME on at this node and stay in the foreground.

    Prints the server's reply, then every incoming message as `Message from NAME: TEXT`, until
    logged off (`messenger logoff`, Ctrl-C) or stopped.
    """
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    validate_name(name)
    asyncio.run(_logon(name, settings))


async def _logon(name: str, settings: Settings) -> None:
    local.ensure_runtime_dir(settings)
    if await local.client_alive(settings):
        raise Rejected(Reply.ALREADY_LOGGED_ON)
    url = resolve_url(settings)
    timeout = min(2.0, settings.reply_timeout)
    redis = connect(url, socket_timeout=timeout, tls=settings.tls)
    # The heartbeat goes through its own Redis user when the URL names a client user (acl).
    hb_url = acl.heartbeat_url(url)
    hb_redis = None if hb_url is None else connect(hb_url, socket_timeout=timeout, tls=settings.tls)
    client = Client(redis, settings, name, out=echo, heartbeat_redis=hb_redis, hold_output=True)
    try:
        await client.logon()
        # Ready for `message` and `logoff` before anyone can see `logged-on` and use them.
        await client.start_serving()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Ctrl-C or a polite kill is a logoff, not a crash (installed before anyone can
            # see `logged-on` and react to it).
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(client.leave()))
        echo(Reply.LOGGED_ON)
        client.release_output()  # a message that came with the logon prints after it
        reason = await client.finished
    finally:
        await client.close()
    if reason is not None:
        raise reason
    echo(Reply.LOGGED_OFF)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("to")
@click.argument("text", nargs=-1, required=True)
@common_options
def message(to: str, text: tuple[str, ...], *, settings: Settings, verbose: bool) -> None:
    """Send TEXT to user TO through this node's client (words are joined by spaces)."""
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    _call_client(settings, entry.request(settings, "message", (to, *text)))


@cli.command()
@common_options
def logoff(*, settings: Settings, verbose: bool) -> None:
    """Log off this node's user; its `logon` process exits 0."""
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    _call_client(settings, entry.request(settings, "logoff", ()))


def _call_client(settings: Settings, request: dict[str, str]) -> None:
    # What `entry` runs itself for the plain forms of these commands (no click, no asyncio).
    code = entry.call_client(settings, request)
    if code:
        sys.exit(code)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list for scripts.")
@common_options
def who(*, as_json: bool, settings: Settings, verbose: bool) -> None:
    """List the logged-on users and their nodes."""
    _setup_logging(logging.DEBUG if verbose else logging.WARNING)
    users, unreadable = asyncio.run(_who(settings))
    if unreadable:
        click.echo(f"messenger: skipped {unreadable} session entries that do not decode", err=True)
    if as_json:
        echo(json.dumps([{"name": n, "node": node} for n, node in users]))
        return
    # What Redis holds is printed escaped, like `Message from`: it must not drive the terminal.
    rows = [(printable(n), printable(node)) for n, node in users]
    width = max((len(n) for n, _ in rows), default=0)
    for n, node in rows:
        echo(f"{n.ljust(width)}  {node}")
    if not rows and sys.stdout.isatty():
        # Scripts see an empty stdout and exit 0; a person is told.
        click.echo("nobody is logged on", err=True)


async def _who(settings: Settings) -> UserList:
    redis = connect(resolve_url(settings), socket_timeout=settings.reply_timeout, tls=settings.tls)
    try:
        return await list_users(redis, settings.prefix)
    except RedisError as e:
        raise NoConnection(f"Redis at {describe(redis)}: {explain(e)}") from None
    finally:
        with contextlib.suppress(RedisError, OSError):
            await redis.aclose()


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
