"""Reading a child's log file the way ``tail -n N -F`` does, across the rotations of :mod:`supervisor.engine.logs`.

The runner writes ``<state_dir>/logs/<name>.log`` and rotates it by renaming it to ``.1`` and
opening a new file. :func:`follow` keeps its descriptor on the old file until that is drained,
then moves to the new one from its start, so no line is lost or repeated at a rotation; a file
truncated in place is read again from its start. Polling (every ``poll_s``) keeps it stdlib-only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

_BLOCK = 64 * 1024


def last_lines(path: str, count: int) -> tuple[list[str], int]:
    """The last ``count`` lines of ``path`` and the offset just after them (where following resumes)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos, data = end, b""
        while pos > 0 and data.count(b"\n") <= count:
            step = min(_BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    complete = data[: data.rfind(b"\n") + 1] if b"\n" in data else b""
    lines = complete.decode("utf-8", "replace").splitlines()
    return (lines[-count:] if count > 0 else []), (end - len(data) + len(complete))


def follow(
    path: str, *, offset: int = 0, poll_s: float = 0.2, stop: Callable[[], bool] = lambda: False
) -> Iterator[str]:
    """Yield whole lines appended to ``path`` from ``offset`` on, until ``stop()`` is true."""
    fd: int | None = None
    inode = None
    partial = b""
    try:
        while not stop():
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:  # between a rotation's rename and the new file, or not yet made
                    time.sleep(poll_s)
                    continue
                inode = os.fstat(fd).st_ino
                os.lseek(fd, offset, os.SEEK_SET)
            chunk = os.read(fd, _BLOCK)
            if chunk:
                lines = (partial + chunk).split(b"\n")
                partial = lines.pop()
                for line in lines:
                    yield line.decode("utf-8", "replace")
                continue
            if _rotated(path, inode):
                if os.fstat(fd).st_size > os.lseek(fd, 0, os.SEEK_CUR):
                    continue  # written just before the rename: drain the old file first
                os.close(fd)
                fd, offset = None, 0  # the old file is drained: the new one is read from its start
                continue
            if os.fstat(fd).st_size < os.lseek(fd, 0, os.SEEK_CUR):
                os.lseek(fd, 0, os.SEEK_SET)  # truncated in place
                partial = b""
                continue
            time.sleep(poll_s)
    finally:
        if fd is not None:
            os.close(fd)


def _rotated(path: str, inode: int | None) -> bool:
    try:
        return os.stat(path).st_ino != inode
    except FileNotFoundError:
        return False  # the new file is not there yet: keep draining the old one
