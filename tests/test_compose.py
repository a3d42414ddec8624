"""docker-compose.yml and Dockerfile: valid Compose, real `messenger` commands, a private Redis."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml
from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from messenger.cli import cli
from messenger.errors import ConfigError, InvalidInput
from messenger.protocol import validate_name, validate_node, validate_text
from messenger.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# Origin: github.com/compose-spec/compose-spec schema/compose-spec.json @ 00655e2222608fa6, as is.
SCHEMA_FILE = Path(__file__).resolve().parent / "data" / "compose-spec.json"

# What interpolation sees: only the password, so every other variable must bring its default.
PASSWORD = "s3cret-Test_pw"
CLIENT_PASSWORD = "cl1ent-Test_pw"
INTERPOLATION_ENV = {"REDIS_PASSWORD": PASSWORD, "CLIENT_PASSWORD": CLIENT_PASSWORD}
MESSENGER_SERVICES = {"coordinator", "client"}


# --- Compose variable interpolation, as the Compose Specification describes it


class MissingVariableError(Exception):
    """A variable is unset (or empty where `:` asks) and has no default."""


_VARIABLE = re.compile(
    r"""\$(?:
        (?P<escaped>\$)
      | \{(?P<braced>[_A-Za-z][_A-Za-z0-9]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}
      | (?P<named>[_A-Za-z][_A-Za-z0-9]*)
      | (?P<invalid>)
    )""",
    re.VERBOSE,
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, ${VAR:+alt},
    $VAR and $$. Stricter than Compose in one way: a plain unset variable is an error, not ""."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["invalid"] is not None:
            raise ValueError(f"invalid interpolation in {text!r}")
        name = match["braced"] or match["named"]
        op, arg = match["op"], interpolate(match["arg"] or "", env)
        value = env.get(name)
        present = value is not None and (value != "" or not (op or "").startswith(":"))
        if op in (":-", "-"):
            return value if present and value is not None else arg
        if op in (":+", "+"):
            return arg if present else ""
        if op in (":?", "?") and not present:
            raise MissingVariableError(f"{name}: {arg}")
        if value is None:
            raise MissingVariableError(f"{name} is unset and has no default")
        return value

    return _VARIABLE.sub(replace, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def load_compose() -> dict[str, Any]:
    """The file as Compose runs it: interpolated with only REDIS_PASSWORD set."""
    data = interpolate_tree(load_raw(), INTERPOLATION_ENV)
    assert isinstance(data, dict)
    return data


def services() -> dict[str, Any]:
    found = load_compose()["services"]
    assert isinstance(found, dict)
    return found


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment:` (map or KEY=VAL list) as strings; valueless entries dropped."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    return {str(k): str(v) for k, v in raw.items() if v is not None}


def as_argv(value: Any) -> list[str]:
    """`command:`/`entrypoint:` in exec form (a list) or shell-like string form."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), value
    return [str(part) for part in value]


# --- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends in a line continuation"
    pairs = []
    for line in joined:
        word, *rest = line.split(None, 1)
        pairs.append((word.upper(), rest[0].strip() if rest else ""))
    last_from = max(i for i, (word, _) in enumerate(pairs) if word == "FROM")
    return pairs[last_from:]


def exec_form(instruction: str) -> list[str]:
    """The JSON (exec) form of the last ENTRYPOINT or CMD; shell form is refused on purpose:
    it runs under /bin/sh, which would not pass signals on to `messenger`."""
    values = [rest for word, rest in dockerfile_instructions() if word == instruction]
    assert values, f"Dockerfile has no {instruction}"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list), f"{instruction} must be in exec form"
    assert all(isinstance(part, str) for part in parsed), parsed
    return [str(part) for part in parsed]


def service_argv(service: Mapping[str, Any]) -> list[str]:
    """What the container runs: entrypoint + command, as Docker combines them."""
    if "entrypoint" in service:
        # A service entrypoint also drops the image's CMD.
        return as_argv(service["entrypoint"]) + as_argv(service.get("command"))
    command = service.get("command")
    return exec_form("ENTRYPOINT") + (exec_form("CMD") if command is None else as_argv(command))


# --- Parsing a command line for real


def parse_messenger_args(args: list[str], env: Mapping[str, str]) -> click.Context:
    """Parse `messenger ARGS` as click would run it, without running it.

    Unknown subcommands or options, missing arguments and bad values (including those read from
    MESSENGER_* variables in `env`) raise click.UsageError, and so does anything before the
    subcommand; a subcommand's `--help` raises click.exceptions.Exit: no way to run a service.
    """
    saved = {k: v for k, v in os.environ.items() if k.startswith("MESSENGER_")}
    for key in saved:
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if k.startswith("MESSENGER_")})
    try:
        group_ctx = click.Context(cli, info_name="messenger")
        if not args:
            raise click.UsageError("no subcommand", group_ctx)
        name, command, rest = cli.resolve_command(group_ctx, args)
        assert name is not None
        assert command is not None
        return command.make_context(name, rest, parent=group_ctx)
    finally:
        for key in [k for k in os.environ if k.startswith("MESSENGER_")]:
            del os.environ[key]
        os.environ.update(saved)


def check_messenger_argv(argv: list[str], env: Mapping[str, str]) -> None:
    assert argv, "the service runs nothing"
    assert argv[0] == "messenger", f"runs {argv[0]!r}, not the messenger console script"
    ctx = parse_messenger_args(argv[1:], env)
    params = ctx.params
    # What the commands check first thing when they run, so a bad name fails here too.
    if ctx.info_name == "logon":
        validate_name(params["name"])
    if ctx.info_name == "message":
        validate_name(params["to"])
        validate_text(" ".join(params["text"]), Settings().max_message_bytes)
    settings = Settings.from_env(env=dict(env))
    if "MESSENGER_NODE" in env:
        validate_node(settings.node)


# --- (a) the Compose Specification


@pytest.fixture(scope="module")
def compose_validator() -> Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    # Its "$schema" is https://json-schema.org/draft-07/schema, a spelling jsonschema does not
    # look up (it knows http://...#), hence the explicit Draft 7 default.
    assert "draft-07" in schema["$schema"]
    cls = validator_for(schema, default=Draft7Validator)
    cls.check_schema(schema)
    validator: Validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return validator


def test_compose_file_matches_the_compose_spec(compose_validator: Validator) -> None:
    raw = load_raw()
    assert "version" not in raw, "the top-level `version:` key is obsolete"
    errors = sorted(compose_validator.iter_errors(load_compose()), key=lambda e: e.json_path)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)


def test_the_schema_check_rejects_a_broken_file(compose_validator: Validator) -> None:
    broken = copy.deepcopy(load_compose())
    broken["services"]["coordinator"]["depends_on"] = {"redis": {"condition": "healthy"}}
    broken["services"]["client"]["restrat"] = "always"
    with pytest.raises(ValidationError):
        compose_validator.validate(broken)
    assert len(list(compose_validator.iter_errors(broken))) == 2


# --- (b) Docker's own parser, where there is one


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False, timeout=60
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {**os.environ, **INTERPOLATION_ENV}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--profile", "client", "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# --- (c) every service built from the Dockerfile runs a real `messenger` command


def messenger_services() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in services().items():
        if "build" in service:
            yield name, service


def test_the_messenger_services_are_the_expected_ones() -> None:
    assert {name for name, _ in messenger_services()} == MESSENGER_SERVICES


@pytest.mark.parametrize("name", sorted(MESSENGER_SERVICES))
def test_service_runs_a_real_messenger_command(name: str) -> None:
    service = services()[name]
    check_messenger_argv(service_argv(service), service_env(service))


def test_service_commands_use_their_defaults() -> None:
    found = services()
    assert service_argv(found["coordinator"]) == ["messenger", "server"]
    assert service_argv(found["client"]) == ["messenger", "logon", "alice"]
    assert service_env(found["client"])["MESSENGER_NODE"] == "client1"


@pytest.mark.parametrize(
    ("argv", "env", "error"),
    [
        (["messenger", "sever"], {}, click.UsageError),
        (["messenger", "logon"], {}, click.UsageError),
        (["messenger", "logon", "alice", "--bogus"], {}, click.UsageError),
        (["messenger", "message", "bob"], {}, click.UsageError),
        (["messenger"], {}, click.UsageError),
        (["messenger", "server"], {"MESSENGER_HEARTBEAT_TTL": "soon"}, click.UsageError),
        (["messenger", "server", "--help"], {}, click.exceptions.Exit),
        (["messenger", "logon", "not a name"], {}, InvalidInput),
        (["messenger", "logon", "bob"], {"MESSENGER_NODE": "a node"}, InvalidInput),
        (["messenger", "server"], {"MESSENGER_HEARTBEAT_TTL": "0.5"}, ConfigError),
        (["python", "-m", "messenger", "server"], {}, AssertionError),
    ],
)
def test_the_command_check_rejects_broken_commands(
    argv: list[str], env: dict[str, str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        check_messenger_argv(argv, env)


def test_the_command_check_rejects_a_broken_compose_command() -> None:
    service = copy.deepcopy(services()["client"])
    service["command"] = ["logon", "${MESSENGER_USER:-alice}", "--nodes", "x"]
    service = interpolate_tree(service, INTERPOLATION_ENV)
    with pytest.raises(click.UsageError, match="--nodes"):
        check_messenger_argv(service_argv(service), service_env(service))


def test_interpolation() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${UNSET:-d} ${EMPTY-d}", env) == "v d d "
    assert interpolate("$SET ${SET} $$SET ${SET:+alt} ${EMPTY:+alt}", env) == "v v $SET alt "
    with pytest.raises(MissingVariableError, match="needed"):
        interpolate("${EMPTY:?needed}", env)
    with pytest.raises(MissingVariableError):
        interpolate("${UNSET}", env)
    with pytest.raises(ValueError, match="invalid"):
        interpolate("${}", env)


# --- (d) Redis: private, password-protected, and the clients know the password


def test_redis_is_not_published() -> None:
    found = services()
    assert "ports" not in found["redis"]
    for name, service in found.items():
        assert service.get("network_mode") != "host", name


def strings_in(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings_in(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)


@pytest.mark.parametrize(("variable", "least"), [("REDIS_PASSWORD", 3), ("CLIENT_PASSWORD", 2)])
def test_no_password_has_a_default(variable: str, least: int) -> None:
    uses = [text for text in strings_in(load_raw()) if variable in text]
    # REDIS_PASSWORD: --requirepass, the healthcheck's REDISCLI_AUTH, the coordinator's URL;
    # CLIENT_PASSWORD: the coordinator's MESSENGER_CLIENT_PASSWORD and the client's URL.
    assert len(uses) >= least, uses
    for text in uses:
        for env in ({}, {variable: ""}):
            with pytest.raises(MissingVariableError, match=variable):
                interpolate(text, env)


def test_redis_requires_the_password_and_persists() -> None:
    redis = services()["redis"]
    assert redis["image"].startswith("redis:7")
    argv = as_argv(redis["command"])
    assert argv[0] == "redis-server"
    assert argv[argv.index("--requirepass") + 1] == PASSWORD
    assert argv[argv.index("--appendonly") + 1] == "yes"
    volume = next(v for v in redis["volumes"] if v.endswith(":/data")).partition(":")[0]
    assert volume in load_compose()["volumes"], "Redis data must live in a named volume"


def test_redis_healthcheck_pings_with_the_password() -> None:
    redis = services()["redis"]
    test = redis["healthcheck"]["test"]
    words = " ".join(test) if isinstance(test, list) else test
    assert "redis-cli" in words
    assert "ping" in words
    with_flag = re.search(r"-a\s+\S+", words) is not None
    assert with_flag or service_env(redis).get("REDISCLI_AUTH") == PASSWORD


def test_the_coordinator_has_redis_s_credential_and_provisions_the_clients() -> None:
    env = service_env(services()["coordinator"])
    url = urlsplit(env["MESSENGER_REDIS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    assert url.password == PASSWORD
    assert url.username in ("", None, "default")
    assert env["MESSENGER_CLIENT_PASSWORD"] == CLIENT_PASSWORD


def test_a_client_has_only_the_client_credential() -> None:
    env = service_env(services()["client"])
    url = urlsplit(env["MESSENGER_REDIS_URL"])
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    assert url.username == "messenger-client"  # the default prefix's client user (acl)
    assert url.password == CLIENT_PASSWORD
    assert PASSWORD not in json.dumps(services()["client"])


def test_coordinator_waits_for_a_healthy_redis_and_restarts() -> None:
    coordinator = services()["coordinator"]
    assert coordinator["depends_on"]["redis"]["condition"] == "service_healthy"
    assert coordinator["restart"] == "unless-stopped"


def test_the_coordinator_s_healthcheck_is_messenger_health() -> None:
    coordinator = services()["coordinator"]
    check = coordinator["healthcheck"]
    test = as_argv(check["test"])
    assert test[0] == "CMD", "exec form: no shell between Docker and `messenger health`"
    argv = test[1:]
    assert argv[:2] == ["messenger", "health"]
    check_messenger_argv(argv, service_env(coordinator))  # a real command, valid options
    ctx = parse_messenger_args(argv[1:], service_env(coordinator))
    reply_timeout = ctx.params["reply_timeout"] or Settings().reply_timeout
    # The command gives up (exit 3) before Docker would kill it.
    assert reply_timeout < duration(check["timeout"])
    assert duration(check["interval"]) > 0
    assert services()["client"]["depends_on"]["coordinator"]["condition"] == "service_healthy"


def duration(text: str) -> float:
    """A compose duration such as `4s`, `1m30s`, `500ms`, in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts, text
    assert "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def test_client_is_an_interactive_opt_in_service() -> None:
    client = services()["client"]
    assert "client" in client["profiles"]
    assert client["stdin_open"] is True
    assert client["tty"] is True


# --- (e) the image


def test_dockerfile_runs_messenger_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert exec_form("ENTRYPOINT") == ["messenger"]
    assert exec_form("CMD") == ["server"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "messenger" in scripts, "the ENTRYPOINT must be the package's console script"
    users = [rest for word, rest in instructions if word == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "pip install --no-cache-dir ." in runs


# --- (e) the walk-throughs (README and the file's header) run in an order that works


def walkthrough_problems(lines: list[str]) -> list[str]:
    """Play the walk-through's commands on paper: every `message TO` must run in a container
    whose user is logged on, to a TO that is logged on by then."""
    user_of: dict[str, str] = {}  # container (or service) -> the user its `logon` logged on
    problems = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if not words or words[0] not in ("docker", "docker-compose"):
            continue
        if "up" in words and words[-1] == "client":
            user_of["client"] = "alice"  # the service's default command: logon alice
        elif "logon" in words:
            container = words[words.index("--name") + 1] if "--name" in words else "client"
            user_of[container] = words[words.index("logon") + 1]
        elif "messenger" in words:
            container = words[words.index("messenger") - 1]
            command = words[words.index("messenger") + 1 :]
            if container not in user_of:
                problems.append(f"{line!r}: nobody is logged on in {container!r} yet")
            elif command[0] == "message" and command[1] not in user_of.values():
                problems.append(f"{line!r}: {command[1]} is not logged on yet")
            elif command[0] == "logoff":
                del user_of[container]
    return problems


def readme_compose_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The compose stack") :]
    block = section[section.index("```sh") + 5 :]
    return block[: block.index("```")].splitlines()


def compose_header_lines() -> list[str]:
    header = []
    for line in COMPOSE_FILE.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# "))
    return header


@pytest.mark.parametrize("source", [readme_compose_lines, compose_header_lines])
def test_the_walkthrough_runs_in_an_order_that_works(source: Any) -> None:
    lines = source()
    assert any("message" in line for line in lines)
    assert walkthrough_problems(lines) == []


def test_the_walkthrough_check_finds_a_message_before_its_receiver_logs_on() -> None:
    broken = [
        "docker compose --profile client up client",
        "docker compose exec client messenger message bob hi",
        "docker compose run --rm --name bob -e MESSENGER_NODE=client2 client logon bob",
    ]
    assert walkthrough_problems(broken) == [f"{broken[1]!r}: bob is not logged on yet"]


def test_the_readme_says_which_terminal_each_step_runs_in() -> None:
    lines = readme_compose_lines()
    commands = [line for line in lines if line.startswith("docker")]
    for i, line in enumerate(lines):
        if line.startswith("docker"):
            before = [x for x in lines[:i] if x.startswith("# terminal")]
            assert before, f"{line!r} does not say which terminal it runs in"
    assert len(commands) >= 6
