"""The runner with fixture children: ordering gates, restarts, crash loops, probes, shutdown."""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from conftest import CLI, alive, free_port_base

from supervisor.engine.runner import Runner
from supervisor.engine.states import (
    DeploymentState,
    DeploymentStatus,
    ProcessEvent,
    ProcessState,
    RunnerEvent,
)
from supervisor.plan.spec import Condition, Dependency, HttpCheck, Probe, Probes, RestartPolicy

pytestmark = pytest.mark.anyio
P, D = ProcessState, DeploymentState
FAST = RestartPolicy(backoff_initial_s=0.0, jitter=0.0)


def health(
    port: int,
    *,
    startup_budget_s: float = 10.0,
    period_s: float = 0.1,
    liveness: bool = False,
    owned: bool = True,
) -> Probes:
    check = HttpCheck(url=f"http://127.0.0.1:{port}/health", owned_port=port if owned else None)
    return Probes(
        startup=Probe(
            check=check, period_s=0.05, timeout_s=0.5, failure_threshold=int(startup_budget_s / 0.05)
        ),
        readiness=Probe(check=check, period_s=period_s, timeout_s=0.5, failure_threshold=2),
        liveness=Probe(check=check, period_s=period_s, timeout_s=0.2, failure_threshold=3)
        if liveness
        else None,
    )


class Recorder:
    """Every runner event with its arrival time."""

    def __init__(self) -> None:
        self.events: list[tuple[float, RunnerEvent]] = []

    def __call__(self, event: RunnerEvent) -> None:
        self.events.append((time.monotonic(), event))

    def process(self, name: str, new: ProcessState | None = None) -> list[tuple[float, ProcessEvent]]:
        return [
            (t, e)
            for t, e in self.events
            if isinstance(e, ProcessEvent) and e.name == name and (new is None or e.new is new)
        ]


@asynccontextmanager
async def supervising(runner: Runner, codes: list[int] | None = None) -> AsyncIterator[Runner]:
    """Serve ``runner`` in the background; always shut it down (and reap everything) on exit."""
    async with anyio.create_task_group() as tg:

        async def serve() -> None:
            code = await runner.serve()
            if codes is not None:
                codes.append(code)

        tg.start_soon(serve)
        try:
            yield runner
        finally:
            runner.request_shutdown()


async def until(
    runner: Runner, predicate: Callable[[DeploymentStatus], bool], timeout_s: float = 10.0
) -> DeploymentStatus:
    return await runner.wait_until(predicate, timeout_s=timeout_s)


async def test_dependency_gates_start_order_and_latency(make_spec, make_plan) -> None:
    base = free_port_base(3)
    a = make_spec("a", "--port", str(base), "--health-after", "0.3", probes=health(base))
    b = make_spec(
        "b",
        "--port",
        str(base + 1),
        probes=health(base + 1),
        depends_on=(Dependency("a", Condition.HEALTHY),),
    )
    c = make_spec("c", depends_on=(Dependency("a", Condition.STARTED),))
    rec = Recorder()
    runner = Runner(make_plan(a, b, c))
    runner.subscribe(rec)
    async with supervising(runner):
        await until(runner, lambda s: s.state is D.READY)
    a_running = rec.process("a", P.RUNNING)[0][0]
    b_started = rec.process("b", P.STARTING)[0][0]
    a_started = rec.process("a", P.STARTING)[0][0]
    c_started = rec.process("c", P.STARTING)[0][0]
    assert rec.process("b", P.WAITING)  # b really waited
    assert a_running <= b_started < a_running + 0.15, "dependent must start within 150 ms of health"
    assert c_started - a_started < 0.1  # "started" only needs a spawned
    assert a_running - a_started >= 0.3


async def test_crashed_process_is_restarted_quickly(make_spec, make_plan) -> None:
    base = free_port_base(1)
    runner = Runner(make_plan(make_spec("a", "--port", str(base), probes=health(base), restart=FAST)))
    async with supervising(runner):
        status = await until(runner, lambda s: s.state is D.READY)
        old = status.process("a").pid
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        status = await until(runner, lambda s: s.process("a").pid not in (None, old), 5)
        respawn = time.monotonic() - killed
        status = await until(runner, lambda s: s.state is D.READY)
    proc = status.process("a")
    assert proc.restarts == 1 and proc.last_exit is not None and proc.last_exit.signal == signal.SIGKILL
    assert respawn < 0.5
    assert not alive(old)


async def test_crash_loop_backs_off_then_fails_and_exit_code_is_1(make_spec, make_plan) -> None:
    policy = RestartPolicy(
        backoff_initial_s=0.05,
        backoff_factor=2.0,
        backoff_max_s=5.0,
        jitter=0.0,
        limit_starts=5,
        limit_window_s=30.0,
    )
    spec = make_spec("crasher", "--exit-after", "0", "--exit-code", "3", restart=policy)
    rec, codes = Recorder(), []
    runner = Runner(make_plan(spec))
    runner.subscribe(rec)
    async with supervising(runner, codes):
        status = await until(runner, lambda s: s.state in (D.FAILED, D.STOPPED), 20)
    starts = [t for t, _ in rec.process("crasher", P.STARTING)]
    backoffs = [t for t, _ in rec.process("crasher", P.BACKOFF)]
    assert len(starts) == 5 and len(backoffs) == 4
    # The wait between an exit and the next start (the child's own run time excluded).
    waits = [start - exit_ for exit_, start in zip(backoffs, starts[1:])]
    for planned, waited in zip([0.05, 0.1, 0.2, 0.4], waits):
        assert planned - 0.005 <= waited < planned + 0.1, waits
    failed = rec.process("crasher", P.FAILED)
    assert failed and "crash loop" in failed[0][1].reason
    assert codes == [1]
    assert status.process("crasher").last_exit.returncode == 3


async def test_hung_process_is_restarted_by_liveness(make_spec, make_plan) -> None:
    base = free_port_base(1)
    spec = make_spec(
        "hung", "--port", str(base), "--hang-after", "0.5", restart=FAST, probes=health(base, liveness=True)
    )
    rec = Recorder()
    runner = Runner(make_plan(spec))
    runner.subscribe(rec)
    async with supervising(runner):
        status = await until(runner, lambda s: s.process("hung").state is P.RUNNING)
        first = status.process("hung").pid
        await until(runner, lambda s: s.process("hung").pid not in (None, first), 10)
    stopping = rec.process("hung", P.STOPPING)
    assert stopping and "liveness" in stopping[0][1].reason
    assert not alive(first)


async def test_readiness_failure_degrades_without_killing(make_spec, make_plan) -> None:
    base = free_port_base(1)
    spec = make_spec("flaky", "--port", str(base), "--unready-after", "0.6", probes=health(base))
    runner = Runner(make_plan(spec))
    async with supervising(runner):
        ready = await until(runner, lambda s: s.state is D.READY)
        pid = ready.process("flaky").pid
        status = await until(runner, lambda s: s.state is D.DEGRADED)
        assert status.process("flaky").state is P.NOT_READY
        assert status.process("flaky").pid == pid and alive(pid)
        assert status.process("flaky").restarts == 0


async def test_health_port_owned_by_a_stranger_is_never_trusted(make_spec, make_plan) -> None:
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    # The child never binds the port (like a Dynamo worker whose health port was taken).
    spec = make_spec("victim", probes=health(port, startup_budget_s=0.5), restart=FAST)
    rec = Recorder()
    runner = Runner(make_plan(spec))
    runner.subscribe(rec)
    try:
        async with supervising(runner):
            status = await until(runner, lambda s: s.process("victim").restarts >= 1, 10)
    finally:
        server.shutdown()
        server.server_close()
    assert not rec.process("victim", P.RUNNING)
    assert "startup probe" in rec.process("victim", P.STOPPING)[0][1].reason
    assert f"port {port} is not held" in (status.process("victim").last_probe.error or "")


async def test_shutdown_is_in_reverse_order_and_cleans_up(make_spec, make_plan, tmp_path: Path) -> None:
    specs = [
        make_spec("a"),
        make_spec("b", depends_on=(Dependency("a", Condition.STARTED),)),
        make_spec("c", depends_on=(Dependency("b", Condition.STARTED),)),
    ]
    rec, codes = Recorder(), []
    runner = Runner(make_plan(*specs))
    runner.subscribe(rec)
    async with supervising(runner, codes):
        status = await until(runner, lambda s: s.state is D.READY)
        pids = [p.pid for p in status.processes]
        assert all(Path(s.multiproc_dir).is_dir() for s in specs)
    stops = sorted((t, e.name) for name in "abc" for t, e in rec.process(name, P.STOPPING))
    assert [name for _, name in stops] == ["c", "b", "a"]
    assert codes == [0]
    assert not any(alive(pid) for pid in pids)
    assert not any(Path(s.multiproc_dir).exists() for s in specs)


async def test_second_interrupt_kills_at_once(make_spec, make_plan) -> None:
    spec = make_spec("stubborn", "--ignore-term", stop_timeout_s=30.0)
    runner = Runner(make_plan(spec))
    async with supervising(runner):
        status = await until(runner, lambda s: s.state is D.READY)
        # The child ignores SIGTERM from before it prints "started": wait for that line in its log.
        with anyio.fail_after(10):
            log = Path(spec.log_file)
            while not (log.exists() and b"started" in log.read_bytes()):
                await anyio.sleep(0.01)
        started = time.monotonic()
        runner.request_shutdown()
        await until(runner, lambda s: s.process("stubborn").state is P.STOPPING)
        runner.request_shutdown(kill=True)
        await until(runner, lambda s: s.state is D.STOPPED)
    assert time.monotonic() - started < 5
    assert not alive(status.process("stubborn").pid)


async def test_restart_dependents_option(make_spec, make_plan) -> None:
    base = free_port_base(1)
    a = make_spec(
        "a",
        "--port",
        str(base),
        probes=health(base),
        restart=RestartPolicy(backoff_initial_s=0.0, restart_dependents=True),
    )
    b = make_spec("b", depends_on=(Dependency("a", Condition.HEALTHY),))
    runner = Runner(make_plan(a, b))
    async with supervising(runner):
        status = await until(runner, lambda s: s.state is D.READY)
        old_a, old_b = status.process("a").pid, status.process("b").pid
        os.kill(old_a, signal.SIGKILL)
        status = await until(runner, lambda s: s.state is D.READY and s.process("b").pid != old_b, 10)
    assert status.process("b").restarts == 1 and not alive(old_b)


async def test_restart_dependents_rolls_one_at_a_time_after_the_server_is_back(make_spec, make_plan) -> None:
    """lm:// clients never reconnect: their workers restart, but never two at once and only once the
    server answers again, so the others keep serving (without the cache) meanwhile."""
    base = free_port_base(3)
    a = make_spec(
        "a",
        "--port",
        str(base),
        "--health-after",
        "0.3",
        probes=health(base),
        restart=RestartPolicy(backoff_initial_s=0.0, restart_dependents=True),
    )
    deps = [
        make_spec(
            name,
            "--port",
            str(base + i),
            "--health-after",
            "0.3",
            probes=health(base + i),
            depends_on=(Dependency("a", Condition.HEALTHY),),
        )
        for i, name in ((1, "b"), (2, "c"))
    ]
    runner = Runner(make_plan(a, *deps))
    recorder = Recorder()
    runner.subscribe(recorder)
    async with supervising(runner):
        status = await until(runner, lambda s: s.state is D.READY)
        old = {n: status.process(n).pid for n in ("a", "b", "c")}
        killed_at = time.monotonic()
        os.kill(old["a"], signal.SIGKILL)
        status = await until(
            runner,
            lambda s: s.state is D.READY and all(s.process(n).pid != old[n] for n in ("b", "c")),
            20,
        )
    assert status.process("b").restarts == 1 and status.process("c").restarts == 1
    a_back = min(t for t, e in recorder.process("a", P.RUNNING) if t > killed_at)
    b_stop = min(t for t, e in recorder.process("b", P.STOPPING) if t > killed_at)
    b_back = min(t for t, e in recorder.process("b", P.RUNNING) if t > killed_at)
    c_stop = min(t for t, e in recorder.process("c", P.STOPPING) if t > killed_at)
    assert a_back <= b_stop < b_back <= c_stop  # server first, then b, and c only once b serves again


async def test_gpu_worker_waits_until_nvml_lets_go(make_spec, make_plan) -> None:
    calls: list[float] = []
    held: set[int] = set()
    release_at: list[float] = []

    def fake_gpu_pids(gpus: tuple[int, ...]) -> set[int]:
        assert gpus == (0, 1)
        calls.append(time.monotonic())
        return set(held) if time.monotonic() < release_at[0] else set()

    spec = make_spec("worker", gpus=(0, 1), restart=FAST)
    runner = Runner(make_plan(spec), gpu_pids=fake_gpu_pids)
    async with supervising(runner):
        old = (await until(runner, lambda s: s.state is D.READY)).process("worker").pid
        held.add(old)  # NVML still shows the dead worker holding memory for 0.5 s
        release_at.append(time.monotonic() + 0.5)
        os.kill(old, signal.SIGKILL)
        await until(runner, lambda s: s.process("worker").pid not in (None, old), 10)
        respawned = time.monotonic()
    assert respawned >= release_at[0]
    assert len(calls) >= 2


async def test_control_api_stop_start_restart(make_spec, make_plan) -> None:
    runner = Runner(make_plan(make_spec("a"), make_spec("b")))
    async with supervising(runner):
        first = (await until(runner, lambda s: s.state is D.READY)).process("a").pid
        await runner.stop("a")
        status = runner.status()
        assert status.process("a").state is P.STOPPED and not alive(first)
        assert status.state is D.DEGRADED
        await runner.start("a")
        second = (await until(runner, lambda s: s.state is D.READY)).process("a").pid
        await runner.restart("a")
        third = (
            (await until(runner, lambda s: s.process("a").pid not in (None, second) and s.state is D.READY))
            .process("a")
            .pid
        )
    assert len({first, second, third}) == 3


def test_pid_file_is_exclusive_and_found_by_down(tmp_path: Path) -> None:
    from supervisor.engine import pidfile
    from supervisor.errors import ControlError, StartError

    with pidfile.PidFile(tmp_path / "demo", "demo"):
        assert (tmp_path / "demo" / "supervisor.pid").read_text().strip() == str(os.getpid())
        with pytest.raises(StartError, match=f"pid {os.getpid()}"):
            # flock locks belong to the open file description: a second open conflicts even here.
            pidfile.PidFile(tmp_path / "demo", "demo").__enter__()
        assert pidfile.choose(tmp_path, None).pid == os.getpid()
        assert pidfile.choose(tmp_path, "demo").deployment == "demo"
        with pytest.raises(ControlError, match="'other'"):
            pidfile.choose(tmp_path, "other")
    assert not (tmp_path / "demo" / "supervisor.pid").exists()
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / "supervisor.pid").write_text("999999\n")  # nobody holds its lock
    assert pidfile.running(tmp_path) == []
    with pytest.raises(ControlError, match="no running deployment"):
        pidfile.choose(tmp_path, None)


def test_down_without_a_running_deployment_says_so(tmp_path: Path) -> None:
    import subprocess

    cli = CLI
    env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path)}
    done = subprocess.run([cli, "down"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"lmcache-supervise: no running deployment under {tmp_path}"
