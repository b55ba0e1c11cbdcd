"""``status --json``: the stable, documented JSON form of a deployment's status (schema 1).

Built from the runner's :class:`~supervisor.engine.states.DeploymentStatus` snapshot, the plan (GPUs,
ports, log files) and the :class:`~supervisor.control.progress.Timeline`; hints come from the tail of each
child's log (:mod:`supervisor.control.hints`). The README's "Control and observability" section
documents every field; add fields freely, but never rename or retype one without bumping
:data:`SCHEMA`.

Process states use the words people ask about, not the runner's finer phases (kept as ``phase``):
starting (waiting for dependencies or in its startup probe), healthy, unhealthy (started but its
readiness fails), backoff, failed, stopping, stopped (never started, stopped, or exited for good).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from typing import Any

from supervisor.control import gpus as gpuview
from supervisor.control import hints as diagnose
from supervisor.control.progress import Timeline
from supervisor.engine.proctree import descendants
from supervisor.engine.states import DeploymentStatus, ExitInfo, ProcessState, ProcessStatus
from supervisor.host import ports
from supervisor.plan.addresses import client_host
from supervisor.plan.spec import Plan, Role

SCHEMA = 1


def exit_view(info: ExitInfo | None) -> dict[str, Any] | None:
    """``{"pid", "code", "signal", "description", "runtime_s"}``: code for an exit, signal name for a kill."""
    if info is None:
        return None
    name = None
    if info.signal is not None:
        try:
            name = signal.Signals(info.signal).name
        except ValueError:
            name = f"SIG{info.signal}"
    return {
        "pid": info.pid,
        "code": info.returncode,
        "signal": name,
        "description": info.describe(),
        "runtime_s": round(info.runtime_s, 3),
    }


def process_view(proc: ProcessStatus, plan: Plan, hints: tuple[diagnose.Hint, ...] = ()) -> dict[str, Any]:
    try:
        spec = plan.process(proc.name)
        gpus, ports, log_file = list(spec.gpus), dict(sorted(spec.ports.items())), spec.log_file
    except KeyError:  # a reload removed it between the snapshot and now
        gpus, ports, log_file = [], {}, None
    probe = proc.last_probe
    return {
        "name": proc.name,
        "role": proc.role,
        "state": proc.state.summary,
        "phase": proc.state.value,
        "required": proc.required,
        "pid": proc.pid,
        "started_at": proc.started_wall,
        "uptime_s": None if proc.uptime_s is None else round(proc.uptime_s, 3),
        "restarts": proc.restarts,
        "last_exit": exit_view(proc.last_exit),
        "gpus": gpus,
        "ports": ports,
        "probe": None
        if probe is None
        else {"ok": probe.ok, "latency_s": round(probe.latency_s, 6), "error": probe.error},
        "reason": proc.reason,
        "log_file": log_file,
        "hints": [h.to_json() for h in hints],
    }


def status_view(
    status: DeploymentStatus,
    plan: Plan,
    timeline: Timeline,
    hints: Mapping[str, tuple[diagnose.Hint, ...]] | None = None,
) -> dict[str, Any]:
    """The whole ``status --json`` document."""
    dep = plan.deployment
    ttr = timeline.time_to_ready_s
    metrics_url = (
        f"http://{client_host(dep.metrics_host)}:{dep.metrics_port}/metrics"
        if dep.metrics_port is not None
        else None
    )
    return {
        "schema": SCHEMA,
        "deployment": {
            "name": status.name,
            "state": status.state.value,
            "model": status.model,
            "base_url": status.base_url,
            "supervisor_pid": os.getpid(),
            "state_dir": dep.state_dir,
            "started_at": timeline.started_wall,
            "uptime_s": round(timeline.elapsed_s(), 3),
            "time_to_ready_s": None if ttr is None else round(ttr, 3),
            "ready_since": status.ready_since_wall,
            "metrics_url": metrics_url,
            "targets_file": dep.targets_file,
        },
        "processes": [process_view(p, plan, (hints or {}).get(p.name, ())) for p in status.processes],
        "roles": roles_view(status, plan),
        "gpus": [gpuview.gpu_view(g) for g in status.gpus],
    }


def roles_view(status: DeploymentStatus, plan: Plan) -> list[dict[str, Any]]:
    """Per group (a worker table's replicas; a process alone is a group of one), in start order:
    ``{"role", "healthy", "replicas", "min_ready", "failed"}`` (``failed``: names of FAILED replicas)."""
    out: list[dict[str, Any]] = []
    for spec in plan.processes:
        if any(r["role"] == spec.group for r in out):
            continue
        names = [m.name for m in plan.members(spec.group)]
        procs = [p for p in status.processes if p.name in names]
        out.append(
            {
                "role": spec.group,
                "healthy": sum(p.state is ProcessState.RUNNING for p in procs),
                "replicas": len(names),
                "min_ready": spec.min_ready,
                "failed": [p.name for p in procs if p.state is ProcessState.FAILED],
            }
        )
    return out


def roles_line(roles: list[dict[str, Any]]) -> str:
    """``frontend 1/1, decode 1/2, prefill 2/2``: healthy of replicas per role."""
    return ", ".join(f"{r['role']} {r['healthy']}/{r['replicas']}" for r in roles)


# ---- hints: the only IO here, run in a worker thread by the control server ----------------------


def read_tail(path: str, limit: int = diagnose.TAIL_BYTES) -> list[str]:
    """The last whole lines within ``limit`` bytes of ``path`` (none if it is missing)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[1:] if size > limit else lines  # the first line of a cut tail is partial


def _tree(pid: int | None) -> set[int]:
    return set() if pid is None else {pid, *descendants(pid)}


def gather_hints(status: DeploymentStatus, plan: Plan) -> dict[str, tuple[diagnose.Hint, ...]]:
    """Hints per process from the tail of its log; bind errors name the port and who holds it."""
    out: dict[str, tuple[diagnose.Hint, ...]] = {}
    table: list[ports.Listener] | None = None
    for proc in status.processes:
        try:
            spec = plan.process(proc.name)
        except KeyError:
            continue
        found = diagnose.scan(read_tail(spec.log_file))
        if any(h.kind == "port-in-use" for h in found):
            table = ports.listeners() if table is None else table
            found = diagnose.attribute_ports(
                found, ports=spec.ports, holder=_holder_of(table, _tree(proc.pid))
            )
        if found:
            out[proc.name] = found
    assigned = {spec.name: spec.gpus for spec in plan.processes if spec.gpus}
    for name, found in gpuview.gpu_hints(status, assigned).items():
        out[name] = (*found, *out.get(name, ()))
    return out


def _holder_of(table: list[ports.Listener], ours: set[int]) -> Callable[[int], diagnose.PortHolder | None]:
    def holder(port: int) -> diagnose.PortHolder | None:
        held = ports.holder(port, table=table)
        if held is None:
            return None
        name = ports.describe(held.pid) if held.pid is not None else None
        return diagnose.PortHolder(pid=held.pid, name=name, ours=held.pid in ours)

    return holder


def cache_view(status: DeploymentStatus, plan: Plan, *, timeout_s: float = 1.0) -> list[dict[str, Any]]:
    """LMCache's servers in this plan: planned capacity and, for a healthy multiprocess server, what its
    own ``/metrics`` says (L1 use, lookup hit and requested tokens). Blocking: run it off the event loop."""
    import httpx

    from supervisor.control import scrape

    out: list[dict[str, Any]] = []
    for proc in status.processes:
        try:
            spec = plan.process(proc.name)
        except KeyError:
            continue
        if not spec.role.is_cache_server:
            continue
        view: dict[str, Any] = {
            "process": spec.name,
            "role": spec.role.value,
            "healthy": proc.state is ProcessState.RUNNING,
            "capacity_bytes": int(spec.memory_gb * 2**30) if spec.memory_gb else None,
        }
        if spec.role is Role.LMCACHE_SERVER and proc.state is ProcessState.RUNNING:
            url = f"http://{client_host(spec.bind_host)}:{spec.ports['http']}/metrics"
            target = scrape.Target(process=spec.name, role=spec.role.value, gpu="", url=url)
            with httpx.Client(trust_env=False) as client:
                summary = scrape.summarize(target, *scrape.scrape(url, client, timeout_s=timeout_s))
            view |= {
                "metrics_error": summary.error,
                "l1_used_bytes": summary.lmcache_local_usage_bytes,
                "l1_usage_ratio": summary.l1_usage_ratio,
                "hit_tokens": summary.lmcache_hits,
                "requested_tokens": summary.lmcache_requested,
            }
        out.append(view)
    return out
