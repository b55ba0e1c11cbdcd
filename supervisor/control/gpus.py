"""The GPUs as the outside sees them: the ``gpus`` document, status hints, the sd_notify phrase. Pure.

Everything here reads :attr:`~supervisor.engine.states.DeploymentStatus.gpus`, the GPU guard's view
(:mod:`supervisor.engine.gpuguard`); nothing reaches into the runner or NVML.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from supervisor.control.hints import Hint, Severity
from supervisor.engine.states import DeploymentStatus, GpuStatus
from supervisor.host.gpuhealth import GpuFault

GPUS_SCHEMA = 1


def fault_view(fault: GpuFault | None) -> dict[str, Any] | None:
    if fault is None:
        return None
    f = fault.finding
    return {
        "what": f.what,
        "meaning": f.meaning,
        "class": f.fault.value,
        "action": f.action.value,
        "xid": f.xid,
        "source": fault.source,
        "at": fault.at_wall,
        "pid": fault.pid,
    }


def gpu_view(gpu: GpuStatus) -> dict[str, Any]:
    """One GPU for ``gpus --json``."""
    counters = gpu.counters
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "total_bytes": gpu.total_bytes,
        "healthy": gpu.healthy,
        "quarantine": gpu.quarantine,
        "spare": gpu.spare,
        "assigned_to": list(gpu.assigned_to),
        "last_fault": fault_view(gpu.last_fault),
        "faults": dict(gpu.faults),
        "memory": [{"pid": u.pid, "process": u.process, "used_bytes": u.used_bytes} for u in gpu.users],
        "throttled_by": list(counters.throttled_by) if counters else [],
        "counters": dataclasses.asdict(counters) if counters else None,
    }


def gpus_document(status: DeploymentStatus) -> dict[str, Any]:
    return {"schema": GPUS_SCHEMA, "deployment": status.name, "gpus": [gpu_view(g) for g in status.gpus]}


def gpu_hints(status: DeploymentStatus, assigned: dict[str, tuple[int, ...]]) -> dict[str, tuple[Hint, ...]]:
    """Hints for processes on (or moved off) a faulted GPU; ``assigned`` maps process -> its GPUs now."""
    quarantined = [g for g in status.gpus if g.quarantine is not None]
    by_index = {g.index: g for g in status.gpus}
    out: dict[str, tuple[Hint, ...]] = {}
    for name, indices in assigned.items():
        found: list[Hint] = []
        for index in indices:
            gpu = by_index.get(index)
            if gpu is None:
                continue
            if gpu.quarantine is not None:
                found.append(
                    Hint(
                        "gpu-quarantined",
                        Severity.ERROR,
                        f"GPU {index} is quarantined ({gpu.quarantine}); {name} waits for a spare or for "
                        f"`lmcache-supervise gpus clear {index}` after the GPU is reset",
                        gpu.quarantine,
                    )
                )
            elif gpu.spare and quarantined:
                was = ", ".join(f"GPU {g.index} ({g.quarantine})" for g in quarantined)
                found.append(
                    Hint("gpu-moved", Severity.WARNING, f"{name} runs on spare GPU {index} after {was}", was)
                )
            elif gpu.last_fault is not None and gpu.last_fault.finding.fault.value == "app":
                f = gpu.last_fault.finding
                found.append(
                    Hint(
                        "gpu-app-fault",
                        Severity.INFO,
                        f"GPU {index} reported {f.what} ({f.meaning}): an application fault, "
                        "so the process was restarted on the same GPU",
                        f.what,
                    )
                )
        if found:
            out[name] = tuple(found)
    return out


def quarantine_phrase(status: DeploymentStatus) -> str:
    """``GPU 0 quarantined (Xid 79)`` for sd_notify's one line; empty when every GPU is healthy."""
    bad = [g for g in status.gpus if g.quarantine is not None]
    return ", ".join(f"GPU {g.index} quarantined ({(g.quarantine or '').split(':')[0]})" for g in bad)
