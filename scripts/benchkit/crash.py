"""Crash detection and respawn: SIGKILL a supervised child N times, ours and supervisord's.

Definitions (all measured from the instant just before the bench's ``os.kill(pid, SIGKILL)``):

* **exit detected**: the runner's own ProcessEvent for the exit (``starting/running -> backoff``),
  stamped by the supervisor with ``time.monotonic()`` when it changes the state.
* **spawned**: the runner's ProcessEvent ``-> starting`` for the new pid (emitted after
  ``Popen`` returned, which CPython only does once ``execve`` succeeded).
* **new process running**: the new child's own first act, writing ``start PID $EPOCHREALTIME``
  (``marker.sh``); this is the figure compared with supervisord, whose child is the same script.

The child has no probes (it serves nothing); restarts use backoff 0 and no crash-loop limit, so
that the figures are the supervisor's reaction, not its policy.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchkit.common import MARKER_SH, ROOT, BenchError, Driver, MarkerFifo, stop_group, summary_ms

CHILDREN = Path(__file__).with_name("children.py")

#: Where the throwaway supervisord venv lives (ignored by git), reused between runs.
SUPERVISORD_VENV = ROOT / ".bench" / "supervisord-venv"
NO_LIMIT = {"backoff_initial_s": 0.0, "jitter": 0.0, "limit_starts": 1_000_000}


def _settle() -> None:
    """A short random pause before each kill: the supervisor is idle, and kills are not phase-locked."""
    time.sleep(random.uniform(0.01, 0.03))


def ours(
    n: int, workdir: Path, *, flooders: int = 0, rate_mb: float = 0.0, stalled: bool = False
) -> dict[str, Any]:
    """``flooders`` more children and the victim itself write ``rate_mb`` MB/s of output each;
    ``stalled``: every log file is a FIFO nobody reads, so the log writer blocks in its first open
    (as on a hung NFS or FUSE mount) and all output is dropped."""
    fifo = MarkerFifo(workdir)
    flood = [sys.executable, str(CHILDREN), "flood", "--rate-mb", str(rate_mb)] if rate_mb else []
    processes: list[dict[str, Any]] = [
        {
            "name": "victim",
            "argv": ["bash", str(MARKER_SH), str(fifo.path), "start", *flood],
            "restart": NO_LIMIT,
            "stop_timeout_s": 5.0,
        }
    ]
    processes += [{"name": f"flood{i}", "argv": flood, "stop_timeout_s": 5.0} for i in range(flooders)]
    scenario = {"state_dir": str(workdir / "state"), "processes": processes}
    if stalled:
        logs = workdir / "state" / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for proc in processes:
            os.mkfifo(logs / f"{proc['name']}.log")
    driver = Driver(scenario, workdir)
    detect, spawned, running = [], [], []
    try:
        pid = fifo.wait(lambda m: m.tag == "start", timeout_s=20, what="the first child").pid
        index = 0
        for _ in range(n):
            _settle()
            kill_wall, kill_mono = time.time(), time.monotonic()
            os.kill(pid, signal.SIGKILL)
            index, exited = driver.wait(
                lambda e: e.name == "victim" and e.new == "backoff",
                start=index,
                timeout_s=10,
                what="the exit event",
            )
            index, started = driver.wait(
                lambda e, old=pid: e.name == "victim" and e.new == "starting" and e.pid != old,
                start=index,
                timeout_s=10,
                what="the respawn event",
            )
            marker = fifo.wait(
                lambda m, new=started.pid: m.tag == "start" and m.pid == new,
                timeout_s=10,
                what=f"pid {started.pid}'s start marker",
            )
            detect.append(exited.at - kill_mono)
            spawned.append(started.at - kill_mono)
            running.append(marker.wall - kill_wall)
            pid = started.pid
    finally:
        driver.stop()
        fifo.close()
    return {"detect": summary_ms(detect), "spawned": summary_ms(spawned), "running": summary_ms(running)}


def ensure_supervisord() -> tuple[Path | None, str]:
    """The supervisord binary of a throwaway venv (created once with pip), or None and why not."""
    binary = SUPERVISORD_VENV / "bin" / "supervisord"
    if binary.exists():
        return binary, ""
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", str(SUPERVISORD_VENV)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                str(SUPERVISORD_VENV / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--timeout",
                "10",
                "--retries",
                "1",
                "supervisor",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return None, f"pip install supervisor failed: {tail[0]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"could not create the supervisord venv: {exc}"
    return (binary, "") if binary.exists() else (None, "supervisord missing after pip install")


def supervisord_version() -> str | None:
    try:
        out = subprocess.run(
            [str(SUPERVISORD_VENV / "bin" / "supervisord"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def supervisord(n: int, workdir: Path) -> dict[str, Any]:
    """The same child and kill loop under supervisord (autorestart, startsecs=0, no retry limit)."""
    binary, why = ensure_supervisord()
    if binary is None:
        return {"running": None, "skipped": why}
    fifo = MarkerFifo(workdir)
    conf = workdir / "supervisord.conf"
    conf.write_text(f"""[supervisord]
nodaemon=true
logfile={workdir}/supervisord.log
pidfile={workdir}/supervisord.pid
childlogdir={workdir}

[program:victim]
command=bash {MARKER_SH} {fifo.path} start
autostart=true
autorestart=true
startsecs=0
startretries=1000000
stopasgroup=true
killasgroup=true
stdout_logfile={workdir}/victim.log
redirect_stderr=true
""")
    proc = subprocess.Popen(
        [str(binary), "-n", "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    running = []
    try:
        pid = fifo.wait(lambda m: m.tag == "start", timeout_s=30, what="supervisord's first child").pid
        for _ in range(n):
            _settle()
            kill_wall = time.time()
            os.kill(pid, signal.SIGKILL)
            marker = fifo.wait(
                lambda m, old=pid: m.tag == "start" and m.pid != old,
                timeout_s=15,
                what="supervisord's respawned child",
            )
            running.append(marker.wall - kill_wall)
            pid = marker.pid
    except BenchError as exc:
        return {"running": None, "skipped": str(exc)}
    finally:
        stop_group(proc, timeout_s=15)
        fifo.close()
    return {"running": summary_ms(running), "version": supervisord_version()}
