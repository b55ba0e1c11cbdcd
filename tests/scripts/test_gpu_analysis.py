"""The pure parts of scripts/gpu_validate.py (scripts/gpu_analysis.py), which CI can run without a GPU."""

from __future__ import annotations

from gpu_analysis import (
    Poll,
    Sample,
    Transition,
    cuda_to_nvml,
    freed_at,
    names_holder,
    normalize_uuid,
    preconditions,
    restart_timeline,
)

from supervisor.host.gpu import NO_DRIVER, Gpu, GpuFacts, MigMode

GIB = 1024**3
UUID0 = "GPU-7be369f6-a0d7-e643-a73b-c7c2ebbc58d7"  # as real NVML printed them (H200, driver 580.159.04)
UUID1 = "GPU-860832c8-1e3a-b330-1ccd-bdfff2557832"


def gpu(index: int) -> Gpu:
    return Gpu(index, "NVIDIA H200", [UUID0, UUID1][index], 140 * GIB, 139 * GIB, MigMode.DISABLED, ())


def test_preconditions_say_why_a_machine_cannot_run_it() -> None:
    assert "no NVIDIA driver" in str(preconditions(GpuFacts(NO_DRIVER, None, ())))
    one = preconditions(GpuFacts(None, "580.159.04", (gpu(0),)))
    assert one is not None and "sees 1 GPU(s)" in one and "needs 2" in one
    assert preconditions(GpuFacts(None, "580.159.04", (gpu(0), gpu(1)))) is None


def test_torch_uuids_match_nvml_uuids_without_the_prefix() -> None:
    # torch's str(props.uuid) drops NVML's "GPU-" prefix: the real run showed both forms.
    assert normalize_uuid(UUID0) == normalize_uuid("7BE369F6-a0d7-e643-a73b-c7c2ebbc58d7")
    torch_order = [{"uuid": UUID1[4:]}, {"uuid": UUID0[4:]}, {"uuid": "00000000-0000"}]
    assert cuda_to_nvml(torch_order, [UUID0, UUID1]) == [1, 0, None]


def test_names_holder_matches_the_preflight_wording() -> None:
    finding = {
        "check": "gpu",
        "message": "GPU 1 (NVIDIA H200): 119.2 GiB free of 140.4 GiB, but prefill "
        "ask(s) 0.90 of it (126.4 GiB); held by pid 1375 (python3, 20.6 GiB)",
    }
    assert names_holder(finding, 1375, "python3")
    assert not names_holder(finding, 137, "python3")
    assert not names_holder(finding, 1375, "vllm")


def samples(gpu_index: int, rows: list[tuple[float, set[int]]]) -> list[Sample]:
    return [Sample(t, gpu_index, dict.fromkeys(pids, GIB), GIB * len(pids)) for t, pids in rows]


def test_freed_at_is_the_reading_after_the_last_one_listing_a_pid() -> None:
    rows = samples(
        0, [(0.0, {10, 11}), (0.05, {11}), (0.10, set()), (0.15, {11}), (0.20, set()), (0.25, set())]
    )
    assert freed_at(rows, 0, {10, 11}, after=0.0) == 0.20  # a pid that comes back is not freed yet
    assert freed_at(rows, 0, {10}, after=0.0) == 0.05
    assert freed_at(rows, 1, {10}, after=0.0) is None  # no reading of that GPU at all
    assert freed_at(samples(0, [(0.0, {10})]), 0, {10}, after=0.0) is None  # never freed in the window


def transitions(*rows: tuple[float, str, int | None]) -> list[Transition]:
    return [Transition(t, "decode", new, pid, f"{new} {pid}") for t, new, pid in rows]


def test_restart_timeline_of_the_escaped_grandchild_run() -> None:
    # The grandchild variant as recorded: kill at 0, exit seen at 0.09, the grandchild (pid 2) listed
    # until 3.70, the runner's last poll at 3.717 free, respawn 3.727, healthy 10.75.
    trs = transitions(
        (-5.0, "starting", 1),
        (-1.0, "running", 1),
        (0.09, "backoff", 1),
        (3.727, "starting", 3),
        (10.75, "running", 3),
    )
    polls = [Poll(0.091 + 0.2 * i, 0.0913 + 0.2 * i, (0,), frozenset({2})) for i in range(18)]
    polls.append(Poll(3.7165, 3.717, (0,), frozenset()))
    smp = samples(
        0, [(-0.5, {1, 2}), (0.05, {1, 2}), (0.1, {2}), (3.65, {2}), (3.70, set()), (3.75, {3}), (4.0, {3})]
    )
    tl = restart_timeline(
        name="decode", gpu=0, killed_at=0.0, dead_pids={1, 2}, transitions=trs, polls=polls, samples=smp
    )
    assert tl["outcome"] == "released" and not tl["violations"]
    assert (tl["exit_detected_s"], tl["nvml_free_s"], tl["respawn_s"], tl["healthy_s"]) == (
        0.09,
        3.70,
        3.727,
        10.75,
    )
    assert (tl["gpu_polls"], tl["gpu_polls_holding"], tl["new_pid"]) == (19, 18, 3)
    assert tl["used_bytes_before_kill"] == 2 * GIB and tl["used_bytes_at_respawn"] == 0


def test_restart_timeline_says_still_held_when_the_last_poll_still_held() -> None:
    trs = transitions((0.09, "backoff", 1), (1.7, "starting", 3), (8.9, "running", 3))
    polls = [Poll(0.09 + 0.2 * i, 0.0903 + 0.2 * i, (0,), frozenset({2})) for i in range(9)]
    smp = samples(0, [(0.0, {1, 2}), (1.69, {2}), (1.75, {2, 3}), (6.67, {3})])
    tl = restart_timeline(
        name="decode", gpu=0, killed_at=0.0, dead_pids={1, 2}, transitions=trs, polls=polls, samples=smp
    )
    assert tl["outcome"] == "still held"
    assert tl["nvml_free_s"] == 6.67 and tl["respawn_s"] == 1.7


def test_restart_timeline_flags_a_dead_pid_listed_after_a_released_respawn() -> None:
    trs = transitions((0.1, "backoff", 1), (0.2, "starting", 3))
    polls = [Poll(0.15, 0.16, (0,), frozenset())]
    smp = samples(0, [(0.0, {1}), (0.12, set()), (0.25, {1, 3})])  # the dead pid is back after the respawn
    tl = restart_timeline(
        name="decode", gpu=0, killed_at=0.0, dead_pids={1}, transitions=trs, polls=polls, samples=smp
    )
    assert tl["outcome"] == "released"
    assert len(tl["violations"]) == 1 and "dead pid(s) [1]" in tl["violations"][0]


def test_restart_timeline_is_unknown_without_polls_or_nvml() -> None:
    trs = transitions((0.1, "backoff", 1), (0.2, "starting", 3))
    assert (
        restart_timeline(
            name="decode", gpu=0, killed_at=0.0, dead_pids={1}, transitions=trs, polls=[], samples=[]
        )["outcome"]
        == "unknown"
    )
    blind = [Poll(0.15, 0.16, (0,), None)]  # NVML could not tell: the runner starts at once
    assert (
        restart_timeline(
            name="decode", gpu=0, killed_at=0.0, dead_pids={1}, transitions=trs, polls=blind, samples=[]
        )["outcome"]
        == "unknown"
    )
