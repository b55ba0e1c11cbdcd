"""A GPU's health counters as NVML reports them, and the judgement of events and counters into faults.

:func:`read_counters` is the only IO here (one NVML call per counter, each guarded: a counter the
GPU does not support is listed in ``unsupported``, not treated as a fault; on Hopper, for example,
page retirement answers NotSupported because row remapping replaced it). Everything else is pure:
:func:`judge_event` turns one NVML event into a :class:`Finding`, :func:`judge_counters` compares
two readings of the same GPU and returns what got worse. Both preflight (one reading) and the
watcher (a reading every few seconds) use them, so a GPU is judged the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from supervisor.host.xid import Action, FaultClass, describe

T = TypeVar("T")

# NVML's constants, fixed by its ABI; named here so that this module needs no pynvml import.
EVENT_SINGLE_BIT_ECC = 0x0001
EVENT_DOUBLE_BIT_ECC = 0x0002
EVENT_XID = 0x0008
EVENT_DRAM_RETIREMENT_FAILURE = 0x0800
EVENT_FATAL_POISON = 0x2000
EVENT_GPU_UNAVAILABLE = 0x4000
EVENT_RECOVERY_ACTION = 0x8000
#: The events the watcher registers for (each only where the GPU supports it).
WATCHED_EVENTS = (
    EVENT_XID
    | EVENT_DOUBLE_BIT_ECC
    | EVENT_DRAM_RETIREMENT_FAILURE
    | EVENT_FATAL_POISON
    | EVENT_GPU_UNAVAILABLE
    | EVENT_RECOVERY_ACTION
)

RECOVERY_ACTIONS = {  # nvmlDeviceGpuRecoveryAction_t
    0: ("none", Action.NONE),
    1: ("GPU reset", Action.RESET_GPU),
    2: ("node reboot", Action.REBOOT),
    3: ("drain peer-to-peer traffic", Action.RESET_GPU),
    4: ("drain and reset", Action.RESET_GPU),
    5: ("recover the IMEX domain", Action.RESET_GPU),
    6: ("bus reset", Action.REBOOT),
    7: ("system reboot", Action.REBOOT),
}
FIELD_RECOVERY_ACTION = 230  # NVML_FI_DEV_GET_GPU_RECOVERY_ACTION

# A software power cap is how a busy GPU normally runs (seen on H200s within seconds of a matmul load):
# shown by `gpus`, never a finding. The hardware and thermal reasons mean cooling or power trouble.
SW_POWER_CAP = 0x0004
THROTTLE_REASONS = {  # nvmlClocksEventReason*: only those that mean the GPU is held back
    0x0004: "software power cap",
    0x0008: "hardware slowdown",
    0x0020: "software thermal slowdown",
    0x0040: "hardware thermal slowdown",
    0x0080: "hardware power brake",
}

ERROR_NOT_SUPPORTED = 3
ERROR_GPU_IS_LOST = 15


@dataclass(frozen=True)
class Finding:
    """A judged observation about one GPU: what, its class, its meaning, the operator action."""

    fault: FaultClass
    what: str
    meaning: str
    action: Action
    xid: int | None = None


@dataclass(frozen=True)
class GpuCounters:
    """One reading of a GPU's health counters; None where NVML did not answer.

    ``ecc_uncorrected_volatile`` counts since the driver loaded (normally since boot);
    ``aggregate`` over the GPU's life. ``remap_*`` are nvmlDeviceGetRemappedRows' four values.
    """

    ecc_enabled: bool | None = None
    ecc_corrected_volatile: int | None = None
    ecc_uncorrected_volatile: int | None = None
    ecc_corrected_aggregate: int | None = None
    ecc_uncorrected_aggregate: int | None = None
    remap_corrected: int | None = None
    remap_uncorrected: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    clock_event_reasons: int | None = None
    pcie_replay: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    persistence: bool | None = None
    pstate: int | None = None
    recovery_action: int | None = None
    unsupported: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    lost: bool = False

    @property
    def throttled_by(self) -> tuple[str, ...]:
        mask = self.clock_event_reasons or 0
        return tuple(name for bit, name in THROTTLE_REASONS.items() if mask & bit)


def _error_value(exc: Exception) -> int | None:
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def read_counters(nvml: Any, handle: Any) -> GpuCounters:
    """Read every health counter of one GPU; never raises for NVML trouble (it lands in the fields)."""
    unsupported: list[str] = []
    errors: list[str] = []
    lost = False

    def call(what: str, fn: Callable[[], T]) -> T | None:
        nonlocal lost
        if lost:
            return None
        try:
            return fn()
        except AttributeError:  # an nvidia-ml-py too old to have this call
            unsupported.append(what)
            return None
        except nvml.NVMLError as exc:
            code = _error_value(exc)
            if code == ERROR_NOT_SUPPORTED:
                unsupported.append(what)
            elif code == ERROR_GPU_IS_LOST:
                lost = True
            else:
                errors.append(f"{what}: {exc}")
            return None

    ecc = call("ECC mode", lambda: nvml.nvmlDeviceGetEccMode(handle))
    kw: dict[str, Any] = {"ecc_enabled": bool(ecc[0]) if ecc is not None else None}
    for name, error_type, counter_type in (
        ("ecc_corrected_volatile", 0, 0),
        ("ecc_uncorrected_volatile", 1, 0),
        ("ecc_corrected_aggregate", 0, 1),
        ("ecc_uncorrected_aggregate", 1, 1),
    ):
        value = call(
            name.replace("_", " "),
            lambda e=error_type, c=counter_type: nvml.nvmlDeviceGetTotalEccErrors(handle, e, c),  # type: ignore[misc]
        )
        kw[name] = int(value) if value is not None else None
    rows = call("remapped rows", lambda: nvml.nvmlDeviceGetRemappedRows(handle))
    if rows is not None:
        kw.update(
            remap_corrected=int(rows[0]),
            remap_uncorrected=int(rows[1]),
            remap_pending=bool(rows[2]),
            remap_failure=bool(rows[3]),
        )
    kw["clock_event_reasons"] = call(
        "clock event reasons", lambda: int(nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
    )
    kw["pcie_replay"] = call("PCIe replay counter", lambda: int(nvml.nvmlDeviceGetPcieReplayCounter(handle)))
    kw["temperature_c"] = call("temperature", lambda: int(nvml.nvmlDeviceGetTemperature(handle, 0)))
    milliwatts = call("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    kw["power_w"] = milliwatts / 1000.0 if milliwatts is not None else None
    persistence = call("persistence mode", lambda: nvml.nvmlDeviceGetPersistenceMode(handle))
    kw["persistence"] = bool(persistence) if persistence is not None else None
    kw["pstate"] = call("performance state", lambda: int(nvml.nvmlDeviceGetPerformanceState(handle)))
    kw["recovery_action"] = call("recovery action", lambda: _recovery_action(nvml, handle))
    return GpuCounters(**kw, unsupported=tuple(unsupported), errors=tuple(errors), lost=lost)


def _recovery_action(nvml: Any, handle: Any) -> int:
    value = nvml.nvmlDeviceGetFieldValues(handle, [FIELD_RECOVERY_ACTION])[0]
    status = int(getattr(value, "nvmlReturn", 0))
    if status != 0:
        raise nvml.NVMLError(status)
    return int(value.value.uiVal)


# ---- judgement (pure) -------------------------------------------------------------------------------

GPU_LOST = Finding(
    FaultClass.FATAL, "GPU lost", "the GPU stopped answering NVML (fell off the bus?)", Action.REBOOT
)


def recovery_finding(action: int) -> Finding | None:
    if action == 0:
        return None
    name, what_to_do = RECOVERY_ACTIONS.get(action, (f"action {action}", Action.RESET_GPU))
    return Finding(
        FaultClass.FATAL,
        f"recovery action: {name}",
        f"the driver says this GPU needs a {name} before it can be trusted again",
        what_to_do,
    )


def judge_event(event_type: int, data: int) -> Finding | None:
    """One NVML event as a finding; None for events that say nothing about health."""
    if event_type & EVENT_XID:
        xid = describe(int(data))
        return Finding(xid.fault, f"Xid {xid.code}", xid.meaning, xid.action, xid.code)
    if event_type & EVENT_DOUBLE_BIT_ECC:
        return Finding(
            FaultClass.FATAL, "double-bit ECC error", "an uncorrectable memory error", Action.RESET_GPU
        )
    if event_type & EVENT_DRAM_RETIREMENT_FAILURE:
        return Finding(
            FaultClass.FATAL,
            "row remapping failure",
            "a bad memory row could not be remapped",
            Action.REPLACE,
        )
    if event_type & EVENT_FATAL_POISON:
        return Finding(
            FaultClass.FATAL, "fatal poison error", "corrupted data reached the GPU", Action.RESET_GPU
        )
    if event_type & EVENT_GPU_UNAVAILABLE:
        return GPU_LOST
    if event_type & EVENT_RECOVERY_ACTION:
        return recovery_finding(int(data))
    if event_type & EVENT_SINGLE_BIT_ECC:
        return Finding(FaultClass.INFO, "single-bit ECC error", "a corrected memory error", Action.NONE)
    return None


def judge_counters(before: GpuCounters | None, now: GpuCounters) -> list[Finding]:
    """What got worse between two readings of one GPU (``before`` None: the first reading).

    On the first reading, standing conditions count (an uncorrectable error since boot, a failed
    remap): a GPU in that state must not take a worker. Later, only changes count, so that one
    condition gives one finding.
    """
    if now.lost:
        return [] if before is not None and before.lost else [GPU_LOST]
    out: list[Finding] = []
    if now.remap_failure and not (before and before.remap_failure):
        out.append(
            Finding(
                FaultClass.FATAL,
                "row remapping failure",
                "the GPU ran out of spare memory rows or failed to remap one",
                Action.REPLACE,
            )
        )
    new_ue = now.ecc_uncorrected_volatile or 0
    old_ue = (before.ecc_uncorrected_volatile or 0) if before else 0
    if new_ue > old_ue:
        out.append(
            Finding(
                FaultClass.FATAL,
                "uncorrectable ECC errors",
                f"{new_ue} uncorrectable memory error(s) since the driver loaded",
                Action.RESET_GPU,
            )
        )
    if now.remap_pending and not (before and before.remap_pending):
        out.append(
            Finding(
                FaultClass.INFO,
                "row remap pending",
                "a remapped memory row takes effect at the next GPU reset",
                Action.RESET_GPU,
            )
        )
    if now.recovery_action and now.recovery_action != (before.recovery_action if before else 0):
        found = recovery_finding(now.recovery_action)
        if found is not None:
            out.append(found)
    new_throttle = set(now.throttled_by) - set(before.throttled_by if before else ())
    new_throttle.discard(THROTTLE_REASONS[SW_POWER_CAP])
    if new_throttle:
        out.append(
            Finding(
                FaultClass.INFO,
                "throttled",
                "clocks held back by " + ", ".join(sorted(new_throttle)),
                Action.CHECK_SYSTEM,
            )
        )
    if before and before.pcie_replay is not None and (now.pcie_replay or 0) > before.pcie_replay:
        out.append(
            Finding(
                FaultClass.INFO,
                "PCIe replays",
                f"{(now.pcie_replay or 0) - before.pcie_replay} new PCIe replay(s) (link errors retried)",
                Action.CHECK_SYSTEM,
            )
        )
    return out


@dataclass(frozen=True)
class GpuFault:
    """A finding placed on one GPU at one time, with where it came from."""

    gpu: int
    uuid: str
    finding: Finding
    source: str  # "nvml-event", "counters", "kernel-log"
    at_wall: float
    pid: int | None = None

    @property
    def fatal(self) -> bool:
        return self.finding.fault is FaultClass.FATAL

    def describe(self) -> str:
        f = self.finding
        return f"GPU {self.gpu}: {f.what} ({f.meaning}); {f.fault.value}: {f.action.value}"


@dataclass
class FaultCounts:
    """How many faults of each class one GPU had (mutable; the watcher owns it)."""

    by_class: dict[str, int] = field(default_factory=dict)

    def add(self, fault: FaultClass) -> None:
        self.by_class[fault.value] = self.by_class.get(fault.value, 0) + 1
