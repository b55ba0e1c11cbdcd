"""A stalled log directory: output is dropped and counted, supervision does not stall.

The stall is real: the child's log file is a FIFO nobody reads, so opening it blocks forever (as a
hung NFS or FUSE mount does). Before, the event loop itself did that open and froze; now only
the log writer thread waits, the queue fills, chunks are dropped and reported once, and a crash
is still detected and answered at once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest
from test_runner import supervising, until

from supervisor import eventlog
from supervisor.engine import logs
from supervisor.engine.logwriter import QUEUE_BYTES
from supervisor.engine.runner import Runner
from supervisor.engine.states import ProcessState
from supervisor.plan.spec import RestartPolicy

pytestmark = pytest.mark.anyio
P = ProcessState


def _release(fifo: Path) -> None:
    """Give the stuck writer thread a reader, drain it, and let it move on (EPIPE once closed)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not logs.flush_all(0.05):
            try:
                while os.read(fd, 1 << 20):
                    pass
            except BlockingIOError:
                pass
    finally:
        os.close(fd)
    assert logs.flush_all(10), "the log writer thread did not recover"


async def test_a_stalled_log_costs_lines_not_supervision(make_spec, make_plan, tmp_path: Path) -> None:
    flood = 2 * QUEUE_BYTES
    spec = make_spec("a", "--flood", str(flood), restart=RestartPolicy(backoff_initial_s=0.0, jitter=0.0))
    fifo = Path(spec.log_file)
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    runner = Runner(make_plan(spec))
    worst_gap = 0.0

    async def ticker() -> None:
        nonlocal worst_gap
        last = time.monotonic()
        while True:
            await anyio.sleep(0.005)
            now = time.monotonic()
            worst_gap, last = max(worst_gap, now - last), now

    try:
        with eventlog.log.capture() as events:
            async with anyio.create_task_group() as tg, supervising(runner):
                tg.start_soon(ticker)
                old = (await until(runner, lambda s: s.process("a").state is P.RUNNING)).process("a").pid
                with anyio.fail_after(20):  # the flood meets the full queue
                    while not any(e["event"].startswith("child log writes stalled") for e in events):
                        await anyio.sleep(0.05)
                killed = time.monotonic()
                os.kill(old, signal.SIGKILL)
                await until(
                    runner,
                    lambda s: s.process("a").pid not in (None, old) and s.process("a").state is P.RUNNING,
                    5,
                )
                respawn = time.monotonic() - killed
                tg.cancel_scope.cancel()
    finally:
        _release(fifo)
    stalled = [e for e in events if e["event"].startswith("child log writes stalled")]
    assert len(stalled) == 1 and stalled[0]["process"] == "a"  # reported once, not per chunk
    assert respawn < 1.0, f"crash answered after {respawn:.3f} s"
    assert worst_gap < 0.25, f"event loop stalled for {worst_gap:.3f} s"
