"""Cross-field rules a profile must satisfy beyond its schema, each error naming its key path.

Per-field types are pydantic's job (profile.py); what needs several fields at once lives here.
Port arithmetic (collisions, the 16-bit DYN_SYSTEM_PORT limit) is checked by the plan, which
computes the ports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from supervisor.errors import ProfileError, ProfileErrors
from supervisor.profile import replicas
from supervisor.profile.lmcache import check_env_value, remote_backend

if TYPE_CHECKING:
    from supervisor.profile.schema import Profile, Worker

# Flags the supervisor sets itself; a profile that passes them in `args` would fight the plan.
MANAGED_FLAGS = {
    "frontend": {
        "--http-host": "frontend.host",
        "--http-port": "frontend.port",
        "--router-mode": "frontend.router_mode",
        "--migration-limit": "frontend.migration_limit",
    },
    "worker": {
        "--model": "model.name",
        "--model-path": "model.name",
        "--model-name": "model.served_name",
        "--served-model-name": "model.served_name",
        "--disaggregation-mode": "workers.<name>.role",
        "--is-prefill-worker": "workers.<name>.role",
        "--kv-transfer-config": "lmcache / workers.<name>.lmcache",
        "--connector": "lmcache (Dynamo 1.6.1 rejects --connector)",
        "--tensor-parallel-size": "workers.<name>.tensor_parallel_size",
        "--gpu-memory-utilization": "workers.<name>.gpu_memory_utilization",
        "--bootstrap-ports": "nothing: the mocker's bootstrap rendezvous stays off (with it Dynamo 1.6.1 "
        "fails the requests of a prefill replica that dies; docs/reliability.md)",
        "--kv-events-config": "frontend.router_mode",
    },
}
# Environment the supervisor owns per process.
MANAGED_ENV = {
    "DYN_SYSTEM_PORT": "workers.<name>.system_port or ports.base",
    "PROMETHEUS_MULTIPROC_DIR": "nothing: each process gets its own, emptied before every start",
    "CUDA_VISIBLE_DEVICES": "workers.<name>.gpus",
    "VLLM_NIXL_SIDE_CHANNEL_PORT": "ports.base",
    "NOTIFY_SOCKET": "nothing: children never talk to systemd",
    "DYN_MIGRATION_LIMIT": "frontend.migration_limit",
    "DYN_HEALTH_CHECK_ENABLED": "workers.<name>.canary",
    "DYN_CANARY_WAIT_TIME": "workers.<name>.canary.wait_s",
    "DYN_HEALTH_CHECK_REQUEST_TIMEOUT": "workers.<name>.canary.request_timeout_s",
}


def _flag_errors(profile: Profile, where: str, args: list[str], kind: str) -> list[ProfileError]:
    errors = []
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in MANAGED_FLAGS[kind]:
            errors.append(
                ProfileError(
                    profile.source,
                    f"{where}.args",
                    f"{flag} is set by the supervisor; use {MANAGED_FLAGS[kind][flag]}",
                )
            )
            continue
        # argparse (the frontend's and the mocker's parsers) takes any unambiguous prefix of a long
        # flag, and the last one wins: `--http-ho 0.0.0.0` would move the frontend off loopback.
        owned = sorted(
            f for f in MANAGED_FLAGS[kind] if flag.startswith("--") and len(flag) > 2 and f.startswith(flag)
        )
        if owned:
            errors.append(
                ProfileError(
                    profile.source,
                    f"{where}.args",
                    f"{flag} abbreviates {owned[0]}, which is set by "
                    f"the supervisor; use {MANAGED_FLAGS[kind][owned[0]]}",
                )
            )
    return errors


def _env_errors(profile: Profile, where: str, env: dict[str, str]) -> list[ProfileError]:
    errors = []
    for key, value in env.items():
        if key in MANAGED_ENV:
            errors.append(
                ProfileError(
                    profile.source, f"{where}.env.{key}", f"is set by the supervisor; use {MANAGED_ENV[key]}"
                )
            )
        elif key.startswith("LMCACHE_"):
            problem = check_env_value(key, value)
            if problem:
                errors.append(ProfileError(profile.source, f"{where}.env.{key}", problem))
    return errors


def _lmcache_errors(profile: Profile) -> list[ProfileError]:
    src, lm = profile.source, profile.lmcache
    errors = []
    if lm.local_disk and lm.max_local_disk_size <= 0:
        errors.append(
            ProfileError(
                src,
                "lmcache.max_local_disk_size",
                "must be above 0 when lmcache.local_disk is set (LMCache ignores the disk otherwise)",
            )
        )
    if lm.max_local_disk_size > 0 and not lm.local_disk:
        errors.append(
            ProfileError(src, "lmcache.local_disk", "is required when lmcache.max_local_disk_size is above 0")
        )
    if lm.gds is not None and lm.gds.buffer_size_mib is None:
        errors.append(
            ProfileError(
                src,
                "lmcache.gds.buffer_size_mib",
                "is required with lmcache.gds.path (LMCache needs gds_buffer_size)",
            )
        )
    if lm.remote is not None:
        backend = remote_backend(lm.remote.url)
        if backend is None:
            schemes = "redis, rediss, redis-sentinel, redis-cluster, lm, infinistore, mooncakestore"
            errors.append(
                ProfileError(
                    src,
                    "lmcache.remote.url",
                    f"unknown scheme in {lm.remote.url.split('://')[0]!r}://...; expected one of {schemes}",
                )
            )
        elif backend == "redis-sentinel" and not lm.remote.service_name:
            errors.append(
                ProfileError(
                    src, "lmcache.remote.service_name", "is required for redis-sentinel (the master name)"
                )
            )
        elif backend == "mooncake" and not lm.remote.config_path:
            errors.append(
                ProfileError(
                    src, "lmcache.remote.config_path", "is required for mooncakestore (MOONCAKE_CONFIG_PATH)"
                )
            )
    for key, value in lm.extra.items():
        if not key.replace("_", "").isalnum() or key != key.lower():
            errors.append(
                ProfileError(src, f"lmcache.extra.{key}", "expected a lower-case LMCache config key")
            )
            continue
        problem = check_env_value(key, value if isinstance(value, str) else str(value).lower())
        if problem:
            errors.append(ProfileError(src, f"lmcache.extra.{key}", problem))
    return errors


def _replica_errors(
    profile: Profile, name: str, worker: Worker, owners: dict[int, tuple[str, bool]]
) -> list[ProfileError]:
    """GPUs per replica, ``min_ready`` within ``replicas``, and GPUs no two workers share unless
    both say ``shared_gpus``; ``owners`` collects GPU -> (worker, shared) across calls."""
    src, key = profile.source, f"workers.{name}"
    errors = []
    problem = replicas.gpu_problem(
        worker.gpus,
        replicas=worker.replicas,
        tensor_parallel_size=worker.tensor_parallel_size,
        needs_gpus=profile.engine == "vllm",
    )
    if problem:
        errors.append(ProfileError(src, f"{key}.gpus", problem))
    if worker.min_ready is not None and worker.min_ready > worker.replicas:
        errors.append(
            ProfileError(
                src,
                f"{key}.min_ready",
                f"is {worker.min_ready}, but the worker has only {worker.replicas} "
                f"replica{'s' if worker.replicas > 1 else ''} (replicas)",
            )
        )
    flat = [
        g
        for chunk in replicas.replica_gpus(
            worker.gpus if not problem else [],
            replicas=worker.replicas,
            tensor_parallel_size=worker.tensor_parallel_size,
        )
        for g in chunk
    ]
    for gpu in dict.fromkeys(flat):
        other = owners.get(gpu)
        if other is not None and other[0] != name and not (other[1] and worker.shared_gpus):
            errors.append(
                ProfileError(
                    src,
                    f"{key}.gpus",
                    f"GPU {gpu} is already given to worker {other[0]!r} "
                    f"(set shared_gpus = true on both to share it)",
                )
            )
        owners.setdefault(gpu, (name, worker.shared_gpus))
    return errors


#: Dynamo 1.6.1's default DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS: after SIGTERM a worker unregisters,
#: waits this long (for the frontend to stop routing to it), then drains its requests.
GRACE_PERIOD_S = 5.0


def _stop_errors(profile: Profile, name: str, worker: Worker) -> list[ProfileError]:
    """A vLLM worker's stop timeout must outlast Dynamo's grace period, or every planned stop (a
    rolling restart, a reload) ends in SIGKILL before the worker drained a single request."""
    if profile.engine != "vllm":
        return []  # the mocker exits within a second of SIGTERM (measured): no grace period to wait
    raw = worker.env.get("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS") or profile.env.get(
        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"
    )
    try:
        grace = float(raw) if raw else GRACE_PERIOD_S
    except ValueError:
        return [
            ProfileError(
                profile.source,
                f"workers.{name}.env.DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",
                f"expected a number of seconds, got {raw!r}",
            )
        ]
    if worker.stop_timeout_s <= grace:
        return [
            ProfileError(
                profile.source,
                f"workers.{name}.stop_timeout_s",
                f"is {worker.stop_timeout_s:g} s, but Dynamo waits its {grace:g} s grace period before it "
                f"drains requests: use more than {grace:g} s plus your longest request (default 30)",
            )
        ]
    return []


def _graph_errors(profile: Profile) -> list[ProfileError]:
    src = profile.source
    errors = []
    roles = [w.role for w in profile.workers.values()]
    if not roles:
        errors.append(ProfileError(src, "workers", "expected at least one worker"))
    if "prefill" in roles and "decode" not in roles:
        errors.append(
            ProfileError(src, "workers", "a prefill worker needs a decode worker (disaggregated serving)")
        )
    if "decode" in roles and "prefill" not in roles:
        errors.append(
            ProfileError(
                src, "workers", 'a decode worker needs a prefill worker (use role = "agg" for one worker)'
            )
        )
    if "agg" in roles and ("decode" in roles or "prefill" in roles):
        errors.append(ProfileError(src, "workers", "mixes agg with decode/prefill workers; pick one mode"))
    owners: dict[int, tuple[str, bool]] = {}
    for name, worker in profile.workers.items():
        key = f"workers.{name}"
        errors += _replica_errors(profile, name, worker, owners)
        errors += _stop_errors(profile, name, worker)
        errors += _flag_errors(profile, key, worker.args, "worker")
        errors += _env_errors(profile, key, worker.env)
    if len(set(profile.spare_gpus)) != len(profile.spare_gpus):
        errors.append(ProfileError(src, "spare_gpus", f"lists a GPU twice: {profile.spare_gpus}"))
    for gpu in profile.spare_gpus:
        if gpu in owners:
            errors.append(
                ProfileError(
                    src, "spare_gpus", f"GPU {gpu} is a spare but also given to worker {owners[gpu][0]!r}"
                )
            )
    return errors


# Flags the plan gives the infrastructure servers (plan/infra.py); `args` may not fight them.
INFRA_FLAGS = {
    "etcd": (
        "--name",
        "--data-dir",
        "--listen-client-urls",
        "--advertise-client-urls",
        "--listen-peer-urls",
        "--initial-advertise-peer-urls",
        "--initial-cluster",
    ),
    "nats": (
        "-a",
        "--addr",
        "--net",
        "-p",
        "--port",
        "-m",
        "--http_port",
        "-js",
        "--jetstream",
        "-sd",
        "--store_dir",
    ),
}


def _discovery_errors(profile: Profile) -> list[ProfileError]:
    src, disc = profile.source, profile.discovery
    errors = []
    for index, endpoint in enumerate(disc.etcd_endpoints):
        scheme, sep, rest = endpoint.partition("://")
        if not sep or scheme not in ("http", "https") or not rest.strip("/"):
            errors.append(
                ProfileError(
                    src,
                    f"discovery.etcd_endpoints.{index}",
                    f"expected an etcd client URL like http://host:2379, got {endpoint!r}",
                )
            )
    if disc.nats_server is not None and not disc.nats_server.startswith(("nats://", "tls://")):
        errors.append(
            ProfileError(
                src,
                "discovery.nats_server",
                f"expected a URL like nats://host:4222, got {disc.nats_server!r}",
            )
        )
    for server, flags in INFRA_FLAGS.items():
        for arg in getattr(profile.infra, server).args:
            if arg.split("=", 1)[0] in flags:
                errors.append(
                    ProfileError(
                        src,
                        f"infra.{server}.args",
                        f"{arg.split('=', 1)[0]} is set by the supervisor; use ports.base or infra.{server}.*",
                    )
                )
    return errors


def check_rules(profile: Profile) -> None:
    """Raise :class:`ProfileErrors` listing every cross-field rule the profile breaks."""
    errors = _graph_errors(profile) + _lmcache_errors(profile)
    errors += _flag_errors(profile, "frontend", profile.frontend.args, "frontend")
    errors += _env_errors(profile, "frontend", profile.frontend.env)
    errors += _env_errors(profile, "env", profile.env)
    errors += _discovery_errors(profile)
    if errors:
        raise ProfileErrors(errors)
