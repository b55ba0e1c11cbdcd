"""The ``engine`` check: what the installed Dynamo, vLLM, LMCache, kvbm and NIXL made of the plan (pure).

:mod:`supervisor.host.engines` asked the engines themselves, in the worker interpreter; this module
judges their answer against what the profile meant. It fails on what would fail or misbehave at
start: a flag the installed parser refuses, a connector that cannot be imported (a missing ``nixl``
or ``kvbm``), an LMCache config that does not load, and an ``LMCACHE_*`` value LMCache reads
differently from what the plan wrote (LMCache never rejects a value: it misreads it silently). Every
message names the process, the flag, connector or variable, and the installed versions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from supervisor.host.engines import EngineFacts, LMCacheRead, ProcessVerdict
from supervisor.host.facts import HostFacts
from supervisor.plan.spec import Plan
from supervisor.preflight.findings import Finding, Status, fail, ok, warn
from supervisor.preflight.needs import engine_requests

CHECK = "engine"
# How to install what a finding names: the set in requirements/engines.txt (scripts/engines-venv.sh).
INSTALL = {
    "nixl": "pip install 'nixl[cu13]==1.4.1'",
    "kvbm": "pip install --no-deps kvbm==1.6.1",
    "lmcache": "pip install lmcache==0.5.6",
    "vllm": "pip install 'vllm[flashinfer,otel,runai]==0.31.0'",
    "ai-dynamo": "pip install --no-deps ai-dynamo==1.6.1 (after requirements/dynamo-cpu.txt)",
}
TRUE_TEXTS, FALSE_TEXTS = ("true", "1"), ("false", "0")


def _meant_bool(text: str) -> bool | None:
    low = text.strip().lower()
    return True if low in TRUE_TEXTS else False if low in FALSE_TEXTS else None


def _as_float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def misread(read: LMCacheRead) -> str | None:
    """How LMCache's reading of ``var=text`` differs from what the text means, or None when it agrees.

    The meaning of a text is the plan's: true/1 and false/0 for booleans, a number for numbers, the
    path without ``file://`` for ``local_disk``, comma lists for lists, JSON for objects."""
    text, value = read.text.strip(), read.read
    if read.var == "LMCACHE_LOG_LEVEL":
        return None if value == text.upper() else f"LMCache logs at {value}"
    if read.var == "LMCACHE_TRACK_USAGE":  # read: whether usage tracking stays on
        meant_on = _meant_bool(text)
        if meant_on is None or value != meant_on:
            return f"LMCache reads it as usage tracking {'on' if value else 'off'}"
        return None
    if value is None:
        return None if text.lower() in ("", "none", "null") else "LMCache read it as unset (None)"
    if isinstance(value, bool):
        meant = _meant_bool(text)
        return None if meant is value else f"LMCache reads it as {str(value).lower()}"
    if isinstance(value, (int, float)):
        return None if _as_float(text) == float(value) else f"LMCache reads it as {value}"
    if isinstance(value, list):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        same = len(parts) == len(value) and all(
            str(p) == str(v) or (_as_float(p) is not None and _as_float(p) == _as_float(v))
            for p, v in zip(parts, value, strict=True)
        )
        return None if same else f"LMCache reads it as {value}"
    if isinstance(value, dict):
        try:
            return None if json.loads(text) == value else f"LMCache reads it as {value}"
        except ValueError:
            return f"LMCache reads it as {value}"
    if read.key == "local_disk":
        text = ",".join(p.strip().removeprefix("file://") for p in text.split(",") if p.strip())
    return None if text == str(value) else f"LMCache reads it as {value!r}"


def _process_findings(verdict: ProcessVerdict, facts: EngineFacts) -> list[Finding]:
    name, versions = verdict.name, facts.versions_text()
    found: list[Finding] = []
    if verdict.crashed:
        return [
            fail(
                CHECK,
                f"{name}: the engines could not judge it in {facts.interpreter}: {verdict.crashed} "
                f"({versions})",
            )
        ]
    if verdict.args is not None and not verdict.args.ok:
        what = verdict.args.flag or "its arguments"
        found.append(
            fail(
                CHECK,
                f"{name}: {what} refused by Dynamo's vLLM argument parsing: {verdict.args.error} "
                f"({versions})",
                f"see `{facts.interpreter} -m dynamo.vllm --help` for the flags this version knows",
            )
        )
    for conn in verdict.connectors:
        for key in conn.unread_extra:
            found.append(
                warn(
                    CHECK,
                    f"{name}: {conn.connector} never reads kv_connector_extra_config key {key!r}; it is "
                    f"ignored ({versions})",
                )
            )
        if conn.verdict.ok:
            continue
        package = conn.verdict.package
        if package:
            found.append(
                fail(
                    CHECK,
                    f"{name}: {conn.connector} cannot load: {package} is not importable in "
                    f"{facts.interpreter} ({conn.verdict.error}; {versions})",
                    f"{INSTALL.get(package, f'install {package}')} into that interpreter",
                )
            )
        else:
            found.append(fail(CHECK, f"{name}: {conn.connector} refused: {conn.verdict.error} ({versions})"))
    ec = verdict.engine_config
    if ec is not None and not ec.ok:
        message = f"{name}: vLLM's engine config validation refused it: {ec.error} ({versions})"
        if facts.device == "cpu":  # vLLM judged it as its CPU platform would: not what a GPU server says
            found.append(warn(CHECK, message + "; judged on vLLM's CPU platform (no GPU here)"))
        else:
            found.append(fail(CHECK, message))
    if verdict.lmcache is not None and not verdict.lmcache.ok:
        found.append(
            fail(CHECK, f"{name}: LMCache cannot load its config: {verdict.lmcache.error} ({versions})")
        )
    for read in verdict.lmcache_reads:
        why = misread(read) if read.verdict.ok else read.verdict.error
        if why:
            found.append(
                fail(
                    CHECK,
                    f"{name}: {read.var}={read.text!r} is not read as meant: {why} ({versions})",
                    "write booleans as true/false, sizes as plain GB numbers",
                )
            )
    for var in verdict.lmcache_ignored:
        found.append(warn(CHECK, f"{name}: {var} is not a setting LMCache reads; it is ignored ({versions})"))
    return found


def _summary(facts: EngineFacts, judged: Sequence[ProcessVerdict]) -> str:
    parts = []
    for verdict in judged:
        chain = "+".join(c.connector for c in verdict.connectors) or "no connector"
        reads = (
            f", {len(verdict.lmcache_reads)} LMCache settings read as meant" if verdict.lmcache_reads else ""
        )
        parts.append(f"{verdict.name} ({chain}{reads})")
    how = "cached verdict" if facts.cached else f"asked in {facts.seconds:.0f} s"
    skipped = next(
        (v.engine_config.skipped for v in judged if v.engine_config and v.engine_config.skipped), None
    )
    model = f"; vLLM's engine-config validation not run ({skipped})" if skipped else ""
    return f"the installed engines accept {'; '.join(parts)} [{facts.versions_text()}; {how}]{model}"


def check_engine(plan: Plan, facts: HostFacts) -> list[Finding]:
    """Findings for every vLLM worker. An interpreter where the software check found dynamo or vllm
    missing is not judged a second time."""
    requests = engine_requests(plan)
    if not requests:
        return [ok(CHECK, "no vLLM workers: nothing for the engines to judge")]
    found: list[Finding] = []
    for req in requests:
        software = facts.interpreter(req.interpreter)
        missing = [
            m.name for m in (software.modules if software else ()) if m.name in ("dynamo", "vllm") and m.error
        ]
        if software is not None and (software.problem or missing):
            found.append(
                warn(
                    CHECK,
                    f"not judged in {req.interpreter}: "
                    f"{software.problem or ', '.join(missing) + ' does not import there'} "
                    "(see the software check)",
                )
            )
            continue
        engines = facts.engine(req.interpreter)
        if engines is None:
            found.append(warn(CHECK, f"{req.interpreter} was not probed"))
            continue
        if engines.problem:
            found.append(fail(CHECK, f"{', '.join(p.name for p in req.processes)}: {engines.problem}"))
            continue
        verdicts = [
            engines.process(p.name) or ProcessVerdict(p.name, crashed="no verdict returned")
            for p in req.processes
        ]
        bad = [f for v in verdicts for f in _process_findings(v, engines)]
        found.extend(bad)
        if not any(f.status is Status.FAIL for f in bad):
            found.append(ok(CHECK, _summary(engines, verdicts)))
    return found
