"""The Xid table: what each NVIDIA Xid code means for the GPU, and what an operator should do. Pure.

An Xid is the driver's error report (``NVRM: Xid (PCI:0000:17:00): 79, pid=..., GPU has fallen off
the bus``), delivered by NVML's ``XidCriticalError`` event and written to the kernel log. The one
judgement that matters to a supervisor is whether the *GPU* is broken (never start a worker on it
again until an operator resets it) or only the *application* crashed (restart it on the same GPU).

Sources: NVIDIA's Xid catalog for Ampere and newer ("Analyzing Xid Errors with the Xid Catalog",
docs.nvidia.com/deploy/xid-errors/analyzing-xid-catalog.html: resolution bucket RESTART_APP,
RESET_GPU, RESTART_BM, ...), and the Dynamic Page Retirement / Row Remapping guides for 48, 63, 64.
Where the catalog's immediate action is RESET_GPU, RESTART_BM or a node drain, the class here is
:attr:`FaultClass.FATAL`; RESTART_APP is :attr:`FaultClass.APP`; IGNORE and pure notices are
:attr:`FaultClass.INFO`. A code not in the table is treated as an application fault (restart on
the same GPU): the crash-loop limit still ends a loop, and the code is shown so an operator can look it up.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class FaultClass(str, enum.Enum):
    """Whose fault it is: decides whether a worker may run on that GPU again."""

    FATAL = "fatal"  # the GPU is broken: quarantine it until an operator resets it
    APP = "app"  # the process crashed (bad kernel, illegal address): the GPU is fine
    INFO = "info"  # worth knowing (throttling, a corrected error, a pending remap): no action now


class Action(str, enum.Enum):
    """What an operator should do, in NVIDIA's resolution-bucket terms."""

    NONE = "none"
    RESTART_APP = "restart the application"
    RESET_GPU = "drain the GPU and reset it (nvidia-smi -r -i N)"
    REBOOT = "drain the node and reboot it (a GPU reset is not enough)"
    REPLACE = "drain the GPU; if it recurs after a reset, have it replaced (RMA)"
    CHECK_SYSTEM = "check cooling, power and the PCIe/NVLink connection"


@dataclass(frozen=True)
class Xid:
    code: int
    meaning: str
    fault: FaultClass
    action: Action


def _x(code: int, meaning: str, fault: FaultClass, action: Action) -> tuple[int, Xid]:
    return code, Xid(code, meaning, fault, action)


F, A, I = FaultClass.FATAL, FaultClass.APP, FaultClass.INFO  # noqa: E741 (a table reads better short)

XIDS: dict[int, Xid] = dict(
    (
        _x(8, "GPU stopped processing (channel idle timeout)", A, Action.RESTART_APP),
        _x(
            13,
            "graphics engine exception (illegal instruction or address in a kernel)",
            A,
            Action.RESTART_APP,
        ),
        _x(31, "GPU memory page fault (a kernel touched an invalid address)", A, Action.RESTART_APP),
        _x(32, "invalid or corrupted push buffer stream", A, Action.RESTART_APP),
        _x(38, "driver firmware error", A, Action.RESTART_APP),
        _x(43, "GPU stopped processing (the application hit an exception)", A, Action.RESTART_APP),
        _x(45, "preemptive cleanup after an earlier error (follows another Xid)", I, Action.NONE),
        _x(48, "double-bit (uncorrectable) ECC error", F, Action.RESET_GPU),
        _x(56, "display engine error", I, Action.NONE),
        _x(57, "error programming video memory interface", F, Action.RESET_GPU),
        _x(61, "internal micro-controller breakpoint/warning (PMU)", F, Action.RESET_GPU),
        _x(62, "internal micro-controller halt (PMU)", F, Action.RESET_GPU),
        _x(
            63,
            "ECC page retirement or row remap recorded; takes effect at the next GPU reset",
            I,
            Action.NONE,
        ),
        _x(64, "ECC page retirement or row remapping FAILED", F, Action.REPLACE),
        _x(68, "video decoder (NVDEC) exception", A, Action.RESTART_APP),
        _x(69, "graphics engine class error", A, Action.RESTART_APP),
        _x(74, "NVLink error", F, Action.RESET_GPU),
        _x(79, "GPU has fallen off the bus", F, Action.REBOOT),
        _x(92, "high single-bit ECC error rate", F, Action.REPLACE),
        _x(
            94,
            "contained ECC error (the process that touched it was killed; reset to clear)",
            F,
            Action.RESET_GPU,
        ),
        _x(95, "uncontained ECC error (every process on the GPU is affected)", F, Action.RESET_GPU),
        _x(109, "context switch timeout", A, Action.RESTART_APP),
        _x(110, "security fault", F, Action.RESET_GPU),
        _x(119, "GSP RPC timeout (the GPU's system processor stopped answering)", F, Action.RESET_GPU),
        _x(120, "GSP error", F, Action.RESET_GPU),
        _x(121, "C2C link corrected error", I, Action.NONE),
        _x(123, "SPI PMU RPC write failure", F, Action.RESET_GPU),
        _x(136, "link training failure", F, Action.REBOOT),
        _x(140, "unrecovered ECC error", F, Action.RESET_GPU),
        _x(143, "GPU initialization failure", F, Action.REBOOT),
        _x(144, "NVLink SAW MVB error", F, Action.RESET_GPU),
        _x(145, "NVLink RLW error", F, Action.RESET_GPU),
        _x(149, "NVLink NETIR error", F, Action.RESET_GPU),
        _x(150, "NVLink TSTG error", F, Action.RESET_GPU),
        _x(154, "GPU recovery action changed (see the recovery action)", I, Action.NONE),
    )
)


def describe(code: int) -> Xid:
    """The table's entry for ``code``; an unknown code is an application fault named as unknown."""
    known = XIDS.get(code)
    if known is not None:
        return known
    return Xid(
        code, f"Xid {code} (not in this supervisor's table; see NVIDIA's Xid catalog)", A, Action.RESTART_APP
    )


# ---- the kernel log, the second source -----------------------------------------------------------

# `NVRM: Xid (PCI:0000:17:00): 79, pid=1234, name=python3, GPU has fallen off the bus.`
# Older drivers print `pid=1234` without a name, or `pid='<unknown>'`; the PCI domain may be absent.
_XID_LINE = re.compile(
    r"NVRM: Xid \(PCI:(?P<bus>[0-9a-fA-F:.]+)\): (?P<code>\d+)(?:, pid=(?P<pid>'?[^,]*'?))?(?:, (?P<rest>.*))?"
)


@dataclass(frozen=True)
class XidLine:
    """One ``NVRM: Xid`` line: the GPU's PCI bus id as printed, the code, the pid when given."""

    bus_id: str
    code: int
    pid: int | None
    text: str


def parse_xid_line(line: str) -> XidLine | None:
    """Parse a kernel log line (a ``/dev/kmsg`` record or plain dmesg text); None if it is no Xid."""
    found = _XID_LINE.search(line)
    if found is None:
        return None
    pid_text = (found.group("pid") or "").strip("'")
    return XidLine(
        found.group("bus"),
        int(found.group("code")),
        int(pid_text) if pid_text.isdigit() else None,
        (found.group("rest") or "").strip(),
    )


def same_bus(kernel_bus: str, nvml_bus: str) -> bool:
    """Whether the kernel's ``0000:17:00`` names NVML's ``00000000:17:00.0`` (domain width differs)."""

    def key(bus: str) -> tuple[int, int, int]:
        parts = bus.lower().replace(".", ":").split(":")
        # [domain, bus, device(, function)] or [bus, device(, function)]
        if len(parts) >= 3 and len(parts[0]) >= 4:
            domain, rest = int(parts[0], 16), parts[1:]
        else:
            domain, rest = 0, parts
        return domain, int(rest[0], 16), int(rest[1], 16) if len(rest) > 1 else 0

    try:
        return key(kernel_bus) == key(nvml_bus)
    except (ValueError, IndexError):
        return False
