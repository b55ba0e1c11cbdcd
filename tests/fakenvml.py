"""A fake NVML for GPU-health tests: pynvml's names, constants and exceptions, GPUs whose counters a
test sets, and an event set whose ``nvmlEventSetWait`` blocks until the test emits an event (or the
timeout passes, raising NVML's own Timeout error), exactly as the real one does. Thread-safe: the
watcher calls it from its own threads while the test changes it."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

GIB = 1024**3


def err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml maps the code to its subclass, as the real calls do


@dataclass(eq=False)
class FakeGpu:
    """One GPU; every counter a test may change. ``lost`` makes every call raise GPU_IS_LOST."""

    index: int
    name: str = "NVIDIA H200"
    total: int = 141 * GIB
    used: int = 0
    supported_events: int = 0xFF9F  # what two real H200s answered (driver 580.159.04)
    ecc_enabled: bool = True
    ecc: dict[tuple[int, int], int] = field(default_factory=dict)  # (error type, counter type) -> n
    remapped: tuple[int, int, int, int] = (0, 0, 0, 0)  # corrected, uncorrected, pending, failure
    clock_reasons: int = 0x1  # GPU idle
    pcie_replay: int = 0
    persistence: bool = True
    recovery_action: int = 0
    processes: list[tuple[int, int]] = field(default_factory=list)  # (pid, used bytes)
    lost: bool = False
    nvlinks: int = 18  # active NVLink links (an H200 has 18); 0: a PCIe-only GPU

    @property
    def uuid(self) -> str:
        return f"GPU-fake-{self.index:04d}"

    @property
    def bus_id(self) -> str:
        return f"00000000:{0x17 + self.index:02X}:00.0"


class FakeEventSet:
    def __init__(self) -> None:
        self.queue: queue.Queue[SimpleNamespace] = queue.Queue()
        self.registered: dict[int, int] = {}  # gpu index -> mask
        self.freed = False


class FakeNvml:
    """pynvml's surface; ``emit(gpu, type, data)`` delivers an event to every set registered for it."""

    NVMLError = pynvml.NVMLError

    def __init__(self, gpus: list[FakeGpu] | None = None, *, count: int = 2) -> None:
        self.gpus = gpus if gpus is not None else [FakeGpu(i) for i in range(count)]
        self.sets: list[FakeEventSet] = []
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.inits = 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML_", "nvmlEventType", "nvmlClocksEventReason")):
            return getattr(pynvml, name)
        raise AttributeError(name)

    # ---- what a test does ------------------------------------------------------------------------

    def emit(self, index: int, event_type: int, data: int = 0) -> None:
        gpu = self.gpus[index]
        for event_set in self.sets:
            if event_set.registered.get(index, 0) & event_type:
                event_set.queue.put(
                    SimpleNamespace(
                        device=gpu, eventType=event_type, eventData=data, gpuInstanceId=0, computeInstanceId=0
                    )
                )

    def xid(self, index: int, code: int) -> None:
        self.emit(index, pynvml.nvmlEventTypeXidCriticalError, code)

    # ---- pynvml ----------------------------------------------------------------------------------

    def _gpu(self, handle: FakeGpu, what: str) -> FakeGpu:
        with self.lock:
            self.calls[what] = self.calls.get(what, 0) + 1
        if handle.lost:
            raise err(pynvml.NVML_ERROR_GPU_IS_LOST)
        return handle

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.159.04"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if index >= len(self.gpus):
            raise err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._gpu(self.gpus[index], "handle")

    def nvmlDeviceGetIndex(self, gpu: FakeGpu) -> int:
        return self._gpu(gpu, "index").index

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        return self._gpu(gpu, "name").name

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return self._gpu(gpu, "uuid").uuid

    def nvmlDeviceGetPciInfo(self, gpu: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(busId=self._gpu(gpu, "pci").bus_id)

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> SimpleNamespace:
        g = self._gpu(gpu, "memory")
        return SimpleNamespace(total=g.total, used=g.used, free=g.total - g.used)

    def nvmlDeviceGetMigMode(self, gpu: FakeGpu) -> tuple[int, int]:
        raise err(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        return [
            SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self._gpu(gpu, "procs").processes
        ]

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        self._gpu(gpu, "procs")
        return []

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        raise err(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetNvLinkState(self, gpu: FakeGpu, link: int) -> int:
        g = self._gpu(gpu, "nvlink")
        if g.nvlinks == 0:
            raise err(pynvml.NVML_ERROR_NOT_SUPPORTED)  # what a PCIe-only GPU answers for every link
        if link >= 18:
            raise err(pynvml.NVML_ERROR_INVALID_ARGUMENT)  # past the GPU's own links
        return pynvml.NVML_FEATURE_ENABLED if link < g.nvlinks else pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetSupportedEventTypes(self, gpu: FakeGpu) -> int:
        return self._gpu(gpu, "supported events").supported_events

    def nvmlEventSetCreate(self) -> FakeEventSet:
        event_set = FakeEventSet()
        self.sets.append(event_set)
        return event_set

    def nvmlDeviceRegisterEvents(self, gpu: FakeGpu, mask: int, event_set: FakeEventSet) -> None:
        g = self._gpu(gpu, "register")
        if mask & ~g.supported_events:
            raise err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        event_set.registered[g.index] = event_set.registered.get(g.index, 0) | mask

    def nvmlEventSetWait(self, event_set: FakeEventSet, timeout_ms: int) -> SimpleNamespace:
        try:
            return event_set.queue.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise err(pynvml.NVML_ERROR_TIMEOUT) from None

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        event_set.freed = True
        self.sets.remove(event_set)

    def nvmlDeviceGetEccMode(self, gpu: FakeGpu) -> tuple[int, int]:
        g = self._gpu(gpu, "ecc mode")
        return int(g.ecc_enabled), int(g.ecc_enabled)

    def nvmlDeviceGetTotalEccErrors(self, gpu: FakeGpu, error_type: int, counter_type: int) -> int:
        return self._gpu(gpu, "ecc").ecc.get((error_type, counter_type), 0)

    def nvmlDeviceGetRemappedRows(self, gpu: FakeGpu) -> tuple[int, int, int, int]:
        return self._gpu(gpu, "remapped rows").remapped

    def nvmlDeviceGetCurrentClocksEventReasons(self, gpu: FakeGpu) -> int:
        return self._gpu(gpu, "clocks").clock_reasons

    def nvmlDeviceGetPcieReplayCounter(self, gpu: FakeGpu) -> int:
        return self._gpu(gpu, "pcie").pcie_replay

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        self._gpu(gpu, "temperature")
        return 31

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        self._gpu(gpu, "power")
        return 75_000

    def nvmlDeviceGetPersistenceMode(self, gpu: FakeGpu) -> int:
        return int(self._gpu(gpu, "persistence").persistence)

    def nvmlDeviceGetPerformanceState(self, gpu: FakeGpu) -> int:
        self._gpu(gpu, "pstate")
        return 0

    def nvmlDeviceGetFieldValues(self, gpu: FakeGpu, fields: list[int]) -> list[SimpleNamespace]:
        g = self._gpu(gpu, "fields")
        return [
            SimpleNamespace(fieldId=f, nvmlReturn=0, value=SimpleNamespace(uiVal=g.recovery_action))
            for f in fields
        ]
