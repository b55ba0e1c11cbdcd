"""Readiness gate: how soon a dependent starts after its dependency turns healthy.

``dep`` is a gate child (children.py) whose ``/health`` answers 503 until the bench sends it
SIGUSR1; its handler flips it to 200 and writes the instant (``flip``). ``dependent`` depends on
``dep`` being healthy and writes its own start (``start``, marker.sh). ``dep`` has the plan's
default probes for a worker (startup probe every 0.1 s with the port-owner check, readiness and
liveness every 5 s), so the figure includes the wait for the next startup-probe tick: that cadence
is part of what a user gets. The first round starts with the dependent waiting for ``dep``; each
later one SIGKILLs ``dep`` (``restart_dependents`` restarts the dependent once ``dep`` is healthy
again), waits for the new ``dep`` to listen, waits a random 50-150 ms, flips, and times.

Reported: flip -> dependent running (its own marker), and the split of it by the runner's events:
flip -> ``dep`` running (probe cadence + probe), ``dep`` running -> dependent spawned (the engine).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from benchkit.common import CHILDREN_PY, MARKER_SH, Driver, MarkerFifo, free_port_base, summary_ms


def measure(n: int, workdir: Path) -> dict[str, Any]:
    fifo = MarkerFifo(workdir)
    port = free_port_base([0])
    url = f"http://127.0.0.1:{port}"
    scenario = {
        "state_dir": str(workdir / "state"),
        "processes": [
            {
                "name": "dep",
                "argv": [
                    sys.executable,
                    str(CHILDREN_PY),
                    "gate",
                    "--port",
                    str(port),
                    "--fifo",
                    str(fifo.path),
                ],
                "probes": {
                    "ready_url": f"{url}/health",
                    "live_url": f"{url}/live",
                    "owned_port": port,
                    "json_status": True,
                },
                "restart": {
                    "backoff_initial_s": 0.0,
                    "jitter": 0.0,
                    "limit_starts": 1_000_000,
                    "restart_dependents": True,
                },
            },
            {
                "name": "dependent",
                "argv": ["bash", str(MARKER_SH), str(fifo.path), "start"],
                "depends_on": [["dep", "healthy"]],
                "stop_timeout_s": 5.0,
            },
        ],
    }
    driver = Driver(scenario, workdir)
    total, probe, engine = [], [], []
    try:
        index = 0
        for round_ in range(n):
            up = fifo.wait(lambda m: m.tag == "up", timeout_s=20, what="the gate child listening")
            if round_ == 0:
                index, _ = driver.wait(
                    lambda e: e.name == "dependent" and e.new == "waiting",
                    start=index,
                    timeout_s=20,
                    what="the dependent waiting",
                )
            time.sleep(random.uniform(0.05, 0.15))
            os.kill(up.pid, signal.SIGUSR1)
            flip = fifo.wait(
                lambda m, pid=up.pid: m.tag == "flip" and m.pid == pid, timeout_s=10, what="the flip"
            )
            started = fifo.wait(lambda m: m.tag == "start", timeout_s=10, what="the dependent's start")
            index, ran = driver.wait(
                lambda e: e.name == "dep" and e.new == "running",
                start=index,
                timeout_s=10,
                what="dep running",
            )
            index, spawned = driver.wait(
                lambda e: e.name == "dependent" and e.new == "starting",
                start=index,
                timeout_s=10,
                what="the dependent spawned",
            )
            flip_mono = float(flip.extra[0])
            total.append(started.wall - flip.wall)
            probe.append(ran.at - flip_mono)
            engine.append(spawned.at - ran.at)
            os.kill(
                up.pid, signal.SIGKILL
            )  # next round: dep restarts unhealthy; the dependent is restarted once it flips
            index += 1
    finally:
        driver.stop()
        fifo.close()
    return {"total": summary_ms(total), "probe": summary_ms(probe), "engine": summary_ms(engine)}
