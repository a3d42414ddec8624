"""The setting options every command takes, and how they make its Settings.

Each may come before the command's name or after it (`messenger --node n1 who` is `messenger
who --node n1`): after wins over before, which wins over MESSENGER_<NAME> in the environment.
The click CLI (`cli`) and the light path of `message` and `logoff` (`entry`) both resolve them
here; this module imports nothing heavy, for the light one.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

from messenger.settings import ENV_PREFIX, Settings


class Kind(Enum):
    """What an option's value is. A path need not exist; if it does, it must be of its kind and
    readable (as click's `Path` type, which `cli` makes of it, checks)."""

    TEXT = "text"
    SECONDS = "seconds"
    DIR = "directory"
    FILE = "file"


OPTIONS: dict[str, Kind] = {
    "--redis-url": Kind.TEXT,
    "--node": Kind.TEXT,
    "--prefix": Kind.TEXT,
    "--heartbeat-interval": Kind.SECONDS,
    "--heartbeat-ttl": Kind.SECONDS,
    "--reply-timeout": Kind.SECONDS,
    "--runtime-dir": Kind.DIR,
    "--tls-ca-file": Kind.FILE,
    "--tls-cert-file": Kind.FILE,
    "--tls-key-file": Kind.FILE,
}


def setting(option: str) -> str:
    """The Settings field an option sets: `--reply-timeout` -> `reply_timeout`."""
    return option[2:].replace("-", "_")


def envvar(option: str) -> str:
    """The environment variable an option falls back on: `--node` -> `MESSENGER_NODE`."""
    return ENV_PREFIX + setting(option).upper()


NAMES = tuple(setting(option) for option in OPTIONS)


def accepts(kind: Kind, value: str) -> bool:
    """Whether `value` is one of `kind` as the click CLI's types check it (`cli` turns each kind
    into its click type; click says what is wrong with any other value)."""
    if kind is Kind.SECONDS:
        try:
            float(value)
        except ValueError:
            return False
        return True
    if kind is Kind.TEXT:
        return True
    try:
        mode = os.stat(value).st_mode
    except OSError:
        return True  # need not exist (yet)
    wrong = stat.S_ISREG(mode) if kind is Kind.DIR else stat.S_ISDIR(mode)
    return not wrong and os.access(value, os.R_OK)


def convert(kind: Kind, value: str) -> str | float | Path:
    """The value of an option of `kind` typed as `value` (which `accepts`)."""
    if kind is Kind.SECONDS:
        return float(value)
    if kind is Kind.TEXT:
        return value
    return Path(value)


def resolve(before: Mapping[str, object], after: Mapping[str, object]) -> Settings:
    """The Settings of a command, from the options given before its name and after it (by
    setting name; absent or None: not given) and the environment."""
    values = {}
    for name in NAMES:
        given = after.get(name)
        values[name] = given if given is not None else before.get(name)
    return Settings.from_env(None, **values)
