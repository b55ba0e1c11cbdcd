"""Every error the supervisor raises on purpose, under one root.

    SupervisorError                 root; ``exit_code`` tells the CLI how to leave
    ├── ProfileError                bad input: a profile file, a --set override, a flag   (exit 2)
    │   └── ProfileErrors           several ProfileErrors collected in one pass           (exit 2)
    ├── PlanError                   a valid profile that renders to an impossible plan    (exit 2)
    ├── PreflightError              the host cannot run the plan                          (exit 3)
    ├── StartError                  a child could not be spawned                          (exit 1)
    ├── StateError                  an illegal lifecycle transition (a bug, not input)    (exit 1)
    ├── StateDirError               the state directory is unsafe (another user owns it)  (exit 2)
    ├── GpuError                    a GPU request that cannot be done (GPU not watched)    (exit 2)
    └── ControlError                the control socket is missing, refused or failed      (exit 1)
        └── BadRequestError         the running supervisor refused a request as bad input (exit 2)

Messages are whole sentences naming the file, key, process, pid or port; those values are kept as
attributes so callers never parse a message.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2
EXIT_PREFLIGHT = 3


def one_line(text: str) -> str:
    """Escape control characters so a message stays one line, whatever the input held."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SupervisorError(Exception):
    """Root of every error the supervisor raises on purpose."""

    exit_code = EXIT_RUNTIME


class ProfileError(SupervisorError):
    """A profile (or an override of it) is not what the schema expects.

    ``source`` is the file (or ``--set``), ``key`` the dotted key path, ``problem`` what was wrong.
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}" if key else source
        super().__init__(one_line(f"{where}: {problem}"))


class ProfileErrors(ProfileError):
    """Several profile errors found in one pass; the message shows the first, ``errors`` holds all."""

    def __init__(self, errors: Sequence[ProfileError]) -> None:
        if not errors:
            raise ValueError("ProfileErrors needs at least one error")
        self.errors = tuple(errors)
        first = self.errors[0]
        super().__init__(first.source, first.key, first.problem)
        more = len(self.errors) - 1
        if more:
            self.args = (f"{self.args[0]} (and {more} more)",)


class PlanError(SupervisorError):
    """A profile that validates field by field but cannot be rendered into a runnable plan."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        super().__init__(one_line(f"{source}: {key}: {problem}" if key else f"{source}: {problem}"))


class PreflightError(SupervisorError):
    """One or more preflight checks failed; ``findings`` holds them."""

    exit_code = EXIT_PREFLIGHT

    def __init__(self, message: str, findings: Sequence[object] = ()) -> None:
        self.findings = tuple(findings)
        super().__init__(message)


class StartError(SupervisorError):
    """A child process could not be spawned at all (missing interpreter, bad cwd, ...).

    ``transient`` marks a shortage of the host's resources (descriptors, memory, processes) that a
    later attempt may not meet: the runner retries it with backoff instead of failing the process."""

    def __init__(self, process: str, problem: str, *, transient: bool = False) -> None:
        self.process, self.problem, self.transient = process, problem, transient
        super().__init__(f"process {process!r} could not start: {problem}")


class StateError(SupervisorError):
    """An illegal lifecycle transition: names the process, its state and the allowed targets."""

    def __init__(self, process: str, current: str, target: str, allowed: Sequence[str]) -> None:
        self.process, self.current, self.target, self.allowed = process, current, target, tuple(allowed)
        allowed_text = ", ".join(allowed) or "none"
        super().__init__(
            f"process {process!r} cannot go from {current} to {target} (allowed: {allowed_text})"
        )


class StateDirError(SupervisorError):
    """The deployment's state directory cannot be trusted: it belongs to another user or is not a
    plain directory. Bad environment, not a runtime failure: nothing has started (exit 2)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(one_line(f"state directory {path}: {problem}"))


class GpuError(SupervisorError):
    """A request about a GPU the supervisor cannot act on (not watched, not quarantined)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, gpu: int | None, problem: str) -> None:
        self.gpu, self.problem = gpu, problem
        super().__init__(problem)


class ControlError(SupervisorError):
    """Talking to a running supervisor over its control socket failed."""


class BadRequestError(ControlError):
    """The running supervisor refused a request as bad input (an unknown process, a bad value)."""

    exit_code = EXIT_BAD_INPUT
