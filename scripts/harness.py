"""A real ``lmcache-supervise up`` in a process of its own, watched from outside: the one harness.

The e2e tests, the soak and the benchmarks all run a deployment through :class:`Deployment`. Its
stderr (JSON lines: stderr is not a terminal) is read by a thread as it comes; each event is stamped
with our ``time.monotonic()`` on arrival, so fault times and the supervisor's state changes share one
clock. Its ports come from the plan itself (:func:`port_offsets`), not from a restated list.

Everything it starts inherits ``LMCACHE_SUPERVISE_SOAK_MARKER`` set to a value unique to this run (and
the test suite's own marker, from the environment): a marked process outside the supervisor's tree is
an orphan, and :meth:`Deployment.close` SIGKILLs whatever marked process is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import proctools
import psutil

CLI = proctools.CLI
MARKER = "LMCACHE_SUPERVISE_SOAK_MARKER"
NAMES = ("frontend", "decode", "prefill")
# A mocker prefill whose decode peer died can wait ~30 s in its graceful shutdown; SIGKILL follows
# the worker stop timeout, so short ones keep tests and the soak fast.
FAST_STOP = ("--set", "workers.decode.stop_timeout_s=3", "--set", "workers.prefill.stop_timeout_s=3")
LIVE_STATES = ("starting", "running", "not-ready")
DEPLOYMENT_STATES = ("starting", "ready", "degraded", "failed", "stopping", "stopped")


def port_offsets(profile: str = "demo", args: Sequence[str] = ()) -> tuple[int, ...]:
    """Every port the plan of ``profile`` (with the ``--set`` overrides in ``args``) binds, minus its base."""
    import supervisor

    sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
    base = 20000
    plan = supervisor.render(supervisor.load(profile, overrides=[*sets, f"ports.base={base}"]))
    ports = {port for spec in plan.processes for port in spec.ports.values()}
    if plan.deployment.metrics_port:
        ports.add(plan.deployment.metrics_port)
    return tuple(sorted(port - base for port in ports))


def free_port_base(profile: str = "demo", args: Sequence[str] = ()) -> int:
    """A base such that every port the plan binds is free on loopback (below Dynamo's int16 limit)."""
    return proctools.free_port_base(port_offsets(profile, args))


class _Output:
    """One output file of the supervisor, read incrementally: whole lines go to ``sink``."""

    def __init__(self, path: Path, sink: Callable[[str], None]) -> None:
        self.path, self.sink = path, sink
        self.offset, self.partial = 0, b""

    def pump(self) -> None:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        for raw in lines:
            self.sink(raw.decode("utf-8", "replace") + "\n")


@dataclass(frozen=True)
class Event:
    """One supervisor event as it arrived: ``at`` is our monotonic clock, ``data`` the JSON object."""

    at: float
    data: Mapping[str, Any]

    @property
    def name(self) -> str:
        return str(self.data.get("event", ""))


class Deployment:
    """A running ``up PROFILE``; use it as a context manager (or :meth:`start` and :meth:`close`) so
    that nothing outlives it. ``args`` go to ``up`` after the profile; ``wrapper`` runs before the CLI."""

    def __init__(
        self,
        workdir: Path,
        *,
        profile: str = "demo",
        name: str | None = None,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
        echo_children: bool = False,
        fast_stop: bool = True,
        base: int | None = None,
        state_root: Path | None = None,
        names: Sequence[str] = NAMES,
    ) -> None:
        self.workdir = workdir
        self.profile = profile
        self.names = tuple(names)  # the processes all_ready() waits for
        self.name = name or Path(profile).stem
        args = [*(FAST_STOP if fast_stop else ()), *extra]
        self.base = base or free_port_base(profile, args)
        self.state_root = state_root or workdir / "state"
        self.marker = f"soak-{uuid.uuid4().hex[:12]}"
        self.env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(self.state_root), MARKER: self.marker}
        self.env.pop("LMCACHE_SUPERVISE_DEBUG", None)
        self.env.update(env or {})
        self.argv = [*wrapper, CLI, "up", profile, "--set", f"ports.base={self.base}", *args]
        if not echo_children:
            self.argv.append("--quiet-children")
        self.events: list[Event] = []
        self.stdout_lines: list[str] = []
        self.stderr_text: list[str] = []
        self.exit_code: int | None = None
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._outputs: list[_Output] = []
        self._pumping = threading.Event()
        self._pump_thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Deployment:
        return self.start()

    def start(self) -> Deployment:
        """Launch ``up`` (not waiting for it to be ready: see :meth:`wait_ready`)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Output goes to files, read by a thread every few ms AND before every question asked here:
        # what the supervisor wrote before a call returns is always seen by that call.
        out, err = self.workdir / "up.out", self.workdir / "up.err"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=self.env
            )
        self._outputs = [_Output(out, self._on_stdout), _Output(err, self._on_stderr)]
        self._pumping.set()
        self._pump_thread = threading.Thread(target=self._pump_loop, daemon=True)
        self._pump_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self._proc is not None, "not started"
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.base}"

    @property
    def state_dir(self) -> Path:
        return self.state_root / self.name

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Until ``up`` printed its ready line; raises with the supervisor's last words otherwise."""
        self.wait(
            lambda: any(line.startswith("ready:") for line in self.stdout_lines) or not self.running(),
            timeout_s,
            "the deployment's first ready",
        )
        if not self.running():
            last_words = "".join(self.stderr_text)[-2000:]
            raise RuntimeError(f"up {self.profile} exited with {self.proc.poll()}: {last_words}")

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (what ``down`` sends) and wait for the orderly shutdown; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.exit_code = self.proc.wait(timeout=timeout_s)
        self._pump()
        return self.exit_code

    def stop_clean(self, timeout_s: float = 60.0) -> None:
        """:meth:`stop`, then fail (AssertionError) if any process it started outlived it."""
        try:
            self.stop(timeout_s)
        finally:
            leaked = self.close()
        assert not leaked, f"processes left behind: {leaked}"

    def close(self) -> list[str]:
        """Kill the supervisor if it still runs and SIGKILL every marked process; returns those."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._pumping.clear()
        if self._pump_thread is not None:
            self._pump_thread.join(timeout=5)
        self._pump()
        return proctools.reap_marked(MARKER, self.marker, 5.0)

    # ---- output ----------------------------------------------------------------------------

    def _pump_loop(self) -> None:
        while self._pumping.is_set():
            self._pump()
            time.sleep(0.01)

    def _pump(self) -> None:
        """Take whatever whole lines the supervisor has written since the last pump."""
        with self._cond:
            for output in self._outputs:
                output.pump()

    def _on_stdout(self, line: str) -> None:
        self.stdout_lines.append(line)
        self._cond.notify_all()

    def _on_stderr(self, line: str) -> None:
        at = time.monotonic()
        data = None
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                pass
        self.stderr_text.append(line)
        if isinstance(data, dict):
            self.events.append(Event(at, data))
        self._cond.notify_all()

    def wait(self, predicate: Callable[[], object], timeout_s: float, what: str) -> None:
        """Re-check ``predicate`` whenever output arrives (and every 0.1 s); TimeoutError after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        self._pump()
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
                self._cond.wait(min(left, 0.1))

    def snapshot(self) -> list[Event]:
        self._pump()
        with self._cond:
            return list(self.events)

    def named(self, event: str, process: str | None = None) -> list[Event]:
        return [
            e
            for e in self.snapshot()
            if e.name == event and (process is None or e.data.get("process") == process)
        ]

    # ---- the supervisor's view, from its events ------------------------------------------

    def process_state(self, name: str) -> tuple[str, int | None]:
        """``(state, pid)`` of ``name`` after its latest event (pid of its latest incarnation)."""
        state, pid = "stopped", None
        for event in self.snapshot():
            if event.data.get("process") == name and event.name.startswith("process "):
                state = event.name.removeprefix("process ")
                pid = event.data.get("pid") if event.name == "process starting" else pid
        return state, pid

    def deployment_state(self) -> str:
        states = [
            e.name.removeprefix("deployment ")
            for e in self.snapshot()
            if e.name.removeprefix("deployment ") in DEPLOYMENT_STATES and "deployment" in e.data
        ]
        return states[-1] if states else "starting"

    def all_ready(self) -> bool:
        """Deployment ready and every process running (its latest incarnation)."""
        running = all(self.process_state(name)[0] == "running" for name in self.names)
        return running and self.deployment_state() == "ready"

    def starts(self, name: str) -> int:
        return len(self.named("process starting", name))

    # ---- the host's view -------------------------------------------------------------------

    def usage(self) -> tuple[int, int]:
        """The supervisor's open descriptors and resident memory (bytes)."""
        proc = psutil.Process(self.pid)
        return proc.num_fds(), proc.memory_info().rss

    def tree(self) -> set[int]:
        proc = psutil.Process(self.pid)
        return {self.pid} | {p.pid for p in proc.children(recursive=True)}

    def marked(self) -> list[psutil.Process]:
        """Live (non-zombie) processes carrying this run's marker, the supervisor excluded."""
        return [p for p in proctools.marked(MARKER, self.marker) if p.pid != self.pid]

    def orphans(self) -> list[int]:
        """Marked processes outside the supervisor's tree (every one is a leak)."""
        tree = self.tree() if self.running() else set()
        return sorted(p.pid for p in self.marked() if p.pid not in tree)

    def multiproc_dirs(self) -> list[str]:
        root = self.state_dir / "prometheus"
        return sorted(p.name for p in root.iterdir()) if root.is_dir() else []

    def post_chat(
        self, client: httpx.Client, *, timeout_s: float = 30.0, max_tokens: int = 4
    ) -> httpx.Response:
        body = {"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": max_tokens}
        return client.post(f"{self.url}/v1/chat/completions", json=body, timeout=timeout_s)

    def chat(self, max_tokens: int = 4) -> httpx.Response:
        """One small chat request on a fresh client (no proxy from the environment)."""
        with httpx.Client(trust_env=False) as client:
            return self.post_chat(client, max_tokens=max_tokens)

    def chat_error(self, client: httpx.Client, *, timeout_s: float) -> str | None:
        """One small chat request; None when it succeeded, else why it failed."""
        try:
            response = self.post_chat(client, timeout_s=timeout_s)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:200]
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:150]}"
        return None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``lmcache-supervise ARGS`` against this deployment's state root."""
        return subprocess.run(
            [CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    # ---- what it printed ---------------------------------------------------------------------

    @property
    def stdout(self) -> str:
        self._pump()
        with self._cond:
            return "".join(self.stdout_lines)

    @property
    def stderr(self) -> str:
        self._pump()
        with self._cond:
            return "".join(self.stderr_text)

    def event_data(self) -> list[Mapping[str, Any]]:
        """The supervisor's events so far, as the JSON objects it wrote."""
        return [e.data for e in self.snapshot()]

    def count(self, event: str) -> int:
        return len(self.named(event))

    def newest_pid(self, process: str) -> int | None:
        """The pid of the newest incarnation of ``process``, from the supervisor's own events."""
        pids = [e.data.get("pid") for e in self.named("process starting", process)]
        return pids[-1] if pids else None


def text_of(lines: Iterable[str]) -> str:
    return "".join(lines)
