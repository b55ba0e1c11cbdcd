"""The engine tier's harness, shared by tests/engines/ and scripts/engines_drift.py: render profiles
for an engines venv, ask the engines about many plans in one probe run (importing vLLM costs ~10 s,
each further worker well under a second), and compare each answer with what the plan meant."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from supervisor.host.engines import EngineFacts, EngineRequest, ProcessVerdict, engine_facts
from supervisor.host.facts import HostFacts, MemoryFacts
from supervisor.plan import render as planmod
from supervisor.plan.spec import Plan, ProcessSpec
from supervisor.preflight.engines import check_engine, misread
from supervisor.preflight.findings import Finding
from supervisor.preflight.needs import engine_requests, is_vllm_worker, kv_connectors
from supervisor.profile import load as profiles

ROOT = Path(__file__).resolve().parents[1]
# A llama-style config.json (no weights): vLLM's engine-config validation reads only this file.
MODEL_DIR = str(ROOT / "profiles" / "demo-model")
VLLM_PROFILES = ("agg", "disagg", "agg-nolmcache", "disagg-nolmcache")
# The plans the tier must see read as planned: the built-ins, and each worker mode they do not cover
# (LMCache's multiprocess cache server: the workers' LMCacheMPConnector).
TIER_PLANS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{name: (name, ()) for name in VLLM_PROFILES},
    "agg-mp": ("agg", ("lmcache.server={l1_size_gb=0.5}",)),
}
STATE = Path("/tmp/lmcache-supervise-engine-tier")
# LMCACHE_* variables LMCache reads outside its config class, or not at all as a setting.
NOT_SETTINGS = ("LMCACHE_CONFIG_FILE",)


def render(name: str, python: str, overrides: Sequence[str] = ()) -> Plan:
    profile = profiles.load(name, overrides=tuple(overrides), model=MODEL_DIR)
    return planmod.render(profile, state_root=STATE, python=python)


def ask(plans: Mapping[str, Plan], python: str, timeout: float = 600) -> dict[str, EngineFacts]:
    """The engines' answer for every plan, from ONE probe run; keyed like ``plans``, process names as planned."""
    processes = []
    for key, plan in plans.items():
        for req in engine_requests(plan):
            assert req.interpreter == python, req.interpreter
            processes.extend(dataclasses.replace(p, name=f"{key}/{p.name}") for p in req.processes)
    facts = engine_facts(EngineRequest(python, tuple(processes)), cache=None, timeout=timeout)
    assert facts.problem is None, facts.problem
    out = {}
    for key in plans:
        mine = tuple(
            dataclasses.replace(p, name=p.name.split("/", 1)[1])
            for p in facts.processes
            if p.name.startswith(f"{key}/")
        )
        out[key] = dataclasses.replace(facts, processes=mine)
    return out


def judge(plan: Plan, facts: EngineFacts) -> list[Finding]:
    """The engine check itself, over these facts alone."""
    host = HostFacts(arch="x86_64", memory=MemoryFacts(0, 0), engines=(facts,))
    return check_engine(plan, host)


def disagreements(plan: Plan, facts: EngineFacts) -> list[str]:
    """Every way the engines' reading of ``plan`` differs from what the plan meant (empty: none)."""
    found: list[str] = []
    for spec in (p for p in plan.processes if is_vllm_worker(p)):
        verdict = facts.process(spec.name)
        if verdict is None:
            found.append(f"{spec.name}: no verdict")
            continue
        found.extend(f"{spec.name}: {why}" for why in _process_disagreements(spec, verdict, facts))
    return found


def _process_disagreements(spec: ProcessSpec, verdict: ProcessVerdict, facts: EngineFacts) -> list[str]:
    if verdict.crashed:
        return [f"probe crashed: {verdict.crashed}"]
    out = []
    if verdict.args is None or not verdict.args.ok:
        out.append(f"argv refused: {verdict.args and verdict.args.error}")
    elif verdict.mode != spec.role.value:
        out.append(f"parsed as disaggregation mode {verdict.mode}, planned as {spec.role.value}")
    planned = [n for n in kv_connectors(spec) if not n.startswith("module:")]
    resolved = [c.connector for c in verdict.connectors]
    if planned != resolved:
        out.append(f"connectors {resolved} resolved, {planned} planned")
    out.extend(
        f"{c.connector} does not load: {c.verdict.error}" for c in verdict.connectors if not c.verdict.ok
    )
    ec = verdict.engine_config
    if ec is None or not ec.ok or ec.skipped:
        out.append(f"engine config: {ec}")
    planned_vars = sorted(k for k in spec.env if k.startswith("LMCACHE_") and k not in NOT_SETTINGS)
    if planned_vars and (verdict.lmcache is None or not verdict.lmcache.ok):
        out.append(f"LMCache config not loaded: {verdict.lmcache}")
    read = {r.var: r for r in verdict.lmcache_reads}
    for var in planned_vars:
        if var in verdict.lmcache_ignored:
            out.append(f"{var} is ignored by LMCache {dict(facts.versions).get('lmcache')}")
        elif var not in read:
            out.append(f"{var} was not read")
        elif why := (misread(read[var]) if read[var].verdict.ok else read[var].verdict.error):
            out.append(f"{var}={spec.env[var]!r}: {why}")
    return out
