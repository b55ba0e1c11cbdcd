"""Where words go: supervisor events through :mod:`supervisor.eventlog`, child output into rotated files.

Events are JSON lines without a terminal (journald, files, CI) and go to ``up``'s panel on one. Each child's
merged stdout/stderr goes to ``<state_dir>/logs/<name>.log``, rotated by size with a few backups,
and in the foreground also to our stdout as ``name | line``.

Nothing here may stop supervision: a full, unwritable or stalled log directory costs log lines,
not children. Files are written by one thread off the event loop (:mod:`supervisor.engine.logwriter`). The first failure is reported as one error event, later ones are counted silently, and
writing is retried after a pause. Terminal echo goes through one bounded queue and one writer
thread, so a stalled terminal (or a pipe nobody reads) drops lines instead of blocking the loop.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from supervisor.engine.logwriter import WRITER, Writer
from supervisor.eventlog import configure, log  # noqa: F401  (re-exported: where words go)

_RETRY_AFTER_S = 30.0
_ECHO_LINE_MAX = 8192


@dataclass(frozen=True)
class LogOptions:
    """How child output files are kept: rotation size and number of backups."""

    max_bytes: int = 50 * 1024 * 1024
    backups: int = 3


class RotatingFile:
    """Append-only file rotated at ``max_bytes`` into ``.1`` .. ``.N``; never raises on write."""

    def __init__(self, path: str, *, max_bytes: int, backups: int, owner: str) -> None:
        self.path, self.max_bytes, self.backups, self.owner = path, max_bytes, backups, owner
        self._fd: int | None = None
        self._size = 0
        self._broken_until = 0.0
        self.dropped_bytes = 0

    def write(self, data: bytes) -> None:
        if self._broken_until and time.monotonic() < self._broken_until:
            self.dropped_bytes += len(data)
            return
        try:
            if self._fd is None:
                self._open()
            assert self._fd is not None
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self._size += len(data)
            if self._size >= self.max_bytes:
                self._rotate()
            self._broken_until = 0.0
        except OSError as exc:
            self.dropped_bytes += len(data)
            if not self._broken_until:  # report the first failure of a run, not every chunk
                log.error(
                    "child log not writable; output dropped, supervision continues",
                    process=self.owner,
                    path=self.path,
                    error=exc.strerror or str(exc),
                )
            self._broken_until = time.monotonic() + _RETRY_AFTER_S
            self.close()

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        self.close()
        for index in range(self.backups - 1, 0, -1):
            src = f"{self.path}.{index}"
            if os.path.exists(src):
                os.replace(src, f"{self.path}.{index + 1}")
        if self.backups > 0:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.truncate(self.path, 0)
        self._open()

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


class TerminalEcho:
    """Prefixed child lines on a terminal (``up --logs``), written by one thread from a bounded queue.

    ``color``: each process's ``name |`` prefix in its own color, in order of first output, as
    docker-compose does. Without a ``stream`` the lines go to whatever ``sys.stdout`` is when written:
    under ``up``'s live panel that is the panel's console, which prints them above itself."""

    COLORS = ("36", "33", "32", "35", "34", "96", "93", "92")  # ANSI: cyan, yellow, green, magenta, blue, ...

    def __init__(self, stream: TextIO | None = None, *, capacity: int = 10_000, color: bool = False) -> None:
        self._stream = stream
        self._color = color
        self._colors: dict[str, str] = {}
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=capacity)
        self._dropped = 0
        self._width = 0
        self._thread = threading.Thread(target=self._run, name="terminal-echo", daemon=True)
        self._thread.start()

    def line(self, name: str, text: str) -> None:
        self._width = max(self._width, len(name))
        prefix = f"{name:<{self._width}} |"
        if self._color:
            code = self._colors.setdefault(name, self.COLORS[len(self._colors) % len(self.COLORS)])
            prefix = f"\x1b[{code}m{prefix}\x1b[0m"
        try:
            self._queue.put_nowait(f"{prefix} {text}\n")
        except queue.Full:
            self._dropped += 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            stream = self._stream or sys.stdout
            try:
                if self._dropped:
                    dropped, self._dropped = self._dropped, 0
                    stream.write(f"[{dropped} lines not shown: terminal too slow]\n")
                stream.write(item)
                if self._queue.empty():
                    stream.flush()
            except (OSError, ValueError):
                pass  # closed terminal: keep draining so the producers never block

    def close(self) -> None:
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            return
        self._thread.join(timeout=1.0)


class ChildOutput:
    """The sink for one child's output: its rotated file (written by the log writer thread, off
    the event loop) and, optionally, the terminal. ``dropped_bytes`` counts what a stalled disk cost."""

    def __init__(
        self, name: str, path: str, options: LogOptions, echo: TerminalEcho | None, *, writer: Writer = WRITER
    ) -> None:
        self.name = name
        self.file = RotatingFile(path, max_bytes=options.max_bytes, backups=options.backups, owner=name)
        self.dropped_bytes = 0
        self._writer = writer
        self._dropping = 0  # bytes dropped in the current spell (0: not dropping)
        self._echo = echo
        self._partial = b""

    def __call__(self, data: bytes) -> None:
        # Once dropping, keep dropping until the queue is half empty: one report per spell, not
        # one per chunk that happens to fit.
        resuming = not self._dropping or self._writer.queued_bytes <= self._writer.capacity // 2
        if resuming and self._writer.put(self.file, data):
            if self._dropping:
                log.warning("child log writing caught up", process=self.name, dropped_bytes=self._dropping)
                self._dropping = 0
        else:
            if not self._dropping:
                log.error(
                    "child log writes stalled; output dropped, supervision continues",
                    process=self.name,
                    path=self.file.path,
                    queued_bytes=self._writer.queued_bytes,
                )
            self._dropping += len(data)
            self.dropped_bytes += len(data)
        if self._echo is None:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _ECHO_LINE_MAX:
            lines.append(self._partial)
            self._partial = b""
        for raw in lines:
            self._echo.line(self.name, raw[:_ECHO_LINE_MAX].decode("utf-8", "replace").rstrip("\r"))

    def close(self) -> None:
        """Close the file after what is queued for it (returns at once)."""
        self._writer.close(self.file)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (blocking: not on the event loop) until what was queued is on disk."""
        return self._writer.flush(timeout_s)


def flush_all(timeout_s: float) -> bool:
    """Wait until every queued child log chunk is on disk (at shutdown; bounded: a stalled disk)."""
    return WRITER.flush(timeout_s)
