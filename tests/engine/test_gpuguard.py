"""The GPU guard end to end: the real runner, real child processes (tests/fixtures/child.py) as the
workers, the real watcher threads, and a fake NVML (the one part this machine lacks) emitting Xid
events, ECC counters and a lost GPU. Then what an operator sees: status, gpus, metrics, sd_notify."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import psutil
import pytest
from fakenvml import FakeGpu, FakeNvml

from supervisor.control import gpus as gpuview
from supervisor.control import notify
from supervisor.control.metrics import SupervisorMetrics
from supervisor.control.progress import Timeline
from supervisor.engine.gpuguard import GpuGuard, choose_spares, moved_spec, watched_gpus
from supervisor.engine.runner import Runner
from supervisor.engine.states import DeploymentState, DeploymentStatus, ProcessEvent, ProcessState
from supervisor.errors import GpuError
from supervisor.host.gpuwatch import GpuWatcher
from supervisor.plan.spec import RestartPolicy

pytestmark = pytest.mark.anyio
P, D = ProcessState, DeploymentState
FAST = RestartPolicy(backoff_initial_s=0.05, jitter=0.0)


def worker(make_spec, name: str, gpu: int):  # type: ignore[no-untyped-def]
    return make_spec(name, gpus=(gpu,), env={"CUDA_VISIBLE_DEVICES": str(gpu)}, restart=FAST)


def with_spares(plan, *spares: int):  # type: ignore[no-untyped-def]
    return dataclasses.replace(plan, deployment=dataclasses.replace(plan.deployment, spare_gpus=spares))


@asynccontextmanager
async def guarded(plan, nvml: FakeNvml) -> AsyncIterator[tuple[Runner, list[ProcessEvent]]]:  # type: ignore[no-untyped-def]
    """Serve ``plan`` with a GPU guard over ``nvml``; shut down and reap everything on exit."""
    runner = Runner(plan, gpu_pids=lambda _: None)  # GPU hygiene's NVML is not under test here
    events: list[ProcessEvent] = []
    runner.subscribe(lambda e: events.append(e) if isinstance(e, ProcessEvent) else None)
    guard = GpuGuard(
        plan,
        watcher=lambda idx: GpuWatcher(idx, nvml=nvml, kmsg_path=None, wait_ms=50, counter_interval_s=0.1),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.serve)
        tg.start_soon(guard.serve, runner)
        try:
            await until(runner, lambda s: s.state is D.READY and len(s.gpus) == len(watched_gpus(plan)))
            yield runner, events
        finally:
            runner.request_shutdown()
            await until(runner, lambda s: s.state is D.STOPPED)
            tg.cancel_scope.cancel()


async def until(runner: Runner, predicate, timeout_s: float = 15.0) -> DeploymentStatus:  # type: ignore[no-untyped-def]
    return await runner.wait_until(predicate, timeout_s=timeout_s)


def cuda_devices(pid: int) -> str:
    return psutil.Process(pid).environ().get("CUDA_VISIBLE_DEVICES", "")


def gpu(status: DeploymentStatus, index: int):  # type: ignore[no-untyped-def]
    return next(g for g in status.gpus if g.index == index)


def held_off_gpu(status: DeploymentStatus, name: str) -> bool:
    """Held by the spawn gate (a kicked process passes through WAITING "restart requested" first)."""
    proc = status.process(name)
    return proc.state is P.WAITING and "quarantined" in proc.reason


def spawned_on(events: list[ProcessEvent], name: str, after: int) -> list[ProcessEvent]:
    return [e for e in events[after:] if e.name == name and e.new is P.STARTING]


async def test_xid_79_moves_the_worker_to_the_spare_and_the_operator_sees_the_quarantine(
    make_spec, make_plan
) -> None:
    nvml = FakeNvml(count=3)
    plan = with_spares(make_plan(worker(make_spec, "decode", 0), worker(make_spec, "prefill", 1)), 2)
    async with guarded(plan, nvml) as (runner, _):
        before = runner.status()
        old_decode, prefill_pid = before.process("decode").pid, before.process("prefill").pid
        assert old_decode is not None and cuda_devices(old_decode) == "0"
        nvml.xid(0, 79)
        status = await until(
            runner,
            lambda s: (
                s.state is D.READY
                and s.process("decode").pid not in (None, old_decode)
                and not gpu(s, 0).healthy
            ),
        )
        new_decode = status.process("decode").pid
        assert new_decode is not None and cuda_devices(new_decode) == "2"  # the real child runs on the spare
        assert runner.plan.process("decode").gpus == (2,)  # same name, new GPU
        assert status.process("prefill").pid == prefill_pid  # the rest kept serving, untouched
        assert not psutil.pid_exists(old_decode) or not psutil.Process(old_decode).is_running()

        # status: the GPU is quarantined, the moved worker gets a hint
        quarantined = gpu(status, 0)
        assert quarantined.quarantine is not None and quarantined.quarantine.startswith("Xid 79")
        assert quarantined.faults == {"fatal": 1}
        hints = gpuview.gpu_hints(status, {s.name: s.gpus for s in runner.plan.processes})
        assert [h.kind for h in hints["decode"]] == ["gpu-moved"]
        # gpus: the document an operator reads
        doc = gpuview.gpus_document(status)
        row = doc["gpus"][0]
        assert (row["index"], row["uuid"], row["healthy"]) == (0, "GPU-fake-0000", False)
        assert (
            row["last_fault"]["what"] == "Xid 79"
            and row["last_fault"]["meaning"] == "GPU has fallen off the bus"
        )
        assert doc["gpus"][2]["assigned_to"] == ["decode"] and doc["gpus"][2]["spare"]
        # metrics
        metrics = SupervisorMetrics(runner.plan, Timeline())
        metrics.refresh(status, runner.plan)
        value = metrics.registry.get_sample_value
        assert (
            value(
                "lmcache_supervise_gpu_healthy", {"deployment": "test", "gpu": "0", "uuid": "GPU-fake-0000"}
            )
            == 0
        )
        assert (
            value(
                "lmcache_supervise_gpu_healthy", {"deployment": "test", "gpu": "2", "uuid": "GPU-fake-0002"}
            )
            == 1
        )
        labels = {"deployment": "test", "gpu": "0", "uuid": "GPU-fake-0000", "class": "fatal"}
        assert value("lmcache_supervise_gpu_faults_total", labels) == 1
        # sd_notify's STATUS= line
        assert "GPU 0 quarantined (Xid 79)" in notify.describe(status)


async def test_xid_79_without_a_spare_stops_the_worker_the_rest_keep_serving_until_cleared(
    make_spec, make_plan
) -> None:
    nvml = FakeNvml(count=2)
    plan = make_plan(worker(make_spec, "decode", 0), worker(make_spec, "prefill", 1))
    async with guarded(plan, nvml) as (runner, events):
        prefill_pid = runner.status().process("prefill").pid
        mark = len(events)
        nvml.xid(0, 79)
        status = await until(runner, lambda s: s.state is D.DEGRADED and held_off_gpu(s, "decode"))
        decode = status.process("decode")
        assert (
            decode.pid is None
            and "GPU 0 quarantined (Xid 79" in decode.reason
            and "no spare" in decode.reason
        )
        assert status.process("prefill").pid == prefill_pid and status.process("prefill").state is P.RUNNING
        await anyio.sleep(0.5)  # a restart loop would show here
        assert spawned_on(events, "decode", mark) == []  # never started onto the broken GPU
        assert runner.status().process("decode").state is P.WAITING
        assert "GPU 0 quarantined" in notify.describe(runner.status())
        assert [h.kind for h in gpuview.gpu_hints(runner.status(), {"decode": (0,)})["decode"]] == [
            "gpu-quarantined"
        ]

        with pytest.raises(GpuError, match="GPU 1 is not quarantined"):
            await runner.clear_gpu(1)
        note = await runner.clear_gpu(0)  # the operator reset the GPU
        assert note == "GPU 0 back in service (was quarantined for Xid 79)"
        status = await until(runner, lambda s: s.state is D.READY and gpu(s, 0).healthy)
        assert cuda_devices(status.process("decode").pid) == "0"  # type: ignore[arg-type]


async def test_xid_13_is_an_application_fault_restarted_on_the_same_gpu(make_spec, make_plan) -> None:
    nvml = FakeNvml(count=3)
    plan = with_spares(make_plan(worker(make_spec, "decode", 0)), 2)
    async with guarded(plan, nvml) as (runner, _):
        old = runner.status().process("decode").pid
        assert old is not None
        nvml.xid(0, 13)
        os.kill(old, signal.SIGKILL)  # the application crashed on its bad kernel
        status = await until(
            runner,
            lambda s: s.state is D.READY and s.process("decode").pid not in (None, old) and gpu(s, 0).faults,
        )
        assert gpu(status, 0).healthy and gpu(status, 0).faults == {"app": 1}
        assert runner.plan.process("decode").gpus == (0,)
        assert cuda_devices(status.process("decode").pid) == "0"  # type: ignore[arg-type]
        hints = gpuview.gpu_hints(status, {"decode": (0,)})
        assert [h.kind for h in hints["decode"]] == ["gpu-app-fault"]
        assert "quarantined" not in notify.describe(status)


async def test_a_gpu_lost_mid_run_is_quarantined_and_its_worker_moved(make_spec, make_plan) -> None:
    nvml = FakeNvml(count=2)
    plan = with_spares(make_plan(worker(make_spec, "decode", 0)), 1)
    async with guarded(plan, nvml) as (runner, _):
        nvml.gpus[0].lost = True  # found by the next counter read, no event needed
        status = await until(
            runner, lambda s: s.state is D.READY and runner.plan.process("decode").gpus == (1,)
        )
        assert gpu(status, 0).quarantine is not None and gpu(status, 0).quarantine.startswith("GPU lost")


async def test_a_fault_while_the_worker_restarts_still_lands_it_on_the_spare(make_spec, make_plan) -> None:
    nvml = FakeNvml(count=3)
    plan = with_spares(make_plan(worker(make_spec, "decode", 0), worker(make_spec, "prefill", 1)), 2)
    async with guarded(plan, nvml) as (runner, events):
        mark = len(events)
        await runner.restart("decode")  # an operator restart in flight...
        nvml.xid(0, 94)  # ...when a contained ECC error arrives
        status = await until(
            runner,
            lambda s: (
                s.state is D.READY and runner.plan.process("decode").gpus == (2,) and not gpu(s, 0).healthy
            ),
        )
        assert cuda_devices(status.process("decode").pid) == "2"  # type: ignore[arg-type]
        starts = spawned_on(events, "decode", mark)
        assert starts and len(starts) <= 2  # at most the restart in flight, then the spare


async def test_a_spare_in_use_is_not_given_twice(make_spec, make_plan) -> None:
    nvml = FakeNvml(count=3)
    plan = with_spares(make_plan(worker(make_spec, "decode", 0), worker(make_spec, "prefill", 1)), 2)
    async with guarded(plan, nvml) as (runner, _):
        nvml.xid(0, 48)
        await until(runner, lambda s: s.state is D.READY and runner.plan.process("decode").gpus == (2,))
        nvml.emit(1, 0x0002)  # a double-bit ECC event on the prefill's GPU: the only spare is taken
        status = await until(runner, lambda s: held_off_gpu(s, "prefill") and s.state is D.DEGRADED)
        assert runner.plan.process("prefill").gpus == (1,)
        assert status.process("decode").state is P.RUNNING
        assert {g.index for g in status.gpus if not g.healthy} == {0, 1}


async def test_a_fault_on_an_idle_spare_takes_it_out_of_the_pool(make_spec, make_plan) -> None:
    nvml = FakeNvml(count=2)
    plan = with_spares(make_plan(worker(make_spec, "decode", 0)), 1)
    async with guarded(plan, nvml) as (runner, _):
        pid = runner.status().process("decode").pid
        nvml.xid(1, 95)
        await until(runner, lambda s: not gpu(s, 1).healthy)
        assert runner.status().process("decode").pid == pid  # nobody was on it: nothing moved
        nvml.xid(0, 79)
        status = await until(runner, lambda s: held_off_gpu(s, "decode"))
        assert "no spare" in status.process("decode").reason


async def test_information_changes_nothing(make_spec, make_plan) -> None:
    nvml = FakeNvml(count=1)
    plan = make_plan(worker(make_spec, "decode", 0))
    async with guarded(plan, nvml) as (runner, _):
        pid = runner.status().process("decode").pid
        nvml.gpus[0].remapped = (1, 0, 1, 0)  # a pending remap: reset at the next opportunity
        nvml.xid(0, 63)
        status = await until(runner, lambda s: gpu(s, 0).faults.get("info", 0) == 2)
        assert gpu(status, 0).healthy and status.process("decode").pid == pid and status.state is D.READY


def test_spares_must_match_model_and_memory_and_cover_every_bad_gpu() -> None:
    kind = {0: ("H200", 141), 1: ("H200", 141), 2: ("H100", 80), 3: ("H200", 141)}
    pick = dict(candidates=(1, 2, 3), quarantined=set(), kind=kind)
    assert choose_spares([0], in_use={0}, **pick) == {0: 1}
    assert choose_spares([0], in_use={0, 1}, **pick) == {0: 3}
    assert choose_spares([0, 1], in_use={0, 1}, **pick) is None  # only one H200 left for two bad GPUs
    assert choose_spares([0], in_use={0, 1, 3}, **pick) is None  # GPU 2 is another model


def test_a_moved_spec_keeps_its_name_and_rewrites_cuda_visible_devices(make_spec) -> None:
    spec = make_spec("decode", gpus=(0, 1), env={"CUDA_VISIBLE_DEVICES": "0,1", "X": "y"})
    moved = moved_spec(spec, {1: 3})
    assert (moved.name, moved.gpus, moved.env) == (
        "decode",
        (0, 3),
        {"CUDA_VISIBLE_DEVICES": "0,3", "X": "y"},
    )


def test_a_gpu_without_a_kind_is_never_a_spare() -> None:
    assert choose_spares([0], candidates=(1,), in_use={0}, quarantined=set(), kind={1: ("H200", 1)}) is None
    assert FakeGpu(0).uuid == "GPU-fake-0000"


async def test_gpus_and_gpu_clear_over_the_control_socket(make_spec, make_plan) -> None:
    from io import StringIO
    from pathlib import Path

    from rich.console import Console

    from supervisor.cli.gpus import render_gpus
    from supervisor.control import client
    from supervisor.control import server as control
    from supervisor.errors import BadRequestError

    nvml = FakeNvml(count=1)
    plan = make_plan(worker(make_spec, "decode", 0))
    async with guarded(plan, nvml) as (runner, _):
        server = control.ControlServer(plan, Timeline())
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, runner)
            with anyio.fail_after(5):
                while server.path is None:
                    await anyio.sleep(0.01)
            endpoint = client.Endpoint("test", Path(plan.deployment.state_dir), os.getpid(), server.path)

            async def ask(message: dict) -> dict:  # type: ignore[type-arg]
                return await anyio.to_thread.run_sync(lambda: client.request(endpoint, message))

            doc = (await ask({"op": "gpus"}))["gpus"]
            assert [(g["index"], g["healthy"], g["assigned_to"]) for g in doc["gpus"]] == [
                (0, True, ["decode"])
            ]
            assert doc["gpus"][0]["counters"]["ecc_enabled"] is True
            status_doc = (await ask({"op": "status"}))["status"]
            assert status_doc["gpus"][0]["uuid"] == "GPU-fake-0000"
            with pytest.raises(BadRequestError, match="gpu must be a GPU index"):
                await ask({"op": "gpu-clear", "gpu": "0"})
            with pytest.raises(BadRequestError, match="GPU 0 is not quarantined"):
                await ask({"op": "gpu-clear", "gpu": 0})
            with pytest.raises(BadRequestError, match="GPU 5 is not watched"):
                await ask({"op": "gpu-clear", "gpu": 5})

            nvml.xid(0, 79)
            await until(runner, lambda s: held_off_gpu(s, "decode"))
            doc = (await ask({"op": "gpus"}))["gpus"]
            out = StringIO()
            Console(file=out, width=200).print(render_gpus(doc))
            text = out.getvalue()
            assert "quarantined" in text and "Xid 79 (GPU has fallen off the bus)" in text
            assert "lmcache-supervise gpus clear 0" in text
            status_doc = (await ask({"op": "status"}))["status"]
            [decode] = status_doc["processes"]
            assert decode["hints"][0]["kind"] == "gpu-quarantined"

            answer = await ask({"op": "gpu-clear", "gpu": 0})
            assert answer["note"].startswith("GPU 0 back in service") and answer["gpus"]["gpus"][0]["healthy"]
            await until(runner, lambda s: s.state is D.READY)
            tg.cancel_scope.cancel()


async def test_a_reload_back_onto_the_quarantined_gpu_is_moved_to_the_spare_again(
    make_spec, make_plan
) -> None:
    nvml = FakeNvml(count=2)
    plan = with_spares(make_plan(worker(make_spec, "decode", 0)), 1)
    async with guarded(plan, nvml) as (runner, events):
        nvml.xid(0, 79)
        await until(runner, lambda s: s.state is D.READY and runner.plan.process("decode").gpus == (1,))
        mark = len(events)
        await runner.apply(plan, restart=["decode"])  # a reload renders the profile's GPU 0 again
        status = await until(
            runner,
            lambda s: (
                s.state is D.READY
                and runner.plan.process("decode").gpus == (1,)
                and s.process("decode").pid is not None
            ),
        )
        assert cuda_devices(status.process("decode").pid) == "1"  # type: ignore[arg-type]
        starts = spawned_on(events, "decode", mark)
        assert len(starts) == 1  # the gate held it off GPU 0; it started once, on the spare


async def test_a_held_worker_takes_a_gpu_freed_later(make_spec, make_plan) -> None:
    nvml = FakeNvml(count=2)
    plan = make_plan(worker(make_spec, "decode", 0), worker(make_spec, "prefill", 1))
    async with guarded(plan, nvml) as (runner, _):
        nvml.xid(0, 79)
        await until(runner, lambda s: held_off_gpu(s, "decode"))
        # The operator drops prefill (a reload without it): GPU 1 is free, same model and size.
        await runner.apply(dataclasses.replace(plan, processes=(plan.processes[0],)), stop=["prefill"])
        status = await until(
            runner, lambda s: s.state is D.READY and runner.plan.process("decode").gpus == (1,)
        )
        assert cuda_devices(status.process("decode").pid) == "1"  # type: ignore[arg-type]
