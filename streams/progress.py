"""A long command's progress on stderr (replay, load): a live line on a terminal, redrawn a few times a second;
elsewhere (a log, a pipe) a line every few seconds; and its summary line at the end."""

from __future__ import annotations

import time
from typing import TextIO


class ProgressLine:
    def __init__(self, command: str, stream: TextIO, interval: float | None = None) -> None:
        self.command = command
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self.start = self.last = time.monotonic()
        self.shown = False

    def due(self) -> float | None:
        """The seconds since the start when a line is due now, else None."""
        now = time.monotonic()
        if now - self.last < self.interval:
            return None
        self.last = now
        return now - self.start

    def show(self, text: str, elapsed: float, done: float | None = None) -> None:
        """`text` (what was done, the rate); with `done` (0 to 1), a bar before it and the time left after."""
        if done is None:
            line = f"{self.command}: {text}"
        else:
            done = min(done, 1.0)
            eta = elapsed * (1 - done) / done if done else 0.0
            line = f"{self.command} [{'#' * int(done * 20):<20}] {done:4.0%}  {text}  ETA {eta:,.0f}s"
        self.stream.write("\r" + line + "\x1b[K" if self.tty else line + "\n")
        self.stream.flush()
        self.shown = True

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def finish(self, text: str) -> None:
        """The summary line, in place of the live one."""
        if self.tty and self.shown:
            self.stream.write("\r\x1b[K")
        self.stream.write(f"{self.command}: {text}\n")
        self.stream.flush()

    @staticmethod
    def rate(count: int, elapsed: float) -> float:
        return count / elapsed if elapsed else 0.0
