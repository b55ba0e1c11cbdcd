"""The ``gpu`` preflight check: driver, indices, free memory against what the workers ask, MIG, holders.

Pure over :class:`~supervisor.host.gpu.GpuFacts`. What a worker "asks" is its vLLM
``--gpu-memory-utilization`` times the GPU's total memory: vLLM refuses to start when free memory is
below that, after minutes of loading, so the same arithmetic here fails in a second instead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from supervisor.host.facts import HostFacts
from supervisor.host.gpu import GpuProcess, MigMode
from supervisor.plan.spec import Plan
from supervisor.preflight.findings import Finding, Status, fail, gib, ok, warn
from supervisor.preflight.needs import VLLM_DEFAULT_GPU_FRACTION, needs_gpus

NO_DRIVER_HINT = (
    "install the NVIDIA driver so that `nvidia-smi` works, or run a GPU-free profile such as "
    '`demo` (engine = "mocker")'
)


def holders(processes: Sequence[GpuProcess]) -> str:
    """``pid 4242 (python3, 59.0 GiB), pid 99 (Xorg)``: who holds memory on a GPU."""
    return ", ".join(
        f"pid {p.pid} ({p.name}" + ("" if p.used_bytes is None else f", {gib(p.used_bytes)}") + ")"
        for p in processes
    )


def _asks(plan: Plan) -> dict[int, list[tuple[str, float]]]:
    """GPU index -> [(process, share of that GPU's memory it asks)]."""
    vllm = plan.deployment.engine == "vllm"
    users: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for spec in plan.processes:
        # A vLLM worker without explicit GPUs sees them all and takes GPU 0 first; a mocker asks nothing.
        indices = spec.gpus or ((0,) if spec.role.is_worker and vllm else ())
        share = (
            spec.gpu_memory_fraction
            if spec.gpu_memory_fraction is not None
            else (VLLM_DEFAULT_GPU_FRACTION if vllm else 0.0)
        )
        for index in indices:
            users[index].append((spec.name, share if spec.role.is_worker else 0.0))
    return users


def check_gpu(plan: Plan, facts: HostFacts) -> list[Finding]:
    if not needs_gpus(plan):
        return [ok("gpu", f"no process uses a GPU (engine {plan.deployment.engine})")]
    nvml = facts.gpus
    if nvml is None:
        return [warn("gpu", "the GPUs were not probed")]
    if nvml.error:
        return [fail("gpu", nvml.error, NO_DRIVER_HINT)]
    if not nvml.gpus:
        return [
            fail(
                "gpu",
                f"NVML (driver {nvml.driver}) sees no GPU",
                "check `nvidia-smi -L`; in a container, expose the GPUs to it",
            )
        ]
    out: list[Finding] = []
    summary: list[str] = []
    present = ", ".join(str(g.index) for g in nvml.gpus)
    for index, users in sorted(_asks(plan).items()):
        who = ", ".join(name for name, _ in users)
        gpu = nvml.gpu(index)
        if gpu is None:
            out.append(
                fail(
                    "gpu",
                    f"GPU {index} (used by {who}) does not exist: NVML sees {len(nvml.gpus)} "
                    f"GPU(s), indices {present}",
                    "change the workers' gpus to existing indices (`nvidia-smi -L` lists them)",
                )
            )
            continue
        label = f"GPU {index} ({gpu.name})"
        out.extend(
            warn(
                "gpu",
                f"{label}: NVML could not read {problem}",
                f"check `nvidia-smi -q -i {index}`; the value was left out of this check",
            )
            for problem in gpu.problems
        )
        if gpu.mig is MigMode.ENABLED:
            out.append(
                warn(
                    "gpu",
                    f"{label}: MIG mode is enabled, so CUDA_VISIBLE_DEVICES={index} gives the "
                    "worker no usable device unless a MIG instance is named",
                    f"disable MIG (`nvidia-smi -i {index} -mig 0`, then reset the GPU) or assign a "
                    "MIG instance UUID",
                )
            )
        held = f"; held by {holders(gpu.processes)}" if gpu.processes else ""
        share = sum(s for _, s in users)
        if share > 1.0:
            out.append(
                fail(
                    "gpu",
                    f"{label} is shared by {who}, which together ask {share:.2f} of its "
                    "memory (more than all of it)",
                    "give each worker its own GPU or lower "
                    "gpu_memory_utilization so the shares sum to 1.0 or less",
                )
            )
            continue
        if gpu.total_bytes is None or gpu.free_bytes is None:
            out.append(
                warn("gpu", f"{label}: free memory unknown{held}", "check `nvidia-smi` before starting")
            )
            continue
        need = int(share * gpu.total_bytes)
        if gpu.free_bytes < need:
            out.append(
                fail(
                    "gpu",
                    f"{label}: {gib(gpu.free_bytes)} free of {gib(gpu.total_bytes)}, but "
                    f"{who} ask(s) {share:.2f} of it ({gib(need)}){held}",
                    "stop the processes holding it, or lower the workers' gpu_memory_utilization",
                )
            )
        elif gpu.processes:
            out.append(
                warn(
                    "gpu",
                    f"{label} is already in use{held}; {gib(gpu.free_bytes)} free still "
                    f"covers the {gib(need)} asked by {who}",
                    "make sure sharing this GPU is intended: the other process may grow",
                )
            )
        mig = "" if gpu.mig is MigMode.DISABLED else f", MIG {gpu.mig.value}"
        summary.append(f"{label}: {gib(gpu.free_bytes)} free, {who} need(s) {gib(need)}{mig}")
    models = {g.name for g in nvml.gpus}
    unordered = any(s.gpus and s.env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID" for s in plan.processes)
    if len(models) > 1 and unordered:
        # CUDA orders devices fastest-first by default, NVML by PCI bus: on a mixed host "GPU 1" differs.
        out.append(
            warn(
                "gpu",
                f"this host mixes GPU models ({', '.join(sorted(models))}) and CUDA numbers "
                "them fastest-first, unlike NVML",
                "set CUDA_DEVICE_ORDER=PCI_BUS_ID in the "
                "profile's env so GPU indices mean the same to CUDA and to this check",
            )
        )
    if all(f.status is Status.OK for f in out):
        out.append(ok("gpu", "; ".join(summary) + f" (driver {nvml.driver})"))
    return out
