"""The control socket with a real runner and fixture children: mode, peer uid, requests, stale and long paths."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor.control import client
from supervisor.control import server as control
from supervisor.control.progress import Timeline
from supervisor.engine.runner import Runner
from supervisor.engine.states import DeploymentState, ProcessState
from supervisor.errors import BadRequestError, ControlError
from supervisor.plan.spec import Plan

pytestmark = pytest.mark.anyio
NOBODY = 65534


@asynccontextmanager
async def controlled(plan: Plan) -> AsyncIterator[tuple[Runner, control.ControlServer, client.Endpoint]]:
    """A runner serving ``plan`` with its control server, until the block ends (then shut down, reaped)."""
    runner = Runner(plan)
    timeline = Timeline()
    runner.subscribe(timeline)
    server = control.ControlServer(plan, timeline)
    async with anyio.create_task_group() as tg:

        async def supervise() -> None:
            await runner.serve()
            tg.cancel_scope.cancel()  # the control service runs until supervision ends

        tg.start_soon(server.serve, runner)
        tg.start_soon(supervise)
        try:
            with anyio.fail_after(10):
                await runner.wait_until(lambda s: s.state is DeploymentState.READY, timeout_s=10)
                while server.path is None:
                    await anyio.sleep(0.01)
            yield (
                runner,
                server,
                client.Endpoint("test", Path(plan.deployment.state_dir), os.getpid(), server.path),
            )
        finally:
            runner.request_shutdown()


async def ask(endpoint: client.Endpoint, message: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
    """The synchronous client, run in a thread so the server (same loop) can answer."""
    return await anyio.to_thread.run_sync(lambda: client.request(endpoint, message, timeout_s=timeout_s))


async def test_socket_is_private_answers_status_and_goes_at_shutdown(make_spec, make_plan) -> None:
    plan = make_plan(make_spec("a"), make_spec("b"))
    async with controlled(plan) as (runner, server, endpoint):
        info = os.stat(server.path)
        assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.geteuid()
        assert server.path == plan.deployment.control_socket
        doc = (await ask(endpoint, {"op": "status"}))["status"]
        assert doc["schema"] == 1
        assert doc["deployment"]["name"] == "test" and doc["deployment"]["state"] == "ready"
        assert (
            doc["deployment"]["time_to_ready_s"] is not None
            and doc["deployment"]["supervisor_pid"] == os.getpid()
        )
        by_name = {p["name"]: p for p in doc["processes"]}
        assert list(by_name) == ["a", "b"]
        assert by_name["a"]["state"] == "healthy" and by_name["a"]["phase"] == "running"
        assert by_name["a"]["pid"] == runner.status().process("a").pid
        assert by_name["a"]["log_file"].endswith("logs/a.log") and by_name["a"]["hints"] == []
        assert set(by_name["a"]) >= {"uptime_s", "restarts", "last_exit", "gpus", "ports", "probe", "reason"}
    assert not os.path.exists(plan.deployment.control_socket)


async def test_restart_stop_start_over_the_socket(make_spec, make_plan) -> None:
    plan = make_plan(make_spec("a"), make_spec("b"))
    async with controlled(plan) as (runner, _, endpoint):
        before = {p.name: p.pid for p in runner.status().processes}
        answer = await ask(endpoint, {"op": "restart", "process": "b", "wait_s": 10, "allow_downtime": True})
        after = {p.name: p.pid for p in runner.status().processes}
        assert answer["old_pid"] == before["b"] and answer["process"]["pid"] == after["b"] != before["b"]
        assert after["a"] == before["a"]  # only the named process changed
        assert answer["deployment_state"] == "ready" and answer["process"]["restarts"] == 1

        answer = await ask(endpoint, {"op": "stop", "process": "b"})
        assert answer["process"]["state"] == "stopped" and answer["process"]["pid"] is None
        assert runner.status().state is DeploymentState.DEGRADED
        answer = await ask(endpoint, {"op": "start", "process": "b", "wait_s": 10})
        assert answer["process"]["state"] == "healthy" and answer["deployment_state"] == "ready"
        again = await ask(endpoint, {"op": "start", "process": "b", "wait_s": 10})
        assert again["note"] == "already healthy" and again["process"]["pid"] == answer["process"]["pid"]


async def test_bad_requests_are_refused_with_one_clear_line(make_spec, make_plan) -> None:
    async with controlled(make_plan(make_spec("a"))) as (runner, server, endpoint):
        with pytest.raises(BadRequestError, match=r"no process 'nope' in deployment 'test' \(processes: a\)"):
            await ask(endpoint, {"op": "restart", "process": "nope"})
        with pytest.raises(BadRequestError, match="unknown op 'explode'"):
            await ask(endpoint, {"op": "explode"})
        with pytest.raises(BadRequestError, match="wait_s"):
            await ask(endpoint, {"op": "start", "process": "a", "wait_s": -1})

        def raw(data: bytes) -> dict[str, Any]:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(5)
                sock.connect(server.path)
                sock.sendall(data)
                return json.loads(sock.makefile("rb").readline())

        answer = await anyio.to_thread.run_sync(raw, b"not json\n")
        assert answer == {
            "ok": False,
            "error": 'a request is one JSON object with an "op" field',
            "bad_input": True,
        }
        assert runner.status().process("a").state is ProcessState.RUNNING  # nothing was disturbed


async def test_down_over_the_socket_stops_everything(make_spec, make_plan) -> None:
    plan = make_plan(make_spec("a"))
    async with controlled(plan) as (runner, _, endpoint):
        pid = runner.status().process("a").pid
        assert (await ask(endpoint, {"op": "down"}))["pid"] == os.getpid()
        status = await runner.wait_until(lambda s: s.state is DeploymentState.STOPPED, timeout_s=10)
        assert status.process("a").pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_stale_socket_is_replaced_and_a_live_one_is_left_alone(make_spec, make_plan) -> None:
    plan = make_plan(make_spec("a"))
    path = plan.deployment.control_socket
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # what a SIGKILLed supervisor leaves: the file, nobody listening
    stale.close()
    async with controlled(plan) as (_, server, endpoint):
        assert server.path == path
        assert (await ask(endpoint, {"op": "status"}))["ok"]

    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(ControlError, match="another supervisor answers"):
            control._clear_stale(path)
        runner = Runner(plan)
        server = control.ControlServer(plan, Timeline())
        with anyio.fail_after(5):
            await server.serve(runner)  # logs an error and returns: supervision would go on without it
        assert server.path is None and os.path.exists(path)
    finally:
        live.close()
        os.unlink(path)


async def test_a_path_too_long_for_a_unix_socket_falls_back_to_a_short_recorded_one(
    tmp_path: Path, make_spec, make_plan
) -> None:
    plan = make_plan(make_spec("a"))
    state = tmp_path / ("deep-" * 25)
    dep = dataclasses.replace(
        plan.deployment, state_dir=str(state), control_socket=str(state / "control.sock")
    )
    plan = dataclasses.replace(plan, deployment=dep)
    assert len(dep.control_socket.encode()) > client.SUN_PATH_MAX
    async with controlled(plan) as (_, server, endpoint):
        assert server.path != dep.control_socket and len(server.path.encode()) <= client.SUN_PATH_MAX
        assert client.socket_for(state) == server.path == (state / client.POINTER_FILE).read_text().strip()
        parent = os.stat(os.path.dirname(server.path))
        assert stat.S_IMODE(parent.st_mode) == 0o700 and parent.st_uid == os.geteuid()
        assert (await ask(endpoint, {"op": "status"}))["status"]["deployment"]["state"] == "ready"
        short = server.path
    assert not os.path.exists(short) and not (state / client.POINTER_FILE).exists()
    assert client.socket_path(dep.control_socket) == short  # the same short path on every run


def test_peer_uid_rule() -> None:
    assert control.peer_allowed(1000, own_uid=1000)
    assert control.peer_allowed(0, own_uid=1000)  # root is allowed: documented in control.py
    assert not control.peer_allowed(1001, own_uid=1000)


def _as_nobody(path: str) -> str:
    """Connect to ``path`` from a forked child that dropped to uid 65534; what it saw, as text."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only raw syscalls, then _exit
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(5)
            try:
                sock.connect(path)
            except PermissionError:
                os.write(write, b"EACCES")
                os._exit(0)
            sock.sendall(b'{"op": "status"}\n')
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            os.write(write, data or b"EOF")
        except BaseException as exc:  # noqa: BLE001 (report anything to the parent)
            os.write(write, repr(exc).encode())
        finally:
            os._exit(0)
    os.close(write)
    out = b""
    while chunk := os.read(read, 65536):
        out += chunk
    os.close(read)
    os.waitpid(pid, 0)
    return out.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid (nobody, 65534)")
async def test_another_uid_is_kept_out_by_the_mode_and_refused_by_the_uid_check(make_spec, make_plan) -> None:
    shared = tempfile.mkdtemp(prefix="ctl-uid-", dir="/tmp")
    os.chmod(shared, 0o711)  # nobody may traverse it, as it may a shared state root
    try:
        plan = make_plan(make_spec("a"))
        dep = dataclasses.replace(plan.deployment, control_socket=f"{shared}/control.sock")
        async with controlled(dataclasses.replace(plan, deployment=dep)) as (_, server, endpoint):
            assert await anyio.to_thread.run_sync(_as_nobody, server.path) == "EACCES"  # mode 0600
            os.chmod(server.path, 0o666)  # as if the mode were lost: SO_PEERCRED still refuses
            answer = json.loads(await anyio.to_thread.run_sync(_as_nobody, server.path))
            assert answer["ok"] is False
            assert answer["error"] == f"refused: peer uid {NOBODY} is not the uid 0 this supervisor runs as"
            assert (await ask(endpoint, {"op": "status"}))["ok"]  # root (us) still gets in
    finally:
        for name in os.listdir(shared):
            os.unlink(os.path.join(shared, name))
        os.rmdir(shared)
