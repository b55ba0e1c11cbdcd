"""One supervised OS child: spawn it isolated, pump its output, signal its group, reap it.

Isolation: argv only (no shell), its own session and process group, stdin on /dev/null, every
descriptor of ours closed (``close_fds``), ``NOTIFY_SOCKET`` and socket-activation variables
stripped from its environment, and its own ``PROMETHEUS_MULTIPROC_DIR`` emptied before each start.

No orphans, even when the supervisor is SIGKILLed, by two mechanisms because neither is enough
alone:

* ``PR_SET_PDEATHSIG`` = SIGKILL in the child before exec. It covers the window right after the
  fork, but only the direct child, and it fires when the *spawning thread* dies, so children are
  spawned from the event-loop thread only.
* A guardian: a tiny ``python -S`` process in its own session that reads group ids from a pipe.
  When the pipe reaches EOF (the supervisor died, however) it SIGKILLs every group still
  registered, which also takes grandchildren such as vLLM's engine-core processes.

Exit detection waits on a pidfd (readable when the child exits): no polling, no thread per child.
Output is one pipe (stdout and stderr merged, in the order the child wrote them) read without
blocking; after the child exits it is drained for a short grace and then closed, so a grandchild
that keeps the pipe open cannot hold the supervisor.

A descendant that calls ``setsid()`` (or ``setpgid``) leaves the child's group, so group signals
miss it. Every tree snapshot (at start-up, readiness and stop) records such strays: they get the
group's signals, the stop waits for them too, and the guardian knows their groups.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

import anyio
import anyio.abc
import psutil

from supervisor.engine import proctree
from supervisor.engine.proctree import descendants
from supervisor.engine.states import ExitInfo
from supervisor.errors import StartError, StateDirError
from supervisor.eventlog import log
from supervisor.host import credentials
from supervisor.plan.spec import ProcessSpec

#: Variables of ours that must not leak into children: systemd's notify/watchdog and socket
#: activation (a child must never talk to systemd as if it were us), and our metrics directory.
STRIPPED_ENV = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "PROMETHEUS_MULTIPROC_DIR",
)
#: How long output is still read after the child exited, for a grandchild holding the pipe.
DRAIN_GRACE_S = 1.0
#: How long to wait for stragglers in a group after SIGKILL before giving up (and saying so): a
#: process in uninterruptible sleep (a GPU driver or NFS hang) acts on SIGKILL only when it wakes.
GROUP_KILL_WAIT_S = 5.0
_READ_CHUNK = 1 << 16
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # resolved before any fork: nothing to load in the child

OutputSink = Callable[[bytes], None]

_GUARDIAN_CODE = """# lmcache-supervise guardian: SIGKILL registered process groups when stdin closes
import os, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups, buf = set(), b""
while True:
    try:
        data = os.read(0, 4096)
    except InterruptedError:
        continue
    if not data:
        break
    buf += data
    *lines, buf = buf.split(b"\\n")
    for line in lines:
        if line[:1] == b"+":
            groups.add(int(line[1:]))
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class Guardian:
    """Kills every registered process group when the supervisor dies (the pipe to it closes)."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _GUARDIAN_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,  # own session: a terminal Ctrl-C spares it
        )
        assert self._proc.stdin is not None
        self._fd = self._proc.stdin.fileno()
        # Never block the event loop on a guardian that stopped reading (frozen, swapped out): a
        # full pipe (64 KiB, thousands of lines) costs that registration, said once, not the loop.
        os.set_blocking(self._fd, False)
        self.lost = 0

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, line: str) -> None:
        try:
            os.write(self._fd, line.encode())  # one short line: written whole or not at all
        except BlockingIOError:
            if not self.lost:
                log.error("guardian not reading; a process group registration was lost", line=line.strip())
            self.lost += 1
        except OSError:
            pass  # guardian gone: PDEATHSIG still covers direct children

    def register(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def unregister(self, pgid: int) -> None:
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        """Orderly end: every group is already unregistered, so EOF kills nothing."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def child_env(spec: ProcessSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment minus what must not leak, plus the spec's, plus its metrics directory."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in STRIPPED_ENV}
    env.update(spec.env)
    if spec.credentials_file:  # the cluster secrets: never in the plan, only in the child's env
        env.update(credentials.read(spec.credentials_file))
    if spec.multiproc_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = spec.multiproc_dir
    return env


def reset_multiproc_dir(path: str) -> None:
    """Empty (create) a process's PROMETHEUS_MULTIPROC_DIR: stale .db files would mix in old series."""
    if not path:
        return
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)


def _in_child(parent: int) -> None:
    """Runs between fork and exec: die with the spawning thread, even if it died already."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the supervisor died before prctl took effect: nobody would signal
        os._exit(137)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in group ``pgid``.

    ``killpg(pgid, 0)`` answers the common case (empty group) in one syscall. Only when it
    succeeds is /proc consulted (a walk shared per tick: proctree.groups), because zombies count
    for ``kill`` and an init that reaps lazily (this box's reaps every ~1 s) would otherwise make
    an empty group look alive.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    members = proctree.groups().get(pgid)
    if members is None:  # the shared walk predates this group: look again
        members = proctree.groups(max_age_s=0).get(pgid, [])
    return list(members)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


class Child:
    """A running (or finished) child. Create it with :func:`spawn`; call :meth:`stop` exactly when done."""

    def __init__(
        self, spec: ProcessSpec, popen: subprocess.Popen[bytes], out_fd: int, guardian: Guardian | None
    ) -> None:
        self.spec = spec
        self.pid = popen.pid
        self.pgid = popen.pid  # start_new_session: the child leads its own session and group
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.exit: ExitInfo | None = None
        self.unkillable: tuple[int, ...] = ()  # pids that outlived SIGKILL and the stop's bound
        self.descendants: set[int] = {self.pid}  # pids seen in its tree (for GPU hygiene after death)
        self._strays: dict[int, psutil.Process] = {}  # descendants that left its process group
        self._stray_groups: set[int] = set()  # their groups, registered with the guardian
        self._popen = popen
        self._pidfd = os.pidfd_open(popen.pid)
        self._out_fd = out_fd
        self._guardian = guardian
        self._exited = anyio.Event()
        self._pump_scope = anyio.CancelScope()
        self._released = False

    @property
    def running(self) -> bool:
        return self.exit is None

    async def watch(self, sink: OutputSink) -> None:
        """Pump output and wait for the exit; run as a task, it returns once both are over."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pump, sink)
            await anyio.wait_readable(self._pidfd)
            code = self._popen.wait()  # readable pidfd: the child is a zombie, this does not block
            os.close(self._pidfd)
            self.exit = ExitInfo.from_popen_code(self.pid, code, runtime_s=time.monotonic() - self.started_at)
            self._exited.set()
            self._pump_scope.deadline = min(self._pump_scope.deadline, anyio.current_time() + DRAIN_GRACE_S)

    async def _pump(self, sink: OutputSink) -> None:
        fd = self._out_fd
        try:
            with self._pump_scope:
                while True:
                    try:
                        data = os.read(fd, _READ_CHUNK)
                    except BlockingIOError:
                        await anyio.wait_readable(fd)
                        continue
                    if not data:
                        return
                    sink(data)
                    # A flooding child must not starve the loop: yield between chunks.
                    await anyio.lowlevel.checkpoint()
        finally:
            os.close(fd)

    async def wait(self) -> ExitInfo:
        await self._exited.wait()
        assert self.exit is not None
        return self.exit

    def snapshot_tree(self) -> None:
        """Remember the pids in the child's tree (after its death NVML may still list them) and
        adopt the descendants that left its group."""
        tree = descendants(self.pid)  # [] once the leader is gone: strays seen before are kept
        self.descendants.update(tree)
        for pid in tree:
            if pid in self._strays:
                continue
            try:
                pgid = os.getpgid(pid)
                if pgid == self.pgid:
                    continue
                self._strays[pid] = psutil.Process(pid)  # keeps its start time: a reused pid is spared
            except (OSError, psutil.Error):
                continue  # gone meanwhile
            if self._guardian is not None and pgid not in self._stray_groups:
                self._guardian.register(pgid)
            self._stray_groups.add(pgid)

    def live_strays(self) -> list[int]:
        return [pid for pid, proc in self._strays.items() if _alive(proc)]

    def signal(self, sig: int) -> bool:
        """Signal the group and any stray; False when none of them exists any more."""
        sent = signal_group(self.pgid, sig)
        for proc in self._strays.values():
            try:
                proc.send_signal(sig)
                sent = True
            except psutil.Error:
                pass  # gone, or its pid now belongs to someone else
        return sent

    async def stop(self, *, sig: int | None = None, timeout_s: float | None = None) -> ExitInfo:
        """Signal the group, wait ``timeout_s``, SIGKILL it, wait until it is empty; idempotent.

        Also the clean-up after an unexpected exit: stragglers left in the group get the same
        treatment, so a restart never overlaps the previous incarnation's processes.
        """
        sig = sig if sig is not None else signal.Signals[self.spec.stop_signal]
        timeout_s = self.spec.stop_timeout_s if timeout_s is None else timeout_s
        if not self._released:
            if self.running:
                self.snapshot_tree()
            if self.running or group_members(self.pgid) or self.live_strays():
                self.signal(sig)
                if sig not in (signal.SIGKILL, signal.SIGCONT):
                    # As systemd does: a frozen (SIGSTOPped) group acts on the signal only once continued;
                    # without this it would sit out the whole timeout until the SIGKILL.
                    self.signal(signal.SIGCONT)
                if not await _wait_group(self, timeout_s):
                    self.signal(signal.SIGKILL)
                    if not await _wait_group(self, GROUP_KILL_WAIT_S):
                        return self._unkillable()
            self._release()
        return await self.wait()

    def _unkillable(self) -> ExitInfo:
        """The stop's bound ran out with processes still there: record them and return without
        waiting for them. The guardian keeps their groups (it kills them if we die first), a later
        stop tries again, and the exit watcher still sees the leader go whenever it does."""
        survivors = {self.pid} if self.running else set()
        survivors.update(group_members(self.pgid), self.live_strays())
        self.unkillable = tuple(sorted(survivors))
        if self.exit is not None:
            return self.exit
        runtime = time.monotonic() - self.started_at
        return ExitInfo(self.pid, returncode=None, signal=None, runtime_s=runtime, survived_kill=True)

    def kill_now(self) -> None:
        """SIGKILL the whole group at once (second Ctrl-C); :meth:`stop` still reaps afterwards."""
        self.signal(signal.SIGKILL)

    def _release(self) -> None:
        if self._guardian is not None:
            for pgid in (self.pgid, *self._stray_groups):
                self._guardian.unregister(pgid)
        self._released = True


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def _wait_group(child: Child, timeout_s: float) -> bool:
    """Wait for the leader's exit (pidfd) and then the group's emptiness (short polls)."""
    deadline = time.monotonic() + timeout_s
    with anyio.move_on_after(timeout_s):
        await child.wait()
    delay = 0.002
    while await _stragglers(child):
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return child.exit is not None


async def _stragglers(child: Child) -> bool:
    """Whether anything of ``child``'s group or strays lives. An empty group costs one syscall here;
    a group that still exists needs the /proc scan (zombies count for ``kill``), done in a worker
    thread: on a host of thousands of processes it takes milliseconds, at every poll of a stop."""
    try:
        os.killpg(child.pgid, 0)
    except ProcessLookupError:
        return bool(child.live_strays())
    except PermissionError:
        pass
    members = await anyio.to_thread.run_sync(group_members, child.pgid)
    return bool(members or child.live_strays())


def spawn(spec: ProcessSpec, *, guardian: Guardian | None, env: Mapping[str, str] | None = None) -> Child:
    """Start ``spec`` now (call from the event-loop thread: PDEATHSIG follows the spawning thread).

    The caller must run :meth:`Child.watch` as a task right away.
    """
    try:
        reset_multiproc_dir(spec.multiproc_dir)
    except OSError as exc:  # a full or read-only disk: this start fails, the supervisor does not
        raise _start_error(spec, f"PROMETHEUS_MULTIPROC_DIR {spec.multiproc_dir}", exc) from exc
    try:
        environ = child_env(spec) if env is None else dict(env)
    except StateDirError as exc:  # the cluster credentials file went missing or bad
        raise StartError(spec.name, str(exc)) from exc
    try:
        read_fd, write_fd = os.pipe()
    except OSError as exc:
        raise _start_error(spec, "its output pipe", exc) from exc
    try:
        popen = subprocess.Popen(
            list(spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            env=environ,
            cwd=spec.cwd,
            start_new_session=True,
            close_fds=True,
            preexec_fn=functools.partial(_in_child, os.getpid()),
        )
    except OSError as exc:
        os.close(read_fd)
        raise _start_error(spec, spec.argv[0], exc) from exc
    except subprocess.SubprocessError as exc:
        os.close(read_fd)
        raise StartError(spec.name, f"{spec.argv[0]}: {exc}") from exc
    finally:
        os.close(write_fd)
    if guardian is not None:
        guardian.register(popen.pid)
    os.set_blocking(read_fd, False)
    try:
        return Child(spec, popen, read_fd, guardian)
    except OSError as exc:  # no descriptor left for its pidfd: it cannot be watched, so it goes
        signal_group(popen.pid, signal.SIGKILL)
        popen.wait()
        os.close(read_fd)
        if guardian is not None:
            guardian.unregister(popen.pid)
        raise _start_error(spec, "its pidfd", exc) from exc


#: Shortages a later attempt may not meet: out of descriptors (EMFILE, ENFILE), memory (ENOMEM)
#: or processes (EAGAIN from fork). They go into the normal backoff instead of failing the process.
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN})


def _start_error(spec: ProcessSpec, what: str, exc: OSError) -> StartError:
    transient = exc.errno in TRANSIENT_ERRNOS
    return StartError(spec.name, f"{what}: {exc.strerror or exc}", transient=transient)
