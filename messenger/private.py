"""Files and directories that only this OS user may touch: the runtime directory (node sockets,
the embedded server's address with its client password) and the server file in it.

Another user on the same host may pre-create `/tmp/messenger-<uid>` (or a file in it) to make a
victim's commands talk to a socket or Redis of theirs; so nothing here is used unless it belongs
to the caller and no one else can read or write it. A symlink is followed only if the link
itself is the caller's too.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from messenger.errors import ConfigError

_HINT = "or choose another with --runtime-dir"


def _refuse(path: Path, what: str, why: str) -> ConfigError:
    return ConfigError(f"{what} {path} {why}: it must belong to you and be private, {_HINT}")


def _check(path: Path, st: os.stat_result, what: str) -> None:
    if st.st_uid != os.getuid():
        raise _refuse(path, what, f"belongs to uid {st.st_uid}, not to you")
    if st.st_mode & 0o077:
        raise _refuse(path, what, f"is open to others (mode {stat.S_IMODE(st.st_mode):o})")


def check_dir(path: Path) -> bool:
    """Whether the private directory exists; raises ConfigError if it is not private."""
    try:
        link = path.lstat()
    except FileNotFoundError:
        return False
    if link.st_uid != os.getuid():
        raise _refuse(path, "runtime directory", f"belongs to uid {link.st_uid}, not to you")
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(path, "runtime directory", "is not a directory")
    _check(path, st, "runtime directory")
    return True


def ensure_dir(path: Path) -> Path:
    """Create the private directory (mode 0700) if needed, and check it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_dir(path)
    return path


def read_file(path: Path) -> str:
    """Read a private file; FileNotFoundError if absent, ConfigError if not private."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refuse(path, "file", "is a symlink") from None
        raise
    with os.fdopen(fd) as f:
        _check(path, os.fstat(fd), "file")
        return f.read()


def write_file(path: Path, text: str) -> None:
    """Write a new private file (mode 0600), replacing any old one."""
    path.unlink(missing_ok=True)  # O_CREAT's mode only applies to a new file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
