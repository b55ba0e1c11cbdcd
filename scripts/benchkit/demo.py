"""Time to first successful request for the demo disagg deployment, three ways, same processes.

* ``lmcache-supervise up demo`` (preflight included: that is what a user runs);
* ``scripts/upstream/disagg_lmcache.sh``: upstream's shape, ``sleep 20`` between decode and prefill;
* ``scripts/upstream/disagg_lmcache_poll.sh``: the same with a 1 s curl loop on decode's health.

The scripts run exactly the argv and env that ``lmcache-supervise plan demo --json`` renders for the
same port base and state directory (written to a launch file of bash arrays). From the instant
before launching, a client POSTs a chat completion every 50 ms until one answers 200; that instant
minus the launch is the figure. Each launch gets fresh ports and a fresh state directory, and runs
in its own session: the scripts' ``kill 0`` and a group SIGKILL after it take everything down.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import httpx
import psutil
from harness import CLI

from benchkit.common import ROOT, BenchError, free_port_base, stop_group

UPSTREAM = ROOT / "scripts" / "upstream"
POLL_S = 0.05
#: Stop timeouts for the supervisor's workers: shutdown is not what is measured here.
FAST_STOP = ("--set", "workers.decode.stop_timeout_s=5", "--set", "workers.prefill.stop_timeout_s=5")


def _env(state_root: Path) -> dict[str, str]:
    env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(state_root)}
    env.pop("LMCACHE_SUPERVISE_DEBUG", None)
    return env


def first_success(url: str, proc: subprocess.Popen[Any], launched: float, *, timeout_s: float) -> float:
    """Seconds from ``launched`` to the first 200 on ``url``, polling every 50 ms."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    deadline = launched + timeout_s
    with httpx.Client(trust_env=False) as client:
        tick = time.monotonic()
        while time.monotonic() < deadline:
            try:
                if client.post(url, json=body, timeout=10.0).status_code == 200:
                    return time.monotonic() - launched
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise BenchError(f"{proc.args[0]} exited with {proc.returncode} before serving")
            tick += POLL_S
            time.sleep(max(0.0, tick - time.monotonic()))
    raise BenchError(f"no successful request within {timeout_s:g} s")


def supervised(workdir: Path, *, state_root: Path | None = None, base: int | None = None) -> dict[str, Any]:
    """``up demo`` from launch to first 200; also the supervisor's RSS while serving.

    ``state_root`` and ``base`` (while its ports are free): pass the same ones run after run, as a
    user starting the same deployment again does, so that later runs find the plan cache."""
    base = free_port_base(harness.port_offsets(), prefer=base)
    out, err = workdir / "up.out", workdir / "up.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        launched, launched_wall = time.monotonic(), time.time()
        proc = subprocess.Popen(
            [CLI, "up", "demo", "--quiet-children", "--set", f"ports.base={base}", *FAST_STOP],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=_env(state_root or workdir / "state"),
            start_new_session=True,
        )
    try:
        seconds = first_success(f"http://127.0.0.1:{base}/v1/chat/completions", proc, launched, timeout_s=120)
        rss_mb = psutil.Process(proc.pid).memory_info().rss / 2**20
    except BenchError as exc:
        raise BenchError(f"{exc}; up demo said: {err.read_text(errors='replace')[-1500:]}") from None
    finally:
        stop_group(proc, timeout_s=60)  # SIGTERM: the orderly shutdown, then the group for certain
    spawned = first_spawn(err) - launched_wall
    return {
        "base": base,
        "seconds": round(seconds, 3),
        "supervisor_rss_mb": round(rss_mb, 1),
        "first_spawn_s": round(spawned, 3),
        "spawn_to_first_request_s": round(seconds - spawned, 3),
    }


def supervised_series(runs: int, parent: Path) -> list[dict[str, Any]]:
    """``runs`` starts of ``up demo`` with the same flags and state root, after one unmeasured start
    that fills the plan and probe caches: what a user sees on every start but the first after an
    install or a profile change (``startup.py`` reports that first one as ``*_cold_ms``)."""
    state_root = Path(tempfile.mkdtemp(prefix="series-", dir=parent))
    base = supervised(Path(tempfile.mkdtemp(prefix="warm-", dir=parent)), state_root=state_root)["base"]
    measured = []
    for _ in range(runs):
        up = supervised(Path(tempfile.mkdtemp(prefix="up-", dir=parent)), state_root=state_root, base=base)
        base = up["base"]
        measured.append(up)
    return measured


def first_spawn(log: Path) -> float:
    """Wall time of the supervisor's first "process starting" event (its JSON log on stderr):
    what came before it is the CLI's start-up and preflight, which the scripts do not do."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "process starting":
                stamp = str(event["timestamp"]).replace("Z", "+00:00")
                return datetime.datetime.fromisoformat(stamp).timestamp()
    raise BenchError(f"no 'process starting' event in {log}")


def launch_file(workdir: Path) -> tuple[Path, int]:
    """The plan's argv/env for frontend, decode and prefill as bash arrays; returns (file, port base)."""
    base = free_port_base(harness.port_offsets())
    state = workdir / "state"
    rendered = subprocess.run(
        [CLI, "plan", "demo", "--json", "--set", f"ports.base={base}"],
        check=True,
        capture_output=True,
        text=True,
        env=_env(state),
        timeout=60,
    )
    plan = json.loads(rendered.stdout)
    by_name = {p["name"]: p for p in plan["processes"]}
    if sorted(by_name) != ["decode", "frontend", "prefill"]:
        raise BenchError(
            f"the demo plan has {sorted(by_name)}, the upstream scripts expect frontend, decode, prefill"
        )
    lines = ["# Written by scripts/bench.py from `lmcache-supervise plan demo --json`."]
    for name in ("frontend", "decode", "prefill"):
        proc = by_name[name]
        words = ["env", *(f"{k}={v}" for k, v in sorted(proc["env"].items())), *proc["argv"]]
        lines.append(f"{name.upper()}=({' '.join(shlex.quote(w) for w in words)})")
    lines.append(f"DECODE_HEALTH_URL={shlex.quote(by_name['decode']['probes']['startup']['check']['url'])}")
    discovery = plan["deployment"].get("discovery_dir")
    if discovery:
        Path(discovery).mkdir(parents=True, exist_ok=True)
    path = workdir / "launch.sh"
    path.write_text("\n".join(lines) + "\n")
    return path, base


def scripted(script: str, workdir: Path, *, timeout_s: float = 120) -> dict[str, Any]:
    """``bash scripts/upstream/SCRIPT LAUNCH`` (an argv list: a real script file) to first 200."""
    launch, base = launch_file(workdir)
    with open(workdir / "script.log", "wb") as log:
        launched = time.monotonic()
        proc = subprocess.Popen(
            ["bash", str(UPSTREAM / script), str(launch)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(workdir / "state"),
            start_new_session=True,
        )
    try:
        seconds = first_success(
            f"http://127.0.0.1:{base}/v1/chat/completions", proc, launched, timeout_s=timeout_s
        )
    finally:
        stop_group(proc, sig=signal.SIGTERM, timeout_s=15)  # the script's own `kill 0`, then SIGKILL
    return {"seconds": round(seconds, 3)}
