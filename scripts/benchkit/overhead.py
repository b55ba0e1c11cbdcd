"""What supervising costs while nothing happens, and how long an orderly stop takes beyond the children.

Overhead: N idle children (``/bin/sleep infinity``: an idle process of ~1 MB, so 128 of them fit
anywhere) with the plan's DEFAULT worker probes: a startup probe every 0.1 s until it passes, then
readiness (``GET /health``, JSON ``status == "ready"``) and liveness (``GET /live``) every 5 s,
timeout 2 s. ``sleep`` serves nothing, so the probes point at one loopback health server run by the
bench in a process of its own (keep-alive, like Dynamo's system server); the port-owner check is
therefore off. Once every child is running, and after a settle period, the driver process's CPU
time over a window divided by the window is ``cpu_percent`` (100 = one core); ``rss_mb`` is its
resident set at the end of the window. The guardian process (``python -S``, a few MB) is reported
apart.

Shutdown: N children that exit ``k * 100 ms`` after SIGTERM (k = 1..N), no dependencies between
them. ``down`` = the runner's ``deployment stopped`` event minus the instant the bench sent SIGTERM
to the supervisor; each child writes when SIGTERM reached it and when it exits, and the slowest of
those own durations is subtracted: ``down_overhead_ms`` is what the supervisor adds on top.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from benchkit.common import CHILDREN_PY, BenchError, Driver, MarkerFifo, free_port_base, stop_group

#: Past the start-up probes of every child (and its first liveness tick): the steady state is measured.
SETTLE_S = 6.0


def _health_server() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port_base([0])
    proc = subprocess.Popen(
        [sys.executable, str(CHILDREN_PY), "health", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError as exc:
            if time.monotonic() > deadline:
                stop_group(proc)
                raise BenchError(f"the bench's health server did not listen on {port}") from exc
            time.sleep(0.02)


def idle(n: int, window_s: float, workdir: Path, *, settle_s: float = SETTLE_S) -> dict[str, Any]:
    server, port = _health_server()
    url = f"http://127.0.0.1:{port}"
    probes = {
        "ready_url": f"{url}/health",
        "live_url": f"{url}/live",
        "owned_port": None,
        "json_status": True,
    }
    scenario = {
        "state_dir": str(workdir / "state"),
        "processes": [
            {"name": f"idle{i}", "argv": ["/bin/sleep", "infinity"], "probes": probes} for i in range(n)
        ],
    }
    driver = Driver(scenario, workdir)
    try:
        driver.wait(
            lambda e: e.kind == "deployment" and e.new == "ready",
            timeout_s=60 + n,
            what=f"{n} idle children running",
        )
        time.sleep(settle_s)
        proc = psutil.Process(driver.pid)
        before, started = proc.cpu_times(), time.monotonic()
        time.sleep(window_s)
        after, wall = proc.cpu_times(), time.monotonic() - started
        rss = proc.memory_info().rss
        guardian = [c for c in proc.children() if "-S" in c.cmdline()]
        guardian_rss = guardian[0].memory_info().rss if guardian else 0
    finally:
        driver.stop()
        stop_group(server, timeout_s=5)
    cpu = (after.user + after.system) - (before.user + before.system)
    return {
        "cpu_percent": round(100.0 * cpu / wall, 3),
        "rss_mb": round(rss / 2**20, 1),
        "guardian_rss_mb": round(guardian_rss / 2**20, 1),
        "window_s": round(wall, 1),
    }


def shutdown(n: int, workdir: Path) -> dict[str, Any]:
    fifo = MarkerFifo(workdir)
    delays = [0.1 * (k + 1) for k in range(n)]
    scenario = {
        "state_dir": str(workdir / "state"),
        "processes": [
            {
                "name": f"slow{k}",
                "argv": [
                    sys.executable,
                    str(CHILDREN_PY),
                    "slowstop",
                    "--delay",
                    f"{delay:g}",
                    "--fifo",
                    str(fifo.path),
                ],
                "stop_timeout_s": 10.0,
            }
            for k, delay in enumerate(delays)
        ],
    }
    driver = Driver(scenario, workdir)
    try:
        for _ in range(n):  # every child has its SIGTERM handler installed
            fifo.wait(lambda m: m.tag == "up", timeout_s=30, what="the slow children up")
        driver.wait(lambda e: e.kind == "deployment" and e.new == "ready", timeout_s=30, what="ready")
        requested = time.monotonic()
        driver.proc.send_signal(signal.SIGTERM)
        _, stopped = driver.wait(
            lambda e: e.kind == "deployment" and e.new == "stopped",
            timeout_s=60,
            what="the deployment stopped",
        )
        own = [
            float(m.extra[0]) - m.wall
            for m in (
                fifo.wait(lambda m: m.tag == "stopped", timeout_s=10, what="exit markers") for _ in range(n)
            )
        ]
    finally:
        driver.stop()
        fifo.close()
    down = stopped.at - requested
    slowest = max(own)
    return {
        "down_ms": round(down * 1000, 1),
        "slowest_child_ms": round(slowest * 1000, 1),
        "overhead_ms": round((down - slowest) * 1000, 1),
        "sum_children_ms": round(sum(own) * 1000, 1),
    }
