"""The GPUs as NVML reports them, for preflight: one snapshot, every NVML call guarded on its own.

NVML is the one boundary tests fake, so it is passed in as a module-like object with pynvml's
function names (:class:`Nvml`); the default is the real ``pynvml`` from nvidia-ml-py. Each call can
fail on its own (a MIG parent refuses process lists, an old driver lacks a function, a container
hides other PIDs), so a failing call records a problem on that GPU and the snapshot goes on: a
preflight that dies on the first ``NVMLError`` would hide every other finding.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import psutil

from supervisor.host.gpuhealth import GpuCounters, read_counters
from supervisor.host.nvml import load_pynvml

T = TypeVar("T")

NO_DRIVER = "no NVIDIA driver found (NVML library not loadable)"


class MigMode(str, enum.Enum):
    """A GPU's current MIG mode; ``unsupported`` for GPUs without MIG, ``unknown`` when NVML failed."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    UNSUPPORTED = "unsupported"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU. ``used_bytes`` is None where NVML cannot tell (MIG, containers)."""

    pid: int
    name: str
    used_bytes: int | None


@dataclass(frozen=True)
class Gpu:
    """One physical GPU by NVML index. Memory fields are None when NVML refused to report them."""

    index: int
    name: str
    uuid: str
    total_bytes: int | None
    free_bytes: int | None
    mig: MigMode
    processes: tuple[GpuProcess, ...]
    problems: tuple[str, ...] = ()
    nvlinks: int | None = None  # active NVLink links (0: PCIe only); None when not asked or NVML cannot tell
    health: GpuCounters | None = None  # ECC, row remapping, persistence, ... (gpuhealth.read_counters)


@dataclass(frozen=True)
class GpuFacts:
    """The NVML view of the machine: ``error`` is set (and ``gpus`` empty) when NVML could not start."""

    error: str | None
    driver: str | None
    gpus: tuple[Gpu, ...]

    def gpu(self, index: int) -> Gpu | None:
        return next((g for g in self.gpus if g.index == index), None)


class Nvml(Protocol):
    """The part of pynvml preflight uses; a test passes a fake with the same names."""

    NVMLError: type[Exception]

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMigMode(self, handle: Any) -> Sequence[int]: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> Sequence[Any]: ...
    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> Sequence[Any]: ...
    def nvmlSystemGetProcessName(self, pid: int) -> str: ...
    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> int: ...


def _text(value: str | bytes) -> str:
    # Old pynvml releases return bytes, new ones str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _error_value(exc: Exception) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _init_error(nvml: Any, exc: Exception) -> str:
    """One sentence for a failed ``nvmlInit``; the common no-driver case gets the fixed wording."""
    code = _error_value(exc)
    if code == getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", 12):
        return NO_DRIVER
    if code == getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", 9):
        return "NVIDIA driver not loaded (NVML: driver not loaded; is the kernel module installed?)"
    if code == getattr(nvml, "NVML_ERROR_LIB_RM_VERSION_MISMATCH", 18):
        return "NVIDIA driver/library version mismatch (NVML: reboot or reload the kernel module)"
    if code == getattr(nvml, "NVML_ERROR_NO_PERMISSION", 4):
        return "no permission to open the NVIDIA devices (NVML: insufficient permissions)"
    return f"NVML could not start: {exc}"


def _process_name(nvml: Any, pid: int) -> str:
    # The driver knows the process even when this supervisor runs in another PID namespace, so ask
    # NVML first; psutil is the fallback for drivers that refuse (NVML_ERROR_NO_PERMISSION).
    try:
        name = _text(nvml.nvmlSystemGetProcessName(pid))
        if name:
            return os.path.basename(name) or name
    except nvml.NVMLError:
        pass
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return "unknown"


def _nvlinks(nvml: Any, handle: Any) -> int | None:
    """Active NVLink links of one GPU: 0 on a PCIe-only GPU (NVML answers NotSupported for every link),
    None when NVML fails otherwise. A link index past the GPU's own count answers InvalidArgument or
    NotSupported (an A100 has 12 links, an H100/H200 18, NVML asks up to NVML_NVLINK_MAX_LINKS)."""
    absent = (getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3), getattr(nvml, "NVML_ERROR_INVALID_ARGUMENT", 2))
    active = 0
    for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
        try:
            state = nvml.nvmlDeviceGetNvLinkState(handle, link)
        except nvml.NVMLError as exc:
            if _error_value(exc) in absent:
                continue
            return None
        active += int(state == getattr(nvml, "NVML_FEATURE_ENABLED", 1))
    return active


def _gpu(nvml: Any, index: int, links: bool = False) -> Gpu:
    problems: list[str] = []

    def call(what: str, fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except nvml.NVMLError as exc:
            if _error_value(exc) != getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3):
                problems.append(f"{what}: {exc}")
            elif what == "memory":
                problems.append("memory: not supported by NVML on this GPU")
            return default

    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:
        # A GPU that fell off the bus (NVML_ERROR_GPU_IS_LOST) still has an index; say so.
        return Gpu(index, "unknown", "", None, None, MigMode.UNKNOWN, (), (f"handle: {exc}",))
    name = call("name", lambda: _text(nvml.nvmlDeviceGetName(handle)), "unknown")
    uuid = call("uuid", lambda: _text(nvml.nvmlDeviceGetUUID(handle)), "")
    memory = call("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle), None)
    total = int(memory.total) if memory is not None else None
    free = int(memory.free) if memory is not None else None

    mig = MigMode.UNKNOWN
    try:
        current = nvml.nvmlDeviceGetMigMode(handle)[0]
        mig = MigMode.ENABLED if current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1) else MigMode.DISABLED
    except nvml.NVMLError as exc:
        if _error_value(exc) == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", 3):
            mig = MigMode.UNSUPPORTED
        else:
            problems.append(f"MIG mode: {exc}")

    # Compute and graphics lists overlap (a CUDA + OpenGL process is in both): one entry per pid.
    seen: dict[int, int | None] = {}
    for what, fn in (
        ("compute processes", nvml.nvmlDeviceGetComputeRunningProcesses),
        ("graphics processes", nvml.nvmlDeviceGetGraphicsRunningProcesses),
    ):
        listed: list[Any] = call(what, lambda fn=fn: list(fn(handle)), [])  # type: ignore[misc]
        for info in listed:
            used = getattr(info, "usedGpuMemory", None)
            seen.setdefault(int(info.pid), int(used) if isinstance(used, int) else None)
    processes = tuple(GpuProcess(pid, _process_name(nvml, pid), used) for pid, used in sorted(seen.items()))
    nvlinks = _nvlinks(nvml, handle) if links else None
    health = read_counters(nvml, handle)
    return Gpu(index, name, uuid, total, free, mig, processes, tuple(problems), nvlinks, health)


def gpu_facts(nvml: Any | None = None, *, links: bool = False) -> GpuFacts:
    """Snapshot every GPU NVML sees. Never raises for NVML trouble: it lands in ``error``/``problems``.

    ``links``: also count each GPU's active NVLinks (``init`` asks; preflight does not need them)."""
    if nvml is None:
        nvml = load_pynvml()
        if nvml is None:
            return GpuFacts(
                "nvidia-ml-py (pynvml) is not installed in the supervisor's environment", None, ()
            )
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return GpuFacts(_init_error(nvml, exc), None, ())
    try:
        try:
            driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            driver = None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            return GpuFacts(f"NVML could not count the GPUs: {exc}", driver, ())
        return GpuFacts(None, driver, tuple(_gpu(nvml, i, links) for i in range(count)))
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
