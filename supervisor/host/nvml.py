"""The one NVML wrapper: loading nvidia-ml-py, initialising NVML once, and which processes hold GPUs.

Every NVML user gets the library here (:func:`load_pynvml`): the preflight facts
(:mod:`~supervisor.host.gpu`) and the health watcher (:mod:`~supervisor.host.gpuwatch`) take a
pynvml-like object so tests can fake that boundary; the engine's GPU hygiene uses :func:`gpu_pids`:
before a GPU worker is relaunched, the runner waits until none of the dead group's processes still
holds memory on its GPUs (the driver frees memory a moment after the process is gone, and a new
vLLM would otherwise see too little free memory and fail).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import anyio.to_thread
import psutil

_lock = threading.Lock()
_state: dict[str, bool] = {}


def load_pynvml() -> Any | None:
    """The real pynvml module, or None when nvidia-ml-py is not installed."""
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _init() -> bool:
    """Initialise NVML once; False (and never retried) when there is no driver or no library."""
    with _lock:
        if "ok" not in _state:
            try:
                pynvml = load_pynvml()
                if pynvml is None:
                    raise ImportError("nvidia-ml-py")
                pynvml.nvmlInit()
                _state["ok"] = True
            except Exception:  # no libnvidia-ml, no driver, no GPU: all mean "unknown"
                _state["ok"] = False
        return _state["ok"]


def gpu_pids(gpu_indices: Iterable[int]) -> set[int] | None:
    """PIDs with compute or graphics contexts on these GPUs; None when NVML cannot tell.

    Blocking (NVML calls take milliseconds): call it through ``anyio.to_thread``.
    """
    indices = tuple(gpu_indices)
    pynvml = load_pynvml()
    if not indices or pynvml is None or not _init():
        return None

    pids: set[int] = set()
    try:
        for index in indices:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for getter in (
                pynvml.nvmlDeviceGetComputeRunningProcesses,
                pynvml.nvmlDeviceGetGraphicsRunningProcesses,
            ):
                pids.update(proc.pid for proc in getter(handle))
    except pynvml.NVMLError:
        return None
    return pids


async def wait_released(
    gpu_indices: tuple[int, ...],
    dead_pids: set[int],
    *,
    gpu_pids: Callable[[tuple[int, ...]], set[int] | None] = gpu_pids,
    timeout_s: float,
    interval_s: float = 0.2,
) -> set[int]:
    """Wait until no process of a dead group holds memory on these GPUs; the pids still there.

    A pid NVML lists that no longer exists counts as the dead group's too: its memory is simply
    not freed yet. Returns an empty set when released (or when NVML cannot tell).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        holding = await anyio.to_thread.run_sync(gpu_pids, gpu_indices)
        if holding is None:
            return set()
        left = {pid for pid in holding if pid in dead_pids or not psutil.pid_exists(pid)}
        if not left or time.monotonic() >= deadline:
            return left
        await anyio.sleep(interval_s)
