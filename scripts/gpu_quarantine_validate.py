"""Move a real CUDA worker off a quarantined GPU onto a spare, on a machine with two NVIDIA GPUs.

The runner, the GPU guard, the watcher, NVML (counters, process lists, event waits), the GPU memory
and the worker (``scripts/gpu_worker.py``: torch holding ``--gib`` on its one visible GPU, answering
``/health`` with the UUID of the device it sees) are all real. One thing is not: a GPU fault cannot be
caused safely, so **the Xid 79 is injected at the NVML boundary**: the watcher's ``nvmlEventSetWait``
returns one synthetic Xid-79 event for GPU 0 (every other call goes to the real driver). Checked:

* before: the worker runs on GPU 0, and ``gpus`` attributes its NVML memory to ``decode``;
* after the injected event: GPU 0 quarantined (status view, metrics gauge 0, sd_notify line), the
  worker restarted under the same name on spare GPU 1, its /health UUID is GPU 1's, NVML shows its
  memory on GPU 1 and none of ours left on GPU 0; the time from injection to ready again;
* ``gpus clear 0`` ends the quarantine and moves nothing back; shutdown leaves no process.

    PYTHONPATH=. python scripts/gpu_quarantine_validate.py --out gpu-quarantine-out   # exit 0 = all held

Writes ``OUT/gpu-quarantine-validation.json``; exit 1 if an expectation failed, 2 without two GPUs.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import proctools
import psutil

from supervisor.control import gpus as gpuview
from supervisor.control import notify
from supervisor.control.metrics import SupervisorMetrics
from supervisor.control.progress import Timeline
from supervisor.engine.gpuguard import GpuGuard
from supervisor.engine.runner import Runner
from supervisor.engine.states import DeploymentState, ProcessState
from supervisor.host.gpuhealth import EVENT_XID
from supervisor.host.gpuwatch import GpuWatcher
from supervisor.plan.spec import (
    HttpCheck,
    Plan,
    Probe,
    Probes,
    ProcessSpec,
    RestartPolicy,
    Role,
)

# Run as `PYTHONPATH=. python scripts/<this>.py` (docs/gpu-validation.md): no sys.path edits.
ROOT = Path(__file__).resolve().parents[1]

WORKER = str(ROOT / "scripts" / "gpu_worker.py")
D, P = DeploymentState, ProcessState


def log(message: str) -> None:
    print(f"[gpu_quarantine_validate {time.strftime('%H:%M:%S')}] {message}", flush=True)


class InjectingNvml:
    """The real pynvml, except that ``inject`` makes the next event wait return a synthetic event."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._injected: queue.Queue[SimpleNamespace] = queue.Queue()
        self.NVMLError = real.NVMLError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def inject(self, index: int, event_type: int, data: int) -> None:
        handle = self._real.nvmlDeviceGetHandleByIndex(index)
        self._injected.put(SimpleNamespace(device=handle, eventType=event_type, eventData=data))

    def nvmlEventSetWait(self, event_set: Any, timeout_ms: int) -> Any:  # noqa: N802 (pynvml's name)
        try:
            return self._injected.get_nowait()
        except queue.Empty:
            return self._real.nvmlEventSetWait(event_set, timeout_ms)


def build_plan(tmp: Path, port: int, gib: float) -> Plan:
    check = HttpCheck(url=f"http://127.0.0.1:{port}/health", json_field="status", json_value="ready")
    decode = ProcessSpec(
        name="decode",
        role=Role.DECODE,
        argv=(sys.executable, WORKER, "--gib", str(gib), "--port", str(port), "--max-lifetime-s", "240"),
        env={"CUDA_VISIBLE_DEVICES": "0", "DYN_SYSTEM_PORT": str(port)},
        gpus=(0,),
        ports={"system": port},
        multiproc_dir=str(tmp / "prometheus" / "decode"),
        log_file=str(tmp / "logs" / "decode.log"),
        probes=Probes(
            startup=Probe(check=check, period_s=0.1, timeout_s=1.0, failure_threshold=1200),
            readiness=Probe(check=check, period_s=1.0, timeout_s=1.0, failure_threshold=3),
        ),
        restart=RestartPolicy(backoff_initial_s=0.5, jitter=0.0),
        stop_timeout_s=10.0,
    )
    dep = proctools.fixture_deployment(
        "gpu-quarantine", tmp, engine="vllm", ready_timeout_s=300.0, spare_gpus=(1,)
    )
    return Plan(deployment=dep, processes=(decode,))


async def scenario(args: argparse.Namespace, expect: Any, report: dict[str, Any]) -> None:
    import pynvml

    nvml = InjectingNvml(pynvml)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-quarantine-"))
    port = 18481
    plan = build_plan(tmp, port, args.gib)
    runner = Runner(plan)
    guard = GpuGuard(plan, watcher=lambda idx: GpuWatcher(idx, nvml=nvml, counter_interval_s=2.0))
    metrics = SupervisorMetrics(plan, Timeline())

    async def health() -> dict[str, Any]:
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
            return (await client.get(f"http://127.0.0.1:{port}/health")).json()

    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.serve)
        tg.start_soon(guard.serve, runner)
        try:
            t0 = time.monotonic()
            status = await runner.wait_until(lambda s: s.state is D.READY and len(s.gpus) == 2, timeout_s=180)
            report["first_ready_s"] = round(time.monotonic() - t0, 2)
            uuids = {g.index: g.uuid for g in status.gpus}
            before = await health()
            old_pid = status.process("decode").pid
            expect(
                before["uuid"].replace("GPU-", "") in uuids[0], "the worker starts on GPU 0", before["uuid"]
            )
            await anyio.sleep(2.5)  # one counter read that lists the worker's memory
            runner.update_gpus(await anyio.to_thread.run_sync(guard.view, runner.status()))
            doc = gpuview.gpus_document(runner.status())
            users0 = doc["gpus"][0]["memory"]
            expect(
                any(u["process"] == "decode" for u in users0),
                "gpus attributes GPU 0's memory to decode (NVML process list)",
                users0,
            )

            log("injecting Xid 79 on GPU 0 at the NVML boundary")
            t_inject = time.monotonic()
            nvml.inject(0, EVENT_XID, 79)
            status = await runner.wait_until(
                lambda s: (
                    s.state is D.READY
                    and s.process("decode").pid not in (None, old_pid)
                    and any(g.index == 0 and not g.healthy for g in s.gpus)
                ),
                timeout_s=180,
            )
            report["inject_to_ready_s"] = round(time.monotonic() - t_inject, 2)
            after = await health()
            expect(
                after["uuid"].replace("GPU-", "") in uuids[1] and after["cuda_visible_devices"] == "1",
                "the worker was restarted on spare GPU 1 (its own CUDA device is GPU 1)",
                {"uuid": after["uuid"], "CUDA_VISIBLE_DEVICES": after["cuda_visible_devices"]},
            )
            expect(runner.plan.process("decode").gpus == (1,), "same name, the spec now names GPU 1")
            await anyio.sleep(2.5)
            runner.update_gpus(await anyio.to_thread.run_sync(guard.view, runner.status()))
            status = runner.status()
            doc = gpuview.gpus_document(status)
            report["gpus_after"] = doc
            ours = [u for u in doc["gpus"][0]["memory"] if u["process"]]
            expect(not ours, "none of our processes holds memory on GPU 0 any more", doc["gpus"][0]["memory"])
            expect(
                any(u["process"] == "decode" for u in doc["gpus"][1]["memory"]),
                "NVML shows decode's memory on GPU 1",
                doc["gpus"][1]["memory"],
            )
            q = doc["gpus"][0]
            expect(
                not q["healthy"] and q["quarantine"].startswith("Xid 79"),
                "GPU 0 shown quarantined",
                q["quarantine"],
            )
            metrics.refresh(status, runner.plan)
            gauge = metrics.registry.get_sample_value(
                "lmcache_supervise_gpu_healthy",
                {"deployment": "gpu-quarantine", "gpu": "0", "uuid": q["uuid"]},
            )
            expect(gauge == 0, "metrics: lmcache_supervise_gpu_healthy{gpu=0} is 0", gauge)
            line = notify.describe(status)
            expect("GPU 0 quarantined (Xid 79)" in line, "sd_notify STATUS names the quarantine", line)
            hints = gpuview.gpu_hints(status, {"decode": runner.plan.process("decode").gpus})
            expect([h.kind for h in hints.get("decode", ())] == ["gpu-moved"], "status hint: gpu-moved")
            other = [g for g in doc["gpus"] if g["index"] == 1][0]["last_fault"]
            expect(other is None, "no fault seen on GPU 1 (no false fault)", other)

            note = await runner.clear_gpu(0)
            status = runner.status()
            expect(
                all(g.healthy for g in status.gpus) and runner.plan.process("decode").gpus == (1,),
                "gpus clear 0: healthy again, the worker stays on GPU 1",
                note,
            )
        finally:
            runner.request_shutdown()
            await runner.wait_until(lambda s: s.state is D.STOPPED, timeout_s=60)
            tg.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-quarantine-out")
    parser.add_argument("--gib", type=float, default=8.0, help="what the worker holds on its GPU")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 -- no NVML here
        print(f"gpu_quarantine_validate: cannot run here: {exc}", file=sys.stderr)
        return 2
    if count < 2:
        print(f"gpu_quarantine_validate: needs two GPUs, found {count}", file=sys.stderr)
        return 2
    items: list[dict[str, Any]] = []

    def expect(held: bool, what: str, detail: Any = None) -> None:
        items.append({"held": bool(held), "what": what, "detail": detail})
        log(("OK   " if held else "FAIL ") + what + ("" if detail is None else f" -- {detail}"))

    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args)}
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        anyio.run(scenario, args, expect, report)
    except Exception as exc:  # noqa: BLE001 -- record it, then fail
        expect(False, "the scenario ran to the end", repr(exc))
    left = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in mine]
    expect(not left, "no process left behind", left)
    report["expectations"] = items
    (out / "gpu-quarantine-validation.json").write_text(json.dumps(report, indent=2, default=str))
    failed = [i["what"] for i in items if not i["held"]]
    log(f"{len(items) - len(failed)}/{len(items)} held")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
