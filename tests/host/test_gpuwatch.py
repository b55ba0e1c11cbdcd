"""The GPU watcher's real threads against a fake NVML (events, counters, a lost GPU) and a pipe
standing in for /dev/kmsg."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pynvml
import pytest
from fakenvml import FakeGpu, FakeNvml

from supervisor.host.gpuhealth import GpuCounters, judge_counters, judge_event
from supervisor.host.gpuwatch import GpuWatcher
from supervisor.host.xid import FaultClass


@pytest.fixture
def nvml() -> FakeNvml:
    return FakeNvml(count=2)


@pytest.fixture
def kmsg(tmp_path) -> Iterator[tuple[str, int]]:
    path = str(tmp_path / "kmsg")
    os.mkfifo(path)
    # Open the writer end first (non-blocking read end keeps it from blocking), as the kernel would.
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(path, os.O_WRONLY)
    yield path, writer
    os.close(writer)
    os.close(reader)


def watcher(nvml: FakeNvml, kmsg_path: str | None = None, **kw: object) -> GpuWatcher:
    w = GpuWatcher((0, 1), nvml=nvml, kmsg_path=kmsg_path, wait_ms=50, **kw)  # type: ignore[arg-type]
    w.start()
    return w


def collect(w: GpuWatcher, want: int, timeout_s: float = 5.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += w.faults(0.1)
    return got


def test_registers_the_health_events_on_every_gpu_and_reads_every_counter(nvml: FakeNvml) -> None:
    w = watcher(nvml)
    try:
        assert [s.registered for s in nvml.sets] == [{0: 0xE80A, 1: 0xE80A}]
        readings = w.readings()
        assert [r.uuid for r in readings] == ["GPU-fake-0000", "GPU-fake-0001"]
        for r in readings:
            c = r.counters
            assert c is not None and not c.unsupported and not c.errors
            assert (c.ecc_enabled, c.ecc_uncorrected_volatile, c.remap_pending, c.persistence) == (
                True,
                0,
                False,
                True,
            )
            assert c.power_w == 75.0 and c.recovery_action == 0
        assert w.faults(0.2) == []  # a healthy machine: no fault, not even information
    finally:
        w.close()
    assert nvml.sets == [] and nvml.inits == 0  # the set is freed and NVML shut down


@pytest.mark.parametrize(
    "code, cls",
    [
        (79, FaultClass.FATAL),
        (48, FaultClass.FATAL),
        (13, FaultClass.APP),
        (31, FaultClass.APP),
        (45, FaultClass.INFO),
    ],
)
def test_an_xid_event_is_classified_and_placed_on_its_gpu(nvml: FakeNvml, code: int, cls: FaultClass) -> None:
    w = watcher(nvml)
    try:
        nvml.xid(1, code)
        [fault] = collect(w, 1)
        assert (fault.gpu, fault.uuid, fault.finding.xid, fault.finding.fault, fault.source) == (
            1,
            "GPU-fake-0001",
            code,
            cls,
            "nvml-event",
        )
        assert w.readings()[1].last_fault == fault
        assert w.readings()[1].counts.by_class == {cls.value: 1}
    finally:
        w.close()


@pytest.mark.parametrize(
    "event, what",
    [
        (pynvml.nvmlEventTypeDoubleBitEccError, "double-bit ECC error"),
        (pynvml.nvmlEventTypeGpuUnavailableError, "GPU lost"),
        (pynvml.nvmlEventTypeDramRetirementFailure, "row remapping failure"),
    ],
)
def test_hardware_events_are_fatal(nvml: FakeNvml, event: int, what: str) -> None:
    w = watcher(nvml)
    try:
        nvml.emit(0, event)
        [fault] = collect(w, 1)
        assert (fault.gpu, fault.finding.what, fault.fatal) == (0, what, True)
    finally:
        w.close()


def test_a_recovery_action_event_names_the_action(nvml: FakeNvml) -> None:
    w = watcher(nvml)
    try:
        nvml.emit(0, pynvml.nvmlEventTypeGpuRecoveryAction, pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT)
        [fault] = collect(w, 1)
        assert fault.fatal and fault.finding.what == "recovery action: node reboot"
    finally:
        w.close()


def test_counters_that_get_worse_are_found_by_the_periodic_read(nvml: FakeNvml) -> None:
    w = watcher(nvml, counter_interval_s=0.05)
    try:
        nvml.gpus[0].ecc[(1, 0)] = 2  # two uncorrectable errors, volatile
        nvml.gpus[1].remapped = (0, 0, 1, 0)  # a pending remap: information
        faults = collect(w, 2)
        assert {(f.gpu, f.finding.what, f.finding.fault) for f in faults} == {
            (0, "uncorrectable ECC errors", FaultClass.FATAL),
            (1, "row remap pending", FaultClass.INFO),
        }
        assert all(f.source == "counters" for f in faults)
        assert w.faults(0.3) == []  # a standing condition is reported once, not every read
    finally:
        w.close()


def test_a_gpu_lost_mid_run_is_one_fatal_fault_and_the_other_gpu_is_still_watched(nvml: FakeNvml) -> None:
    w = watcher(nvml, counter_interval_s=0.05)
    try:
        nvml.gpus[0].lost = True
        [fault] = collect(w, 1)
        assert (fault.gpu, fault.finding.what, fault.fatal) == (0, "GPU lost", True)
        assert w.readings()[0].counters.lost  # type: ignore[union-attr]
        nvml.xid(1, 13)
        [later] = collect(w, 1)
        assert (later.gpu, later.finding.xid) == (1, 13)
        assert w.faults(0.2) == []
    finally:
        w.close()


def test_a_standing_fault_at_start_counts(nvml: FakeNvml) -> None:
    nvml.gpus[1].remapped = (3, 1, 0, 1)  # remapping failed before we started
    w = watcher(nvml)
    try:
        [fault] = collect(w, 1)
        assert (fault.gpu, fault.finding.what, fault.fatal) == (1, "row remapping failure", True)
    finally:
        w.close()


def test_without_event_support_the_counters_and_kernel_log_still_work(kmsg: tuple[str, int]) -> None:
    nvml = FakeNvml([FakeGpu(0, supported_events=0), FakeGpu(1, supported_events=0)])
    path, writer = kmsg
    w = watcher(nvml, path, counter_interval_s=0.05)
    try:
        assert nvml.sets == []  # no set kept when nothing can be registered
        assert "kernel log is the only source" in (w.readings()[0].event_error or "")
        os.write(
            writer,
            b"4,900,123456,-;NVRM: Xid (PCI:0000:18:00): 79, pid=77, name=python, "
            b"GPU has fallen off the bus.\n SUBSYSTEM=pci\n",
        )
        [fault] = collect(w, 1)
        assert (fault.gpu, fault.finding.xid, fault.source, fault.pid, fault.fatal) == (
            1,
            79,
            "kernel-log",
            77,
            True,
        )
        assert w.stats.kmsg_records == 1  # the continuation line is not a record
    finally:
        w.close()


def test_the_same_xid_from_nvml_and_the_kernel_log_is_delivered_once(
    nvml: FakeNvml, kmsg: tuple[str, int]
) -> None:
    path, writer = kmsg
    w = watcher(nvml, path)
    try:
        nvml.xid(0, 79)
        os.write(writer, b"NVRM: Xid (PCI:0000:17:00): 79, pid=1, name=x, GPU has fallen off the bus.\n")
        faults = collect(w, 2, timeout_s=1.0)
        assert len(faults) == 1 and faults[0].finding.xid == 79
        assert w.readings()[0].counts.by_class == {"fatal": 1}
    finally:
        w.close()


def test_close_returns_promptly_while_a_wait_is_blocked(nvml: FakeNvml) -> None:
    w = GpuWatcher((0, 1), nvml=nvml, kmsg_path=None, wait_ms=300)
    w.start()
    started = time.monotonic()
    w.close()
    assert time.monotonic() - started < 1.0
    assert not any(t.name.startswith("gpuwatch") for t in threading.enumerate())


def test_judging_is_pure() -> None:
    assert judge_event(pynvml.nvmlEventTypeXidCriticalError, 79).fault is FaultClass.FATAL  # type: ignore[union-attr]
    assert judge_event(pynvml.nvmlEventTypePState, 0) is None
    throttled = GpuCounters(clock_event_reasons=0x40)
    [finding] = judge_counters(GpuCounters(), throttled)
    assert finding.fault is FaultClass.INFO and "hardware thermal slowdown" in finding.meaning
    assert judge_counters(throttled, throttled) == []
    power_capped = GpuCounters(clock_event_reasons=0x4)  # how a busy GPU normally runs: shown, not judged
    assert (
        power_capped.throttled_by == ("software power cap",)
        and judge_counters(GpuCounters(), power_capped) == []
    )
    assert judge_counters(GpuCounters(pcie_replay=1), GpuCounters(pcie_replay=4))[0].meaning.startswith(
        "3 new"
    )
