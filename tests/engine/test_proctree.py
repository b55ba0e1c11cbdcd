"""The /proc child-list walk against psutil's host-wide one, on a real four-process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import wait_for

from supervisor.engine import proctree
from supervisor.engine.process import group_members

# A child that starts a grandchild (which starts a great-grandchild) and one in a session of its own.
TREE = """
import subprocess, sys, time
leaf = "import time; time.sleep(60)"
mid = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {leaf!r}]); time.sleep(60)"
subprocess.Popen([sys.executable, "-c", mid])
subprocess.Popen([sys.executable, "-c", leaf], start_new_session=True)
time.sleep(60)
"""


@pytest.fixture
def tree() -> Iterator[tuple[int, list[int]]]:
    """The root's pid and its three descendants' pids, as psutil sees them."""
    root = subprocess.Popen([sys.executable, "-c", TREE], start_new_session=True)

    def three_below() -> list[int] | None:
        below = [c.pid for c in psutil.Process(root.pid).children(recursive=True)]
        return below if len(below) == 3 else None

    try:
        yield root.pid, wait_for(three_below, 20, what="a tree of four")
    finally:
        for pid in proctree._descendants_by_psutil(root.pid):
            os.kill(pid, signal.SIGKILL)
        root.kill()
        root.wait()


def test_descendants_match_psutil_and_come_parents_first(tree: tuple[int, list[int]]) -> None:
    root, expected = tree
    found = proctree.descendants(root)
    assert sorted(found) == sorted(expected) and root not in found
    for pid in found:  # each one's parent is the root or listed before it
        parent = psutil.Process(pid).ppid()
        assert parent == root or found.index(parent) < found.index(pid)


def test_a_kernel_without_child_lists_falls_back_to_psutil(tree: tuple[int, list[int]], monkeypatch) -> None:
    root, expected = tree
    monkeypatch.setattr(proctree, "_children", lambda pid: None)
    assert sorted(proctree.descendants(root)) == sorted(expected)


def test_a_gone_process_has_no_descendants() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    assert proctree.descendants(int(done.stdout)) == []


# ---- the group walk shared per tick (proctree.groups, process.group_members) ----


@pytest.fixture
def session() -> Iterator[subprocess.Popen[bytes]]:
    """A process leading a group of its own (a real stop would be waiting for it)."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_groups_polled_at_once_share_one_walk_per_tick(session: subprocess.Popen[bytes]) -> None:
    """Eight stops polling their groups from worker threads, as a deployment's shutdown does:
    within a tick they share one walk of /proc, and each gets its own group's members."""
    calls = 8 * 25
    before = proctree.walks
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: group_members(session.pid), range(calls)))
    walks = proctree.walks - before
    assert all(answer == [session.pid] for answer in answers), answers
    assert 1 <= walks < calls / 4, f"{walks} walks of /proc for {calls} polls"


def test_a_group_newer_than_the_shared_walk_is_still_seen() -> None:
    proctree.groups(max_age_s=0)  # a fresh walk, taken before the group exists
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert group_members(proc.pid) == [proc.pid]  # not an empty group from the stale walk
    finally:
        proc.kill()
        proc.wait()
    assert group_members(proc.pid) == []


def test_a_group_of_zombies_is_empty() -> None:
    """killpg still finds a group whose processes are unreaped zombies; the walk says it is empty."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, 5, what="a zombie")
        os.killpg(proc.pid, 0)  # the group still exists for kill(2)
        assert group_members(proc.pid) == []
    finally:
        proc.wait()
