"""GPU hygiene at the NVML boundary, replaying what real NVML showed on two H200s (docs/gpu-validation.md).

On the real driver, by the time the runner sees a SIGKILLed worker exit (~0.1 s for 8 GiB) the
driver has already freed the leader's memory: its pid is never listed again. What the wait before a
respawn guards against is memory still held for a process of the dead worker's tree, such as its
grandchild in a session of its own (the supervisor stops it with the worker; on the H200s NVML
dropped it 0.25 s after the kill, and before that change it held 4 GiB for 3 s), while NVML also
lists every other process on the GPU. The fake ``gpu_pids`` below lists exactly that: the
grandchild for three polls, or an unrelated live process.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anyio
import pytest
from conftest import alive, free_port_base

from supervisor.engine.runner import Runner
from supervisor.engine.states import DeploymentState, ProcessState
from supervisor.plan.spec import HttpCheck, Probe, Probes, RestartPolicy

pytestmark = pytest.mark.anyio
P, D = ProcessState, DeploymentState
FAST = RestartPolicy(backoff_initial_s=0.0, jitter=0.0)


def health(port: int) -> Probes:
    check = HttpCheck(url=f"http://127.0.0.1:{port}/health", owned_port=port)
    return Probes(
        startup=Probe(check=check, period_s=0.05, timeout_s=0.5, failure_threshold=200),
        readiness=Probe(check=check, period_s=0.1, timeout_s=0.5, failure_threshold=2),
    )


def grandchildren(pidfile: Path) -> list[int]:
    """The fixture child writes its pid, then its grandchild's, once per incarnation."""
    pids = [int(line) for line in pidfile.read_text().split()]
    return pids[1::2]


async def test_restart_waits_for_an_escaped_grandchild_nvml_still_lists(
    make_spec, make_plan, tmp_path: Path
) -> None:
    port, pidfile = free_port_base(1), tmp_path / "pids"
    spec = make_spec(
        "worker",
        "--port",
        str(port),
        "--grandchild",
        "escape",
        "--pidfile",
        str(pidfile),
        probes=health(port),
        gpus=(0,),
        restart=FAST,
    )
    listed: set[int] = set()  # what the fake NVML lists on GPU 0
    polls: list[tuple[float, frozenset[int]]] = []
    released: list[float] = []
    holding_polls = 3

    def fake_gpu_pids(gpus: tuple[int, ...]) -> set[int]:
        assert gpus == (0,)
        polls.append((time.monotonic(), frozenset(listed)))
        if listed and sum(1 for _, seen in polls if seen) >= holding_polls:
            # The grandchild lets go now (as the real one did after its hold): it exits, NVML drops it.
            for pid in listed:
                os.kill(pid, signal.SIGKILL)
            listed.clear()
            released.append(time.monotonic())
        return set(polls[-1][1])

    runner = Runner(make_plan(spec), gpu_pids=fake_gpu_pids)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.serve)
            try:
                ready = await runner.wait_until(lambda s: s.state is D.READY, timeout_s=10)
                old = ready.process("worker").pid
                assert old is not None
                grand = grandchildren(pidfile)[0]
                listed.add(grand)  # not the leader: real NVML dropped it before the exit was even seen
                os.kill(old, signal.SIGKILL)
                status = await runner.wait_until(
                    lambda s: s.process("worker").pid not in (None, old) and s.state is D.READY, timeout_s=10
                )
                respawned = time.monotonic()
            finally:
                runner.request_shutdown()
    finally:
        for pid in grandchildren(pidfile):  # outside the group: make sure, whatever the runner did
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert status.process("worker").restarts == 1
    assert released and respawned >= released[0], "respawned while NVML still listed the grandchild"
    assert sum(1 for _, seen in polls if grand in seen) == holding_polls
    assert polls[-1][1] == frozenset()  # the last poll before the respawn showed the GPU free


async def test_an_unrelated_process_on_the_gpu_does_not_hold_up_the_restart(make_spec, make_plan) -> None:
    # NVML lists every process on the GPU (the check section's holder, another user's job): only the
    # dead group's pids may delay a respawn. Here a live stranger (this test's own pid) is listed.
    port = free_port_base(1)
    spec = make_spec("worker", "--port", str(port), probes=health(port), gpus=(0,), restart=FAST)
    polls: list[float] = []

    def fake_gpu_pids(gpus: tuple[int, ...]) -> set[int]:
        polls.append(time.monotonic())
        return {os.getpid()}

    runner = Runner(make_plan(spec), gpu_pids=fake_gpu_pids)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.serve)
        try:
            old = (await runner.wait_until(lambda s: s.state is D.READY, timeout_s=10)).process("worker").pid
            assert old is not None
            before = len(polls)
            os.kill(old, signal.SIGKILL)
            await runner.wait_until(
                lambda s: s.process("worker").pid not in (None, old) and s.state is D.READY, timeout_s=10
            )
        finally:
            runner.request_shutdown()
    assert len(polls) - before == 1, "one poll showing only a stranger must be enough to respawn"
