"""A live progress display on stderr: one updating line on a terminal, plain
lines otherwise (CI logs), nothing at all when ``quiet``."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, stream=None, quiet: bool = False):
        self.total, self.done = total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._width = 0

    def _emit(self, text: str, final: bool = False) -> None:
        if self.quiet:
            return
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad + ("\n" if final else ""))
            self._width = 0 if final else len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def step(self, what: str) -> None:
        """Announce the cell that starts now."""
        elapsed = time.monotonic() - self.t0
        self._emit(f"[{self.done + 1}/{self.total} {elapsed:5.1f}s] {what}")

    def advance(self, note: str = "") -> None:
        self.done += 1
        if note and not self.tty:
            self._emit(f"    {note}")

    def warn(self, text: str) -> None:
        """A line that must stay visible (e.g. a failed cell)."""
        if self.tty and self._width:
            self._emit("", final=False)
            self.stream.write("\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self._width = 0

    def close(self) -> None:
        if self.tty and self._width and not self.quiet:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
