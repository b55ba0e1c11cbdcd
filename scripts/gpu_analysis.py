"""Pure helpers for scripts/gpu_validate.py: preconditions, UUID matching, the restart timeline.

Nothing here touches NVML, CUDA or processes, so tests/scripts/test_gpu_analysis.py runs it on machines
without a GPU (CI). The driver feeds it what it recorded: runner events, the runner's own NVML polls
(through its ``gpu_pids`` hook) and an independent NVML sampler's readings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from supervisor.host.gpu import GpuFacts


@dataclass(frozen=True)
class Sample:
    """One NVML reading of one GPU: the pids with compute contexts (and their bytes) and memory used."""

    t: float
    gpu: int
    pids: dict[int, int | None]
    used_bytes: int | None


@dataclass(frozen=True)
class Poll:
    """One call of the runner's ``gpu_pids`` hook: when it ran and what NVML answered (None: unknown)."""

    started: float
    ended: float
    gpus: tuple[int, ...]
    pids: frozenset[int] | None


@dataclass(frozen=True)
class Transition:
    """One process state change as the runner emitted it (``ProcessEvent`` flattened)."""

    t: float
    name: str
    new: str
    pid: int | None
    reason: str


def preconditions(facts: GpuFacts, *, need: int = 2) -> str | None:
    """Why this machine cannot run the validation (one sentence), or None when it can."""
    if facts.error:
        return f"NVML is not usable here: {facts.error}. Run this on a machine with {need} NVIDIA GPUs."
    if len(facts.gpus) < need:
        return (
            f"NVML (driver {facts.driver}) sees {len(facts.gpus)} GPU(s); this validation needs {need} "
            "(a disagg-shaped plan puts decode on GPU 0 and prefill on GPU 1)"
        )
    return None


def normalize_uuid(value: str) -> str:
    """NVML says ``GPU-8c6d...``, torch's ``props.uuid`` prints ``8c6d...``: compare bare, lowercase."""
    value = value.strip().lower()
    return value.removeprefix("gpu-")


def cuda_to_nvml(torch_devices: Sequence[dict[str, Any]], nvml_uuids: Sequence[str]) -> list[int | None]:
    """For each CUDA ordinal, the NVML index holding the same UUID (None: no such GPU in NVML)."""
    by_uuid = {normalize_uuid(u): i for i, u in enumerate(nvml_uuids)}
    return [by_uuid.get(normalize_uuid(str(d.get("uuid", "")))) for d in torch_devices]


def findings_for(findings: Iterable[dict[str, Any]], check: str) -> list[dict[str, Any]]:
    return [f for f in findings if f.get("check") == check]


def names_holder(finding: dict[str, Any], pid: int, name: str) -> bool:
    """Whether a finding's message names ``pid (name`` the way ``preflight_gpu.holders`` writes it."""
    return f"pid {pid} ({name}" in str(finding.get("message", ""))


def freed_at(samples: Iterable[Sample], gpu: int, pids: set[int], *, after: float) -> float | None:
    """The first sampler reading after ``after`` from which on NVML never again lists any of ``pids``."""
    relevant = sorted((s for s in samples if s.gpu == gpu and s.t >= after), key=lambda s: s.t)
    last_held = None
    for i, sample in enumerate(relevant):
        if pids & sample.pids.keys():
            last_held = i
    start = 0 if last_held is None else last_held + 1
    return relevant[start].t if start < len(relevant) else None


def held_after(samples: Iterable[Sample], gpu: int, pids: set[int], *, after: float) -> list[Sample]:
    """Readings at or after ``after`` that still list one of ``pids`` on ``gpu``."""
    return [s for s in samples if s.gpu == gpu and s.t >= after and pids & s.pids.keys()]


def used_at(samples: Iterable[Sample], gpu: int, t: float) -> int | None:
    """Memory used on ``gpu`` by the last reading at or before ``t``."""
    before = [s for s in samples if s.gpu == gpu and s.t <= t]
    return max(before, key=lambda s: s.t).used_bytes if before else None


def _first(transitions: Iterable[Transition], name: str, new: str, *, after: float) -> Transition | None:
    found = [tr for tr in transitions if tr.name == name and tr.new == new and tr.t >= after]
    return min(found, key=lambda tr: tr.t) if found else None


def restart_timeline(
    *,
    name: str,
    gpu: int,
    killed_at: float,
    dead_pids: set[int],
    transitions: Sequence[Transition],
    polls: Sequence[Poll],
    samples: Sequence[Sample],
) -> dict[str, Any]:
    """The figures of one SIGKILL -> GPU wait -> respawn -> healthy cycle, in seconds after the kill.

    ``outcome`` is ``released`` when the runner's last NVML poll before the respawn listed none of
    the dead group's pids, ``still held`` when it still did (the bounded wait expired, or the holder
    was one the runner could not know, such as an orphan it never saw), ``unknown``
    when NVML could not tell or nothing was polled. ``violations`` lists what contradicts the
    hygiene promise: sampler readings that show a dead pid after the respawn while the outcome
    says released.
    """
    exited = _first(transitions, name, "backoff", after=killed_at)
    respawn = _first(transitions, name, "starting", after=killed_at)
    healthy = _first(transitions, name, "running", after=respawn.t) if respawn else None
    nvml_free = freed_at(samples, gpu, dead_pids, after=killed_at)

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - killed_at, 4)

    waiting = [
        p
        for p in polls
        if exited is not None and p.started >= exited.t and (respawn is None or p.ended <= respawn.t)
    ]
    held = [p for p in waiting if p.pids is not None and dead_pids & p.pids]
    last = waiting[-1] if waiting else None
    if last is None or last.pids is None:
        outcome = "unknown"
    elif dead_pids & last.pids:
        outcome = "still held"
    else:
        outcome = "released"
    violations: list[str] = []
    if respawn is not None and outcome == "released":
        for s in held_after(samples, gpu, dead_pids, after=respawn.t):
            violations.append(
                f"NVML listed dead pid(s) {sorted(dead_pids & s.pids.keys())} on GPU {gpu} "
                f"{s.t - respawn.t:.3f} s after the respawn"
            )
    return {
        "exit_detected_s": rel(exited.t if exited else None),
        "exit_reason": exited.reason if exited else None,
        "nvml_free_s": rel(nvml_free),
        "gpu_wait_started_s": rel(waiting[0].started if waiting else None),
        "gpu_wait_ended_s": rel(last.ended if last else None),
        "gpu_polls": len(waiting),
        "gpu_polls_holding": len(held),
        "respawn_s": rel(respawn.t if respawn else None),
        "new_pid": respawn.pid if respawn else None,
        "healthy_s": rel(healthy.t if healthy else None),
        "used_bytes_before_kill": used_at(samples, gpu, killed_at),
        "used_bytes_at_respawn": used_at(samples, gpu, respawn.t) if respawn else None,
        "outcome": outcome,
        "violations": violations,
    }
