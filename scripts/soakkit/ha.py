"""What a client of the API sees during faults and planned operations, one replica vs two.

Side by side in one run, each under :class:`streamload.StreamLoad` (``clients`` concurrent streaming
chat clients, 40 tokens each; a request fails on a non-200, an error inside the stream, or a stream
without a finish reason):

- ``single``: the ``demo`` profile (one decode, one prefill, no migration). Each worker is
  SIGKILLed in turn; failed requests per SIGKILL.
- ``ha``: the ``demo-ha`` profile (two decode and two prefill replicas, migration on). SIGKILLs of
  worker replicas (decode and prefill, round robin), then ``restart --all`` (a rolling restart of
  every worker), then a reload that changes the env of every worker (rolled the same way); the
  load runs on until at least ``min_requests`` requests were sent. Failed requests per phase.
- ``frontend``: ``restart frontend --allow-downtime`` on the HA deployment: how long clients are
  refused (first to last failed request) and how many fail: one frontend is a single point of
  failure (docs/reliability.md says how to run two behind a load balancer).

Both profiles run with a raised crash-loop limit (``restart.limit_starts``): the soak kills replicas
on purpose, faster than the default limit (5 starts in 120 s) allows, and the crash-loop outcome is
what the e2e crash-loop test measures, not this one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from harness import CLI, Deployment
from proctools import wait_for
from streamload import Outcome, StreamLoad, failure_window_s, summary

PROFILES = Path(__file__).resolve().parents[2] / "profiles"
HA_WORKERS = ("decode-0", "prefill-0", "decode-1", "prefill-1")
SINGLE_WORKERS = ("decode", "prefill")
RECOVER_TIMEOUT_S = 60.0
NO_LOOP = (
    "--set",
    "workers.decode.restart.limit_starts=50",
    "--set",
    "workers.prefill.restart.limit_starts=50",
)


@dataclass(frozen=True)
class Window:
    """A phase of the run: [start, end) on the monotonic clock."""

    name: str
    start: float
    end: float


def ha_profile(path: Path, *, mark: str = "") -> Path:
    """A copy of demo-ha (named ``ha-soak``) whose workers carry ``SOAK_MARK=mark``: a reload that
    changes ``mark`` changes every worker's plan."""
    env = f'env = {{ SOAK_MARK = "{mark}" }}\n' if mark else ""
    path.write_text(
        f'extends = "{PROFILES / "demo-ha.toml"}"\nname = "ha-soak"\n\n'
        f"[workers.decode]\n{env}\n[workers.prefill]\n{env}"
    )
    return path


def in_window(outcomes: list[Outcome], window: Window) -> list[Outcome]:
    return [o for o in outcomes if window.start <= o.started < window.end]


def _cli(
    dep: Deployment, *args: str, timeout_s: float = 180.0
) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    try:
        done = subprocess.run(
            [CLI, *args], env=dep.env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        tail = "".join(dep.stderr_text[-15:])
        done = subprocess.CompletedProcess(
            args, -1, "", f"timed out after {timeout_s:g} s; supervisor said:\n{tail}"
        )
    return time.monotonic() - started, done


def kill_and_recover(dep: Deployment, name: str) -> float:
    """SIGKILL ``name``'s newest incarnation; seconds until it runs again and the frontend counts
    every worker again (so each SIGKILL is one fault, not two replicas of a role down at once)."""
    _, pid = dep.process_state(name)
    assert pid is not None, f"{name} has no pid"
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    dep.wait(
        lambda: dep.process_state(name)[0] == "running" and dep.process_state(name)[1] != pid,
        RECOVER_TIMEOUT_S,
        f"{name} running again",
    )
    recovered = time.monotonic() - started
    expected = {"decode": 2, "prefill": 2} if name in HA_WORKERS else {"decode": 1, "prefill": 1}
    wait_for(
        lambda: _frontend_counts(dep) == expected,
        RECOVER_TIMEOUT_S,
        interval=0.1,
        what=f"the frontend to count {expected} workers after {name} came back",
    )
    return recovered


def _frontend_counts(dep: Deployment) -> dict[str, int]:
    try:
        with httpx.Client(trust_env=False) as client:
            answer = client.get(f"{dep.url}/v1/models/demo/ready", timeout=2.0).json()
    except (httpx.HTTPError, ValueError):
        return {}
    counts: dict[str, int] = {}
    for namespace in (answer.get("namespaces") or {}).values():
        for kind, info in (namespace.get("worker_types") or {}).items():
            counts[kind] = counts.get(kind, 0) + int(info.get("workers", 0))
    return counts


def _phase(windows: list[Window], name: str, action: Callable[[], Any]) -> Any:
    start = time.monotonic()
    result = action()
    windows.append(Window(name, start, time.monotonic()))
    return result


def run_single(workdir: Path, *, kills: int, clients: int, settle_s: float) -> dict[str, Any]:
    """One decode + one prefill without migration: failed requests per worker SIGKILL."""
    with Deployment(workdir / "single", extra=NO_LOOP) as dep:
        dep.wait_ready()
        load = StreamLoad(dep.url, model="demo", clients=clients)
        load.start()
        time.sleep(settle_s)  # fixed warm-up traffic before the first fault
        recoveries = []
        start = time.monotonic()
        for i in range(kills):
            name = SINGLE_WORKERS[i % len(SINGLE_WORKERS)]
            recoveries.append(kill_and_recover(dep, name))
            dep.wait(dep.all_ready, RECOVER_TIMEOUT_S, "the deployment ready again")
            time.sleep(settle_s)  # fixed calm between faults: each outage is counted alone
        outcomes = [o for o in load.stop() if o.started >= start]
        dep.stop()
    failed = sum(not o.ok for o in outcomes)
    return {
        "profile": "demo",
        "kills": kills,
        **summary(outcomes),
        "failed_per_kill": round(failed / kills, 2) if kills else 0.0,
        "failure_window_per_kill_s": round(failure_window_s(outcomes) / kills, 2) if kills else 0.0,
        "recovery_s_max": round(max(recoveries, default=0.0), 2),
    }


def run_ha(
    workdir: Path,
    *,
    kills: int,
    clients: int,
    min_requests: int,
    settle_s: float,
    targets: tuple[str, ...] = HA_WORKERS,
) -> dict[str, Any]:
    """demo-ha under load: SIGKILLs of ``targets`` in turn, restart --all, a reload of every worker,
    then a frontend restart."""
    workdir.mkdir(parents=True, exist_ok=True)
    profile = ha_profile(workdir / "ha-soak.toml", mark="a")
    windows: list[Window] = []
    with Deployment(
        workdir / "ha",
        profile=str(profile),
        name="ha-soak",
        names=("frontend", *HA_WORKERS),
        extra=NO_LOOP,
    ) as dep:
        dep.wait_ready()
        load = StreamLoad(dep.url, model="demo", clients=clients)
        load.start()
        time.sleep(settle_s)  # fixed warm-up traffic
        start = time.monotonic()

        kill_windows: list[Window] = []

        def kill_all() -> list[float]:
            recoveries = []
            for i in range(kills):
                name = targets[i % len(targets)]
                at = time.monotonic()
                recoveries.append(kill_and_recover(dep, name))
                time.sleep(settle_s)  # fixed gap: the next fault comes once the last one healed
                kill_windows.append(Window(name, at, time.monotonic()))
            return recoveries

        recoveries = _phase(windows, "sigkill", kill_all)
        restart_s, restarted = _phase(
            windows, "restart_all", lambda: _cli(dep, "restart", "--all", "-d", "ha-soak")
        )
        ha_profile(profile, mark="b")
        reload_s, reloaded = _phase(
            windows, "reload", lambda: _cli(dep, "reload", "ha-soak", "--timeout", "150")
        )

        def tail() -> None:
            deadline = time.monotonic() + 120
            while (
                sum(o.started >= start for o in load.outcomes()) < min_requests
                and time.monotonic() < deadline
            ):
                time.sleep(0.2)  # a deadline wait for the request count, not a fixed pause

        _phase(windows, "tail", tail)
        outcomes = [o for o in load.stop() if o.started >= start]

        # The frontend is one process: its restart is a refusal window, measured on its own.
        probe = StreamLoad(dep.url, model="demo", clients=clients)
        probe.start()
        time.sleep(settle_s)
        fe_s, fe_done = _cli(dep, "restart", "frontend", "--allow-downtime", "-d", "ha-soak", timeout_s=60.0)
        time.sleep(settle_s)  # fixed tail: requests after the frontend is back must pass
        fe_outcomes = probe.stop()
        dep.stop()
    fe_failed = [o for o in fe_outcomes if not o.ok]
    refusal_s = (max(o.ended for o in fe_failed) - min(o.started for o in fe_failed)) if fe_failed else 0.0
    return {
        "profile": "demo-ha",
        "kills": kills,
        "targets": list(targets),
        **summary(outcomes),
        "phases": {
            w.name: {**summary(in_window(outcomes, w)), "seconds": round(w.end - w.start, 1)} for w in windows
        },
        "recovery_s_max": round(max(recoveries, default=0.0), 2),
        "per_kill": [
            {"target": w.name, "at_s": round(w.start - start, 1), **summary(in_window(outcomes, w))}
            for w in kill_windows
        ],
        "restart_all": {
            "seconds": round(restart_s, 1),
            "exit": restarted.returncode,
            "output": (restarted.stdout + restarted.stderr).strip()[-300:],
        },
        "reload": {
            "seconds": round(reload_s, 1),
            "exit": reloaded.returncode,
            "output": (reloaded.stdout + reloaded.stderr).strip()[-300:],
        },
        "frontend_restart": {
            "seconds": round(fe_s, 2),
            "exit": fe_done.returncode,
            "output": (fe_done.stdout + fe_done.stderr).strip()[-3000:],
            **summary(fe_outcomes),
            "refusal_window_s": round(refusal_s, 2),
        },
    }


def run(
    workdir: Path,
    *,
    kills: int = 10,
    single_kills: int = 4,
    clients: int = 4,
    min_requests: int = 1000,
    settle_s: float = 1.5,
    targets: tuple[str, ...] = HA_WORKERS,
) -> dict[str, Any]:
    """Both deployments, one after the other (never at once: they would share two CPU cores)."""
    single = run_single(workdir, kills=single_kills, clients=clients, settle_s=settle_s)
    ha = run_ha(
        workdir, kills=kills, clients=clients, min_requests=min_requests, settle_s=settle_s, targets=targets
    )
    problems = []
    if ha["failed"]:
        problems.append(f"demo-ha: {ha['failed']} of {ha['sent']} requests failed: {ha['reasons']}")
    if ha["sent"] < min_requests:
        problems.append(f"demo-ha: only {ha['sent']} requests sent (wanted {min_requests})")
    for op in ("restart_all", "reload"):
        if ha[op]["exit"] != 0:
            problems.append(f"demo-ha: {op} exited {ha[op]['exit']}: {ha[op]['output']}")
    return {"single": single, "ha": ha, "clients": clients, "problems": problems, "ok": not problems}
