"""What every measurement shares: statistics, free ports, the marker FIFO, the driver, clean-up.

Clocks. Runner events carry ``time.monotonic()`` of the driver process; CLOCK_MONOTONIC is one
clock for every process on a Linux host, so they compare directly with the bench's own
``time.monotonic()``. Children written in bash can only read the wall clock (``$EPOCHREALTIME``,
microseconds), so every instant a child reports is ``time.time()``, and is compared only with
other wall-clock instants taken within the same second or so (NTP slewing is negligible there).

No process is left behind: everything the bench starts inherits ``LMCACHE_SUPERVISE_BENCH`` set to
a value unique to this run, and :meth:`Reaper.sweep` SIGKILLs any live process still carrying it
(after each measurement, and in a ``finally`` on errors and Ctrl-C).
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import proctools  # scripts/ is on sys.path wherever benchkit is importable
import psutil

ROOT = Path(__file__).resolve().parents[2]
KIT = Path(__file__).resolve().parent
MARKER_SH = KIT / "marker.sh"
CHILDREN_PY = KIT / "children.py"
DRIVER_PY = KIT / "driver.py"
BENCH_ENV = "LMCACHE_SUPERVISE_BENCH"


class BenchError(RuntimeError):
    """A measurement could not be taken (a deadline passed, a process died); the message says which."""


# ---- statistics -----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100): always one of the measured values, never interpolated."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max of a sample of durations in seconds, in milliseconds (rounded to 0.01 ms)."""
    return {
        "p50": round(percentile(seconds, 50) * 1000, 2),
        "p99": round(percentile(seconds, 99) * 1000, 2),
        "max": round(max(seconds) * 1000, 2),
        "n": len(seconds),
    }


# ---- ports ------------------------------------------------------------------------------------


def free_port_base(offsets: Iterable[int], prefer: int | None = None) -> int:
    """A base port such that ``base + o`` is free on loopback for every offset (below 32767: Dynamo
    reads ports as int16): ``prefer`` while it is free, so that a series of runs passes the same
    flags each time, as a user starting the same deployment again does."""
    try:
        return proctools.free_port_base(offsets, tries=500, prefer=prefer)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


# ---- clean-up ---------------------------------------------------------------------------------


class Reaper:
    """Marks everything the bench starts and kills what is left of it."""

    def __init__(self) -> None:
        self.value = uuid.uuid4().hex
        os.environ[BENCH_ENV] = self.value  # inherited by every child, grandchild and supervisor

    def marked(self) -> list[psutil.Process]:
        """Live processes (not zombies, not us) carrying our value."""
        return proctools.marked(BENCH_ENV, self.value)

    def sweep(self, *, grace_s: float = 2.0) -> list[str]:
        """Wait up to ``grace_s`` for stragglers to go, SIGKILL the rest; returns what was killed."""
        return proctools.reap_marked(BENCH_ENV, self.value, grace_s)


def stop_group(proc: subprocess.Popen[Any], *, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
    """Signal the process group ``proc`` leads, wait for the leader, SIGKILL the group after ``timeout_s``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, the leader included
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ---- markers: what children say about themselves ---------------------------------------------


@dataclass(frozen=True)
class Marker:
    """One line a child wrote: ``tag pid wall [more...]``."""

    tag: str
    pid: int
    wall: float
    extra: tuple[str, ...]


class MarkerFifo:
    """A named pipe children write one-line markers into (atomic: each line < PIPE_BUF).

    Opened read-write by us, so it never reports EOF between writers and a writer's open never
    blocks. A thread turns lines into :class:`Marker` values on a queue.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / "markers.fifo"
        os.mkfifo(self.path)
        self._fd = os.open(self.path, os.O_RDWR)
        self._queue: queue.Queue[Marker] = queue.Queue()
        self._thread = threading.Thread(target=self._read, name="markers", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        buf = b""
        while True:
            data = os.read(self._fd, 4096)
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                parts = line.decode(errors="replace").split()
                if parts == ["quit"]:
                    return
                if len(parts) >= 3:
                    self._queue.put(Marker(parts[0], int(parts[1]), float(parts[2]), tuple(parts[3:])))

    def wait(self, predicate: Callable[[Marker], bool], *, timeout_s: float, what: str) -> Marker:
        """The next marker satisfying ``predicate`` (others are dropped); BenchError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
            try:
                marker = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(marker):
                return marker

    def close(self) -> None:
        os.write(self._fd, b"quit\n")
        self._thread.join(timeout=2.0)
        os.close(self._fd)


# ---- the supervisor under test, in a process of its own ---------------------------------------


@dataclass(frozen=True)
class Event:
    """One runner event as the driver printed it (``at`` is the driver's ``time.monotonic()``)."""

    kind: str  # "process" | "deployment" | "exit"
    name: str
    old: str
    new: str
    pid: int | None
    at: float
    reason: str


class Driver:
    """``python driver.py SCENARIO`` in its own session, its events read by a thread into a list."""

    def __init__(self, scenario: dict[str, Any], workdir: Path) -> None:
        self.workdir = workdir
        path = workdir / "scenario.json"
        path.write_text(json.dumps(scenario))
        self.stderr_path = workdir / "driver.log"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(DRIVER_PY), str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                cwd=str(ROOT),
                # scripts/ on the driver's path, as for every harness here: it imports proctools.
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(
                        filter(None, [str(KIT.parent), os.environ.get("PYTHONPATH")])
                    ),
                },
            )
        self.events: list[Event] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="driver-events", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                raw = json.loads(line)
            except ValueError:
                continue
            event = Event(
                raw["kind"],
                raw.get("name", ""),
                raw.get("old", ""),
                raw.get("new", ""),
                raw.get("pid"),
                float(raw["at"]),
                raw.get("reason", ""),
            )
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait(
        self, predicate: Callable[[Event], bool], *, start: int = 0, timeout_s: float, what: str
    ) -> tuple[int, Event]:
        """The first event at index >= ``start`` satisfying ``predicate``, and its index."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            index = start
            while True:
                while index < len(self.events):
                    if predicate(self.events[index]):
                        return index, self.events[index]
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._thread.is_alive()):
                    tail = self.stderr_path.read_text(errors="replace")[-1500:]
                    raise BenchError(
                        f"timed out after {timeout_s:g} s waiting for {what}; driver log ends:\n{tail}"
                    )
                self._cond.wait(timeout=min(left, 0.5))

    def process_events(self, name: str, new: str | None = None) -> list[Event]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.kind == "process" and e.name == name and (new is None or e.new == new)
            ]

    def stop(self, *, timeout_s: float = 30.0) -> int | None:
        """Orderly stop (SIGTERM: the runner's shutdown), SIGKILL after ``timeout_s``; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # its guardian SIGKILLs every child group when we do
            self.proc.wait()
        self._thread.join(timeout=5.0)
        return self.proc.returncode


def workdir(parent: Path, name: str) -> Path:
    """A fresh directory for one measurement (short: it holds Unix sockets and a FIFO)."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
