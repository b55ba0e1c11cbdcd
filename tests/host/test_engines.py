"""Running the engine probe for real in an interpreter, and its verdict cache.

This interpreter (the supervisor's venv) has ai-dynamo but no vLLM, so the probe answers fast and
says so; tests/engines/ runs the same probe in the engines venv against the released vLLM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from supervisor.host.cache import ProbeCache
from supervisor.host.engines import PACKAGES, EngineProcess, EngineRequest, engine_facts

ARGV = (sys.executable, "-m", "dynamo.vllm", "--model", "Qwen/Qwen3-0.6B")


def request(env: dict[str, str] | None = None, interpreter: str = sys.executable) -> EngineRequest:
    processes = (
        EngineProcess("frontend", (interpreter, "-m", "dynamo.frontend"), ()),
        EngineProcess("worker", (interpreter, *ARGV[1:]), tuple(sorted((env or {}).items()))),
    )
    return EngineRequest(interpreter, processes)


def test_the_probe_runs_in_the_interpreter_and_reports_versions_and_verdicts(tmp_path: Path) -> None:
    facts = engine_facts(request(), cache=None, timeout=60)
    assert facts.problem is None and not facts.cached
    versions = dict(facts.versions)
    assert tuple(versions) == PACKAGES and versions["ai-dynamo"] == "1.6.1" and versions["vllm"] is None
    frontend, worker = facts.processes
    assert frontend.skipped == "not a dynamo.vllm worker"
    assert worker.crashed is not None and "vllm" in worker.crashed


def test_verdicts_are_cached_by_what_they_depend_on(tmp_path: Path) -> None:
    cache = ProbeCache(tmp_path / "cache", "engines")
    first = engine_facts(request({"LMCACHE_CHUNK_SIZE": "256"}), cache=cache, timeout=60)
    again = engine_facts(request({"LMCACHE_CHUNK_SIZE": "256"}), cache=cache, timeout=60)
    assert not first.cached and again.cached and again.processes == first.processes
    (stored,) = (tmp_path / "cache" / "engines").iterdir()
    assert json.loads(stored.read_text())["value"]["processes"]
    changed = engine_facts(request({"LMCACHE_CHUNK_SIZE": "512"}), cache=cache, timeout=60)
    assert not changed.cached and len(list((tmp_path / "cache" / "engines").iterdir())) == 2
    fresh = engine_facts(
        request({"LMCACHE_CHUNK_SIZE": "256"}),
        cache=ProbeCache(cache.dir.parent, "engines", read=False),
        timeout=60,
    )
    assert not fresh.cached  # check --fresh


def test_a_missing_interpreter_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "python")
    facts = engine_facts(request(interpreter=missing), cache=None, timeout=60)
    assert facts.problem == f"worker interpreter {missing} not found" and facts.processes == ()


def test_the_gpu_extra_carries_ai_dynamos_own_requirements() -> None:
    """ai-dynamo goes in with --no-deps after the `gpu` extra: the extra must bring what it needs,
    the same list the supervisor's own venv installs from requirements/dynamo-cpu.txt."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    lines = (root / "requirements" / "dynamo-cpu.txt").read_text().splitlines()
    wanted = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert wanted and [w for w in wanted if w not in extra] == []
    assert "vllm[flashinfer,otel,runai]==0.31.0" in extra and "nixl[cu13]==1.4.1" in extra
