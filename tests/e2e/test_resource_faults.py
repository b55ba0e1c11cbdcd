"""The real demo with its log directory full (a 64 KiB tmpfs, filled) or read-only (a read-only
bind mount): one clear error event per process, and supervision goes on (a SIGKILLed worker is
restarted, the deployment is ready again, shutdown is orderly). Needs root for the mounts."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import Deployment

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs or a read-only bind"),
]
ERROR_EVENT = "child log not writable; output dropped, supervision continues"


def _run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, timeout=30)


@contextmanager
def broken_logs(logs: Path, how: str) -> Iterator[str]:
    """Make ``logs`` full or read-only; yields the error the supervisor should report; always unmounts."""
    logs.mkdir(parents=True)
    try:
        if how == "full":
            _run("mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(logs))
        else:
            _run("mount", "--bind", str(logs), str(logs))
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount here: {getattr(exc, 'stderr', b'') or exc}")
    try:
        if how == "full":
            fd = os.open(logs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:  # fill it up to the last byte (unbuffered: nothing left to flush at close)
                while os.write(fd, b"\0" * 512):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)
            yield os.strerror(errno.ENOSPC)
        else:
            _run("mount", "-o", "remount,bind,ro", str(logs))
            yield os.strerror(errno.EROFS)
    finally:
        subprocess.run(["umount", str(logs)], capture_output=True, timeout=30)
        if os.path.ismount(logs):
            subprocess.run(["umount", "-l", str(logs)], capture_output=True, timeout=30)
    assert not os.path.ismount(logs)


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_broken_log_dir_costs_log_lines_not_supervision(tmp_path: Path, how: str) -> None:
    state_root = tmp_path / "state"
    logs = state_root / "demo" / "logs"
    with broken_logs(logs, how) as error, Deployment(tmp_path, state_root=state_root) as dep:
        dep.wait_ready()
        old = dep.process_state("decode")[1]
        os.kill(old, signal.SIGKILL)
        dep.wait(lambda: dep.process_state("decode")[1] != old and dep.all_ready(), 60, "decode back, ready")
        reported = dep.named(ERROR_EVENT)
        assert dep.stop() == 0
    by_process = [e.data["process"] for e in reported]
    assert by_process and len(by_process) == len(set(by_process)), by_process  # once per process, not line
    assert {"frontend", "decode"} <= set(by_process)
    assert all(e.data["error"] == error and e.data["level"] == "error" for e in reported)
    assert all(e.data["path"] == str(logs / f"{e.data['process']}.log") for e in reported)
    assert len(dep.named("process starting", "decode")) == 2
