"""The /proc child-list walk against psutil's host-wide one, on a real four-process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest
from conftest import wait_for

from supervisor.engine import proctree

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
