"""Prove the NVML code paths on real NVIDIA GPUs: preflight's GPU check, GPU hygiene, worker isolation.

CI has no GPU, so everything GPU-related is faked there at the NVML boundary. This script runs the
real thing on a machine with two NVIDIA GPUs, PyTorch with CUDA and nvidia-ml-py (vLLM, LMCache and
Dynamo are NOT needed: the workers are ``scripts/gpu_worker.py``, which holds real CUDA memory and
answers the probes a Dynamo worker answers)::

    PYTHONPATH=. python scripts/gpu_validate.py --out gpu-validation-out

Sections (``--sections``, default all, in this order):

``env``
    nvidia-smi, driver, CUDA, NVML vs CUDA device order compared by UUID, versions.
``check``
    ``lmcache-supervise check disagg`` (software and model checks skipped: no vLLM here) on the idle
    GPUs, then with a torch process holding ``--hold-gib`` on GPU 1 (the in-use finding must name its
    pid and name), then with prefill's memory share lowered so the same holder is only a warning.
``hygiene``
    The real :class:`~supervisor.runner.Runner` supervises one GPU worker built from the rendered
    disagg plan's decode process (argv swapped for the fixture, everything else as rendered, backoff
    set to 0 so the timeline shows the GPU wait alone). The worker is SIGKILLed and the timeline is
    recorded from the runner's events, the runner's own NVML polls and a 50 ms NVML sampler. Four
    variants: the worker alone; with a grandchild in a session of its own that would keep memory
    ``--grandchild-hold-s`` after the kill (the supervisor must adopt it as a stray and stop it with
    the worker); the same grandchild ignoring SIGTERM, a teardown that takes long (the runner must
    wait until NVML shows its memory freed); the grandchild orphaned before any walk of the tree (the
    supervisor cannot know it: the runner must not wait for it). The NVML wait's bound
    (``GPU_CLEAR_TIMEOUT_S``) cannot expire here any more, since the stop waits for every process it
    knows of; CI covers the expiry at the NVML boundary.
``isolation``
    Decode (GPU 0) and prefill (GPU 1, after decode is healthy) from the rendered disagg plan, each
    a fixture worker: each must see one CUDA device, with the UUID NVML gives its assigned index.

Writes ``OUT/gpu-validation.json`` (every figure and expectation) and prints a summary. Exit 0 when
every expectation held, 1 when one failed, 2 when this machine cannot run it (no NVML, < 2 GPUs).
Every process it starts carries a marker in its environment; whatever is still alive at the end is
killed and reported as a leak.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import proctools
import psutil
from gpu_analysis import (
    Poll,
    Sample,
    Transition,
    cuda_to_nvml,
    findings_for,
    names_holder,
    normalize_uuid,
    preconditions,
    restart_timeline,
)

from supervisor.engine import core as core_mod
from supervisor.engine import runner as runner_mod
from supervisor.engine.states import ProcessEvent, ProcessState, RunnerEvent
from supervisor.host import nvml as gpu
from supervisor.host.gpu import gpu_facts
from supervisor.plan.spec import Condition, Plan, ProcessSpec, RestartPolicy

ROOT = Path(__file__).resolve().parents[1]  # run as `PYTHONPATH=. python scripts/gpu_validate.py`
WORKER = str(ROOT / "scripts" / "gpu_worker.py")
MARKER = "LMCACHE_GPU_VALIDATE_MARKER"
GIB = 1024**3
SECTIONS = ("env", "check", "hygiene", "isolation")
P = ProcessState


def log(message: str) -> None:
    print(f"[gpu_validate {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Expectations:
    """What a section promised and whether it held; a section passes when all held."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def __call__(self, held: bool, what: str, detail: Any = None) -> bool:
        self.items.append({"held": bool(held), "what": what, "detail": detail})
        log(("OK   " if held else "FAIL ") + what + ("" if detail is None else f" -- {detail}"))
        return bool(held)

    @property
    def passed(self) -> bool:
        return all(item["held"] for item in self.items)


# ---- NVML sampler ------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Reads every GPU's compute processes and used memory every ``interval_s``, independently of the
    runner (its own NVML handle), so the record does not rest on the code under test alone."""

    def __init__(self, gpus: tuple[int, ...], interval_s: float = 0.05) -> None:
        super().__init__(name="nvml-sampler", daemon=True)
        self.gpus, self.interval_s = gpus, interval_s
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        try:
            handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.gpus}
            while not self._halt.is_set():
                for index, handle in handles.items():
                    t0 = time.monotonic()
                    try:
                        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                        used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
                    except pynvml.NVMLError as exc:
                        self.errors.append(f"GPU {index}: {exc}")
                        continue
                    pids = {
                        int(p.pid): (p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else None)
                        for p in procs
                    }
                    sample = Sample((t0 + time.monotonic()) / 2, index, pids, used)
                    with self._lock:
                        self.samples.append(sample)
                self._halt.wait(self.interval_s)
        finally:
            pynvml.nvmlShutdown()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def snapshot(self, since: float = 0.0) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.t >= since]

    def latest(self, gpu_index: int) -> Sample | None:
        with self._lock:
            return next((s for s in reversed(self.samples) if s.gpu == gpu_index), None)

    async def until(self, predicate: Callable[[dict[int, Sample]], bool], timeout_s: float) -> bool:
        """Wait until the latest reading of every GPU satisfies ``predicate``; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            latest = {i: s for i in self.gpus if (s := self.latest(i)) is not None}
            if len(latest) == len(self.gpus) and predicate(latest):
                return True
            await anyio.sleep(self.interval_s)
        return False


def samples_json(samples: list[Sample], origin: float) -> list[dict[str, Any]]:
    return [
        {
            "t_s": round(s.t - origin, 4),
            "gpu": s.gpu,
            "pids": {str(k): v for k, v in s.pids.items()},
            "used_bytes": s.used_bytes,
        }
        for s in samples
    ]


# ---- small process helpers ---------------------------------------------------------------------


def run_argv(argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``argv`` (never a shell) and capture it; a missing program or a timeout is data, not a crash."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"argv": argv, "rc": None, "stdout": "", "stderr": str(exc)}
    return {"argv": argv, "rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


@contextmanager
def holder(gpu_index: int, gib: float, *, timeout_s: float = 120.0) -> Iterator[dict[str, Any]]:
    """A plain torch process holding ``gib`` GiB on NVML GPU ``gpu_index``; yields what it reported."""
    proc = subprocess.Popen(
        [sys.executable, WORKER, "--gib", str(gib), "--no-http"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=child_env(CUDA_VISIBLE_DEVICES=str(gpu_index)),
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                raise TimeoutError(f"holder pid {proc.pid} did not allocate within {timeout_s:g} s")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"holder pid {proc.pid} exited with {proc.wait()} before allocating")
        yield json.loads(line)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def reap_leftovers(value: str, timeout_s: float) -> list[str]:
    """Wait ``timeout_s`` for this run's processes to go, SIGKILL the rest; describe the leaked ones."""
    return proctools.reap_marked(MARKER, value, timeout_s)


# ---- section: env ------------------------------------------------------------------------------


def section_env(ctx: dict[str, Any], expect: Expectations) -> dict[str, Any]:
    import pynvml

    facts = ctx["facts"]
    smi_query = (
        "index,name,uuid,pci.bus_id,driver_version,memory.total,memory.used,mig.mode.current,"
        "mig.mode.pending,compute_mode"
    )
    out: dict[str, Any] = {
        "nvidia_smi": run_argv(["nvidia-smi"], timeout_s=30)["stdout"],
        "nvidia_smi_query": run_argv(
            ["nvidia-smi", f"--query-gpu={smi_query}", "--format=csv"], timeout_s=30
        )["stdout"],
        "nvidia_smi_topo": run_argv(["nvidia-smi", "topo", "-m"], timeout_s=30)["stdout"],
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "versions": {
            name: _version(name)
            for name in (
                "nvidia-ml-py",
                "torch",
                "anyio",
                "psutil",
                "httpx",
                "pydantic",
                "click",
            )
        },
        "nvml_driver": facts.driver,
        "nvml_gpus": [
            {
                "index": g.index,
                "name": g.name,
                "uuid": g.uuid,
                "total_bytes": g.total_bytes,
                "free_bytes": g.free_bytes,
                "mig": g.mig.value,
                "processes": len(g.processes),
                "problems": list(g.problems),
            }
            for g in facts.gpus
        ],
    }
    pynvml.nvmlInit()
    try:
        out["nvml_cuda_driver"] = pynvml.nvmlSystemGetCudaDriverVersion()
        out["nvml_pci_bus_ids"] = [
            _text(pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(g.index)).busId)
            for g in facts.gpus
        ]
    finally:
        pynvml.nvmlShutdown()
    nvml_uuids = [g.uuid for g in facts.gpus]
    for order in ("default", "PCI_BUS_ID"):
        env = child_env() if order == "default" else child_env(CUDA_DEVICE_ORDER=order)
        env.pop("CUDA_VISIBLE_DEVICES", None)
        if order == "default":
            env.pop("CUDA_DEVICE_ORDER", None)
        probe = run_argv([sys.executable, WORKER, "--devices"], timeout_s=120, env=env)
        try:
            devices = json.loads(probe["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            expect(False, f"torch lists the CUDA devices (order {order})", probe["stderr"][-2000:])
            continue
        mapping = cuda_to_nvml(devices["devices"], nvml_uuids)
        out[f"torch_devices_{order}"] = devices | {"cuda_to_nvml": mapping}
        expect(
            len(devices["devices"]) == len(nvml_uuids),
            f"torch sees as many CUDA devices as NVML ({order} order)",
            f"{len(devices['devices'])} vs {len(nvml_uuids)}",
        )
        expect(
            mapping == list(range(len(nvml_uuids))),
            f"CUDA ordinal i is NVML index i, by UUID ({order} order)",
            mapping,
        )
    return out


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# ---- section: check ----------------------------------------------------------------------------

CHECK_ARGV = [
    "-m",
    "supervisor",
    "check",
    "disagg",
    "--json",
    "--skip-check",
    "software",
    "--skip-check",
    "model",
]


def run_check(*extra: str) -> dict[str, Any]:
    """``lmcache-supervise check disagg --json`` (software/model skipped) as a user runs it."""
    started = time.monotonic()
    res = run_argv([sys.executable, *CHECK_ARGV, *extra], timeout_s=120)
    try:
        findings = json.loads(res["stdout"])
    except ValueError:
        findings = []
    return {
        "argv": ["lmcache-supervise", *CHECK_ARGV[2:], *extra],
        "rc": res["rc"],
        "findings": findings,
        "stderr": res["stderr"][-2000:],
        "seconds": round(time.monotonic() - started, 3),
    }


def section_check(ctx: dict[str, Any], expect: Expectations) -> dict[str, Any]:
    sampler: Sampler = ctx["sampler"]
    out: dict[str, Any] = {}
    idle = out["idle"] = run_check()
    gpu_idle = findings_for(idle["findings"], "gpu")
    expect(
        bool(gpu_idle) and all(f["status"] == "ok" for f in gpu_idle),
        "check disagg on idle GPUs: gpu finding ok (both GPUs detected with their memory)",
        [f["message"] for f in gpu_idle],
    )
    expect(idle["rc"] == 0, "check disagg on idle GPUs exits 0", idle["rc"])
    facts = gpu_facts()
    out["mig"] = {str(g.index): g.mig.value for g in facts.gpus}
    expect(
        all(g.mig.value in ("disabled", "enabled", "unsupported") for g in facts.gpus),
        "MIG state read from NVML for every GPU",
        out["mig"],
    )
    expect(
        all(g.total_bytes and g.free_bytes is not None for g in facts.gpus),
        "NVML reports total and free memory for every GPU",
        {g.index: (g.total_bytes, g.free_bytes) for g in facts.gpus},
    )

    # Enough that the free memory left is below what prefill asks (0.9 of the card) on any card size.
    total = facts.gpu(1).total_bytes if facts.gpu(1) else None
    hold_gib = ctx["hold_gib"] or round((0.1 * (total or 80 * GIB)) / GIB + 6.0, 1)
    out["hold_gib"] = hold_gib
    with holder(1, hold_gib) as held:
        pid = held["pid"]
        out["holder"] = held
        seen = anyio.run(sampler.until, lambda latest: pid in latest[1].pids, 15.0)
        expect(seen, f"the NVML sampler lists holder pid {pid} on GPU 1")
        pids1, pids0 = gpu.gpu_pids((1,)), gpu.gpu_pids((0,))
        out["gpu_pids"] = {"0": sorted(pids0 or ()), "1": sorted(pids1 or ())}
        expect(pids1 is not None and pid in pids1, "engine's gpu.gpu_pids((1,)) includes the holder", pids1)
        expect(pids0 is not None and pid not in pids0, "engine's gpu.gpu_pids((0,)) does not", pids0)
        during = gpu_facts().gpu(1)
        procs = [dataclasses.asdict(p) for p in (during.processes if during else ())]
        out["gpu1_processes"] = procs
        mine = next((p for p in procs if p["pid"] == pid), None)
        expect(mine is not None, "host_gpu.gpu_facts lists the holder on GPU 1 with its name and bytes", mine)
        names = {psutil.Process(pid).name(), os.path.basename(sys.executable)}
        name = mine["name"] if mine else "?"
        expect(
            name in names or name.startswith("python"),
            "its name is the holder's executable",
            {"nvml": name, "psutil": sorted(names)},
        )
        expect(
            mine is not None and mine["used_bytes"] is not None and mine["used_bytes"] >= hold_gib * GIB,
            "usedGpuMemory covers what it allocated",
            mine and mine["used_bytes"],
        )

        busy = out["busy"] = run_check()
        gpu_busy = findings_for(busy["findings"], "gpu")
        failing = [f for f in gpu_busy if f["status"] == "fail"]
        expect(
            busy["rc"] == 3 and len(failing) == 1,
            "check disagg with GPU 1 held: one gpu failure, exit 3",
            {"rc": busy["rc"], "gpu": [f["message"] for f in gpu_busy]},
        )
        expect(
            bool(failing)
            and failing[0]["message"].startswith("GPU 1 ")
            and names_holder(failing[0], pid, name),
            "the failure is GPU 1's and names the holder",
            failing[0]["message"] if failing else None,
        )

        shared = out["shared"] = run_check("--set", "workers.prefill.gpu_memory_utilization=0.5")
        gpu_shared = findings_for(shared["findings"], "gpu")
        warned = [f for f in gpu_shared if f["status"] == "warn" and names_holder(f, pid, name)]
        expect(
            shared["rc"] == 0 and len(warned) == 1 and "already in use" in warned[0]["message"],
            "with prefill at 0.5 the same holder is an in-use warning naming it, exit 0",
            {"rc": shared["rc"], "gpu": [f["message"] for f in gpu_shared]},
        )
    gone = anyio.run(sampler.until, lambda latest: pid not in latest[1].pids, 15.0)
    expect(gone, "NVML drops the holder once it exited")
    after = out["after"] = run_check()
    expect(after["rc"] == 0, "check disagg passes again afterwards", after["rc"])
    return out


# ---- plans built from the rendered disagg profile ----------------------------------------------


def disagg_plan(tmp: Path) -> Plan:
    """The rendered ``disagg`` plan with state under ``tmp``, no frontend and no model gate.

    Workers keep their rendered env (``CUDA_VISIBLE_DEVICES``, ``DYN_SYSTEM_PORT``), GPUs, ports,
    probes and policies; only argv changes, to the fixture worker, because vLLM is not installed.
    """
    from supervisor.cli.app import load_plan

    rendered = load_plan("disagg")
    dep = dataclasses.replace(
        rendered.deployment,
        ready_url="",
        smoke=None,
        state_dir=str(tmp),
        discovery_dir=str(tmp / "discovery"),
        control_socket=str(tmp / "control.sock"),
        targets_file=str(tmp / "targets.json"),
    )
    procs = []
    for spec in rendered.processes:
        if not spec.role.is_worker:
            continue
        procs.append(
            dataclasses.replace(
                spec,
                depends_on=tuple(d for d in spec.depends_on if d.name != "frontend"),
                log_file=str(tmp / "logs" / f"{spec.name}.log"),
                multiproc_dir=str(tmp / "prometheus" / spec.name),
            )
        )
    return Plan(deployment=dep, processes=tuple(procs))


def keep_logs(ctx: dict[str, Any], label: str, plan: Plan) -> None:
    """Remember the supervised children's own logs (written by the runner) for OUT/child-logs.txt."""
    for spec in plan.processes:
        for path in sorted(Path(spec.log_file).parent.glob(Path(spec.log_file).name + "*")):
            ctx["child_logs"].append(f"===== {label}/{spec.name}: {path}\n{path.read_text(errors='replace')}")


def fixture(spec: ProcessSpec, *args: str) -> ProcessSpec:
    return dataclasses.replace(spec, argv=(sys.executable, WORKER, *args))


class Recorder:
    """Runner events as :class:`Transition` values, with the times the runner stamped on them."""

    def __init__(self) -> None:
        self.transitions: list[Transition] = []

    def __call__(self, event: RunnerEvent) -> None:
        if isinstance(event, ProcessEvent):
            self.transitions.append(
                Transition(event.at, event.name, event.new.value, event.pid, event.reason)
            )


async def get_health(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
        return (await client.get(f"http://127.0.0.1:{port}/health")).json()


# ---- section: hygiene --------------------------------------------------------------------------


def section_hygiene(ctx: dict[str, Any], expect: Expectations) -> dict[str, Any]:
    hold = ctx["grandchild_hold_s"]
    grandchild = ["--grandchild-gib", str(ctx["grandchild_gib"]), "--grandchild-hold-s", str(hold)]
    variants = {
        "worker": [],
        "stray": grandchild,
        "slow-stray": [*grandchild, "--grandchild-ignore-term"],
        "orphan": [*grandchild, "--grandchild-orphan"],
    }
    out = {}
    for name, extra in variants.items():
        log(f"hygiene variant {name}")
        out[name] = one_restart(ctx, expect, name, extra)
    return out


def one_restart(ctx: dict[str, Any], expect: Expectations, variant: str, extra: list[str]) -> dict[str, Any]:
    sampler: Sampler = ctx["sampler"]
    hold = ctx["grandchild_hold_s"]
    tmp = Path(tempfile.mkdtemp(prefix=f"hygiene-{variant}-", dir=ctx["tmp"]))
    decode = disagg_plan(tmp).process("decode")
    gpu_index = decode.gpus[0]
    # Backoff 0: the time between exit and respawn is the GPU wait alone (the rendered 0.5 s would hide it).
    spec = dataclasses.replace(
        fixture(decode, "--gib", str(ctx["worker_gib"]), *extra),
        depends_on=(),
        restart=RestartPolicy(backoff_initial_s=0.0, jitter=0.0),
    )
    plan = dataclasses.replace(disagg_plan(tmp), processes=(spec,))
    polls: list[Poll] = []

    def gpu_pids(gpus: tuple[int, ...]) -> set[int] | None:
        started = time.monotonic()
        pids = gpu.gpu_pids(gpus)  # the engine's real NVML boundary, only timed here
        polls.append(Poll(started, time.monotonic(), tuple(gpus), None if pids is None else frozenset(pids)))
        return pids

    rec = Recorder()
    runner = runner_mod.Runner(plan, gpu_pids=gpu_pids)
    runner.subscribe(rec)
    info: dict[str, Any] = {
        "gpu": gpu_index,
        "worker_gib": ctx["worker_gib"],
        "argv": list(spec.argv),
        "env_cuda_visible_devices": spec.env.get("CUDA_VISIBLE_DEVICES"),
        "gpu_clear_timeout_s": core_mod.GPU_CLEAR_TIMEOUT_S,
    }
    port = spec.ports["system"]

    async def scenario() -> None:
        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.serve)
                try:
                    first = await runner.wait_until(
                        lambda s: s.process("decode").state is P.RUNNING, timeout_s=150
                    )
                    old = first.process("decode").pid
                    assert old is not None
                    health = await get_health(port)
                    dead = {old} | ({health["grandchild_pid"]} if health.get("grandchild_pid") else set())
                    info.update(
                        first_health=health,
                        dead_pids=sorted(dead),
                        first_start_s=round(time.monotonic() - runner_start, 3),
                    )
                    listed = await sampler.until(lambda latest: dead <= latest[gpu_index].pids.keys(), 15.0)
                    expect(
                        listed, f"[{variant}] NVML lists the worker's pids {sorted(dead)} on GPU {gpu_index}"
                    )
                    killed_at = time.monotonic()
                    os.kill(old, signal.SIGKILL)
                    info["killed_at"] = killed_at
                    second = await runner.wait_until(
                        lambda s: (
                            s.process("decode").pid not in (None, old)
                            and s.process("decode").state is P.RUNNING
                        ),
                        timeout_s=150,
                    )
                    info["second_health"] = await get_health(port)
                    info["restarts"] = second.process("decode").restarts
                    # Half a second more of readings, so "never listed after the respawn" covers a window.
                    healthy_at = time.monotonic()
                    await sampler.until(
                        lambda latest: min(s.t for s in latest.values()) >= healthy_at + 0.5, 3.0
                    )
                finally:
                    runner.request_shutdown()

    runner_start = time.monotonic()
    try:
        anyio.run(scenario, backend="asyncio")
    finally:
        keep_logs(ctx, f"hygiene-{variant}", plan)
    # Both incarnations' grandchildren are outside the worker's group: a stray is killed with its
    # worker, an orphan leaves by itself --grandchild-hold-s after it. Either way NVML must show them gone.
    escaped = {
        p
        for h in (info.get("first_health"), info.get("second_health"))
        if h
        for p in [h.get("grandchild_pid")]
        if p
    }
    if escaped:
        gone = anyio.run(sampler.until, lambda latest: not (escaped & latest[gpu_index].pids.keys()), 30.0)
        expect(gone, f"[{variant}] the grandchildren {sorted(escaped)} are gone from the GPU")
    killed_at = info["killed_at"]
    dead_pids = set(info["dead_pids"])
    timeline = restart_timeline(
        name="decode",
        gpu=gpu_index,
        killed_at=killed_at,
        dead_pids=dead_pids,
        transitions=rec.transitions,
        polls=polls,
        samples=sampler.snapshot(),
    )
    info["timeline"] = timeline
    info["transitions"] = [
        {"t_s": round(t.t - killed_at, 4), "new": t.new, "pid": t.pid, "reason": t.reason}
        for t in rec.transitions
    ]
    info["polls"] = [
        {
            "start_s": round(p.started - killed_at, 4),
            "end_s": round(p.ended - killed_at, 4),
            "pids": None if p.pids is None else sorted(p.pids),
        }
        for p in polls
    ]
    info["samples"] = samples_json(sampler.snapshot(killed_at - 1.0), killed_at)
    info["gpu_poll_ms"] = _poll_ms(polls)
    log(f"[{variant}] timeline: " + json.dumps({k: v for k, v in timeline.items() if k != "violations"}))

    respawn, free = timeline["respawn_s"], timeline["nvml_free_s"]
    expect(
        timeline["exit_reason"] is not None and "SIGKILL" in timeline["exit_reason"],
        f"[{variant}] the runner saw the SIGKILL",
        timeline["exit_reason"],
    )
    expect(
        respawn is not None and timeline["healthy_s"] is not None,
        f"[{variant}] it respawned and turned healthy again",
        (respawn, timeline["healthy_s"]),
    )
    if variant != "orphan":
        expect(
            timeline["outcome"] == "released",
            f"[{variant}] the respawn followed an NVML poll showing the GPU free of the dead group",
            timeline["outcome"],
        )
        expect(
            not timeline["violations"],
            f"[{variant}] no NVML reading lists a dead pid after the respawn",
            timeline["violations"],
        )
        expect(
            free is not None and respawn is not None and respawn >= free - 0.06,
            f"[{variant}] respawn at {respawn} s is not before the sampler saw the memory freed "
            f"({free} s, 50 ms sampling)",
        )
    if variant == "stray":
        expect(
            free is not None and free < hold / 2,
            f"[{variant}] the grandchild in its own session was killed with its worker: NVML free at "
            f"{free} s, not after its {hold:g} s hold",
        )
    if variant == "slow-stray":
        expect(
            free is not None and respawn is not None and free >= hold * 0.8 and respawn >= free - 0.06,
            f"[{variant}] the runner waited for the grandchild's {hold:g} s teardown: NVML free at "
            f"{free} s, respawn at {respawn} s",
            {"polls_holding": timeline["gpu_polls_holding"]},
        )
    if variant == "orphan":
        waited = (respawn or 0) - (timeline["exit_detected_s"] or 0)
        expect(
            free is not None and respawn is not None and respawn < free and waited < 1.0,
            f"[{variant}] the runner did not wait for a holder it never saw: respawn at {respawn} s, "
            f"the orphan freed its memory at {free} s",
            {"waited_s": round(waited, 3)},
        )
    return info


def _poll_ms(polls: list[Poll]) -> dict[str, float] | None:
    if not polls:
        return None
    ms = sorted((p.ended - p.started) * 1000 for p in polls)
    return {"n": len(ms), "median": round(ms[len(ms) // 2], 3), "max": round(ms[-1], 3)}


# ---- section: isolation ------------------------------------------------------------------------


def section_isolation(ctx: dict[str, Any], expect: Expectations) -> dict[str, Any]:
    sampler: Sampler = ctx["sampler"]
    tmp = Path(tempfile.mkdtemp(prefix="isolation-", dir=ctx["tmp"]))
    base = disagg_plan(tmp)
    plan = dataclasses.replace(base, processes=tuple(fixture(s, "--gib", "1") for s in base.processes))
    nvml_uuids = {g.index: g.uuid for g in ctx["facts"].gpus}
    rec = Recorder()
    runner = runner_mod.Runner(plan)
    runner.subscribe(rec)
    out: dict[str, Any] = {
        "processes": {
            s.name: {
                "gpus": list(s.gpus),
                "env_cuda_visible_devices": s.env.get("CUDA_VISIBLE_DEVICES"),
                "depends_on": [f"{d.name} {d.condition.value}" for d in s.depends_on],
            }
            for s in plan.processes
        }
    }

    async def scenario() -> None:
        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.serve)
                try:
                    await runner.wait_until(
                        lambda s: all(p.state is P.RUNNING for p in s.processes), timeout_s=200
                    )
                    for spec in plan.processes:
                        out["processes"][spec.name]["health"] = await get_health(spec.ports["system"])
                    pids = {s.name: out["processes"][s.name]["health"]["pid"] for s in plan.processes}
                    listed = await sampler.until(
                        lambda latest: all(pids[s.name] in latest[s.gpus[0]].pids for s in plan.processes),
                        15.0,
                    )
                    expect(listed, "NVML lists each worker on its assigned GPU")
                    for spec in plan.processes:
                        on = sorted(
                            i
                            for i, smp in ((i, sampler.latest(i)) for i in sampler.gpus)
                            if smp and pids[spec.name] in smp.pids
                        )
                        out["processes"][spec.name]["nvml_gpus_listing_pid"] = on
                finally:
                    runner.request_shutdown()

    try:
        anyio.run(scenario, backend="asyncio")
    finally:
        keep_logs(ctx, "isolation", plan)
    for spec in plan.processes:
        got = out["processes"][spec.name]
        health, index = got.get("health", {}), spec.gpus[0]
        expect(
            health.get("device_count") == 1,
            f"{spec.name}: torch.cuda.device_count() == 1",
            health.get("device_count"),
        )
        expect(
            normalize_uuid(str(health.get("uuid", ""))) == normalize_uuid(nvml_uuids.get(index, "?")),
            f"{spec.name}: its one device is NVML GPU {index} by UUID",
            {"torch": health.get("uuid"), "nvml": nvml_uuids.get(index)},
        )
        expect(
            got.get("nvml_gpus_listing_pid") == [index],
            f"{spec.name}: NVML lists its pid on GPU {index} only",
            got.get("nvml_gpus_listing_pid"),
        )
    first = {
        name: min((t.t for t in rec.transitions if t.name == name and t.new == new), default=None)
        for name, new in (("decode", "running"), ("prefill", "starting"))
    }
    out["prefill_started_after_decode_healthy_s"] = (
        None if None in first.values() else round(first["prefill"] - first["decode"], 4)
    )  # type: ignore[operator]
    dep = next((d for d in plan.process("prefill").depends_on if d.name == "decode"), None)
    expect(
        dep is not None
        and dep.condition is Condition.HEALTHY
        and out["prefill_started_after_decode_healthy_s"] is not None
        and out["prefill_started_after_decode_healthy_s"] >= 0,
        "prefill started only after decode was healthy",
        out["prefill_started_after_decode_healthy_s"],
    )
    stopped = [t.name for t in sorted(rec.transitions, key=lambda t: t.t) if t.new == "stopped"]
    out["stop_order"] = stopped
    expect(stopped == ["prefill", "decode"], "shutdown stopped prefill before decode", stopped)
    out["transitions"] = [dataclasses.asdict(t) for t in rec.transitions]
    return out


# ---- main --------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[dict[str, Any], Expectations], dict[str, Any]]] = {
    "env": section_env,
    "check": section_check,
    "hygiene": section_hygiene,
    "isolation": section_isolation,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-validation-out", help="folder for gpu-validation.json")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--hold-gib",
        type=float,
        default=0.0,
        help="what the check section's holder takes (default: 10%% of GPU 1 + 6 GiB)",
    )
    parser.add_argument("--worker-gib", type=float, default=8.0, help="what the hygiene worker takes")
    parser.add_argument("--grandchild-gib", type=float, default=4.0)
    parser.add_argument("--grandchild-hold-s", type=float, default=3.0)
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args)}

    facts = gpu_facts()
    why = preconditions(facts)
    if why:
        print(f"gpu_validate: cannot run here: {why}", file=sys.stderr)
        report["error"] = why
        (out_dir / "gpu-validation.json").write_text(json.dumps(report, indent=2))
        return 2

    marker = os.environ[MARKER] = uuid.uuid4().hex  # every child inherits it: the leak check's handle
    sampler = Sampler(tuple(g.index for g in facts.gpus))
    sampler.start()
    tmp_root = tempfile.mkdtemp(prefix="gpu-validate-")  # plans' state, logs and metrics dirs
    ctx: dict[str, Any] = {
        "facts": facts,
        "sampler": sampler,
        "child_logs": [],
        "tmp": tmp_root,
        **vars(args),
    }
    results: dict[str, Any] = {}
    try:
        for section in sections:
            expect = Expectations()
            started = time.monotonic()
            log(f"=== section {section}")
            try:
                data = RUNNERS[section](ctx, expect)
            except Exception as exc:  # noqa: BLE001 -- one broken section must not hide the others' figures
                expect(False, f"section {section} ran to the end", repr(exc))
                data = {"traceback": traceback.format_exc()}
                log(data["traceback"])
            results[section] = {
                "passed": expect.passed,
                "seconds": round(time.monotonic() - started, 2),
                "expectations": expect.items,
                "data": data,
            }
            (out_dir / "gpu-validation.json").write_text(
                json.dumps(report | {"sections": results}, indent=2, default=str)
            )
    finally:
        sampler.stop()
        leaked = reap_leftovers(marker, timeout_s=15.0)
        report["sampler_errors"] = sampler.errors[:50]
        report["leaked"] = leaked
        report["sections"] = results
        (out_dir / "gpu-validation.json").write_text(json.dumps(report, indent=2, default=str))
        (out_dir / "child-logs.txt").write_text("\n".join(ctx["child_logs"]))
        shutil.rmtree(tmp_root, ignore_errors=True)
    print("\nsummary")
    for section, res in results.items():
        failed = [e["what"] for e in res["expectations"] if not e["held"]]
        print(
            f"  {section:10s} {'PASS' if res['passed'] else 'FAIL'} {res['seconds']:7.1f} s  "
            f"{len(res['expectations']) - len(failed)}/{len(res['expectations'])} held"
            + "".join(f"\n      failed: {w}" for w in failed)
        )
    if "hygiene" in results and "traceback" not in results["hygiene"]["data"]:
        for variant, info in results["hygiene"]["data"].items():
            tl = info.get("timeline", {})
            print(
                f"  hygiene/{variant}: exit {tl.get('exit_detected_s')} s, "
                f"NVML free {tl.get('nvml_free_s')} s, "
                f"respawn {tl.get('respawn_s')} s, healthy {tl.get('healthy_s')} s, {tl.get('outcome')}, "
                f"{tl.get('gpu_polls')} polls ({tl.get('gpu_polls_holding')} holding)"
            )
    print(f"  leaked processes: {leaked or 'none'}")
    ok = all(r["passed"] for r in results.values()) and not leaked
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
