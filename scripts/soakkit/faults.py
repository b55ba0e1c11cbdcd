"""What the soak does to the deployment: a client that never stops asking, and random faults.

Faults, as production delivers them: SIGKILL of one process (the OOM killer, a crash), and
SIGSTOP of a process group followed later by SIGCONT (a frozen cgroup, a debugger, a swap storm).
Short stops (0.5-4 s) stay below the liveness threshold (3 misses at a 5 s period); long ones
(25 s) exceed it, so the supervisor kills and restarts the frozen process. Faults overlap: a
SIGCONT is merely scheduled, and the next fault may come before the last one healed.

A process is SIGKILLed (or long-stopped) only while its crash-loop budget allows it: the demo's
restart policy fails a process that started 5 times within 120 s, which is the documented
crash-loop outcome, not what a soak measures (tests/engine/test_runner.py covers that one).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import psutil
from harness import NAMES, Deployment

SHORT_STOP_S = (0.5, 4.0)
LONG_STOP_S = 25.0
CRASH_LIMIT_STARTS, CRASH_WINDOW_S = 5, 120.0
BUDGET_MARGIN_S = 15.0  # event arrival and backoff slack on top of the policy's window


@dataclass(frozen=True)
class Request:
    """One client request: when it was sent and answered (monotonic), and why it failed (None: ok)."""

    started: float
    ended: float
    error: str | None


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``ended`` is when the SIGKILL or the SIGCONT went out."""

    kind: str  # "SIGKILL" or "SIGSTOP"
    target: str
    pid: int
    injected: float
    ended: float
    held_s: float = 0.0

    @property
    def long(self) -> bool:
        return self.kind == "SIGSTOP" and self.held_s >= LONG_STOP_S


class Client:
    """Small chat requests back to back from a few threads, each bounded by a timeout, until stopped."""

    def __init__(
        self, deployment: Deployment, *, threads: int = 2, timeout_s: float = 5.0, pause_s: float = 0.05
    ) -> None:
        self._dep, self._timeout_s, self._pause_s = deployment, timeout_s, pause_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> list[Request]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self._timeout_s + 5)
        with self._lock:
            return sorted(self.requests, key=lambda r: r.started)

    def _loop(self) -> None:
        with httpx.Client(trust_env=False) as client:  # loopback only: no proxy from the environment
            while not self._stop.is_set():
                started = time.monotonic()
                error = self._dep.chat_error(client, timeout_s=self._timeout_s)
                with self._lock:
                    self.requests.append(Request(started, time.monotonic(), error))
                self._stop.wait(self._pause_s)


class Injector:
    """Random faults at random intervals until a deadline, every SIGSTOP answered by its SIGCONT."""

    def __init__(
        self,
        deployment: Deployment,
        rng: random.Random,
        *,
        gap_s: tuple[float, float],
        long_stop_chance: float = 0.15,
    ) -> None:
        self._dep, self._rng, self._gap_s = deployment, rng, gap_s
        self._long_chance = long_stop_chance
        self.faults: list[Fault] = []
        self._pending: list[tuple[float, int, float, Fault]] = []  # (cont at, pgid, create time, fault)

    def run(self, *, until: float) -> list[Fault]:
        """Inject until ``until`` (monotonic); returns once every stopped group got its SIGCONT."""
        next_fault = time.monotonic() + self._rng.uniform(*self._gap_s)
        while True:
            now = time.monotonic()
            due = [p for p in self._pending if p[0] <= now]
            for item in due:
                self._pending.remove(item)
                self._resume(item)
            if now >= next_fault and now < until:
                self._inject(until)
                next_fault = time.monotonic() + self._rng.uniform(*self._gap_s)
            if now >= until and not self._pending:
                return self.faults
            wake = min([p[0] for p in self._pending] + ([next_fault] if next_fault < until else [until]))
            # A deadline wait for the next planned action; nothing here polls the supervisor.
            time.sleep(max(0.0, min(wake - time.monotonic(), 0.5)))

    def _budget_left(self, name: str, now: float) -> bool:
        """Room for one more start of ``name`` without reaching the crash-loop limit."""
        window = CRASH_WINDOW_S + BUDGET_MARGIN_S
        recent = [e for e in self._dep.named("process starting", name) if now - e.at <= window]
        return len(recent) <= CRASH_LIMIT_STARTS - 2

    def _inject(self, until: float) -> None:
        now = time.monotonic()
        stopped = {item[3].target for item in self._pending}
        candidates = []
        for name in NAMES:
            state, pid = self._dep.process_state(name)
            if state in ("starting", "running", "not-ready") and pid and name not in stopped:
                candidates.append((name, pid))
        if not candidates:
            return
        name, pid = self._rng.choice(candidates)
        may_restart = self._budget_left(name, now)
        roll = self._rng.random()
        if may_restart and roll < 0.5:
            self._kill(name, pid)
        else:
            long = may_restart and until - now > LONG_STOP_S + 5 and self._rng.random() < self._long_chance
            self._stop(name, pid, LONG_STOP_S if long else self._rng.uniform(*SHORT_STOP_S))

    def _kill(self, name: str, pid: int) -> None:
        at = time.monotonic()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return  # it died meanwhile: no fault of ours to count
        self.faults.append(Fault("SIGKILL", name, pid, at, at))

    def _stop(self, name: str, pid: int, held_s: float) -> None:
        try:
            created = psutil.Process(pid).create_time()
            at = time.monotonic()
            os.killpg(pid, signal.SIGSTOP)  # the whole group: a frozen worker, engine processes included
        except (psutil.Error, ProcessLookupError):
            return
        self._pending.append((at + held_s, pid, created, Fault("SIGSTOP", name, pid, at, at, held_s)))

    def _resume(self, item: tuple[float, int, float, Fault]) -> None:
        _, pgid, created, fault = item
        at = time.monotonic()
        try:
            # Only the same process: after a liveness kill the pid may belong to someone else.
            if psutil.Process(pgid).create_time() == created:
                os.killpg(pgid, signal.SIGCONT)
        except (psutil.Error, ProcessLookupError):
            pass
        self.faults.append(Fault("SIGSTOP", fault.target, fault.pid, fault.injected, at, at - fault.injected))
