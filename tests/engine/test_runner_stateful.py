"""Random interleavings of control operations against a real runner (a hypothesis state machine).

Two small children (``a`` with an HTTP health server and a liveness probe, ``b`` with no probes
and a slow stop) are supervised by a real :class:`Runner` on an event loop in a background thread;
consecutive examples share the runner (20 in a row, then a fresh one). Each step is a
control operation (start, stop, restart), two of them at once (on one process or on both), a
signal to a child (SIGKILL, SIGTERM, SIGSTOP), or a reload that changes one process's spec. After
every step the invariants hold:

* the supervisor is alive (``serve`` has not returned or raised);
* every state change was legal and continues from the state before it;
* no metrics directory is missing under a live process;
* each process settles in the state its last command asked for (concurrent commands apply in the
  order they were made: the later one wins);
* no process outside the supervised tree (besides the guardian) carries this test's marker.

``LMCACHE_SUPERVISE_STATEFUL_EXAMPLES`` sets the number of examples, 300 by default (~80 s on the
2-core box; ``scripts/stateful.py`` runs 1000 of 8 steps). Where an example's time went (measured
with cProfile): starting children, a Python child with http.server taking ~50 ms where a
socket-only one takes ~15 and ``sh``+``sleep`` ~3; a fresh runner per example (guardian, two
children, an event-loop thread); and three walks of /proc per step in the tree invariant, now one.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import Any

import anyio
import proctools
import psutil
import pytest
from anyio.from_thread import start_blocking_portal
from conftest import MARKER, free_port_base
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from supervisor.engine.runner import Runner
from supervisor.engine.states import PROCESS_TRANSITIONS, ProcessEvent, ProcessState, RunnerEvent
from supervisor.plan.spec import (
    HttpCheck,
    Plan,
    Probe,
    Probes,
    ProcessSpec,
    RestartPolicy,
    Role,
)

pytestmark = pytest.mark.timeout(900)
P = ProcessState
NAMES = ("a", "b")
OPS = ("start", "stop", "restart")
SETTLE_S = 20.0
EXAMPLES = int(os.environ.get("LMCACHE_SUPERVISE_STATEFUL_EXAMPLES", "300"))
STEPS = int(os.environ.get("LMCACHE_SUPERVISE_STATEFUL_STEPS", "5"))
REUSE = 20  # examples in a row on one runner before a fresh one (RunnerMachine)
IGNORES_TERM = ("/bin/sh", "-c", "trap '' TERM; exec sleep 3600")
# ``a``: GET anything -> 200 {"status": "ready"}, one connection at a time, as the runner's probes
# need. Socket-only: it answers ~15 ms after exec, where tests/fixtures/child.py (argparse,
# http.server) takes ~50 ms, and every restart of ``a`` waits for it.
HEALTH_SERVER = """
import socket, sys
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
body = b'{"status": "ready"}'
reply = b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nContent-Length: %d\\r\\n" % len(body)
reply += b"Connection: close\\r\\n\\r\\n" + body
while True:
    conn, _ = server.accept()
    try:
        conn.recv(65536)
        conn.sendall(reply)
    except OSError:
        pass
    conn.close()
"""
#: Short enough to keep the suite fast, long enough for operations to land inside a backoff.
POLICY = RestartPolicy(backoff_initial_s=0.1, backoff_factor=1.0, jitter=0.0, limit_starts=0)


def _plan(root: str, port: int, generation: int = 0) -> Plan:
    url = f"http://127.0.0.1:{port}/health"
    check = HttpCheck(url=url, owned_port=port)
    probes = Probes(
        startup=Probe(check=check, period_s=0.02, timeout_s=0.5, failure_threshold=500),
        readiness=Probe(check=check, period_s=0.1, timeout_s=0.5, failure_threshold=2),
        liveness=Probe(check=check, period_s=0.1, timeout_s=0.2, failure_threshold=3),
    )

    def spec(name: str, argv: tuple[str, ...], **extra: Any) -> ProcessSpec:
        return ProcessSpec(
            name=name,
            role=Role.CUSTOM,
            argv=argv,
            env={"GENERATION": str(generation)},
            gpus=(),
            ports={},
            restart=POLICY,
            multiproc_dir=os.path.join(root, "prometheus", name),
            log_file=os.path.join(root, "logs", f"{name}.log"),
            **extra,
        )

    dep = proctools.fixture_deployment("stateful", root, profile="test")
    # ``b`` ignores SIGTERM, so each stop of it takes its stop timeout and a SIGKILL: a slow stop,
    # as a Dynamo worker's (it drains for 5 s), during which other commands arrive. It is a shell
    # that execs sleep (an ignored signal stays ignored across exec): it starts in ~3 ms where a
    # Python child takes ~50, and ``b`` has no probe that needs more.
    return Plan(
        deployment=dep,
        processes=(
            spec(
                "a", (sys.executable, "-S", "-c", HEALTH_SERVER, str(port)), probes=probes, stop_timeout_s=3.0
            ),
            spec("b", IGNORES_TERM, stop_timeout_s=0.05),
        ),
    )


def _is_guardian(proc: psutil.Process) -> bool:
    try:
        return any("lmcache-supervise guardian" in part for part in proc.cmdline())
    except psutil.Error:
        return True  # gone meanwhile: not a leak


class Supervised:
    """A real runner serving on an event loop in a background thread, with every state change it
    reports checked against the one before. Consecutive examples share one (see RunnerMachine)."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="stateful-")
        self.port = free_port_base(1)
        self.generation = 0
        self.examples = 0
        self.violations: list[str] = []
        self.last: dict[str, ProcessState] = {}
        self._portal_cm = start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        self.runner = Runner(_plan(self.root, self.port))
        self.runner.subscribe(self._observe)
        self.serving: Future[int] = self.portal.start_task_soon(self.runner.serve)

    def _observe(self, event: RunnerEvent) -> None:  # on the loop thread, at every state change
        if not isinstance(event, ProcessEvent):
            return
        before = self.last.get(event.name, P.STOPPED)
        if event.old is not before:
            self.violations.append(f"{event.name}: event from {event.old.value}, but it was {before.value}")
        if event.new is not event.old and event.new not in PROCESS_TRANSITIONS[event.old]:
            self.violations.append(f"{event.name}: illegal {event.old.value} -> {event.new.value}")
        self.last[event.name] = event.new
        self._check_metrics_dirs()

    def _check_metrics_dirs(self) -> None:
        for proc in self.runner.status().processes:
            if proc.state.is_live and proc.pid is not None and _alive(proc.pid):
                path = os.path.join(self.root, "prometheus", proc.name)
                if not os.path.isdir(path):
                    self.violations.append(f"{proc.name}: metrics directory gone under live pid {proc.pid}")

    def close(self) -> None:
        try:
            if not self.serving.done():  # orderly stops are exercised by the steps; end fast here
                self.portal.call(lambda: self.runner.request_shutdown(kill=True))
            deadline = time.monotonic() + SETTLE_S
            while not self.serving.done() and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            self._portal_cm.__exit__(None, None, None)
            shutil.rmtree(self.root, ignore_errors=True)


_shared: Supervised | None = None


class RunnerMachine(RuleBasedStateMachine):
    """One example: both processes running, then up to STEPS steps, invariants after each.

    Examples share a runner, REUSE in a row, rather than starting one each: a fresh runner, its
    guardian and two children cost more than the steps themselves. The runner then carries every
    earlier example's history (op queues, restarts, reloads), and the transition check runs across
    examples; after an example that did not end settled and clean, the next one gets a fresh runner.
    """

    def __init__(self) -> None:
        super().__init__()
        global _shared
        if _shared is not None and (_shared.examples >= REUSE or _shared.serving.done()):
            _shared.close()
            _shared = None
        if _shared is None:
            _shared = Supervised()
        self.sup = _shared
        self.sup.examples += 1
        self.runner = self.sup.runner
        self.expected = {name: P.RUNNING for name in NAMES}
        self.replaced: dict[str, int | None] = {}  # name -> a pid that must be gone once settled
        for name in NAMES:  # a no-op for a process the previous example left running
            self._call(self._op("start", name))
        self._settle()

    @property
    def serving(self) -> Future[int]:
        return self.sup.serving

    @property
    def portal(self) -> Any:
        return self.sup.portal

    # ---- driving ----

    def _call(self, make: Callable[[], Awaitable[None]]) -> None:
        async def bounded() -> None:
            with anyio.fail_after(SETTLE_S):
                await make()

        if self.serving.done():
            return  # the invariant reports it
        try:
            self.portal.call(bounded)
        except TimeoutError:
            ended = f"; the supervisor ended: {self.serving.exception()!r}" if self.serving.done() else ""
            raise AssertionError(f"a command did not return in {SETTLE_S:g} s{ended}") from None

    def _op(self, op: str, name: str) -> Callable[[], Awaitable[None]]:
        return lambda: getattr(self.runner, op)(name)

    def _together(self, calls: list[tuple[Callable[[], Awaitable[None]], float]]) -> None:
        async def run() -> None:
            async with anyio.create_task_group() as tg:
                for index, (make, gap) in enumerate(calls):
                    if index and gap:
                        await anyio.sleep(gap)
                    tg.start_soon(make)

        self._call(run)

    def _settle(self) -> None:
        if self.serving.done():
            return

        def settled(status: Any) -> bool:
            return all(
                status.process(name).state is self.expected[name]
                and (name not in self.replaced or status.process(name).pid != self.replaced[name])
                for name in NAMES
            )

        async def wait() -> None:
            await self.runner.wait_until(settled, timeout_s=SETTLE_S)

        try:
            self.portal.call(wait)
        except TimeoutError:
            now = {p.name: (p.state.value, p.reason) for p in self.runner.status().processes}
            raise AssertionError(
                f"not settled in {SETTLE_S:g} s: expected "
                f"{ {n: s.value for n, s in self.expected.items()} }, got {now}"
            ) from None
        finally:
            self.replaced.clear()

    def _expect(self, name: str, ops: tuple[str | None, ...], pid: int | None) -> None:
        """The last command wins; after a restart, or a start that follows a stop, it runs with a new pid."""
        commands = [op for op in ops if op is not None]
        if not commands:
            return
        self.expected[name] = P.STOPPED if commands[-1] == "stop" else P.RUNNING
        if commands[-1] != "stop" and ("restart" in commands or "stop" in commands):
            self.replaced[name] = pid

    def _pid(self, name: str) -> int | None:
        return self.runner.status().process(name).pid

    @rule(op=st.sampled_from(OPS), name=st.sampled_from(NAMES))
    def one(self, op: str, name: str) -> None:
        pid = self._pid(name)
        self._call(self._op(op, name))
        self._expect(name, (op,), pid)
        self._settle()

    @rule(
        first=st.sampled_from(OPS),
        second=st.sampled_from(OPS),
        name=st.sampled_from(NAMES),
        gap=st.sampled_from((0.0, 0.001, 0.01, 0.03)),  # the last lands inside b's 0.05 s stop
    )
    def two_at_once(self, first: str, second: str, name: str, gap: float) -> None:
        """Two commands for one process, the second made while the first may still run."""
        pid = self._pid(name)
        self._together([(self._op(first, name), 0.0), (self._op(second, name), gap)])
        self._expect(name, (first, second), pid)
        self._settle()

    @rule(op_a=st.sampled_from(OPS), op_b=st.sampled_from(OPS))
    def both_processes(self, op_a: str, op_b: str) -> None:
        pids = {name: self._pid(name) for name in NAMES}
        self._together([(self._op(op_a, "a"), 0.0), (self._op(op_b, "b"), 0.0)])
        self._expect("a", (op_a,), pids["a"])
        self._expect("b", (op_b,), pids["b"])
        self._settle()

    @rule(
        name=st.sampled_from(NAMES),
        sig=st.sampled_from((signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP)),
        then=st.sampled_from((None, *OPS)),
        gap=st.sampled_from((0.0, 0.01, 0.1)),
    )
    def signal_child(self, name: str, sig: int, then: str | None, gap: float) -> None:
        """A child is killed, exits or freezes; a command may follow at once (inside the backoff)."""
        pid = self.runner.status().process(name).pid
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if then is not None:
            time.sleep(gap)
            self._call(self._op(then, name))
            self._expect(name, (then,), pid)
        self._settle()

    @rule(name=st.sampled_from(NAMES), op=st.sampled_from((None, *OPS)))
    def reload(self, name: str, op: str | None) -> None:
        """A reload that changes ``name``'s spec (so restarts it), maybe with a command for the other."""
        self.sup.generation += 1
        pids = {n: self._pid(n) for n in NAMES}
        new = _plan(self.sup.root, self.sup.port, self.sup.generation)
        calls: list[tuple[Callable[[], Awaitable[None]], float]] = [
            (lambda: self.runner.apply(new, restart=(name,)), 0.0)
        ]
        other = next(n for n in NAMES if n != name)
        if op is not None:
            calls.append((self._op(op, other), 0.0))
            self._expect(other, (op,), pids[other])
        self._together(calls)
        self._expect(name, ("restart",), pids[name])
        self._settle()

    # ---- invariants ----

    @invariant()
    def supervisor_alive(self) -> None:
        if self.serving.done():
            raise AssertionError(
                f"the supervisor ended: {self.serving.exception() or self.serving.result()!r}"
            )

    @invariant()
    def transitions_legal(self) -> None:
        assert not self.sup.violations, self.sup.violations

    @invariant()
    def nothing_outside_the_tree(self) -> None:
        # One pass over /proc (marked pids and every parent), the supervised pids after it: a child
        # spawned in between is not marked yet, one replaced in between is dead (not a stray).
        found, parent = _scan(os.environ[MARKER])
        roots = {proc.pid for proc in self.runner.status().processes if proc.pid is not None}

        def in_tree(pid: int) -> bool:
            seen: set[int] = set()
            while pid > 1 and pid not in seen:
                if pid in roots:
                    return True
                seen.add(pid)
                pid = parent.get(pid, 0)
            return False

        strays = [_describe(p) for p in found if not in_tree(p.pid) and not _is_guardian(p) and _alive(p.pid)]
        assert not strays, f"processes outside the supervised tree: {strays}"

    def teardown(self) -> None:
        """Keep the runner for the next example only if this one ended settled and clean."""
        global _shared
        status = self.runner.status()
        clean = (
            not self.serving.done()
            and not self.sup.violations
            and all(status.process(name).state is self.expected[name] for name in NAMES)
        )
        if not clean and _shared is self.sup:
            _shared = None
            self.sup.close()


def _scan(value: str) -> tuple[list[psutil.Process], dict[int, int]]:
    """Live processes whose environment carries ``MARKER=value``, and every process's parent, read in
    one walk of /proc (this invariant runs after every step: three psutil walks were a third of the
    test's time)."""
    needle = f"{MARKER}={value}".encode()
    found, parent = [], {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or entry.name == str(os.getpid()):
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()  # after "(comm)": state, ppid, ...
            parent[pid] = int(fields[1])
            with open(f"/proc/{pid}/environ", "rb") as fh:
                marked = needle in fh.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if marked and fields[0] != b"Z":
            try:
                found.append(psutil.Process(pid))
            except psutil.Error:
                continue  # gone meanwhile
    return found, parent


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ppid {proc.ppid()} {proc.status()} {' '.join(proc.cmdline())[-80:]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


SETTINGS = settings(
    # No shrinking: steps race real processes, so a failing sequence does not replay exactly;
    # it is reported as generated.
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
    phases=[Phase.generate],
)


def test_runner_stateful() -> None:
    global _shared
    try:
        run_state_machine_as_test(RunnerMachine, settings=SETTINGS)
    finally:
        if _shared is not None:
            _shared.close()
            _shared = None
