"""The ``gpu-health`` preflight check: no worker starts on a GPU that is already faulty. Pure.

Reads each used GPU's :class:`~supervisor.host.gpuhealth.GpuCounters` (and each spare's). Fails on
what the GPU guard would quarantine at once: a lost GPU, a row-remapping failure, a pending row
remap (the GPU must be reset before the remap takes effect), uncorrectable ECC errors since the
driver loaded, a recovery action the driver asks for. Warns where ECC or persistence mode is off
(ECC off hides memory errors; persistence off makes every start re-initialise the driver), and where
a spare could not replace a worker's GPU (another model or memory size).
"""

from __future__ import annotations

from supervisor.host.facts import HostFacts
from supervisor.host.gpu import Gpu
from supervisor.host.gpuhealth import RECOVERY_ACTIONS
from supervisor.plan.spec import Plan
from supervisor.preflight.findings import Finding, fail, ok, warn

CHECK = "gpu-health"


def _judge(gpu: Gpu, role: str) -> list[Finding]:
    label = f"GPU {gpu.index} ({role})"
    reset = f"drain GPU {gpu.index} and reset it (`nvidia-smi -r -i {gpu.index}`), then run check again"
    c = gpu.health
    if c is None:
        return [warn(CHECK, f"{label}: health counters not read")]
    if c.lost:
        return [
            fail(
                CHECK,
                f"{label} is lost: NVML cannot reach it",
                "reboot the node; if it recurs, replace the GPU",
            )
        ]
    out: list[Finding] = []
    if c.remap_failure:
        out.append(
            fail(
                CHECK, f"{label}: a row remapping failed (no spare memory rows left)", "have the GPU replaced"
            )
        )
    if c.remap_pending:
        out.append(
            fail(CHECK, f"{label}: a row remap is pending and takes effect only after a GPU reset", reset)
        )
    if c.ecc_uncorrected_volatile:
        out.append(
            fail(
                CHECK,
                f"{label}: {c.ecc_uncorrected_volatile} uncorrectable ECC error(s) since the driver loaded",
                reset,
            )
        )
    if c.recovery_action:
        name = RECOVERY_ACTIONS.get(c.recovery_action, (f"action {c.recovery_action}", None))[0]
        out.append(
            fail(CHECK, f"{label}: the driver asks for a {name}", f"perform the {name}, then run check again")
        )
    if c.ecc_enabled is False:
        out.append(
            warn(
                CHECK,
                f"{label}: ECC is off, so memory errors go unseen",
                f"enable it (`nvidia-smi -i {gpu.index} -e 1`, then reset the GPU)",
            )
        )
    if c.persistence is False:
        out.append(
            warn(
                CHECK,
                f"{label}: persistence mode is off (each worker start re-initialises the GPU; counters reset)",
                "enable it with `nvidia-persistenced` or `nvidia-smi -pm 1`",
            )
        )
    return out


def check_gpu_health(plan: Plan, facts: HostFacts) -> list[Finding]:
    users: dict[int, list[str]] = {}
    for spec in plan.processes:
        for index in spec.gpus:
            users.setdefault(index, []).append(spec.name)
    spares = plan.deployment.spare_gpus
    if not users and not spares:
        return [ok(CHECK, "no process is pinned to a GPU")]
    nvml = facts.gpus
    if nvml is None or nvml.error or not nvml.gpus:
        return [warn(CHECK, "GPU health not read (see the gpu check)")]
    out: list[Finding] = []
    for index in sorted(set(users) | set(spares)):
        gpu = nvml.gpu(index)
        if gpu is None:
            if index in spares:
                out.append(
                    fail(CHECK, f"spare GPU {index} does not exist", "list existing GPUs in spare_gpus")
                )
            continue  # a missing worker GPU is the gpu check's failure
        out += _judge(gpu, ", ".join(users.get(index, ["spare"])))
    kinds = {(g.name, g.total_bytes) for g in nvml.gpus if g.index in users}
    for index in spares:
        gpu = nvml.gpu(index)
        if gpu is not None and (gpu.name, gpu.total_bytes) not in kinds:
            out.append(
                warn(
                    CHECK,
                    f"spare GPU {index} ({gpu.name}) matches no worker's GPU model and memory size, "
                    "so no worker can move to it",
                    "list spares of the same model as the workers' GPUs",
                )
            )
    if not out:
        listed = ", ".join(str(i) for i in sorted(set(users) | set(spares)))
        out.append(
            ok(CHECK, f"GPU(s) {listed}: no ECC error, no pending or failed remap, ECC and persistence on")
        )
    return out
