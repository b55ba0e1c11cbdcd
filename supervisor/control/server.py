"""The control socket: a running ``up`` answers small JSON requests from the CLI over a Unix socket.

Protocol: one JSON object per line, one request per connection, one answer::

    {"op": "status"}                                  -> {"ok": true, "status": {...}}   (statusview)
    {"op": "restart", "process": "decode", "wait_s": 600}
    {"op": "stop", "process": "decode"}               -> {"ok": true, "process": {...}}
    {"op": "start", "process": "decode", "wait_s": 600}
    {"op": "down"}                                    -> {"ok": true, "pid": <supervisor pid>}
    {"op": "reload"}                                  -> {"ok": true, "pid": ...}  (outcome: reload.json)
    {"op": "gpus"}                                    -> {"ok": true, "gpus": {...}}     (control.gpus)
    {"op": "gpu-clear", "gpu": 0}                     -> {"ok": true, "note": "...", "gpus": {...}}
    anything wrong                                    -> {"ok": false, "error": "...", "bad_input": bool}

``wait_s`` (restart, start): answer once the process is healthy again with a new pid and, when every
process is healthy, the deployment is ready again; 0 answers at once.

Security: the socket lives in the deployment's state directory, is created mode 0600 (chmod happens
between bind and listen, so no connection is possible before), and every peer's uid is read with
SO_PEERCRED: a peer whose uid is not the supervisor's effective uid is refused, except root, which
is allowed (root can signal and trace the supervisor anyway; refusing it would only push an
administrator to ``kill``).

Path length: a Unix socket path holds at most 107 bytes. When the state directory is deeper than
that allows, the socket goes to ``/run/user/<uid>/lmcache-supervise/<hash>.sock`` (or
``/tmp/lmcache-supervise-<uid>/`` with mode 0700 when there is no runtime directory) and the real
path is recorded in ``<state_dir>/control.path``, which clients read first.

The server talks to the runner only through its public API (``status``, ``start``, ``stop``,
``restart``, ``request_shutdown``, ``wait_until``, ``plan``); the runner never imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from supervisor.control import gpus, rolling
from supervisor.control import status as statusview
from supervisor.control.client import POINTER_FILE, SOCKET_NAME, socket_path
from supervisor.control.progress import Timeline
from supervisor.engine.states import DeploymentState, DeploymentStatus, ProcessState
from supervisor.errors import BadRequestError, ControlError, GpuError, SupervisorError
from supervisor.eventlog import log
from supervisor.plan.spec import Plan

MESSAGE_MAX = 64 * 1024
READ_TIMEOUT_S = 5.0
P, D = ProcessState, DeploymentState


class Supervised(Protocol):
    """The part of :class:`~supervisor.engine.runner.Runner` the control server uses."""

    plan: Plan

    def status(self) -> DeploymentStatus: ...
    async def start(self, name: str) -> None: ...
    async def stop(self, name: str) -> None: ...
    async def restart(self, name: str) -> None: ...
    async def clear_gpu(self, index: int) -> str: ...
    def request_shutdown(self, *, kill: bool = False, reason: str = "requested") -> None: ...
    def request_reload(self) -> bool: ...
    async def wait_until(
        self, predicate: Callable[[DeploymentStatus], bool], *, timeout_s: float
    ) -> DeploymentStatus: ...


def _clear_stale(path: str) -> None:
    """Remove a socket file nobody answers on (a SIGKILLed supervisor's); refuse to take a live one."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"{path} exists and is not a socket; remove it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ControlError(f"cannot check the old control socket {path}: {exc.strerror or exc}") from None
        log.info("replacing a stale control socket", path=path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise ControlError(f"another supervisor answers on {path}")


# ---- server --------------------------------------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_allowed(uid: int, *, own_uid: int | None = None) -> bool:
    """Same effective uid as the supervisor, or root."""
    return uid in (os.geteuid() if own_uid is None else own_uid, 0)


class ControlServer:
    """A runner service serving the control socket of ``plan`` (``services=[server.serve]``)."""

    def __init__(self, plan: Plan, timeline: Timeline) -> None:
        self.plan, self.timeline = plan, timeline
        self.path: str | None = None
        self._runner: Supervised | None = None
        self._rolling = anyio.Lock()  # one restart (a roll of several replicas) at a time

    async def serve(self, runner: Supervised) -> None:
        self._runner = runner
        dep = self.plan.deployment
        pointer = Path(dep.state_dir) / POINTER_FILE
        try:
            path = socket_path(dep.control_socket)
            Path(dep.state_dir).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240  (once, at start)
            _clear_stale(path)
            listener = await anyio.create_unix_listener(path, mode=0o600)
            if path != str(Path(dep.state_dir) / SOCKET_NAME):
                pointer.write_text(path + "\n")
        except (ControlError, OSError) as exc:
            # Supervision matters more than its remote control: `down` falls back to SIGTERM.
            log.error(
                "control socket not available; supervision continues",
                path=dep.control_socket,
                error=str(exc) if isinstance(exc, ControlError) else exc.strerror or str(exc),
            )
            return
        self.path = path
        log.info("control socket listening", path=path)
        try:
            async with listener:
                await listener.serve(self._handle)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            with contextlib.suppress(FileNotFoundError):
                pointer.unlink()

    async def _handle(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            try:
                pid, uid, _ = peer_credentials(stream.extra(anyio.abc.SocketAttribute.raw_socket))
                # Read the request even from a peer about to be refused: closing a socket with unread
                # data resets it, and the peer would see ECONNRESET instead of the refusal.
                with anyio.fail_after(READ_TIMEOUT_S):
                    line = await BufferedByteReceiveStream(stream).receive_until(b"\n", MESSAGE_MAX)
                if not peer_allowed(uid):
                    log.warning("control connection refused", peer_pid=pid, peer_uid=uid)
                    await _send(
                        stream,
                        _error(
                            f"refused: peer uid {uid} is not the uid {os.geteuid()} this supervisor runs as"
                        ),
                    )
                    return
                try:
                    request = json.loads(line)
                except ValueError:
                    request = None
                try:
                    answer = await self.answer(request)
                except SupervisorError as exc:  # e.g. the runner refused: an answer, not a crash
                    answer = _error(str(exc), bad_input=isinstance(exc, BadRequestError))
                except Exception as exc:  # a bug here must cost one request, never supervision
                    log.exception("control request failed", request=str(request)[:200])
                    answer = _error(f"internal error: {type(exc).__name__}: {exc}")
                await _send(stream, answer)
            except (
                anyio.EndOfStream,
                anyio.IncompleteRead,
                anyio.DelimiterNotFound,
                TimeoutError,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ) as exc:
                log.debug("control connection dropped", error=type(exc).__name__)

    async def answer(self, request: Any) -> dict[str, Any]:
        """The answer to one request (never raises for a bad one)."""
        runner = self._runner
        assert runner is not None
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return _error('a request is one JSON object with an "op" field', bad_input=True)
        op = request["op"]
        if op == "status":
            return {"ok": True, "status": await self.status_document()}
        if op == "down":
            runner.request_shutdown(reason="down over the control socket")
            return {"ok": True, "pid": os.getpid()}
        if op == "reload":  # queued; the outcome is written to reload.json (control.reload)
            if not runner.request_reload():
                return _error(
                    f"deployment {self.plan.deployment.name!r} was started without a profile to re-read"
                )
            return {"ok": True, "pid": os.getpid()}
        if op == "gpus":
            return {"ok": True, "gpus": gpus.gpus_document(runner.status())}
        if op == "gpu-clear":
            index = request.get("gpu")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                return _error("gpu must be a GPU index (an integer >= 0)", bad_input=True)
            try:
                note = await runner.clear_gpu(index)
            except GpuError as exc:  # a GPU not watched or not quarantined: the operator's input
                return _error(str(exc), bad_input=True)
            return {"ok": True, "note": note, "gpus": gpus.gpus_document(runner.status())}
        if op not in ("restart", "stop", "start"):
            return _error(
                f"unknown op {op!r} (status, restart, stop, start, down, reload, gpus, gpu-clear)",
                bad_input=True,
            )
        if op == "restart":
            return await self._restart(runner, request)
        name = request.get("process")
        names = [p.name for p in runner.status().processes]
        if name not in names:
            return _error(
                f"no process {name!r} in deployment {self.plan.deployment.name!r} "
                f"(processes: {', '.join(names)})",
                bad_input=True,
            )
        if runner.status().state in (D.STOPPING, D.STOPPED):
            return _error(f"deployment {self.plan.deployment.name!r} is shutting down")
        wait_s = request.get("wait_s", 0)
        if not isinstance(wait_s, (int, float)) or wait_s < 0:
            return _error("wait_s must be a number of seconds >= 0", bad_input=True)
        return await self._act(runner, op, name, float(wait_s))

    async def _restart(self, runner: Supervised, request: dict[str, Any]) -> dict[str, Any]:
        """``restart``: a role's replicas one at a time, a single process, or (``all``) every worker,
        never below a role's min_ready unless ``allow_downtime`` (see :mod:`~supervisor.control.rolling`)."""
        wait_s = request.get("wait_s", 0)
        if not isinstance(wait_s, (int, float)) or wait_s < 0:
            return _error("wait_s must be a number of seconds >= 0", bad_input=True)
        target, everything = request.get("process"), bool(request.get("all"))
        if not everything and not isinstance(target, str):
            return _error('restart needs "process" (a process or a role) or "all": true', bad_input=True)
        names = rolling.resolve(runner.plan, target, everything=everything)
        allow = bool(request.get("allow_downtime"))
        if runner.status().state in (D.STOPPING, D.STOPPED):
            return _error(f"deployment {self.plan.deployment.name!r} is shutting down")
        if wait_s == 0 and len(names) > 1:
            return _error(
                f"--no-wait restarts one process; {', '.join(names)} restart one at a time, each waited for",
                bad_input=True,
            )
        if self._rolling.locked():
            return _error("another restart is in progress; try again when it is done")
        async with self._rolling:
            if wait_s == 0 and len(names) == 1:  # --no-wait: schedule it and answer at once
                if not allow and (problems := rolling.downtime(runner.plan, names)):
                    raise BadRequestError(
                        f"restarting {names[0]} would stop serving: {'; '.join(problems)} "
                        "(add replicas, or pass --allow-downtime)"
                    )
                return await self._act(runner, "restart", names[0], 0.0)
            log.info("control request", op="restart", processes=list(names), allow_downtime=allow)
            import httpx  # only a rolling restart needs it: kept off the start path of `up`

            async with httpx.AsyncClient(trust_env=False) as client:
                steps = await rolling.roll(
                    runner, names, allow_downtime=allow, timeout_s=float(wait_s) or 600.0, client=client
                )
        answer = self._done(runner, steps[-1].name, steps[0].old_pid)
        answer["steps"] = [dataclasses.asdict(step) for step in steps]
        return answer

    async def _act(self, runner: Supervised, op: str, name: str, wait_s: float) -> dict[str, Any]:
        before = runner.status().process(name)
        if op == "start" and before.state not in (P.STOPPED, P.EXITED, P.FAILED):
            return self._done(runner, name, before.pid, note=f"already {before.state.summary}")
        log.info("control request", op=op, process=name)
        action: Callable[[str], Awaitable[None]] = {
            "restart": runner.restart,
            "stop": runner.stop,
            "start": runner.start,
        }[op]
        await action(name)
        if op != "stop" and wait_s > 0:
            try:
                await runner.wait_until(_Comeback(name, before.state, before.pid), timeout_s=wait_s)
            except TimeoutError:
                proc = runner.status().process(name)
                return _error(
                    f"{name} was {op}ed but is {proc.state.summary} after "
                    f"{wait_s:g} s ({proc.reason}); see `lmcache-supervise logs {name}`"
                )
            proc = runner.status().process(name)
            if proc.state is not P.RUNNING:
                return _error(f"{name} did not come back: {proc.state.summary} ({proc.reason})")
        return self._done(runner, name, before.pid)

    @staticmethod
    def _done(runner: Supervised, name: str, old_pid: int | None, note: str = "") -> dict[str, Any]:
        status = runner.status()
        return {
            "ok": True,
            "old_pid": old_pid,
            "note": note,
            "process": statusview.process_view(status.process(name), runner.plan),
            "deployment_state": status.state.value,
        }

    async def status_document(self) -> dict[str, Any]:
        runner = self._runner
        assert runner is not None
        status, plan = runner.status(), runner.plan
        # Log tails and the port table are file and /proc reads: keep them off the event loop.
        hints = await anyio.to_thread.run_sync(statusview.gather_hints, status, plan)
        doc = statusview.status_view(status, plan, self.timeline, hints)
        if any(spec.role.is_cache_server for spec in plan.processes):
            doc["cache_servers"] = await anyio.to_thread.run_sync(statusview.cache_view, status, plan)
        return doc


class _Comeback:
    """Predicate for ``wait_until``: the process is back after a start or restart.

    Back means healthy with a new pid and, when every process is healthy, the deployment ready
    again; or a state it will not leave by itself (failed, exited, stopped), reported at once. The
    action only schedules the work, so states count once the process moved from where it was.
    """

    def __init__(self, name: str, state: ProcessState, pid: int | None) -> None:
        self.name, self.state, self.pid = name, state, pid
        self.moved = False

    def __call__(self, status: DeploymentStatus) -> bool:
        proc = status.process(self.name)
        self.moved = self.moved or proc.state is not self.state or proc.pid != self.pid
        if not self.moved:
            return False
        if proc.state in (P.FAILED, P.EXITED, P.STOPPED):
            return True
        if proc.state is not P.RUNNING or proc.pid == self.pid:
            return False
        return status.state is D.READY or not all(p.state is P.RUNNING for p in status.processes)


def _error(message: str, *, bad_input: bool = False) -> dict[str, Any]:
    return {"ok": False, "error": message, "bad_input": bad_input}


async def _send(stream: anyio.abc.SocketStream, message: dict[str, Any]) -> None:
    await stream.send((json.dumps(message, separators=(",", ":")) + "\n").encode())
