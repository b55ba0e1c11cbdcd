"""Watch GPUs for faults: NVML events, a periodic counter read, and the kernel log's Xid lines.

Two daemon threads, neither ever on the event loop:

* the NVML thread blocks in ``nvmlEventSetWait(set, wait_ms)`` (one set for every watched GPU,
  registered for Xid, double-bit ECC, remap failure, fatal poison, GPU unavailable and recovery
  action, each only where the GPU supports it); between waits, every ``counter_interval_s``, it
  reads each GPU's counters (:func:`~supervisor.host.gpuhealth.read_counters`) and judges the change;
* the kernel-log thread reads ``/dev/kmsg`` from its end (only new records) and parses
  ``NVRM: Xid`` lines: the second source, and the only one where NVML events are unsupported.

Both hand :class:`~supervisor.host.gpuhealth.GpuFault` objects to one queue; the engine takes
them with :meth:`GpuWatcher.faults` through ``anyio.to_thread``. The same Xid seen by both sources
within :data:`DEDUPE_S` is delivered once. NVML is passed in (pynvml's names), so tests drive the
real threads with a fake that emits events and counters; ``kmsg_path`` likewise.
"""

from __future__ import annotations

import errno
import os
import queue
import re
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from supervisor.eventlog import log
from supervisor.host.gpuhealth import (
    GPU_LOST,
    WATCHED_EVENTS,
    FaultCounts,
    Finding,
    GpuCounters,
    GpuFault,
    judge_counters,
    judge_event,
    read_counters,
)
from supervisor.host.nvml import load_pynvml
from supervisor.host.xid import describe, parse_xid_line, same_bus

DEDUPE_S = 10.0
ERROR_TIMEOUT = 10
_KMSG_PREFIX = re.compile(r"^\d+,\d+,\d+,[^;]*;")


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class GpuReading:
    """The watcher's current view of one GPU (a copy is handed out; the watcher owns the original)."""

    index: int
    uuid: str
    name: str
    bus_id: str
    total_bytes: int | None
    events: int = 0  # the event mask registered; 0 when NVML events are unsupported here
    event_error: str | None = None
    counters: GpuCounters | None = None
    last_fault: GpuFault | None = None
    counts: FaultCounts = field(default_factory=FaultCounts)
    processes: tuple[tuple[int, int | None], ...] = ()  # (pid, used bytes) from the last read


@dataclass
class WatchStats:
    """What the watcher did, for the validation run and the logs."""

    waits: int = 0
    events: int = 0
    counter_reads: int = 0
    kmsg_records: int = 0
    kmsg_error: str | None = None
    nvml_errors: int = 0


class GpuWatcher:
    """Watch ``indices`` (NVML indices). :meth:`start` before use, :meth:`close` after (idempotent)."""

    def __init__(
        self,
        indices: Sequence[int],
        *,
        nvml: Any = None,
        kmsg_path: str | None = "/dev/kmsg",
        counter_interval_s: float = 10.0,
        wait_ms: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.indices = tuple(sorted(set(indices)))
        self._nvml = nvml
        self._kmsg_path = kmsg_path
        self._counter_interval_s = counter_interval_s
        self._wait_ms = wait_ms
        self._clock = clock
        self._queue: queue.Queue[GpuFault] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._handles: dict[int, Any] = {}
        self._readings: dict[int, GpuReading] = {}
        self._seen: dict[tuple[int, str], float] = {}
        self._event_set: Any = None
        self._started = False
        self.stats = WatchStats()

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Open NVML, find the GPUs, register for events, start the threads. Raises only if NVML
        itself cannot start (no driver): the caller then runs without a watcher and says so."""
        if self._nvml is None:
            self._nvml = load_pynvml()
            if self._nvml is None:
                raise RuntimeError("nvidia-ml-py (pynvml) is not installed in the supervisor's environment")
        nvml = self._nvml
        nvml.nvmlInit()
        self._started = True
        for index in self.indices:
            self._readings[index] = self._open(index)
        self._register_events()
        for index in self.indices:  # the first reading: standing conditions count as faults
            self._read(index)
        self._threads.append(threading.Thread(target=self._nvml_loop, name="gpuwatch-nvml", daemon=True))
        if self._kmsg_path:
            self._threads.append(threading.Thread(target=self._kmsg_loop, name="gpuwatch-kmsg", daemon=True))
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=max(2.0, self._wait_ms / 1000 * 2))
        self._threads.clear()
        if not self._started:
            return
        self._started = False
        nvml = self._nvml
        if self._event_set is not None:
            try:
                nvml.nvmlEventSetFree(self._event_set)
            except nvml.NVMLError:
                pass
            self._event_set = None
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass

    # ---- what the engine reads ----------------------------------------------------------------

    def faults(self, timeout_s: float) -> list[GpuFault]:
        """Blocking: the faults found since the last call, waiting up to ``timeout_s`` for the first."""
        out: list[GpuFault] = []
        try:
            out.append(self._queue.get(timeout=timeout_s))
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def readings(self) -> tuple[GpuReading, ...]:
        with self._lock:
            return tuple(
                replace(r, counts=FaultCounts(dict(r.counts.by_class)))
                for _, r in sorted(self._readings.items())
            )

    # ---- NVML ---------------------------------------------------------------------------------

    def _open(self, index: int) -> GpuReading:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as exc:
            reading = GpuReading(index, "", "unknown", "", None, event_error=f"handle: {exc}")
            self._deliver(reading, GPU_LOST, "nvml-event")
            return reading
        self._handles[index] = handle

        def get(fn: Callable[[], Any], default: Any) -> Any:
            try:
                return fn()
            except nvml.NVMLError:
                return default

        memory = get(lambda: nvml.nvmlDeviceGetMemoryInfo(handle), None)
        return GpuReading(
            index=index,
            uuid=_text(get(lambda: nvml.nvmlDeviceGetUUID(handle), "")),
            name=_text(get(lambda: nvml.nvmlDeviceGetName(handle), "unknown")),
            bus_id=_text(get(lambda: nvml.nvmlDeviceGetPciInfo(handle).busId, "")),
            total_bytes=int(memory.total) if memory is not None else None,
        )

    def _register_events(self) -> None:
        nvml = self._nvml
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            for reading in self._readings.values():
                reading.event_error = f"event set: {exc}"
            return
        for index, handle in self._handles.items():
            reading = self._readings[index]
            try:
                mask = int(nvml.nvmlDeviceGetSupportedEventTypes(handle)) & WATCHED_EVENTS
                if mask:
                    nvml.nvmlDeviceRegisterEvents(handle, mask, self._event_set)
                reading.events = mask
                if not mask:
                    reading.event_error = "no health events supported (the kernel log is the only source)"
            except nvml.NVMLError as exc:
                reading.event_error = f"register events: {exc}"
        if not any(r.events for r in self._readings.values()):
            try:
                nvml.nvmlEventSetFree(self._event_set)
            except nvml.NVMLError:
                pass
            self._event_set = None

    def _nvml_loop(self) -> None:
        next_read = time.monotonic() + self._counter_interval_s
        while not self._stop.is_set():
            if self._event_set is None:
                self._stop.wait(max(0.0, min(self._wait_ms / 1000, next_read - time.monotonic())))
            else:
                self._wait_event()
            if time.monotonic() >= next_read and not self._stop.is_set():
                next_read = time.monotonic() + self._counter_interval_s
                for index in self._handles:
                    self._read(index)

    def _wait_event(self) -> None:
        nvml = self._nvml
        try:
            data = nvml.nvmlEventSetWait(self._event_set, self._wait_ms)
        except nvml.NVMLError as exc:
            self.stats.waits += 1
            if getattr(exc, "value", None) != ERROR_TIMEOUT:
                self.stats.nvml_errors += 1
                log.warning("NVML event wait failed", error=str(exc))
                self._stop.wait(self._wait_ms / 1000)  # never spin on a broken set
            return
        self.stats.waits += 1
        self.stats.events += 1
        finding = judge_event(int(data.eventType), int(data.eventData))
        index = self._index_of(data.device)
        if finding is None or index is None:
            log.info("NVML event", type=hex(int(data.eventType)), data=int(data.eventData), gpu=index)
            return
        self._deliver(self._readings[index], finding, "nvml-event")

    def _index_of(self, device: Any) -> int | None:
        for index, handle in self._handles.items():
            if handle is device:
                return index
        nvml = self._nvml
        try:
            uuid = _text(nvml.nvmlDeviceGetUUID(device))
        except nvml.NVMLError:
            return None
        return next((r.index for r in self._readings.values() if r.uuid == uuid), None)

    def _read(self, index: int) -> None:
        handle = self._handles.get(index)
        if handle is None:
            return
        counters = read_counters(self._nvml, handle)
        processes = () if counters.lost else self._processes(handle)
        self.stats.counter_reads += 1
        reading = self._readings[index]
        with self._lock:
            before, reading.counters = reading.counters, counters
            reading.processes = processes
        for finding in judge_counters(before, counters):
            self._deliver(reading, finding, "counters")

    def _processes(self, handle: Any) -> tuple[tuple[int, int | None], ...]:
        nvml = self._nvml
        try:
            found = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except nvml.NVMLError:
            return ()
        used = (getattr(p, "usedGpuMemory", None) for p in found)
        return tuple((int(p.pid), u if isinstance(u, int) else None) for p, u in zip(found, used))

    # ---- the kernel log -------------------------------------------------------------------------

    def _kmsg_loop(self) -> None:
        assert self._kmsg_path is not None
        try:
            fd = os.open(self._kmsg_path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            self.stats.kmsg_error = f"{self._kmsg_path}: {exc.strerror}"
            log.info("kernel log not readable; NVML events only", path=self._kmsg_path, error=exc.strerror)
            return
        try:
            try:
                os.lseek(fd, 0, os.SEEK_END)  # /dev/kmsg: only records from now on
            except OSError:
                pass  # a pipe (tests): nothing to skip
            pending = b""
            while not self._stop.is_set():
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    continue
                try:
                    chunk = os.read(fd, 8192)
                except OSError as exc:
                    if exc.errno == errno.EPIPE:  # records overwritten before we read them: go on
                        continue
                    if exc.errno == errno.EAGAIN:
                        continue
                    self.stats.kmsg_error = f"{self._kmsg_path}: {exc.strerror}"
                    return
                if not chunk:  # a writer closed its end (tests); /dev/kmsg never ends
                    self._stop.wait(0.5)
                    continue
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._kmsg_record(_text(line))
        finally:
            os.close(fd)

    def _kmsg_record(self, line: str) -> None:
        if not line or line.startswith(" "):  # a record's continuation (key=value) lines
            return
        self.stats.kmsg_records += 1
        parsed = parse_xid_line(_KMSG_PREFIX.sub("", line))
        if parsed is None:
            return
        reading = next(
            (r for r in self._readings.values() if r.bus_id and same_bus(parsed.bus_id, r.bus_id)), None
        )
        if reading is None:
            log.info("Xid on a GPU not watched", bus=parsed.bus_id, xid=parsed.code)
            return
        xid = describe(parsed.code)
        self._deliver(
            reading,
            Finding(xid.fault, f"Xid {xid.code}", xid.meaning, xid.action, xid.code),
            "kernel-log",
            pid=parsed.pid,
        )

    # ---- delivery -------------------------------------------------------------------------------

    def _deliver(self, reading: GpuReading, finding: Finding, source: str, *, pid: int | None = None) -> None:
        now = self._clock()
        key = (reading.index, finding.what)
        with self._lock:
            last = self._seen.get(key)
            self._seen[key] = now
            if last is not None and now - last < DEDUPE_S:
                return  # the same fault from the other source, or repeated by the driver
            fault = GpuFault(reading.index, reading.uuid, finding, source, now, pid)
            reading.last_fault = fault
            reading.counts.add(finding.fault)
        level = "error" if fault.fatal else "warning"
        getattr(log, level)(
            "GPU fault",
            gpu=reading.index,
            uuid=reading.uuid,
            what=finding.what,
            fault=finding.fault.value,
            meaning=finding.meaning,
            action=finding.action.value,
            source=source,
        )
        self._queue.put(fault)
