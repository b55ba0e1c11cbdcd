"""The verdict type of preflight: a :class:`Finding` per concern, ok / warn / fail, one line each."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from supervisor.preflight.needs import GIB
from supervisor.redact import redact_text


class Status(str, enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    """One verdict: ``check`` is a stable name (``gpu``, ``ports``, ...); message and hint are one line."""

    check: str
    status: Status
    message: str
    hint: str = ""

    def to_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.value, "message": self.message, "hint": self.hint}


def finding(check: str, status: Status, message: str, hint: str = "") -> Finding:
    """A finding with secrets masked: a URL with a password must never reach a terminal or a log."""
    return Finding(check, status, redact_text(message), redact_text(hint))


def ok(check: str, message: str) -> Finding:
    return finding(check, Status.OK, message)


def warn(check: str, message: str, hint: str = "") -> Finding:
    return finding(check, Status.WARN, message, hint)


def fail(check: str, message: str, hint: str = "") -> Finding:
    return finding(check, Status.FAIL, message, hint)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def names(specs: Iterable[object]) -> str:
    return ", ".join(getattr(s, "name", str(s)) for s in specs)
