"""``<state_dir>/supervisor.pid``: who supervises a deployment, and how ``down`` finds and stops it.

The file is locked (``flock``) for the supervisor's whole life: a second ``up`` of the same
deployment is refused, and a leftover file from a killed supervisor is recognised as stale because
nobody holds its lock. The kernel drops the lock when the process dies, however it dies.
Until the control socket exists, ``down`` uses this file: SIGTERM, then wait for the lock to go.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from supervisor.errors import ControlError, StartError
from supervisor.paths import secure_state_dir

PID_FILE = "supervisor.pid"


@dataclass(frozen=True)
class Running:
    """A live supervisor found under the state root."""

    deployment: str
    pid: int
    pid_file: Path


class PidFile:
    """Held (locked) while a supervisor runs a deployment; ``with PidFile(dir, name): ...``."""

    def __init__(self, state_dir: str | os.PathLike[str], deployment: str) -> None:
        self.path = Path(state_dir) / PID_FILE
        self.deployment = deployment
        self._fd: int | None = None

    def __enter__(self) -> PidFile:
        secure_state_dir(self.path.parent)  # 0700, ours: refuses a directory planted by another user
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartError(
                self.deployment, f"another supervisor (pid {other}) already runs it ({self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            os.close(self._fd)  # releases the lock
            self._fd = None


def _holder(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if a live process holds its lock, else None (stale or absent)."""
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def running(state_root: str | os.PathLike[str]) -> list[Running]:
    """Every deployment under ``state_root`` whose supervisor is alive."""
    root = Path(state_root)
    found = []
    for pid_file in sorted(root.glob(f"*/{PID_FILE}")) if root.is_dir() else []:
        pid = _holder(pid_file)
        if pid is not None:
            found.append(Running(deployment=pid_file.parent.name, pid=pid, pid_file=pid_file))
    return found


def choose(state_root: str | os.PathLike[str], deployment: str | None) -> Running:
    """The supervisor ``down`` should stop: the named one, or the only one running."""
    live = running(state_root)
    if deployment is not None:
        for entry in live:
            if entry.deployment == deployment:
                return entry
        raise ControlError(f"no running supervisor for deployment {deployment!r} under {state_root}")
    if not live:
        raise ControlError(f"no running deployment under {state_root}")
    if len(live) > 1:
        names = ", ".join(entry.deployment for entry in live)
        raise ControlError(f"several deployments run under {state_root} ({names}): name one")
    return live[0]


def stop(entry: Running, *, timeout_s: float) -> float:
    """SIGTERM the supervisor and wait until it let go of its pid file; returns seconds taken."""
    started = time.monotonic()
    try:
        os.kill(entry.pid, signal.SIGTERM)
    except ProcessLookupError:
        return 0.0
    except PermissionError as exc:
        raise ControlError(
            f"not allowed to signal supervisor pid {entry.pid} of {entry.deployment!r}"
        ) from exc
    delay = 0.01
    while _holder(entry.pid_file) == entry.pid:
        if time.monotonic() - started > timeout_s:
            raise ControlError(
                f"supervisor pid {entry.pid} of {entry.deployment!r} did not stop within {timeout_s:g} s"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return time.monotonic() - started
