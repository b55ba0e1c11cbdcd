"""What a plan asks of the host, read from the plan alone (pure): sizes, paths, ports, URLs, imports.

Both halves of preflight use it: :func:`facts_request` tells :func:`supervisor.host.facts.gather` what to
probe (and nothing more: no NVML for a mocker-only plan, no PING without a remote URL), and the checks
in :mod:`supervisor.preflight.checks` read the same values to judge the facts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from urllib.parse import unquote, urlsplit

from supervisor.host.engines import EngineProcess, EngineRequest
from supervisor.host.facts import (
    ExecutableRequest,
    FactsRequest,
    InterpreterRequest,
    LMCacheFileFacts,
    ModelRequest,
)
from supervisor.host.redis import RemoteTarget
from supervisor.plan.addresses import is_local
from supervisor.plan.spec import Plan, ProcessSpec, Role

GIB = 1024**3
# LMCache's own default for max_local_cpu_size when the variable is unset (GB per TP rank).
LMCACHE_DEFAULT_CPU_GB = 5.0
# Host RAM one worker process needs beyond LMCache's buffer, per tensor-parallel rank: a vLLM rank
# holds torch, the CUDA context, pinned staging buffers and the tokenizer (observed 1.5-3 GB RSS); a
# mocker is ~115 MB RSS (stack-facts), so a quarter GB leaves it twice that.
RUNTIME_RESERVE_GB = {"vllm": 2.0, "mocker": 0.25}
RUNTIME_RESERVE_DEFAULT_GB = 2.0
# Share of total RAM left untouched for the OS, page cache and the supervisor: filling RAM to the last
# byte makes the kernel OOM-kill the largest process, which is one of our workers.
HOST_MEMORY_MARGIN = 0.10
# vLLM's default --gpu-memory-utilization, used when a process states no fraction.
VLLM_DEFAULT_GPU_FRACTION = 0.9


@dataclass(frozen=True)
class PlannedPort:
    """A port some part of the plan binds: ``owner`` is the process (or ``supervisor``) and its purpose."""

    owner: str
    purpose: str
    host: str
    port: int


def float_env(spec: ProcessSpec, key: str) -> tuple[float | None, str | None]:
    """``spec.env[key]`` as a float; (None, None) when unset; (None, why) when LMCache would misread it."""
    raw = spec.env.get(key)
    if raw is None:
        return None, None
    try:
        value = float(raw)
    except ValueError:
        return None, f"{spec.name}: {key}={raw!r} is not a number of GB (LMCache would ignore it)"
    if value < 0 or value != value:
        return None, f"{spec.name}: {key}={raw!r} must be zero or more"
    return value, None


def lmcache_processes(plan: Plan) -> tuple[ProcessSpec, ...]:
    return tuple(p for p in plan.processes if p.loads_lmcache)


CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"


def lmcache_file_requests(plan: Plan) -> tuple[tuple[str, str | None], ...]:
    """Each (path, cwd) of an LMCACHE_CONFIG_FILE that a process loading LMCache names."""
    return tuple(
        dict.fromkeys(
            (p.env[CONFIG_FILE_ENV], p.cwd) for p in lmcache_processes(plan) if p.env.get(CONFIG_FILE_ENV)
        )
    )


def lmcache_file_of(spec: ProcessSpec, files: tuple[LMCacheFileFacts, ...]) -> LMCacheFileFacts | None:
    path = spec.env.get(CONFIG_FILE_ENV) if spec.loads_lmcache else None
    return next((f for f in files if (f.path, f.cwd) == (path, spec.cwd)), None) if path else None


def as_lmcache_sees(plan: Plan, files: tuple[LMCacheFileFacts, ...]) -> Plan:
    """``plan`` with each LMCACHE_CONFIG_FILE folded into its process's env the way LMCache folds it:
    the file first, the env on top. Preflight judges this view (a remote URL or disk cache set only
    in the file is probed too); what is launched is unchanged."""
    processes = []
    for spec in plan.processes:
        found = lmcache_file_of(spec, files)
        if found and found.values:
            from_file = {f"LMCACHE_{key.upper()}": value for key, value in found.values}
            spec = replace(spec, env={**from_file, **spec.env})
        processes.append(spec)
    return replace(plan, processes=tuple(processes))


def local_disk(spec: ProcessSpec) -> tuple[str, float] | None:
    """The local-disk cache path and size (GB per rank), or None when LMCache would not use one.

    LMCache ignores ``local_disk`` unless ``max_local_disk_size`` is above zero (stack-facts)."""
    path = spec.env.get("LMCACHE_LOCAL_DISK")
    size, _ = float_env(spec, "LMCACHE_MAX_LOCAL_DISK_SIZE")
    if not spec.loads_lmcache or not path or not size:
        return None
    if path.startswith("file://"):
        path = unquote(urlsplit(path).path)
    return path, size


def remote_urls(plan: Plan) -> tuple[tuple[str, ProcessSpec], ...]:
    """Each distinct LMCACHE_REMOTE_URL with the first process that uses it."""
    found: dict[str, ProcessSpec] = {}
    for spec in lmcache_processes(plan):
        url = spec.env.get("LMCACHE_REMOTE_URL", "").strip()
        if url:
            found.setdefault(url, spec)
    return tuple(found.items())


def _host_port(text: str, default_port: int | None) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):  # [::1]:6379
        host, _, rest = text[1:].partition("]")
        port_text = rest.lstrip(":")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} has no port")
        return host, default_port
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return host, port


def parse_remote_url(url: str, env: dict[str, str] | None = None) -> tuple[RemoteTarget | None, str | None]:
    """A :class:`RemoteTarget` for ``url`` (comma lists of hosts allowed), or (None, why) when unparsable.

    ``urlsplit`` cannot read ``h1:p1,h2:p2`` netlocs, so the authority is split here by hand."""
    env = env or {}
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        return None, "is not a URL (expected scheme://host:port)"
    scheme = scheme.lower()
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    username = password = None
    if "@" in authority:
        userinfo, authority = authority.rsplit("@", 1)
        user, has_pw, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if has_pw else None)
    default = {"redis": 6379, "rediss": 6379, "redis-cluster": 6379, "redis-sentinel": 26379}.get(scheme)
    try:
        endpoints = tuple(_host_port(part, default) for part in authority.split(",") if part.strip())
    except ValueError as exc:
        return None, f"has a bad host:port ({exc})"
    if not endpoints and scheme != "mooncakestore":
        return None, "names no host"
    return RemoteTarget(url, scheme, endpoints, username, password, env.get("REDIS_SERVICE_NAME")), None


def planned_ports(plan: Plan) -> tuple[PlannedPort, ...]:
    ports = [
        PlannedPort(p.name, purpose, p.bind_host, port)
        for p in plan.processes
        for purpose, port in p.ports.items()
        if port
    ]
    dep = plan.deployment
    if dep.metrics_port:
        ports.append(PlannedPort("supervisor", "metrics", dep.metrics_host, dep.metrics_port))
    return tuple(ports)


def served_by_plan(plan: Plan, host: str, port: int) -> PlannedPort | None:
    """The planned port that will serve ``host:port`` (a Redis or lmcache_server the plan starts itself)."""
    for planned in planned_ports(plan):
        if planned.port == port and (planned.host == host or (is_local(host) and is_local(planned.host))):
            return planned
    return None


def kv_connectors(spec: ProcessSpec) -> tuple[str, ...]:
    """Every connector the process's --kv-transfer-config names, those nested in a PdConnector too,
    and its ``kv_connector_module_path`` (as ``module:<path>``)."""
    argv = list(spec.argv)
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--kv-transfer-config":
            try:
                config = json.loads(value)
            except ValueError:
                return ()
            return _connector_names(config)
    return ()


def _connector_names(config: object) -> tuple[str, ...]:
    if not isinstance(config, dict):
        return ()
    found = [str(config.get("kv_connector", ""))]
    if config.get("kv_connector_module_path"):
        found.append(f"module:{config['kv_connector_module_path']}")
    nested = (config.get("kv_connector_extra_config") or {}).get("connectors")
    for child in nested if isinstance(nested, list) else []:
        found.extend(_connector_names(child))
    return tuple(n for n in found if n)


def required_modules(plan: Plan, spec: ProcessSpec) -> tuple[str, ...]:
    """What must import in ``spec``'s interpreter: dynamo always; vllm, lmcache, kvbm and nixl as its
    connectors need (PdConnector lives in kvbm; every NIXL connector imports the nixl package)."""
    mods = ["dynamo"]
    if plan.deployment.engine == "vllm" and spec.role.is_worker:
        mods.append("vllm")
    if spec.loads_lmcache:
        mods.append("lmcache")
    if plan.deployment.engine == "vllm":
        names = kv_connectors(spec)
        if "PdConnector" in names or any(n.startswith("module:kvbm") for n in names):
            mods.append("kvbm")
        if any(n.startswith("Nixl") for n in names):
            mods.append("nixl")
    return tuple(mods)


def is_vllm_worker(spec: ProcessSpec) -> bool:
    """A ``python -m dynamo.vllm`` process: what the engine check asks the engines about."""
    return tuple(spec.argv[1:3]) == ("-m", "dynamo.vllm")


def engine_requests(plan: Plan) -> tuple[EngineRequest, ...]:
    """One request per worker interpreter, listing its ``dynamo.vllm`` processes as planned."""
    by_interpreter: dict[str, list[EngineProcess]] = {}
    for spec in plan.processes:
        if is_vllm_worker(spec):
            by_interpreter.setdefault(spec.argv[0], []).append(
                EngineProcess(spec.name, tuple(spec.argv), tuple(sorted(spec.env.items())), spec.cwd)
            )
    return tuple(EngineRequest(path, tuple(procs)) for path, procs in by_interpreter.items())


def dynamo_processes(plan: Plan) -> tuple[ProcessSpec, ...]:
    """The frontend and workers: the processes that run in the worker interpreter."""
    return tuple(p for p in plan.processes if p.role is Role.FRONTEND or p.role.is_worker)


def interpreter_requests(plan: Plan) -> tuple[InterpreterRequest, ...]:
    """One probe per distinct argv[0], asking for the union of what its processes import."""
    merged: dict[str, tuple[list[str], bool, ProcessSpec]] = {}
    for spec in dynamo_processes(plan):
        if not spec.argv:
            continue
        mods, native, first = merged.get(spec.argv[0], ([], False, spec))
        mods.extend(m for m in required_modules(plan, spec) if m not in mods)
        merged[spec.argv[0]] = (mods, native or spec.loads_lmcache, first)
    return tuple(
        InterpreterRequest(path, tuple(mods), native, tuple(sorted(first.env.items())), first.cwd)
        for path, (mods, native, first) in merged.items()
    )


def other_processes(plan: Plan) -> tuple[ProcessSpec, ...]:
    """Processes that are not Dynamo's (etcd, nats-server, custom commands): their binary is the software."""
    dynamo = dynamo_processes(plan)
    return tuple(p for p in plan.processes if p not in dynamo and p.argv)


def executable_requests(plan: Plan) -> tuple[ExecutableRequest, ...]:
    """Each such argv[0], with the PATH its child will search (the spec's own, else ours)."""
    return tuple(
        dict.fromkeys(
            ExecutableRequest(p.argv[0], p.env.get("PATH", os.environ.get("PATH", os.defpath)))
            for p in other_processes(plan)
        )
    )


def is_local_model(name: str) -> bool:
    """Local paths are absolute, ``~`` or ``./``; anything else (``org/name``) is an HF id."""
    return name.startswith(("/", "~", "."))


def model_request(plan: Plan) -> ModelRequest | None:
    name = plan.deployment.model
    if not name:
        return None
    env: dict[str, str] = {}
    for spec in dynamo_processes(plan):  # HF_* variables the workers will see decide the cache
        env.update({k: v for k, v in spec.env.items() if k.startswith(("HF_", "TRANSFORMERS_", "XDG_"))})
    return ModelRequest(name, is_local_model(name), tuple(sorted(env.items())))


def discovery_dir(plan: Plan) -> str | None:
    dep = plan.deployment
    if dep.discovery != "file":
        return None
    if dep.discovery_dir:
        return dep.discovery_dir
    return next((p.env["DYN_FILE_KV"] for p in plan.processes if p.env.get("DYN_FILE_KV")), None)


def etcd_endpoints(plan: Plan) -> tuple[str, ...]:
    """Endpoints to probe: none when discovery is not etcd or the plan starts etcd itself."""
    dep = plan.deployment
    if dep.discovery != "etcd" or any(p.role is Role.ETCD for p in plan.processes):
        return ()
    found = list(dep.etcd_endpoints)
    for spec in plan.processes:
        found.extend(e.strip() for e in spec.env.get("ETCD_ENDPOINTS", "").split(",") if e.strip())
    return tuple(dict.fromkeys(found))


def needs_gpus(plan: Plan) -> bool:
    """A process pinned to GPUs, or any vLLM worker (it needs at least one even when none is named)."""
    return any(p.gpus for p in plan.processes) or (
        plan.deployment.engine == "vllm" and any(p.role.is_worker for p in plan.processes)
    )


def facts_request(
    plan: Plan,
    lmcache_files: tuple[LMCacheFileFacts, ...] = (),
    *,
    network_timeout_s: float = 2.0,
    interpreter_timeout_s: float = 180.0,
) -> FactsRequest:
    """Exactly the probes ``plan`` needs, the settings in its LMCache config files (already read) included.

    The engines are asked about the plan as launched (LMCache folds its file in by itself)."""
    engines = engine_requests(plan)
    plan = as_lmcache_sees(plan, lmcache_files)
    paths = [d for d in (plan.deployment.state_dir, discovery_dir(plan)) if d]
    paths.extend(disk[0] for disk in map(local_disk, lmcache_processes(plan)) if disk)
    remotes = []
    for url, spec in remote_urls(plan):
        target, _ = parse_remote_url(url, dict(spec.env))
        if target and not any(served_by_plan(plan, h, p) for h, p in target.endpoints):
            remotes.append(target)
    return FactsRequest(
        gpus=needs_gpus(plan),
        paths=tuple(dict.fromkeys(paths)),
        ports=tuple(dict.fromkeys((p.host, p.port) for p in planned_ports(plan))),
        remotes=tuple(remotes),
        interpreters=interpreter_requests(plan),
        executables=executable_requests(plan),
        lmcache_files=lmcache_files,
        model=model_request(plan),
        etcd=etcd_endpoints(plan),
        # The head creates its own at `up`; a worker node must already hold the head's copy.
        credentials_file=plan.deployment.credentials_file if plan.deployment.node_role == "worker" else "",
        network_timeout_s=network_timeout_s,
        interpreter_timeout_s=interpreter_timeout_s,
        engines=engines,
    )
