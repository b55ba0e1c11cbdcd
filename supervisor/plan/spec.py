"""The launch plan's data: what to run, in which order, and how to watch and restart it.

These frozen dataclasses are the contract between ``plan.render`` (which builds them, purely) and
everything downstream (preflight, the runner, control, systemd). They carry no behaviour beyond
small derived views, and serialise to plain JSON through :func:`to_jsonable`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


class Role(str, enum.Enum):
    """What a supervised process is for. Infrastructure roles come before the frontend."""

    ETCD = "etcd"
    NATS = "nats"
    LMCACHE_SERVER = "lmcache-server"  # LMCache's multiprocess cache server (`lmcache server`)
    LM_SERVER = "lm-server"  # the server behind lm:// remote URLs (`lmcache_server`)
    REDIS = "redis"  # a redis-server the supervisor runs for a redis:// remote URL
    FRONTEND = "frontend"
    AGG = "agg"
    DECODE = "decode"
    PREFILL = "prefill"
    CUSTOM = "custom"

    @property
    def is_worker(self) -> bool:
        return self in (Role.AGG, Role.DECODE, Role.PREFILL)

    @property
    def is_cache_server(self) -> bool:
        return self in (Role.LMCACHE_SERVER, Role.LM_SERVER, Role.REDIS)

    @property
    def frontend_type(self) -> str | None:
        """The frontend's name for this worker role in its model-ready answer (``worker_types``)."""
        return {Role.AGG: "aggregated", Role.DECODE: "decode", Role.PREFILL: "prefill"}.get(self)


class Condition(str, enum.Enum):
    """When a dependency counts as satisfied (docker compose's names)."""

    STARTED = "started"
    HEALTHY = "healthy"


class RestartMode(str, enum.Enum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


@dataclass(frozen=True)
class HttpCheck:
    """GET ``url``; success is ``status`` and, when ``json_field`` is set, that field equal to ``json_value``.

    ``owned_port``: trust the answer only if the listening socket on this port belongs to the child's
    process tree (a Dynamo worker keeps running without its health server when the port was taken).
    """

    url: str
    status: int = 200
    json_field: str | None = None
    json_value: Any = None
    owned_port: int | None = None
    kind: Literal["http"] = "http"


@dataclass(frozen=True)
class TcpCheck:
    host: str
    port: int
    owned_port: int | None = None
    kind: Literal["tcp"] = "tcp"


@dataclass(frozen=True)
class ProtocolCheck:
    """One request/answer exchange over TCP, in the server's own protocol, where a connect alone proves
    too little: ``redis-ping`` (``PING`` -> ``+PONG``), ``lm-health`` (LMCache's ``HEALTH`` command
    to ``lmcache_server`` -> return code 200) and ``etcd-auth`` (etcd's auth is on and the cluster
    credentials log in; the check turns it on first, idempotently: engine/etcd_auth.py)."""

    protocol: Literal["redis-ping", "lm-health", "etcd-auth"]
    host: str
    port: int
    owned_port: int | None = None
    kind: Literal["protocol"] = "protocol"
    # etcd-auth: the credentials file whose root user the check sets up (once) and logs in as.
    credentials_file: str = ""


@dataclass(frozen=True)
class ExecCheck:
    """Run ``argv`` (never a shell); exit status 0 is success."""

    argv: tuple[str, ...]
    kind: Literal["exec"] = "exec"


Check = HttpCheck | TcpCheck | ProtocolCheck | ExecCheck


@dataclass(frozen=True)
class Probe:
    """A Kubernetes-style probe: ``check`` every ``period_s``; ``failure_threshold`` misses in a row fail it."""

    check: Check
    period_s: float = 5.0
    timeout_s: float = 2.0
    failure_threshold: int = 3
    success_threshold: int = 1
    initial_delay_s: float = 0.0


@dataclass(frozen=True)
class Probes:
    """``startup`` gates the rest: until it passes, readiness and liveness are not run.

    While starting, the startup probe runs every ``startup.period_s`` (fast: 0.1 s by default) for at
    most ``period_s * failure_threshold`` seconds, the load budget.
    """

    startup: Probe | None = None
    readiness: Probe | None = None
    liveness: Probe | None = None


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff with jitter, reset after ``reset_after_s`` healthy, and a crash-loop limit."""

    mode: RestartMode = RestartMode.ALWAYS
    backoff_initial_s: float = 0.5
    backoff_factor: float = 2.0
    backoff_max_s: float = 30.0
    jitter: float = 0.1
    reset_after_s: float = 60.0
    limit_starts: int = 5
    limit_window_s: float = 120.0
    restart_dependents: bool = False
    # After a crash loop: FAILED, then one more start after failed_retry_s (doubling per failed
    # retry, capped at failed_retry_max_s); 0 keeps it FAILED.
    failed_retry_s: float = 300.0
    failed_retry_max_s: float = 1800.0


@dataclass(frozen=True)
class Dependency:
    """``name`` is a process or a group of replicas (``decode`` for ``decode-0``, ``decode-1``);
    the dependency holds once ``min_ready`` of its members meet ``condition``."""

    name: str
    condition: Condition
    min_ready: int = 1


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised OS process, fully resolved: nothing here is looked up at run time.

    ``env`` is what the supervisor ADDS to its own environment (minus what it strips, such as
    ``NOTIFY_SOCKET``); ``ports`` maps a purpose (``http``, ``system``, ``nixl``, ...) to the port the
    process binds; ``multiproc_dir`` is its own ``PROMETHEUS_MULTIPROC_DIR``, emptied before every start.
    """

    name: str
    role: Role
    argv: tuple[str, ...]
    env: Mapping[str, str]
    gpus: tuple[int, ...]
    ports: Mapping[str, int]
    multiproc_dir: str
    log_file: str
    depends_on: tuple[Dependency, ...] = ()
    probes: Probes = field(default_factory=Probes)
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    stop_signal: str = "SIGTERM"
    stop_timeout_s: float = 30.0
    required: bool = True
    loads_lmcache: bool = False
    tensor_parallel_size: int = 1
    gpu_memory_fraction: float | None = None
    bind_host: str = "127.0.0.1"
    cwd: str | None = None
    # Replicas: ``group`` is the profile table a replica came from (its own name when alone);
    # ``min_ready`` how many healthy members the group needs (gates, readiness, rolling restarts).
    group: str = ""
    min_ready: int = 1
    # Host memory the process is planned to hold beyond its runtime (an LMCache server's L1, a Redis
    # maxmemory), in GB: preflight adds it to what the workers need.
    memory_gb: float = 0.0
    # The cluster credentials file (host/credentials.py) whose values the process gets in its
    # environment at spawn: the secrets stay out of the plan, its output and its comparisons.
    credentials_file: str = ""

    def __post_init__(self) -> None:
        if not self.group:
            object.__setattr__(self, "group", self.name)


@dataclass(frozen=True)
class SmokeRequest:
    """The request that proves the deployment serves, sent once the model reports ready."""

    path: str = "/v1/chat/completions"
    prompt: str = "Hello"
    max_tokens: int = 4
    timeout_s: float = 30.0


@dataclass(frozen=True)
class DeploymentSpec:
    """The deployment as a whole: its name, where its state lives, and what "ready" means for it."""

    name: str
    profile: str
    engine: str
    model: str
    served_model_name: str
    state_dir: str
    base_url: str
    ready_url: str
    smoke: SmokeRequest | None
    ready_timeout_s: float
    discovery: str
    discovery_dir: str | None
    etcd_endpoints: tuple[str, ...]
    python: str
    metrics_host: str
    metrics_port: int | None
    control_socket: str
    targets_file: str
    lmcache: Mapping[str, str] = field(default_factory=dict)
    # Several machines: which part of the profile this node runs ("all" on one machine), the head
    # node's address (worker nodes), and the address this node's peers reach it at.
    node_role: Literal["all", "head", "worker"] = "all"
    # A required group whose every member FAILED: "exit" fails the deployment (exit code 1),
    # "retry" keeps the rest serving while the failed replicas wait out their long retry delay.
    on_role_failed: Literal["exit", "retry"] = "exit"
    spare_gpus: tuple[int, ...] = ()  # a worker whose GPU is quarantined moves to one of these
    head: str | None = None
    advertise: str | None = None
    # Set when the head's etcd/nats-server listen beyond loopback (and the profile is not insecure):
    # the cluster credentials file (host/credentials.py) the head creates and a worker node must have.
    credentials_file: str = ""
    # Listeners beyond loopback that take any client, accepted by discovery.insecure[_planes]
    # (plan/exposure.py): `plan` and the transport check name them with the firewall rule.
    open_listeners: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A deployment and its processes in start order."""

    deployment: DeploymentSpec
    processes: tuple[ProcessSpec, ...]

    def process(self, name: str) -> ProcessSpec:
        for spec in self.processes:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def dependents(self, name: str) -> tuple[ProcessSpec, ...]:
        """Processes that depend on ``name``, directly or through others, in start order."""
        found: set[str] = {name}
        for spec in self.processes:
            if spec.name == name:
                found.add(spec.group)
        for spec in self.processes:
            if any(dep.name in found for dep in spec.depends_on):
                found |= {spec.name, spec.group}
        return tuple(spec for spec in self.processes if spec.name in found and spec.name != name)

    def members(self, group: str) -> tuple[ProcessSpec, ...]:
        """The processes of ``group`` (a replicated worker's replicas, or the one process so named)."""
        return tuple(spec for spec in self.processes if spec.group == group)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from plan dataclasses and enums, with mapping keys in a stable order."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value
