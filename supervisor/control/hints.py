"""Known lines in children's output, turned into hints a person can act on. Pure: no IO.

:func:`scan` reads log lines (ANSI colour codes stripped: Dynamo colours its logs even into files)
and returns one :class:`Hint` per kind of problem found, the newest matching line kept.
:func:`attribute_ports` completes the "Address already in use" hints with the port and its holder,
from facts the caller gathered (who listens on which port); a port held by the process's own tree
means the clash is over and its hint is dropped.

The control socket runs both over the tail of each child's log when ``status`` or ``logs`` asks,
so hints need no state in the runner and survive a supervisor restart.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

#: How much of a log's end is scanned: recent enough to matter, small enough to read per request.
TAIL_BYTES = 64 * 1024
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_LINE_MAX = 300


class Severity(enum.Enum):
    """How much a hint matters: an error to fix, a warning to check, or a line that is expected."""

    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Hint:
    """One diagnosis: ``kind`` is stable (for scripts), ``message`` is for people, ``line`` the evidence."""

    kind: str
    severity: Severity
    message: str
    line: str
    port: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "severity": self.severity.value,
            "message": self.message,
            "line": self.line,
            "port": self.port,
        }


@dataclass(frozen=True)
class _Rule:
    kind: str
    pattern: re.Pattern[str]
    severity: Severity
    message: str


_RULES = (
    _Rule(
        "port-in-use",
        re.compile(r"address already in use|EADDRINUSE|os error 98", re.IGNORECASE),
        Severity.ERROR,
        "a port this process binds is already in use",
    ),
    _Rule(
        "unkillable",
        re.compile(r"^lmcache-supervise: .* survived SIGKILL"),
        Severity.ERROR,
        "a process of this tree survived SIGKILL: it is in uninterruptible sleep (state D), usually a GPU "
        "driver, NFS or FUSE hang; see dmesg and nvidia-smi. The guardian keeps it registered and kills it "
        "if the supervisor stops; a host reboot may be the only cure",
    ),
    _Rule(
        "cuda-oom",
        re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory", re.IGNORECASE),
        Severity.ERROR,
        "CUDA out of memory: lower gpu_memory_utilization or max_model_len, free the GPU (another process "
        "may hold it: nvidia-smi), or use more tensor-parallel GPUs",
    ),
    _Rule(
        "kv-cache-memory",
        re.compile(
            r"No available memory for the cache blocks|"
            r"larger than the available KV cache memory",
            re.IGNORECASE,
        ),
        Severity.ERROR,
        "vLLM found no room for the KV cache: raise gpu_memory_utilization or lower max_model_len",
    ),
    _Rule(
        "nvml",
        re.compile(
            r"NVML(Error|_ERROR)|Failed to initialize NVML|NVML Shared Library Not Found|"
            r"Driver/library version mismatch",
            re.IGNORECASE,
        ),
        Severity.ERROR,
        "NVML (the NVIDIA management library) failed: a driver/library version mismatch needs a driver "
        "reload or a reboot; a missing library means the NVIDIA driver is not installed in this environment",
    ),
    _Rule(
        "lmcache-prometheus-logger",
        re.compile(r"PrometheusLogger instance already created", re.IGNORECASE),
        Severity.INFO,
        "benign: LMCache logs this when vLLM re-creates its metrics logger; LMCACHE_LOG_LEVEL=CRITICAL "
        "(profile: lmcache.log_level) silences it",
    ),
    _Rule(
        "prometheus-multiproc-dir",
        re.compile(r"Found PROMETHEUS_MULTIPROC_DIR was set by user", re.IGNORECASE),
        Severity.INFO,
        "expected: the supervisor gives each process its own PROMETHEUS_MULTIPROC_DIR and empties it "
        "before every start, which is what this vLLM warning asks for",
    ),
)

# Where a line names the port: "127.0.0.1:8081", "[::1]:8081", "('127.0.0.1', 8081)", "port 8081".
_PORT_PATTERNS = (
    re.compile(r"(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]*\]|localhost):(\d{1,5})\b"),
    re.compile(r"'\s*,\s*(\d{1,5})\)"),
    re.compile(r"\bport\s+(\d{1,5})\b", re.IGNORECASE),
)


def clean(line: str) -> str:
    """A log line without ANSI escapes or trailing whitespace, cut to a readable length."""
    text = _ANSI.sub("", line).rstrip()
    return text if len(text) <= _LINE_MAX else text[:_LINE_MAX] + "..."


def port_in(line: str) -> int | None:
    """The TCP port a bind error line names, if it names one."""
    for pattern in _PORT_PATTERNS:
        match = pattern.search(line)
        if match and 0 < int(match.group(1)) < 65536:
            return int(match.group(1))
    return None


def scan(lines: Iterable[str]) -> tuple[Hint, ...]:
    """One hint per (kind, port) found in ``lines``, in order of first appearance, newest line kept."""
    found: dict[tuple[str, int | None], Hint] = {}
    for raw in lines:
        if not raw:
            continue
        line = clean(raw)
        for rule in _RULES:
            if rule.pattern.search(line):
                port = port_in(line) if rule.kind == "port-in-use" else None
                found[(rule.kind, port)] = Hint(rule.kind, rule.severity, rule.message, line, port)
                break
    if any(kind == "port-in-use" and port is not None for kind, port in found):
        # Dynamo logs one bind failure twice, once without the port: keep the line that names it.
        found.pop(("port-in-use", None), None)
    return tuple(found.values())


def attribute_ports(
    hints: Iterable[Hint], *, ports: Mapping[str, int], holder: Callable[[int], PortHolder | None]
) -> tuple[Hint, ...]:
    """Name the port and its holder in every "port-in-use" hint.

    ``ports`` are the process's own ports (purpose -> port), searched when the line names none;
    ``holder(port)`` says who listens on a port now (None: nobody). A port now held by the
    process's own tree is no clash any more (a restart fixed it): that hint is dropped.
    """
    out: list[Hint] = []
    for hint in hints:
        if hint.kind != "port-in-use":
            out.append(hint)
            continue
        if hint.port is not None:
            who = holder(hint.port)
            if who is None or not who.ours:
                out.append(_named(hint, hint.port, ports, who))
            continue
        owners = {port: holder(port) for port in sorted(set(ports.values()))}
        strangers = [port for port, who in owners.items() if who is not None and not who.ours]
        out.extend(_named(hint, port, ports, owners[port]) for port in strangers)
        if not strangers and not (owners and all(w is not None and w.ours for w in owners.values())):
            out.append(hint)  # the clash was on a port we cannot name: keep the bare hint
    return tuple(out)


def _named(hint: Hint, port: int, ports: Mapping[str, int], who: PortHolder | None) -> Hint:
    purpose = next((k for k, v in sorted(ports.items()) if v == port), None)
    what = f"port {port}" + (f" ({purpose})" if purpose else "")
    by = who.describe() if who is not None else "nobody now (it was taken when the process started)"
    return replace(hint, port=port, message=f"{what} was already in use, held by {by}")


@dataclass(frozen=True)
class PortHolder:
    """Who listens on a port: ``ours`` when it is the supervised process itself or its descendants."""

    pid: int | None
    name: str | None
    ours: bool = False

    def describe(self) -> str:
        if self.pid is None:
            return "a process of another user (its pid is not visible)"
        return f"pid {self.pid}" + (f" ({self.name})" if self.name else "")
