"""The engine's only contact with NVML: which processes hold memory on given GPUs.

Used for GPU hygiene: before a GPU worker is relaunched, the runner waits until none of the dead
group's processes still holds memory on its GPUs (the driver frees memory a moment after the
process is gone, and a new vLLM would otherwise see too little free memory and fail). Tests fake
this boundary, not NVML itself.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

_lock = threading.Lock()
_state: dict[str, bool] = {}


def _init() -> bool:
    """Initialise NVML once; False (and never retried) when there is no driver or no library."""
    with _lock:
        if "ok" not in _state:
            try:
                import pynvml

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
    if not indices or not _init():
        return None
    import pynvml

    pids: set[int] = set()
    try:
        for index in indices:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for getter in (pynvml.nvmlDeviceGetComputeRunningProcesses,
                           pynvml.nvmlDeviceGetGraphicsRunningProcesses):
                pids.update(proc.pid for proc in getter(handle))
    except pynvml.NVMLError:
        return None
    return pids
