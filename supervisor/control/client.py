"""The control socket's client side: where a deployment's socket is, and one request to it.

The CLI (``status``, ``restart``, ``down`` ...) needs only this module, not the server's event loop
code. :mod:`supervisor.control.server` documents the protocol; the server binds the path that
:func:`socket_path` gives and records it where :func:`socket_for` looks.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.engine import pidfile
from supervisor.errors import BadRequestError, ControlError

SOCKET_NAME = "control.sock"
POINTER_FILE = "control.path"
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, NUL included
READ_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 2.0


# ---- where the socket is ---------------------------------------------------------------------


def short_dir(uid: int | None = None) -> Path:
    """A private directory for sockets whose natural path is too long: mode 0700, ours, no symlink."""
    uid = os.geteuid() if uid is None else uid
    runtime = Path(f"/run/user/{uid}")
    base = (
        runtime / "lmcache-supervise"
        if runtime.is_dir() and os.access(runtime, os.W_OK)
        else Path(f"/tmp/lmcache-supervise-{uid}")
    )
    try:
        base.mkdir(mode=0o700, parents=False, exist_ok=True)
    except OSError as exc:
        raise ControlError(f"cannot create {base} for the control socket: {exc.strerror or exc}") from None
    info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        # /tmp is shared: someone else may have created (or planted a symlink at) this name first.
        raise ControlError(f"{base} is not a private directory of uid {uid}; remove it")
    return base


def socket_path(configured: str) -> str:
    """``configured`` if it fits in sun_path, else a short path derived from it (stable across runs)."""
    if len(os.fsencode(configured)) <= SUN_PATH_MAX:
        return configured
    digest = hashlib.sha256(os.fsencode(configured)).hexdigest()[:20]
    return str(short_dir() / f"{digest}.sock")


def socket_for(state_dir: str | os.PathLike[str]) -> str:
    """The socket of the deployment whose state is in ``state_dir`` (what a client connects to)."""
    pointer = Path(state_dir) / POINTER_FILE
    try:
        recorded = pointer.read_text().strip()
    except OSError:
        recorded = ""
    return recorded or str(Path(state_dir) / SOCKET_NAME)


# ---- client --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A running deployment as a client finds it."""

    deployment: str
    state_dir: Path
    pid: int
    socket: str


def find(state_root: str | os.PathLike[str], deployment: str | None) -> Endpoint:
    """The named running deployment, or the only one; :class:`ControlError` names the choices."""
    entry = pidfile.choose(state_root, deployment)
    state_dir = entry.pid_file.parent
    return Endpoint(entry.deployment, state_dir, entry.pid, socket_for(state_dir))


def request(
    endpoint: Endpoint, message: dict[str, Any], *, timeout_s: float = READ_TIMEOUT_S
) -> dict[str, Any]:
    """Send one request and return the answer's payload; a refusal raises (bad input: exit 2)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(endpoint.socket)
        except OSError as exc:
            raise ControlError(
                f"deployment {endpoint.deployment!r} (supervisor pid {endpoint.pid}) does not "
                f"answer on {endpoint.socket}: {exc.strerror or exc}"
            ) from None
        sock.settimeout(timeout_s)
        sock.sendall((json.dumps(message) + "\n").encode())
        data = b""
        deadline = time.monotonic() + timeout_s
        while not data.endswith(b"\n"):
            if time.monotonic() > deadline:
                raise TimeoutError
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ControlError(
            f"deployment {endpoint.deployment!r} did not answer {message.get('op')!r} within {timeout_s:g} s"
        ) from None
    finally:
        sock.close()
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(
            f"deployment {endpoint.deployment!r} closed the connection without an answer"
        ) from None
    if not answer.get("ok"):
        error = BadRequestError if answer.get("bad_input") else ControlError
        raise error(str(answer.get("error", "request failed")))
    if not isinstance(answer, dict):
        raise ControlError(
            f"deployment {endpoint.deployment!r} answered with something that is not an object"
        )
    return answer


def wait_gone(endpoint: Endpoint, *, timeout_s: float) -> float:
    """Wait until the supervisor let go of its pid file (it has stopped everything); seconds taken."""
    started = time.monotonic()
    delay = 0.02
    while any(e.pid == endpoint.pid for e in pidfile.running(endpoint.state_dir.parent)):
        if time.monotonic() - started > timeout_s:
            raise ControlError(
                f"supervisor pid {endpoint.pid} of {endpoint.deployment!r} did not stop "
                f"within {timeout_s:g} s"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
    return time.monotonic() - started
