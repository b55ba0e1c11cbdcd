"""`logs -n` and `logs -f` over the runner's rotated log files: nothing lost or repeated at a rotation."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from supervisor.control.logtail import follow, last_lines
from supervisor.engine.logs import RotatingFile


def test_last_lines_and_the_offset_to_follow_from(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(b"".join(f"line {i}\n".encode() for i in range(20000)) + b"partial")
    lines, offset = last_lines(str(log), 3)
    assert lines == ["line 19997", "line 19998", "line 19999"]
    assert log.read_bytes()[offset:] == b"partial"  # following starts at the unfinished line
    assert last_lines(str(log), 0)[0] == []
    small = tmp_path / "b.log"
    small.write_text("one\ntwo\n")
    assert last_lines(str(small), 50) == (["one", "two"], 8)


def test_follow_reads_across_rotations_in_order(tmp_path: Path) -> None:
    """Bursts smaller than a file, each read before the next: every rotation is crossed once, in order.

    (Like ``tail -F``, a reader that falls several whole files behind skips the ones rotated past it.)"""
    path = str(tmp_path / "logs" / "decode.log")
    sink = RotatingFile(path, max_bytes=4096, backups=2, owner="decode")  # the runner's own rotation
    total, burst = 3000, 40  # 40 lines of 55 bytes: at most one rotation per burst
    seen: list[int] = []
    deadline = time.monotonic() + 30

    def write() -> None:
        for start in range(0, total, burst):
            for i in range(start, start + burst):
                sink.write(f"message {i:05d} {'x' * 40}\n".encode())
            while len(seen) < start + burst and time.monotonic() < deadline:
                time.sleep(0.001)  # the reader is at the end of the file when the next burst comes
        sink.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for line in follow(
            path, poll_s=0.005, stop=lambda: len(seen) >= total or time.monotonic() > deadline
        ):
            seen.append(int(line.split()[1]))
    finally:
        writer.join()
    assert seen == list(range(total))
    assert Path(f"{path}.2").exists()  # it did rotate underneath the reader, many times
