"""``render(profile) -> Plan``: the pure step from a validated profile to what will run.

No IO here: the same profile, state root and interpreter give the same plan, byte for byte. Every
port is derived from ``ports.base`` with fixed offsets so two deployments on one host differ by one
number, and every collision or out-of-range port is an error naming both owners.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from supervisor.errors import PlanError
from supervisor.plan import cache_servers, exposure
from supervisor.plan import infra as plan_infra
from supervisor.plan.addresses import http_url, url_host
from supervisor.plan.policies import STARTUP_BUDGET_S, probes, restart_policy
from supervisor.plan.spec import (
    Condition,
    Dependency,
    DeploymentSpec,
    HttpCheck,
    Plan,
    ProcessSpec,
    Role,
    SmokeRequest,
)
from supervisor.profile import lmcache, replicas
from supervisor.profile.schema import Profile, Worker

# Offsets from ports.base. 81/82 keep upstream's DYN_SYSTEM_PORT 8081/8082 for base 8000.
FRONTEND_OFFSET = 0
SYSTEM_OFFSET = 81
METRICS_OFFSET = 90
NIXL_OFFSET = 200
NIXL_BLOCK = 16  # NIXL side-channel ports per worker: vLLM adds the DP index (and rank) to the base
KV_EVENTS_OFFSET = 500
SYSTEM_PORT_MAX = 32767  # Dynamo parses DYN_SYSTEM_PORT as a signed 16-bit number

READY_TIMEOUT_S = {"vllm": 1800.0, "mocker": 60.0}
ROLE_ORDER = {"agg": 0, "decode": 0, "prefill": 1}
DEFAULT_MIGRATION_LIMIT = 3  # see migration_limit()


def _model_path(profile: Profile) -> str:
    """``~`` expanded; relative paths were anchored to their profile file by the loader."""
    name = profile.model.name
    if name.startswith("~"):
        return str(Path(name).expanduser())
    return name


class _Ports:
    """Hands out ports and refuses collisions, naming both claimants."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.owners: dict[int, str] = {}

    def claim(self, port: int, owner: str, key: str) -> int:
        if not 1 <= port <= 65535:
            raise PlanError(self.source, key, f"port {port} for {owner} is outside 1-65535; lower ports.base")
        if port in self.owners:
            raise PlanError(
                self.source, key, f"port {port} for {owner} is already used by {self.owners[port]}"
            )
        self.owners[port] = owner
        return port


def _ordered_workers(profile: Profile) -> list[tuple[str, Worker]]:
    return sorted(profile.workers.items(), key=lambda item: ROLE_ORDER[item[1].role])


@dataclass(frozen=True)
class _Replica:
    name: str
    group: str
    ordinal: int
    gpus: tuple[int, ...]


def _replicas(profile: Profile) -> list[tuple[_Replica, Worker]]:
    """Every worker replica in start order (role order, then table order, then replica number)."""
    out = []
    for group, worker in _ordered_workers(profile):
        names = replicas.replica_names(group, worker.replicas)
        gpus = replicas.replica_gpus(
            worker.gpus, replicas=worker.replicas, tensor_parallel_size=worker.tensor_parallel_size
        )
        out += [(_Replica(n, group, i, g), worker) for i, (n, g) in enumerate(zip(names, gpus))]
    return out


def migration_limit(profile: Profile) -> int:
    """``frontend.migration_limit``, or its default: 3 once any role has two or more workers.

    Why 3: a request in flight on a replica that dies moves once; during a rolling restart it may
    land on the next replica to restart and move again; one more covers an unplanned fault on top.
    More only multiplies the work a request that itself crashes workers can destroy. With one
    worker per role there is nowhere to move to, so the default is off (Dynamo's own default, 0).
    """
    if profile.frontend.migration_limit is not None:
        return profile.frontend.migration_limit
    per_role: dict[str, int] = {}
    for worker in profile.workers.values():
        per_role[worker.role] = per_role.get(worker.role, 0) + worker.replicas
    return DEFAULT_MIGRATION_LIMIT if any(n >= 2 for n in per_role.values()) else 0


def system_offset(index: int) -> int:
    """DYN_SYSTEM_PORT offset of the ``index``-th worker replica: 81..89, then 100..199 (90 is the
    supervisor's metrics port; 200 on are NIXL side channels)."""
    return SYSTEM_OFFSET + index if SYSTEM_OFFSET + index < METRICS_OFFSET else 100 + index


def render(
    profile: Profile,
    *,
    state_root: Path,
    python: str | None = None,
    node_role: plan_infra.NodeRole = "all",
    head: str | None = None,
    advertise: str | None = None,
    binaries: Mapping[str, str] | None = None,
) -> Plan:
    """The launch plan for ``profile``, with state under ``state_root/<name>``.

    ``node_role``: ``all`` runs everything here; ``head`` the infrastructure, the frontend and the
    workers placed on the head; ``worker`` the other workers, pointed at ``head``. ``advertise`` is
    the address other nodes reach this one at (see plan_infra). ``binaries`` maps bare infrastructure
    binary names to the paths the caller found for them (render itself looks at nothing).
    """
    python = profile.python or python or sys.executable
    state = state_root / profile.name
    src = profile.source
    base, host = profile.ports.base, profile.ports.host
    here = plan_infra.node(profile, node_role, head=head, advertise=advertise)
    ports = _Ports(src)
    model = _model_path(profile)
    served = profile.model.served_name or profile.model.name

    # Health stays local (ports.host); the planes other machines use bind the advertise address.
    common_env = {
        "DYN_TCP_RPC_HOST": here.plane_host,
        "DYN_EVENT_PLANE_HOST": here.plane_host,
        "DYN_TCP_RESPONSE_STREAM_HOST": here.plane_host,
        "DYN_SYSTEM_HOST": host,
    }
    discovery_dir = str(state / "discovery") if profile.discovery.backend == "file" else None
    secret = plan_infra.credentials_file(profile, here, state)  # the secrets join at spawn, not here
    common_env |= plan_infra.discovery_env(profile, here, discovery_dir)
    common_env |= profile.env
    infra = plan_infra.infra_processes(profile, here, state=state, claim=ports.claim, binaries=binaries or {})
    cache = cache_servers.cache_server_processes(
        profile, here, state=state, claim=ports.claim, binaries=binaries or {}
    )

    def paths(name: str) -> dict[str, Any]:
        return {
            "multiproc_dir": str(state / "prometheus" / name),
            "log_file": str(state / "logs" / f"{name}.log"),
        }

    fe = profile.frontend
    if here.runs_frontend:
        fe_port = ports.claim(fe.port or base + FRONTEND_OFFSET, "frontend.http", "frontend.port")
        fe_url = http_url(fe.host, fe_port)
    else:  # the head's frontend, for display: the gate on a worker node is its own workers' health
        fe_port = fe.port or base + FRONTEND_OFFSET
        fe_url = f"http://{url_host(here.head or '')}:{fe_port}"
    frontend = ProcessSpec(
        name="frontend",
        role=Role.FRONTEND,
        argv=(
            python,
            "-m",
            "dynamo.frontend",
            "--http-host",
            fe.host,
            "--http-port",
            str(fe_port),
            "--router-mode",
            fe.router_mode,
            *(("--migration-limit", str(limit)) if (limit := migration_limit(profile)) else ()),
            *fe.args,
        ),
        env={**common_env, **fe.env},
        credentials_file=secret,
        gpus=(),
        ports={"http": fe_port},
        depends_on=plan_infra.infra_dependencies(infra),
        probes=probes(
            fe.health,
            HttpCheck(url=f"{fe_url}/health", owned_port=fe_port),
            HttpCheck(url=f"{fe_url}/live", owned_port=fe_port),
            STARTUP_BUDGET_S["frontend"],
        ),
        restart=restart_policy(fe.restart),
        stop_signal=fe.stop_signal,
        stop_timeout_s=fe.stop_timeout_s,
        required=fe.required,
        bind_host=fe.host,
        **paths("frontend"),
    )

    metrics_port = None
    if profile.supervisor.metrics:
        metrics_port = ports.claim(
            profile.supervisor.metrics_port or base + METRICS_OFFSET,
            "supervisor.metrics",
            "supervisor.metrics_port",
        )

    processes = [*infra, *cache, frontend] if here.runs_frontend else [*cache]
    # Indices (and so ports) come from the whole profile: a worker has the same ports on any node.
    local = [(i, r, w) for i, (r, w) in enumerate(_replicas(profile)) if here.runs_worker(w.node)]
    decode_groups = {r.group: w.min_ready or 1 for _, r, w in local if w.role == "decode"}
    for index, replica, worker in local:
        processes.append(
            _worker(
                profile,
                replica,
                worker,
                index,
                python=python,
                model=model,
                served=served,
                ports=ports,
                common_env=common_env,
                paths=paths(replica.name),
                decode_groups=decode_groups,
                plane_host=here.plane_host,
                frontend=here.runs_frontend,
                cache_deps=cache_servers.cache_dependencies(cache),
                credentials_file=secret,
            )
        )

    sup = profile.supervisor
    deployment = DeploymentSpec(
        name=profile.name,
        profile=src,
        engine=profile.engine,
        model=model,
        served_model_name=served,
        state_dir=str(state),
        base_url=fe_url,
        # A worker node is ready when its own workers are: the model's readiness is the head's to judge.
        ready_url=f"{fe_url}/v1/models/{quote(served, safe='')}/ready" if here.runs_frontend else "",
        smoke=SmokeRequest(prompt=sup.smoke_prompt) if sup.smoke and here.runs_frontend else None,
        ready_timeout_s=sup.ready_timeout_s or READY_TIMEOUT_S[profile.engine],
        discovery=profile.discovery.backend,
        discovery_dir=discovery_dir,
        etcd_endpoints=plan_infra.etcd_endpoints(profile, here),
        python=python,
        metrics_host=sup.metrics_host,
        metrics_port=metrics_port,
        control_socket=str(state / "control.sock"),
        targets_file=str(state / "targets.json"),
        # With the multiprocess server, LMCache's settings are its command line, not the workers' env.
        lmcache=lmcache.lmcache_env(profile.lmcache)
        if profile.lmcache.enabled and profile.lmcache.server is None
        else {},
        node_role=here.role,
        on_role_failed=sup.on_role_failed,
        spare_gpus=tuple(profile.spare_gpus),
        head=here.head,
        advertise=here.advertise,
        credentials_file=secret,
        open_listeners=exposure.gate(profile, processes, one_machine=here.role == "all"),
    )
    return Plan(deployment=deployment, processes=tuple(processes))


def _worker(
    profile: Profile,
    replica: _Replica,
    worker: Worker,
    index: int,
    *,
    python: str,
    model: str,
    served: str,
    ports: _Ports,
    common_env: dict[str, str],
    paths: dict[str, Any],
    decode_groups: Mapping[str, int],
    plane_host: str,
    frontend: bool,
    cache_deps: tuple[Dependency, ...] = (),
    credentials_file: str = "",
) -> ProcessSpec:
    src, base, host = profile.source, profile.ports.base, profile.ports.host
    name, key = replica.name, f"workers.{replica.group}"
    if worker.system_port:
        system_port = worker.system_port + replica.ordinal
    else:
        system_port = base + system_offset(index)
    if system_port > SYSTEM_PORT_MAX:
        raise PlanError(
            src,
            f"{key}.system_port",
            f"DYN_SYSTEM_PORT {system_port} is above {SYSTEM_PORT_MAX} (Dynamo parses it as a signed "
            f"16-bit number and the worker fails to start); lower ports.base or set {key}.system_port",
        )
    port_map = {"system": ports.claim(system_port, f"{name}.system", f"{key}.system_port")}
    loads_lmcache = profile.engine == "vllm" and lmcache.worker_loads_lmcache(worker, profile.lmcache)
    env = dict(common_env)
    env["DYN_SYSTEM_PORT"] = str(system_port)
    # One seed for every worker: LMCache's chunk hashes must match across processes or hits are silently 0.
    env["PYTHONHASHSEED"] = str(profile.lmcache.hash_seed)

    if profile.engine == "vllm":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in replica.gpus)
        mp = cache_servers.mp_connector(profile)
        kv_config = lmcache.kv_transfer_config(worker.role, uses_lmcache=loads_lmcache, connector=mp)
        uses_nixl = "NixlConnector" in lmcache.kv_transfer_json(kv_config)
        argv = [
            python,
            "-m",
            "dynamo.vllm",
            "--model",
            model,
            "--served-model-name",
            served,
            "--disaggregation-mode",
            worker.role,
        ]
        if kv_config:
            argv += ["--kv-transfer-config", lmcache.kv_transfer_json(kv_config)]
        argv += [
            "--tensor-parallel-size",
            str(worker.tensor_parallel_size),
            "--gpu-memory-utilization",
            str(worker.gpu_memory_utilization),
        ]
        if worker.role != "agg":
            # Upstream: without it the decode worker hangs on the KV transfer.
            argv.append("--disable-hybrid-kv-cache-manager")
        if uses_nixl:
            if worker.tensor_parallel_size > NIXL_BLOCK:
                raise PlanError(
                    src,
                    f"{key}.tensor_parallel_size",
                    f"at most {NIXL_BLOCK} ranks fit one worker's NIXL port block",
                )
            nixl = ports.claim(base + NIXL_OFFSET + NIXL_BLOCK * index, f"{name}.nixl", "ports.base")
            for rank in range(1, NIXL_BLOCK):
                ports.claim(nixl + rank, f"{name}.nixl+{rank}", "ports.base")
            port_map["nixl"] = nixl
            # The peer worker may sit on another node: the side channel binds the plane address.
            env |= {"VLLM_NIXL_SIDE_CHANNEL_HOST": plane_host, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(nixl)}
        if profile.frontend.router_mode == "kv":
            kv_port = ports.claim(base + KV_EVENTS_OFFSET + index, f"{name}.kv_events", "ports.base")
            port_map["kv_events"] = kv_port
            argv += [
                "--kv-events-config",
                lmcache.kv_transfer_json(
                    {
                        "publisher": "zmq",
                        "topic": "kv-events",
                        "endpoint": f"tcp://{host}:{kv_port}",
                        "enable_kv_cache_events": True,
                    }
                ),
            ]
        if loads_lmcache and mp is None:  # with the MP server, LMCache's config is the server's
            env |= lmcache.lmcache_env(profile.lmcache)
        budget = STARTUP_BUDGET_S["vllm"]
    else:
        argv = [
            python,
            "-m",
            "dynamo.mocker",
            "--model-path",
            model,
            "--model-name",
            served,
            "--disaggregation-mode",
            worker.role,
        ]
        # No --bootstrap-ports: the mocker stands in for vLLM, whose prefill leg ends before the frontend
        # starts the decode leg. With the mocker's bootstrap rendezvous (SGLang's way) both legs run at
        # once under one request id, and Dynamo 1.6.1 fails requests when a prefill replica dies: the
        # migrated retry finds the first attempt's leg "already active" on a live replica, the frontend
        # takes that for a dead one and 503s everything for up to 5 s (docs/reliability.md).
        # The mocker registers no health payload: without this its /health stays 503 forever.
        env["DYN_SYSTEM_STARTING_HEALTH_STATUS"] = "ready"
        budget = STARTUP_BUDGET_S["mocker"]
    if worker.canary is not None:
        # Dynamo's runtime reads its config from DYN_* variables (figment), checked in the 1.6.1 wheel.
        env |= {
            "DYN_HEALTH_CHECK_ENABLED": "true",
            "DYN_CANARY_WAIT_TIME": str(worker.canary.wait_s),
            "DYN_HEALTH_CHECK_REQUEST_TIMEOUT": str(worker.canary.request_timeout_s),
        }
    argv += worker.args
    env |= worker.env

    url = http_url(host, system_port)
    ready = HttpCheck(url=f"{url}/health", json_field="status", json_value="ready", owned_port=system_port)
    live = HttpCheck(url=f"{url}/live", owned_port=system_port)
    # Only processes of this node can gate: a worker node has no frontend, a decode worker may be elsewhere.
    depends = [Dependency("frontend", Condition.STARTED)] if frontend else []
    if worker.role == "prefill":
        depends += [Dependency(g, Condition.HEALTHY, min_ready=n) for g, n in decode_groups.items()]
    if lmcache.worker_loads_lmcache(worker, profile.lmcache):  # the mocker too: it shows the order
        depends += cache_deps
    return ProcessSpec(
        name=name,
        role=Role(worker.role),
        argv=tuple(argv),
        env=env,
        gpus=replica.gpus,
        ports=port_map,
        depends_on=tuple(depends),
        probes=probes(worker.health, ready, live, budget),
        restart=restart_policy(worker.restart),
        stop_signal=worker.stop_signal,
        stop_timeout_s=worker.stop_timeout_s,
        required=worker.required,
        loads_lmcache=loads_lmcache,
        tensor_parallel_size=worker.tensor_parallel_size,
        gpu_memory_fraction=worker.gpu_memory_utilization if profile.engine == "vllm" else None,
        bind_host=host,
        group=replica.group,
        min_ready=worker.min_ready or 1,
        credentials_file=credentials_file,
        **paths,
    )
