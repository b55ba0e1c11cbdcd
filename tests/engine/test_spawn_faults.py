"""A host short of descriptors, memory or processes: the spawn is retried with backoff, never fatal.

EMFILE is real (the soft RLIMIT_NOFILE of this process is lowered to what is open). ENOMEM and
EAGAIN from fork cannot be produced safely on a shared machine (and root ignores RLIMIT_NPROC), so
the kernel's answer is injected at the one boundary that asks for it: subprocess's fork_exec.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess

import pytest
from test_runner import Recorder, supervising, until

from supervisor.engine import process
from supervisor.engine.runner import Runner
from supervisor.engine.states import PROCESS_TRANSITIONS, DeploymentState, ProcessState
from supervisor.errors import StartError
from supervisor.plan.spec import RestartPolicy

pytestmark = pytest.mark.anyio
P, D = ProcessState, DeploymentState
QUICK = RestartPolicy(backoff_initial_s=0.05, jitter=0.0, limit_starts=0)


def _illegal(rec: Recorder) -> list[str]:
    return [
        f"{e.old.value} -> {e.new.value}"
        for _, e in rec.process("a")
        if e.new is not e.old and e.new not in PROCESS_TRANSITIONS[e.old]
    ]


@pytest.mark.parametrize(
    ("code", "words"), [(errno.ENOMEM, "Cannot allocate memory"), (errno.EAGAIN, "Resource temporarily")]
)
async def test_fork_failure_goes_into_backoff_and_the_process_starts_later(
    make_spec, make_plan, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    real = subprocess._fork_exec  # type: ignore[attr-defined]
    failures = [2]

    def fork_exec(*args: object, **kwargs: object) -> int:
        if failures[0] and "child.py" in str(args[0]):  # the fixture child, not the guardian
            failures[0] -= 1
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "_fork_exec", fork_exec)
    rec = Recorder()
    runner = Runner(make_plan(make_spec("a", restart=QUICK)))
    runner.subscribe(rec)
    codes: list[int] = []
    async with supervising(runner, codes):
        status = await until(runner, lambda s: s.process("a").state is P.RUNNING, 5)
    backoffs = rec.process("a", P.BACKOFF)
    assert len(backoffs) == 2 and all(words in e.reason for _, e in backoffs), backoffs
    assert status.process("a").pid is not None
    assert codes == [0] and not _illegal(rec)


async def test_out_of_descriptors_goes_into_backoff_and_the_process_starts_later(
    make_spec, make_plan
) -> None:
    rec = Recorder()
    runner = Runner(make_plan(make_spec("a", restart=QUICK, multiproc_dir="")))
    runner.subscribe(rec)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with supervising(runner):
        await until(runner, lambda s: s.process("a").state is P.RUNNING, 5)
        await runner.stop("a")
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        try:
            await runner.start("a")
            status = await until(runner, lambda s: s.process("a").state is P.BACKOFF, 5)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert "Too many open files" in status.process("a").reason
        await until(runner, lambda s: s.process("a").state is P.RUNNING, 5)
    assert not _illegal(rec)


async def test_a_missing_program_still_fails_at_once(make_spec, make_plan) -> None:
    """Not a shortage: retrying cannot help, so it fails (one line) as before."""
    runner = Runner(make_plan(make_spec("a", restart=QUICK, argv=("/nonexistent/python",))))
    async with supervising(runner):
        status = await until(runner, lambda s: s.process("a").state is P.FAILED, 5)
    assert "No such file or directory" in status.process("a").reason


def test_a_pidfd_that_cannot_be_opened_leaves_no_child(make_spec, monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[int] = []
    real_popen = subprocess.Popen

    def popen(*args: object, **kwargs: object) -> subprocess.Popen[bytes]:
        proc = real_popen(*args, **kwargs)  # type: ignore[call-overload]
        spawned.append(proc.pid)
        return proc

    def pidfd_open(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(process.subprocess, "Popen", popen)
    monkeypatch.setattr(process.os, "pidfd_open", pidfd_open)
    with pytest.raises(StartError) as caught:
        process.spawn(make_spec("a"), guardian=None)
    assert caught.value.transient and "Too many open files" in caught.value.problem
    assert spawned
    with pytest.raises(ChildProcessError):
        os.waitpid(spawned[0], os.WNOHANG)  # killed and reaped
