"""host_gpu against a fake NVML (the one boundary that cannot be real on a GPU-less machine), raising
pynvml's own error classes, plus the real pynvml on whatever this machine has."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from supervisor.host.gpu import NO_DRIVER, GpuProcess, MigMode, gpu_facts

GIB = 1024**3


def err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)  # pynvml maps the code to its subclass, as the real calls do


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GIB
    free: int = 79 * GIB
    mig: Any = (0, 0)  # (current, pending), or an error code
    compute: Any = ()  # [(pid, used)] or an error code
    graphics: Any = ()
    memory_error: int | None = None
    lost: bool = False


@dataclass
class FakeNvml:
    """pynvml's surface with the real constants and exceptions; every call is recorded."""

    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: int | None = None
    names: dict[int, str] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    NVMLError = pynvml.NVMLError

    def __getattr__(self, name: str) -> Any:
        if name.startswith("NVML_"):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _call(self, what: str) -> None:
        self.calls.append(what)

    def nvmlInit(self) -> None:
        self._call("init")
        if self.init_error is not None:
            raise err(self.init_error)

    def nvmlShutdown(self) -> None:
        self._call("shutdown")

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.90.07"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if self.gpus[index].lost:
            raise err(pynvml.NVML_ERROR_GPU_IS_LOST)
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> bytes:
        return gpu.name.encode()  # old pynvml returns bytes: must be decoded

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return f"GPU-{self.gpus.index(gpu):04d}"

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> SimpleNamespace:
        if gpu.memory_error is not None:
            raise err(gpu.memory_error)
        return SimpleNamespace(total=gpu.total, free=gpu.free, used=gpu.total - gpu.free)

    def nvmlDeviceGetMigMode(self, gpu: FakeGpu) -> Any:
        if isinstance(gpu.mig, int):
            raise err(gpu.mig)
        return list(gpu.mig)

    def _procs(self, spec: Any) -> list[SimpleNamespace]:
        if isinstance(spec, int):
            raise err(spec)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in spec]

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        return self._procs(gpu.compute)

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: FakeGpu) -> list[SimpleNamespace]:
        return self._procs(gpu.graphics)

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        if pid not in self.names:
            raise err(pynvml.NVML_ERROR_NOT_FOUND)
        return self.names[pid]


def test_no_driver_is_one_sentence_not_a_traceback() -> None:
    fake = FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    facts = gpu_facts(fake)
    assert (facts.error, facts.gpus) == (NO_DRIVER, ())
    assert NO_DRIVER == "no NVIDIA driver found (NVML library not loadable)"
    assert fake.calls == ["init"]  # nothing to shut down after a failed init


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver not loaded"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "version mismatch"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
        (pynvml.NVML_ERROR_UNKNOWN, "NVML could not start"),
    ],
)
def test_other_init_failures_are_named(code: int, words: str) -> None:
    assert words in (gpu_facts(FakeNvml(init_error=code)).error or "")


def test_two_gpus_with_a_foreign_process_and_mig_states() -> None:
    fake = FakeNvml(
        gpus=[
            FakeGpu(
                free=60 * GIB,
                compute=[(4242, 19 * GIB)],
                graphics=[(4242, 19 * GIB)],
                mig=pynvml.NVML_ERROR_NOT_SUPPORTED,
            ),
            FakeGpu(mig=(1, 1), compute=[(777, None)]),
        ],
        names={4242: "/usr/bin/python3.11"},
    )
    facts = gpu_facts(fake)
    assert facts.error is None and facts.driver == "550.90.07"
    first, second = facts.gpus
    assert (first.index, first.name, first.uuid) == (0, "NVIDIA H100 80GB HBM3", "GPU-0000")
    assert (first.total_bytes, first.free_bytes) == (80 * GIB, 60 * GIB)
    assert first.mig is MigMode.UNSUPPORTED
    assert first.processes == (GpuProcess(4242, "python3.11", 19 * GIB),)  # one entry despite both lists
    assert second.mig is MigMode.ENABLED
    assert second.processes[0].pid == 777 and second.processes[0].used_bytes is None
    assert facts.gpu(1) is second and facts.gpu(2) is None
    assert fake.calls[-1] == "shutdown"


def test_each_failing_call_is_a_problem_on_its_gpu_and_the_rest_still_reads() -> None:
    fake = FakeNvml(
        gpus=[
            FakeGpu(
                compute=pynvml.NVML_ERROR_NO_PERMISSION,
                graphics=pynvml.NVML_ERROR_NOT_SUPPORTED,
                mig=pynvml.NVML_ERROR_UNKNOWN,
            ),
            FakeGpu(memory_error=pynvml.NVML_ERROR_NOT_SUPPORTED),
            FakeGpu(lost=True),
        ]
    )
    first, second, third = gpu_facts(fake).gpus
    assert first.free_bytes == 79 * GIB and first.mig is MigMode.UNKNOWN
    assert any(p.startswith("compute processes:") for p in first.problems)
    assert any(p.startswith("MIG mode:") for p in first.problems)
    assert not any("graphics" in p for p in first.problems)  # unsupported there is normal, not a problem
    assert second.total_bytes is None and second.free_bytes is None
    assert second.problems == ("memory: not supported by NVML on this GPU",)
    assert third.name == "unknown" and third.problems[0].startswith("handle:")
    assert fake.calls[-1] == "shutdown"


def test_the_real_pynvml_on_this_machine_gives_facts_or_the_no_driver_sentence() -> None:
    facts = gpu_facts()  # real NVML: on a GPU-less host the library is not loadable
    if facts.error is not None:
        assert facts.error == NO_DRIVER and facts.gpus == ()
    else:
        assert facts.gpus and all(g.total_bytes for g in facts.gpus)
