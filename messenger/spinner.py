"""A spinner on stderr while a command waits, on a terminal only (never on a pipe or a file).

Hand-written rather than rich's: `messenger message` and `logoff` load this only once their
answer has taken longer than half a second (local.PATIENCE), and rich would cost them more to
import than the whole command takes otherwise. It draws on one line and erases it when stopped,
before the command prints its reply, so stdout never carries any of it.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_ASCII_FRAMES = "|/-\\"
_PERIOD = 0.1
_ERASE = "\r\x1b[K"


class Spinner:
    """`Spinner(what).start()` ... `.stop()` (or `with Spinner(what):`): after `delay` seconds
    without stop(), a spinner and `what` on `stream` (stderr) until stop(), which erases it."""

    def __init__(self, what: str, *, delay: float = 0.5, stream: TextIO | None = None) -> None:
        self.what = what
        self.delay = delay
        self.stream = stream if stream is not None else sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.drawn = False

    def start(self) -> Spinner:
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):  # closed, or not a real stream
            tty = False
        if tty:
            self._thread = threading.Thread(target=self._run, name="spinner", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        if self._stop.wait(self.delay):
            return
        encoding = (getattr(self.stream, "encoding", None) or "").lower().replace("-", "")
        frames = _FRAMES if encoding == "utf8" else _ASCII_FRAMES
        i = 0
        while not self._stop.is_set():
            self._write(f"\r{frames[i % len(frames)]} {self.what}\x1b[K")
            self.drawn = True
            i += 1
            self._stop.wait(_PERIOD)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None
            if self.drawn:
                self._write(_ERASE)

    def __enter__(self) -> Spinner:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
