"""Preflight for LMCache's own servers: locked-memory limit, /dev/shm, and what RAM their caches take.

Pure: judges the plan against :class:`HostFacts`. The RAM the servers hold (an L1, a Redis maxmemory)
is added to the workers' needs by ``check_host_memory`` through ``ProcessSpec.memory_gb``; this
module owns the two limits only LMCache's servers run into:

- RLIMIT_MEMLOCK: on a GPU host LMCache pins its CPU buffers (the multiprocess server's L1, an
  in-process worker's ``max_local_cpu_size``) so the GPU can copy from them; LMCache's own systemd unit
  sets ``LimitMEMLOCK=infinity``. A foreground ``up`` inherits the shell's limit (often 8 MiB), so it is
  judged against the largest buffer one process pins. Without a GPU, LMCache pins nothing (it logs
  "memory pinning ... not supported") and the limit does not matter.
- /dev/shm: only a multiprocess server given ``--shm-name`` (engine-driven transfers) maps its L1 there.
"""

from __future__ import annotations

from supervisor.host.facts import HostFacts
from supervisor.plan.spec import Plan, ProcessSpec, Role
from supervisor.preflight.findings import Finding, fail, gib, ok
from supervisor.preflight.needs import GIB, LMCACHE_DEFAULT_CPU_GB, float_env

MEMLOCK_HINT = (
    "raise it before `up` (`ulimit -l unlimited`, or memlock in /etc/security/limits.conf); the unit "
    "`lmcache-supervise systemd` writes sets LimitMEMLOCK=infinity"
)


def _size(n: int | None) -> str:
    if n is None:
        return "unlimited"
    return gib(n) if n >= GIB else f"{n / 2**20:g} MiB"


def uses_mp_server(spec: ProcessSpec) -> bool:
    """A worker whose LMCache is the multiprocess server's client: its CPU cache lives in the server."""
    return any("LMCacheMPConnector" in arg for arg in spec.argv)


def pinned_gb(spec: ProcessSpec) -> float:
    """The host memory one process asks LMCache to pin on a GPU host (GB)."""
    if spec.role is Role.LMCACHE_SERVER:
        return spec.memory_gb
    if spec.loads_lmcache and not uses_mp_server(spec):
        cpu, _ = float_env(spec, "LMCACHE_MAX_LOCAL_CPU_SIZE")
        return LMCACHE_DEFAULT_CPU_GB if cpu is None else cpu
    return 0.0


def check_memlock(plan: Plan, facts: HostFacts) -> list[Finding]:
    pinning = [(pinned_gb(spec), spec.name) for spec in plan.processes if pinned_gb(spec) > 0]
    if not pinning:
        return [ok("memlock", "no process pins LMCache buffers")]
    limit = facts.memory.memlock_bytes
    shown = _size(limit)
    if facts.gpus is None or not facts.gpus.gpus:  # no GPU asked for, or none found (the gpu check says so)
        return [ok("memlock", f"no GPU here: LMCache pins no memory (memlock limit {shown})")]
    need_gb, who = max(pinning)
    if limit is not None and limit < need_gb * GIB:
        return [
            fail(
                "memlock",
                f"the locked-memory limit (RLIMIT_MEMLOCK) is {shown}, but {who} pins {need_gb:g} GB of "
                "LMCache CPU buffer on a GPU host",
                MEMLOCK_HINT,
            )
        ]
    return [
        ok(
            "memlock",
            f"memlock limit {shown} covers the largest pinned LMCache buffer ({who}: {need_gb:g} GB)",
        )
    ]


def _shm_name(spec: ProcessSpec) -> str | None:
    argv = list(spec.argv)
    for i, arg in enumerate(argv):
        if arg == "--shm-name" and i + 1 < len(argv):
            return argv[i + 1] or None
        if arg.startswith("--shm-name="):
            return arg.split("=", 1)[1] or None
    return None


def check_shm(plan: Plan, facts: HostFacts) -> list[Finding]:
    users = [s for s in plan.processes if s.role is Role.LMCACHE_SERVER and _shm_name(s)]
    if not users:
        return [ok("shm", "no LMCache server maps its L1 into /dev/shm")]
    free = facts.memory.shm_free_bytes
    need = sum(s.memory_gb for s in users)
    who = ", ".join(s.name for s in users)
    if free is None:
        return [fail("shm", f"{who} uses --shm-name, but this host has no /dev/shm", "drop --shm-name")]
    if free < need * GIB:
        return [
            fail(
                "shm",
                f"{who} maps a {need:g} GB L1 into /dev/shm (--shm-name), but /dev/shm has {gib(free)} free",
                "enlarge /dev/shm (`mount -o remount,size=<N>G /dev/shm`; docker: --shm-size) or lower "
                "lmcache.server.l1_size_gb",
            )
        ]
    return [ok("shm", f"/dev/shm has {gib(free)} free for {who}'s {need:g} GB L1")]
