"""The Xid table and the kernel-log parser (pure)."""

from __future__ import annotations

import pytest

from supervisor.host.xid import XIDS, Action, FaultClass, describe, parse_xid_line, same_bus


@pytest.mark.parametrize("code", [48, 64, 74, 79, 92, 94, 95, 119, 120])
def test_the_issues_fatal_codes_quarantine_the_gpu(code: int) -> None:
    assert describe(code).fault is FaultClass.FATAL
    assert describe(code).action in (Action.RESET_GPU, Action.REBOOT, Action.REPLACE)


@pytest.mark.parametrize("code", [13, 31, 43])
def test_application_codes_restart_on_the_same_gpu(code: int) -> None:
    assert describe(code).fault is FaultClass.APP
    assert describe(code).action is Action.RESTART_APP


def test_a_pending_remap_is_information_and_a_failed_one_is_fatal() -> None:
    assert describe(63).fault is FaultClass.INFO
    assert describe(64).fault is FaultClass.FATAL


def test_an_unknown_code_is_an_application_fault_that_says_it_is_unknown() -> None:
    unknown = describe(9999)
    assert unknown.fault is FaultClass.APP
    assert "not in this supervisor's table" in unknown.meaning


def test_every_entry_has_a_meaning_and_an_action_that_fits_its_class() -> None:
    for code, xid in XIDS.items():
        assert xid.code == code and xid.meaning
        if xid.fault is FaultClass.FATAL:
            assert xid.action not in (Action.NONE, Action.RESTART_APP), code
        if xid.fault is FaultClass.APP:
            assert xid.action is Action.RESTART_APP, code


@pytest.mark.parametrize(
    "line, bus, code, pid",
    [
        (
            "NVRM: Xid (PCI:0000:17:00): 79, pid=1234, name=python3, GPU has fallen off the bus.",
            "0000:17:00",
            79,
            1234,
        ),
        (
            "6,1234,5678901,-;NVRM: Xid (PCI:0000:3b:00): 13, pid='<unknown>', name=<unknown>, Graphics Exception",
            "0000:3b:00",
            13,
            None,
        ),
        (
            "[  12.5] NVRM: Xid (PCI:0000:c6:00): 94, pid=1101234, name=nvc:[driver], Contained: SM (0x1)",
            "0000:c6:00",
            94,
            1101234,
        ),
        (
            "NVRM: Xid (PCI:0000:04:00): 63, Row Remapper: New row marked for remapping",
            "0000:04:00",
            63,
            None,
        ),
    ],
)
def test_kernel_xid_lines_parse(line: str, bus: str, code: int, pid: int | None) -> None:
    parsed = parse_xid_line(line)
    assert parsed is not None
    assert (parsed.bus_id, parsed.code, parsed.pid) == (bus, code, pid)


def test_other_kernel_lines_are_not_xids() -> None:
    assert parse_xid_line("NVRM: loading NVIDIA UNIX x86_64 Kernel Module  580.159.04") is None
    assert parse_xid_line("usb 1-1: new high-speed USB device") is None


def test_kernel_and_nvml_bus_ids_match_across_domain_widths() -> None:
    assert same_bus("0000:17:00", "00000000:17:00.0")
    assert same_bus("17:00", "00000000:17:00.0")
    assert not same_bus("0000:18:00", "00000000:17:00.0")
    assert not same_bus("garbage", "00000000:17:00.0")
