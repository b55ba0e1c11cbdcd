"""The deployment profile's schema: pydantic models, strict, unknown keys forbidden.

Strict on purpose: "10GB" is not a number and "yes" is not a boolean here, where LMCache itself
would read both silently wrong. Loading, ``extends`` and ``--set`` live in :mod:`supervisor.profile.load`;
rules that need several fields at once in :mod:`supervisor.profile.rules`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,47}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Port = Annotated[int, Field(ge=1, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0)]


def _bind_host(value: str) -> str:
    """A bind address is one word: a value like ``--help`` or ``a -b`` lands in argv (``--http-host``)."""
    if value.startswith("-") or not re.fullmatch(r"[A-Za-z0-9_.:%-]+", value):
        raise ValueError(f"expected a host name or IP address, got {value!r}")
    return value


Host = Annotated[str, AfterValidator(_bind_host)]
SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL")


class _Model(BaseModel):
    # strict: "10GB" is not a number and "yes" is not a boolean; LMCache itself would read both
    # silently wrong. Ints are accepted where floats are expected (TOML writes 5 for 5.0).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Health(_Model):
    """How a process is probed. ``startup_timeout_s`` is the load budget (minutes for a real model)."""

    startup_timeout_s: PositiveSeconds | None = None
    startup_period_s: Annotated[float, Field(gt=0, le=10)] = 0.1
    period_s: PositiveSeconds = 5.0
    timeout_s: PositiveSeconds = 2.0
    failure_threshold: Annotated[int, Field(ge=1, le=100)] = 3
    liveness: bool = True


class Restart(_Model):
    policy: Literal["always", "on-failure", "never"] = "always"
    backoff_initial_s: Annotated[float, Field(ge=0)] = 0.5
    backoff_factor: Annotated[float, Field(ge=1)] = 2.0
    backoff_max_s: Annotated[float, Field(ge=0)] = 30.0
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.1
    reset_after_s: PositiveSeconds = 60.0
    limit_starts: Annotated[int, Field(ge=1)] = 5
    limit_window_s: PositiveSeconds = 120.0
    restart_dependents: bool = False
    # A replica past its crash-loop limit is FAILED, then started again after this long (doubling
    # per failed retry up to failed_retry_max_s) while its siblings serve; 0: never again.
    failed_retry_s: Annotated[float, Field(ge=0)] = 300.0
    failed_retry_max_s: PositiveSeconds = 1800.0


class _Process(_Model):
    """What every supervised process has: extra args and env, probes, restart, stop."""

    args: list[str] = []
    env: dict[str, str] = {}
    health: Health = Health()
    restart: Restart = Restart()
    stop_signal: Literal[SIGNALS] = "SIGTERM"  # type: ignore[valid-type]
    stop_timeout_s: PositiveSeconds = 30.0
    required: bool = True


class Frontend(_Process):
    host: Host = "127.0.0.1"
    port: Port | None = None
    router_mode: Literal["round-robin", "random", "kv", "least-loaded", "power-of-two"] = "round-robin"
    # --migration-limit: how many times Dynamo moves a request to another worker when its worker dies
    # or stops mid-request. None: 3 when a worker role has two or more replicas, else off (0).
    migration_limit: Annotated[int, Field(ge=0, le=100)] | None = None


class Canary(_Model):
    """Dynamo's own worker canary (DYN_HEALTH_CHECK_ENABLED): after ``wait_s`` without traffic the
    worker sends itself a tiny request; one not answered within ``request_timeout_s`` turns its
    /health to 503, which the supervisor's readiness probe sees."""

    wait_s: Annotated[int, Field(ge=1, le=3600)] = 10
    request_timeout_s: Annotated[int, Field(ge=1, le=600)] = 3


GpuIndex = Annotated[int, Field(ge=0)]


class Worker(_Process):
    role: Literal["agg", "decode", "prefill"]
    # A pool (replica i takes tensor_parallel_size GPUs in order) or one list per replica.
    gpus: list[GpuIndex] | list[list[GpuIndex]] = []
    replicas: Annotated[int, Field(ge=1, le=64)] = 1
    # Healthy replicas this role needs: dependents start once this many are healthy, the deployment
    # is ready while it has them, and a rolling restart never goes below it. None: 1.
    min_ready: Annotated[int, Field(ge=1, le=64)] | None = None
    shared_gpus: bool = False  # allow GPUs that another worker also lists (e.g. two small models)
    canary: Canary | None = None

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_shape(cls, value: object) -> object:
        """One clear message for both forms (pydantic's union errors name its internal branches)."""

        def index(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if isinstance(value, list) and (
            all(index(v) for v in value)
            or all(isinstance(v, list) and all(index(g) for g in v) for v in value)
        ):
            return value
        raise ValueError("expected an array of GPU indices (>= 0), or one such array per replica")

    tensor_parallel_size: Annotated[int, Field(ge=1, le=64)] = 1
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    lmcache: bool | None = None  # None: decided by role (see lmcache.worker_loads_lmcache)
    system_port: Port | None = None
    node: Literal["head", "worker"] = "worker"  # which node runs it under `--role head|worker`


class Model(_Model):
    name: str  # an HF id (org/name) or a local path: absolute, ~, or ./relative to the profile
    served_name: str | None = None

    @field_validator("name", "served_name")
    @classmethod
    def _no_flag(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or value.startswith("-")):
            raise ValueError(f"expected a model name or path, got {value!r} (it would be read as a flag)")
        return value


class Discovery(_Model):
    """How Dynamo processes find each other: files on one machine, etcd (+ optional NATS) across several.

    Empty ``etcd_endpoints`` (and no ``nats_server`` while a plane is "nats") means the head node runs
    that server itself (see :class:`Infra`); listing them points every node at existing servers.
    """

    backend: Literal["file", "etcd"] = "file"
    etcd_endpoints: list[str] = []
    nats_server: str | None = None
    request_plane: Literal["tcp", "nats"] = "tcp"  # DYN_REQUEST_PLANE
    event_plane: Literal["zmq", "nats"] = "zmq"  # DYN_EVENT_PLANE
    # ETCD_LEASE_TTL: a SIGKILLed worker's registration outlives it by this long (Dynamo's default ~30 s).
    lease_ttl_s: Annotated[int, Field(ge=2, le=600)] = 10
    # The head's etcd/nats-server beyond loopback require the cluster credentials (README, "Several
    # machines"); true keeps them open to anyone who reaches them (firewall them then), and implies
    # insecure_planes.
    insecure: bool = False
    # Listeners that cannot authenticate (Dynamo's TCP planes without mutual TLS, the ZMQ event plane,
    # NIXL side channels, worker system servers: plan/exposure.py) may bind beyond loopback only when
    # this says so; the plan is refused otherwise. Firewall them to your nodes.
    insecure_planes: bool = False


class _Server(_Model):
    """An infrastructure server the head runs: a binary (a name found on PATH or beside the
    interpreter, or a path), extra flags, and the usual probes/restart/stop settings."""

    args: list[str] = []
    health: Health = Health()
    restart: Restart = Restart()
    stop_timeout_s: PositiveSeconds = 10.0


class Etcd(_Server):
    binary: str = "etcd"
    client_port: Port | None = None  # default ports.base + 379
    peer_port: Port | None = None  # default ports.base + 380


class Nats(_Server):
    binary: str = "nats-server"
    port: Port | None = None  # default ports.base + 422
    monitor_port: Port | None = None  # default ports.base + 822


class Infra(_Model):
    """Servers the head node runs when ``discovery`` names none (data under the state directory)."""

    etcd: Etcd = Etcd()
    nats: Nats = Nats()


class Ports(_Model):
    base: Annotated[int, Field(ge=1024, le=65000)] = 8000
    host: Host = "127.0.0.1"


class RemoteServer(_Model):
    """How the supervisor runs the remote backend itself (``lmcache.remote.serve = true``).

    ``lm://`` runs ``lmcache_server HOST PORT``; ``redis://`` runs ``redis-server`` bound to the URL's
    loopback host, with ``maxmemory`` and an eviction policy always set (LMCache stores keys without a
    TTL: an unbounded Redis grows until the host runs out) and persistence off unless asked for.
    ``restart`` left unset takes the default that matches how LMCache's client behaves after the
    server restarts (docs/lmcache-servers.md): lm:// restarts its dependents, Redis does not.
    """

    binary: str | None = None  # default: lmcache_server or redis-server, beside the interpreters or on PATH
    maxmemory_gb: Annotated[float, Field(gt=0)] = 1.0  # redis only
    maxmemory_policy: Literal["allkeys-lru", "allkeys-lfu", "volatile-lru", "allkeys-random"] = "allkeys-lru"
    persistence: bool = False  # redis only: append-only file in the state directory
    args: list[str] = []
    health: Health = Health()
    restart: Restart | None = None
    stop_timeout_s: PositiveSeconds = 10.0


class Remote(_Model):
    """One remote LMCache backend; the URL scheme picks it (redis, rediss, redis-sentinel, ...)."""

    url: str
    service_name: str | None = None  # redis-sentinel master name (REDIS_SERVICE_NAME)
    config_path: str | None = None  # mooncake JSON config (MOONCAKE_CONFIG_PATH)
    serde: Literal["naive", "cachegen"] = "naive"
    serve: bool = False  # the supervisor runs this server itself (lm:// or redis:// on loopback)
    server: RemoteServer = RemoteServer()


class CacheServer(_Model):
    """LMCache's multiprocess cache server (``lmcache server``), one per node, and the workers' client.

    Workers that load LMCache then use vLLM's ``LMCacheMPConnector`` pointed at it, and wait for its
    ``/healthcheck``. The L1 (CPU memory) lives here, not in the workers. ``restart_dependents`` stays
    off by default: LMCache's client degrades to recompute while the server is away and resumes by
    itself once it is back (docs/lmcache-servers.md).
    """

    binary: str = "lmcache"  # beside the interpreters or on PATH, or a path
    port: Port | None = None  # ZMQ requests; default ports.base + 555
    http_port: Port | None = None  # /healthcheck and /metrics; default ports.base + 556
    l1_size_gb: Annotated[float, Field(gt=0)] = 1.0
    eviction_policy: Literal["LRU", "ARC", "IsolatedLRU", "noop"] = "LRU"
    l2_adapters: list[dict[str, str | int | float | bool]] = []  # each becomes one --l2-adapter JSON
    heartbeat_interval_s: PositiveSeconds | None = None  # lmcache.mp.heartbeat_interval (LMCache: 10 s)
    args: list[str] = []
    env: dict[str, str] = {}
    health: Health = Health()
    restart: Restart = Restart()
    stop_timeout_s: PositiveSeconds = 30.0


class Gds(_Model):
    path: str
    buffer_size_mib: Annotated[int, Field(ge=1)] | None = None


class LMCache(_Model):
    enabled: bool = True
    chunk_size: Annotated[int, Field(ge=16, le=65536)] = 256
    local_cpu: bool = True
    max_local_cpu_size: Annotated[float, Field(ge=0)] = 5.0
    local_disk: str | None = None
    max_local_disk_size: Annotated[float, Field(ge=0)] = 0.0
    remote: Remote | None = None
    server: CacheServer | None = None  # [lmcache.server]: the per-node multiprocess cache server
    gds: Gds | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    track_usage: bool = False
    hash_seed: Annotated[int, Field(ge=0, le=4294967295)] = 0
    extra: dict[str, str | int | float | bool] = {}


class Supervisor(_Model):
    metrics_host: Host = "127.0.0.1"
    metrics_port: Port | None = None  # default: ports.base + 90
    metrics: bool = True
    ready_timeout_s: PositiveSeconds | None = None
    smoke: bool = True
    smoke_prompt: str = "Hello"
    # A required role whose every replica FAILED (crash loop): "exit" stops the deployment with exit
    # code 1 (systemd's Restart= takes over); "retry" keeps serving what is left while the failed
    # replicas are retried on their long backoff (restart.failed_retry_s).
    on_role_failed: Literal["exit", "retry"] = "exit"


class Profile(_Model):
    """A validated deployment profile. ``source`` is the file it came from (for messages)."""

    name: Name
    description: str = ""
    engine: Literal["vllm", "mocker"] = "vllm"
    python: str | None = None
    model: Model
    discovery: Discovery = Discovery()
    infra: Infra = Infra()
    ports: Ports = Ports()
    frontend: Frontend = Frontend()
    workers: dict[Name, Worker]
    # GPUs kept free for a worker whose GPU faults (same model and memory size as the one it replaces)
    spare_gpus: list[Annotated[int, Field(ge=0)]] = []
    lmcache: LMCache = LMCache()
    supervisor: Supervisor = Supervisor()
    env: dict[str, str] = {}
    source: str = ""
