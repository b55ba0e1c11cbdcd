"""The supervisor's own events: ``log.info("process starting", process="decode", pid=7)``, one per line.

Stdlib only, and small on purpose: it replaced structlog, whose import (with rich's traceback and
pretty-printer behind it) cost ~90 ms of every start, a third of the whole budget from exec to the
first spawn. What the project used of it is all here: levels, key-value events, an ISO timestamp,
secrets masked at the sink, JSON lines without a terminal, and one capture hook for tests.

Where an event goes is set once by :func:`configure`: JSON lines on a stream (journald, files, a pipe),
a short readable line on a terminal, or a ``sink`` callable: the terminal panel of ``up`` takes the
events there and prints each one once, above itself. Nothing here may stop supervision: a sink that
raises or a closed stream drops the event.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from supervisor.redact import MASK, is_secret_name, redact_text

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVEL_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error"}
LEVELS = {name: number for number, name in LEVEL_NAMES.items()}

Event = dict[str, Any]
Sink = Callable[[Event], None]


def redact_value(key: object, value: Any) -> Any:
    """No event leaves with a secret: URL passwords masked in any text, a text field named like a
    credential (``token``, ``HF_TOKEN``, ...) masked whole; numbers are never secrets."""
    if isinstance(value, str):
        return MASK if value and isinstance(key, str) and is_secret_name(key) else redact_text(value)
    if isinstance(value, (list, tuple)):
        return [redact_value(key, item) for item in value]
    if isinstance(value, dict):
        return {k: redact_value(k, v) for k, v in value.items()}
    return value


def timestamp(now: datetime.datetime | None = None) -> str:
    """UTC, ISO 8601 with microseconds and a ``Z``: what structlog's TimeStamper(fmt="iso") wrote."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def render_json(event: Event) -> str:
    return json.dumps(event, default=str)


def render_line(event: Event) -> str:
    """``17:06:20 warning  GPU memory still held; starting anyway  process=decode pids=[4242]``."""
    fields = " ".join(
        f"{k}={v}" for k, v in event.items() if k not in ("event", "level", "timestamp", "exception")
    )
    clock = str(event.get("timestamp", ""))[11:19]
    text = f"{clock} {event.get('level', 'info'):<8} {event.get('event', '')}" + (
        f"  {fields}" if fields else ""
    )
    if event.get("exception"):
        text += "\n" + str(event["exception"]).rstrip()
    return text


class _Stream:
    """A sink writing rendered lines to a stream (flushed: the reader may be journald or a test)."""

    def __init__(self, stream: TextIO, render: Callable[[Event], str]) -> None:
        self.stream, self.render = stream, render

    def __call__(self, event: Event) -> None:
        self.stream.write(self.render(event) + "\n")
        self.stream.flush()


class EventLog:
    """The logger every module shares (``from supervisor.eventlog import log``)."""

    def __init__(self) -> None:
        self.level = INFO
        self.sink: Sink = _Stream(sys.stderr, render_json)
        self._captures: list[list[Event]] = []

    def log(self, level: int, event: str, **fields: Any) -> None:
        if level < self.level and not self._captures:
            return
        record: Event = {
            "event": event,
            **fields,
            "level": LEVEL_NAMES.get(level, "info"),
            "timestamp": timestamp(),
        }
        record = {k: redact_value(k, v) for k, v in record.items()}
        for captured in self._captures:
            captured.append(record)
        if level < self.level:
            return
        try:
            self.sink(record)
        except Exception:  # noqa: BLE001 - an event that cannot be written is dropped, supervision goes on
            pass

    def debug(self, event: str, **fields: Any) -> None:
        self.log(DEBUG, event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log(INFO, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log(WARNING, event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log(ERROR, event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error event carrying the traceback being handled (masked like every other field)."""
        self.log(ERROR, event, **fields, exception=traceback.format_exc())

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[Event]]:
        """Every event logged inside the block, whatever the level or sink (for tests)."""
        captured: list[Event] = []
        self._captures.append(captured)
        try:
            yield captured
        finally:
            self._captures.remove(captured)


log = EventLog()


def configure(
    *, json: bool | None = None, level: str = "info", stream: TextIO | None = None, sink: Sink | None = None
) -> None:
    """Where events go: ``sink`` when given; else ``stream`` (stderr), JSON unless it is a terminal."""
    log.level = LEVELS[level.lower()]
    if sink is not None:
        log.sink = sink
        return
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    log.sink = _Stream(stream, render_json if json else render_line)
