"""Preflight: judge a :class:`~supervisor.host.facts.HostFacts` snapshot against a plan, purely.

``check(plan, facts)`` does no IO: :func:`supervisor.host.facts.gather` took the facts (only those
:func:`facts_request` asked for), so every rule here is tested with hand-made facts. Each check yields
one or more :class:`Finding` rows (ok / warn / fail, one-line message, fix hint); ``--skip-check NAME``
turns that check's failures into warnings that say they were skipped. :func:`enforce` is what ``up``
calls: any remaining failure raises :class:`~supervisor.errors.PreflightError` (exit 3).

Each check lives with its kind: GPUs (``gpu``, ``gpu_health``), the cache (``cache``,
``cache_servers``), software (``software``, ``engines``); what a plan needs is read by ``needs``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from supervisor.errors import PreflightError, ProfileError
from supervisor.host.facts import HostFacts
from supervisor.plan.addresses import is_loopback
from supervisor.plan.spec import Plan, Role
from supervisor.preflight import cache_servers
from supervisor.preflight.cache import check_lmcache_config, check_remote_cache
from supervisor.preflight.engines import check_engine
from supervisor.preflight.findings import Finding, Status, fail, gib, names, ok, warn
from supervisor.preflight.gpu import check_gpu
from supervisor.preflight.gpu_health import check_gpu_health
from supervisor.preflight.needs import (
    GIB,
    HOST_MEMORY_MARGIN,
    LMCACHE_DEFAULT_CPU_GB,
    RUNTIME_RESERVE_DEFAULT_GB,
    RUNTIME_RESERVE_GB,
    as_lmcache_sees,
    discovery_dir,
    etcd_endpoints,
    facts_request,
    float_env,
    lmcache_file_requests,
    lmcache_processes,
    local_disk,
    planned_ports,
)
from supervisor.preflight.software import check_software

__all__ = ["CHECKS", "Finding", "Status", "check", "enforce", "facts_request", "lmcache_file_requests"]

X86 = ("x86_64", "amd64")
# The seed document's platform note, kept in its words so users can find it there.
SEED_PLATFORM_NOTE = (
    "LMCache integration currently only supports x86 architecture. ARM64 is not supported at this time"
)


def check_arch(plan: Plan, facts: HostFacts) -> list[Finding]:
    users = lmcache_processes(plan)
    if not users:
        return [ok("arch", f"{facts.arch}: no process loads LMCache, any architecture works")]
    if facts.arch.lower() in X86:
        return [ok("arch", f"{facts.arch}: LMCache's x86_64 requirement is met")]
    return [
        fail(
            "arch",
            f"{facts.arch} host, but {names(users)} load(s) LMCache: {SEED_PLATFORM_NOTE}",
            "run on an x86_64 host, or use a profile without LMCache (lmcache.enabled = false, "
            "e.g. disagg-nolmcache)",
        )
    ]


def check_host_memory(plan: Plan, facts: HostFacts) -> list[Finding]:
    reserve = RUNTIME_RESERVE_GB.get(plan.deployment.engine, RUNTIME_RESERVE_DEFAULT_GB)
    parts: list[str] = []
    need_gb = 0.0
    for spec in (p for p in plan.processes if p.role.is_worker):
        tp = spec.tensor_parallel_size
        need_gb += tp * reserve
        text = f"{spec.name}: {tp} x {reserve:g} GB runtime"
        if spec.loads_lmcache and not cache_servers.uses_mp_server(spec):
            # LMCache allocates its CPU buffer per tensor-parallel rank whatever local_cpu says (the buffer
            # also stages disk and remote transfers) and never caps it at free memory.
            cpu, problem = float_env(spec, "LMCACHE_MAX_LOCAL_CPU_SIZE")
            if problem:
                return [fail("host-memory", problem, "set lmcache.max_local_cpu_size to a number of GB")]
            cpu = LMCACHE_DEFAULT_CPU_GB if cpu is None else cpu
            need_gb += tp * cpu
            text += f" + {tp} x {cpu:g} GB LMCache CPU"
        parts.append(text)
    for spec in (p for p in plan.processes if not p.role.is_worker and p.memory_gb > 0):
        need_gb += spec.memory_gb  # an LMCache server's L1, a served Redis's maxmemory
        parts.append(
            f"{spec.name}: {spec.memory_gb:g} GB {'L1' if spec.role is Role.LMCACHE_SERVER else 'maxmemory'}"
        )
    if not parts:
        return [ok("host-memory", "no worker process in the plan")]
    need, margin = int(need_gb * GIB), int(HOST_MEMORY_MARGIN * facts.memory.total_bytes)
    available = facts.memory.available_bytes
    detail = (
        f"processes need {gib(need)} ({'; '.join(parts)}) plus a {HOST_MEMORY_MARGIN:.0%} margin "
        f"({gib(margin)})"
    )
    if need + margin > available:
        return [
            fail(
                "host-memory",
                f"{detail}, but only {gib(available)} is available",
                "lower lmcache.max_local_cpu_size (or lmcache.server.l1_size_gb) or tensor parallelism, "
                "or free memory: LMCache allocates it per rank at startup and the kernel OOM-kills the "
                "worker without a log line",
            )
        ]
    return [ok("host-memory", f"{detail}; {gib(available)} available")]


def check_disk(plan: Plan, facts: HostFacts) -> list[Finding]:
    out: list[Finding] = []
    state = facts.path(plan.deployment.state_dir)
    if state is not None and not state.writable:
        out.append(
            fail(
                "disk",
                f"state directory {plan.deployment.state_dir} is not writable: {state.problem}",
                "set LMCACHE_SUPERVISE_STATE_ROOT to a writable directory",
            )
        )
    wanted: dict[str, tuple[float, list[str]]] = {}  # path -> (GB over all ranks, processes)
    for spec in lmcache_processes(plan):
        disk = local_disk(spec)
        if disk:
            gb, users = wanted.get(disk[0], (0.0, []))
            wanted[disk[0]] = (gb + spec.tensor_parallel_size * disk[1], [*users, spec.name])
    fits = []
    for path, (gb, users) in wanted.items():
        found, who = facts.path(path), ", ".join(users)
        if found is None:
            out.append(warn("disk", f"local-disk cache {path} was not probed"))
        elif not found.writable:
            out.append(
                fail(
                    "disk",
                    f"local-disk cache {path} ({who}) is not writable: {found.problem}",
                    "point lmcache.local_disk at a writable directory",
                )
            )
        elif found.free_bytes is not None and found.free_bytes < gb * GIB:
            out.append(
                fail(
                    "disk",
                    f"local-disk cache {path} needs {gb:g} GB for {who} (all ranks), but "
                    f"{found.checked} has {gib(found.free_bytes)} free",
                    "lower lmcache.max_local_disk_size or choose a larger filesystem",
                )
            )
        else:
            fits.append(f"local-disk cache {path}: {gb:g} GB fits")
    return out or [ok("disk", "state directory writable; " + ("; ".join(fits) or "no local-disk cache"))]


def check_ports(plan: Plan, facts: HostFacts) -> list[Finding]:
    out: list[Finding] = []
    planned = planned_ports(plan)
    by_port: dict[int, list[str]] = defaultdict(list)
    for p in planned:
        by_port[p.port].append(f"{p.owner} {p.purpose}")
    out.extend(
        fail(
            "ports",
            f"port {port} is planned twice ({', '.join(owners)})",
            "give each process its own port (ports.base, system_port, supervisor.metrics_port)",
        )
        for port, owners in sorted(by_port.items())
        if len(owners) > 1
    )
    for p in planned:
        found = facts.port(p.host, p.port)
        what = f"port {p.port} ({p.owner} {p.purpose} on {p.host})"
        if found is None or found.free:
            continue
        if found.problem:
            out.append(
                fail(
                    "ports",
                    f"{what} cannot be bound: {found.problem}",
                    "bind to an address of this machine (ports.host, frontend.host)",
                )
            )
            continue
        owner = (
            f"pid {found.owner_pid} ({found.owner_name or 'unknown'})"
            if found.owner_pid
            else "a process this user cannot see (as root: ss -ltnp)"
        )
        out.append(
            fail(
                "ports",
                f"{what} is taken by {owner}",
                "stop that process or move the deployment, e.g. --set ports.base=<free base>",
            )
        )
    listed = ", ".join(str(p.port) for p in planned) or "none"
    return out or [ok("ports", f"all {len(planned)} planned ports are free ({listed})")]


def check_model(plan: Plan, facts: HostFacts) -> list[Finding]:
    model = facts.model
    if model is None:
        return [ok("model", "no model to check")]
    if model.local:
        if model.found:
            return [ok("model", f"{model.location} has config.json and a tokenizer")]
        return [
            fail(
                "model",
                f"model directory {model.location} lacks {', '.join(model.missing)}",
                "point model.name at a directory with the Hugging Face files (config.json, tokenizer.json)",
            )
        ]
    if model.found:
        return [ok("model", f"{model.name} is in the local HF cache ({model.location})")]
    searched = ", ".join(model.searched)
    if model.offline:
        return [
            fail(
                "model",
                f"{model.name} is not in the local HF cache ({searched}) and HF_HUB_OFFLINE=1 "
                "forbids downloading it",
                f"download it first (`hf download {model.name}`) or give model.name a local path",
            )
        ]
    return [
        warn(
            "model",
            f"{model.name} is not in the local HF cache ({searched}): the workers will download it at start",
            f"pre-download it (`hf download {model.name}`) so a start does not depend on the hub",
        )
    ]


def check_discovery(plan: Plan, facts: HostFacts) -> list[Finding]:
    dep = plan.deployment
    if dep.discovery == "file":
        path = discovery_dir(plan)
        found = facts.path(path) if path else None
        if path is None:
            return [
                fail(
                    "discovery",
                    "file discovery without a directory (DYN_FILE_KV)",
                    "set the state root so the plan can place the discovery directory",
                )
            ]
        if found is None:
            return [warn("discovery", f"discovery directory {path} was not probed")]
        if not found.writable:
            return [
                fail(
                    "discovery",
                    f"discovery directory {path} is not writable: {found.problem}",
                    "make it writable or move the state root (LMCACHE_SUPERVISE_STATE_ROOT)",
                )
            ]
        return [ok("discovery", f"file discovery in {path} (writable)")]
    if dep.discovery != "etcd":
        return [ok("discovery", f"discovery backend {dep.discovery}: nothing to check")]
    if any(p.role is Role.ETCD for p in plan.processes):
        return [ok("discovery", "etcd is started by this plan (its port is checked under ports)")]
    endpoints = etcd_endpoints(plan)
    if not endpoints:
        return [
            fail(
                "discovery", "discovery is etcd but no endpoint is configured", "set discovery.etcd_endpoints"
            )
        ]
    out = []
    for endpoint in endpoints:
        etcd = next((e for e in facts.etcd if e.endpoint == endpoint), None)
        if etcd is None:
            out.append(warn("discovery", f"etcd {endpoint} was not probed"))
        elif not etcd.healthy:
            out.append(
                fail(
                    "discovery",
                    f"etcd {endpoint}: {etcd.problem}",
                    'start etcd, or use discovery.backend = "file" for a single host',
                )
            )
    return out or [ok("discovery", f"etcd healthy at {', '.join(endpoints)}")]


def _cluster_servers(plan: Plan, facts: HostFacts) -> Finding:
    """etcd and nats-server started beyond loopback require the cluster credentials (Dynamo 1.6.1
    reads ETCD_AUTH_*, NATS_AUTH_*: host/credentials.py); a profile with ``discovery.insecure = true``
    leaves them open, said as a warning on every check/up of such a head, with what to do then."""
    exposed = [
        f"{spec.name} on {spec.bind_host}:{spec.ports.get('client', '?')}"
        for spec in plan.processes
        if spec.role in (Role.ETCD, Role.NATS) and not is_loopback(spec.bind_host)
    ]
    secret = plan.deployment.credentials_file
    if plan.deployment.node_role == "worker" and secret:
        if facts.credentials_problem:
            return fail(
                "transport",
                facts.credentials_problem,
                f"copy {Path(secret).name} from the head's state directory to {secret}, mode 0600",
            )
        return ok("transport", f"the head's cluster credentials are in {secret}")
    if not exposed:
        return ok("transport", "no cluster server (etcd, nats-server) listens beyond loopback")
    if secret:
        return ok(
            "transport",
            f"{' and '.join(exposed)} require the cluster credentials in "
            f"{plan.deployment.credentials_file} (copy it to each worker node's state directory)",
        )
    return warn(
        "transport",
        f"{' and '.join(exposed)} accept any client without authentication "
        "(discovery.insecure = true): a host on that network can register a worker or rewrite discovery",
        'allow only your nodes to reach these ports with a firewall rule (README, "Several machines"), '
        "or drop discovery.insecure to require credentials",
    )


def check_transport(plan: Plan, facts: HostFacts) -> list[Finding]:
    """The cluster servers' authentication, then the listeners that cannot authenticate and that the
    profile lets bind beyond loopback (plan/exposure.py): named, with the firewall rule, at every
    check and up."""
    found = [_cluster_servers(plan, facts)]
    listeners = plan.deployment.open_listeners
    if listeners:
        found.append(
            warn(
                "transport",
                f"{'; '.join(listeners)} accept any client without authentication "
                "(discovery.insecure_planes): a host that reaches them can send this deployment requests, "
                "events or engine commands",
                "allow only your nodes to reach these addresses with a firewall rule "
                '(README, "Several machines": nft ... ip saddr != <your nodes> drop)',
            )
        )
    return found


CHECKS: dict[str, Callable[[Plan, HostFacts], list[Finding]]] = {
    "arch": check_arch,
    "gpu": check_gpu,
    "gpu-health": check_gpu_health,
    "lmcache-config": check_lmcache_config,
    "host-memory": check_host_memory,
    "disk": check_disk,
    "ports": check_ports,
    "remote-cache": check_remote_cache,
    "memlock": cache_servers.check_memlock,
    "shm": cache_servers.check_shm,
    "software": check_software,
    "engine": check_engine,
    "model": check_model,
    "discovery": check_discovery,
    "transport": check_transport,
}


def check(plan: Plan, facts: HostFacts, *, skip: Iterable[str] = ()) -> list[Finding]:
    """Every check's findings, in :data:`CHECKS` order. Failures of a skipped check become warnings.

    The plan is judged as LMCache will see it, with its config files folded in (:func:`as_lmcache_sees`)."""
    skipped = set(skip)
    unknown = sorted(skipped - CHECKS.keys())
    if unknown:
        raise ProfileError("--skip-check", unknown[0], f"unknown check (choose from {', '.join(CHECKS)})")
    plan = as_lmcache_sees(plan, facts.lmcache_files)
    findings: list[Finding] = []
    for name, run in CHECKS.items():
        for found in run(plan, facts):
            if found.status is Status.FAIL and name in skipped:
                found = replace(
                    found, status=Status.WARN, message=f"skipped (--skip-check {name}): {found.message}"
                )
            findings.append(found)
    return findings


def enforce(findings: Sequence[Finding]) -> None:
    """Raise :class:`PreflightError` (exit 3) when any finding failed; warnings pass."""
    failed = [f for f in findings if f.status is Status.FAIL]
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise PreflightError(f"preflight failed: {failed[0].check}: {failed[0].message}{more}", failed)
