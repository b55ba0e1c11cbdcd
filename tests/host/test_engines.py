"""Running the engine probe for real in an interpreter, and its verdict cache.

This interpreter (the supervisor's venv) has ai-dynamo but no vLLM, so the probe answers fast and
says so; tests/engines/ runs the same probe in the engines venv against the released vLLM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from supervisor.host.engines import PACKAGES, EngineProcess, EngineRequest, engine_facts

ARGV = (sys.executable, "-m", "dynamo.vllm", "--model", "Qwen/Qwen3-0.6B")


def request(env: dict[str, str] | None = None, interpreter: str = sys.executable) -> EngineRequest:
    processes = (
        EngineProcess("frontend", (interpreter, "-m", "dynamo.frontend"), ()),
        EngineProcess("worker", (interpreter, *ARGV[1:]), tuple(sorted((env or {}).items()))),
    )
    return EngineRequest(interpreter, processes)


def test_the_probe_runs_in_the_interpreter_and_reports_versions_and_verdicts(tmp_path: Path) -> None:
    facts = engine_facts(request(), cache_dir=None, timeout=60)
    assert facts.problem is None and not facts.cached
    versions = dict(facts.versions)
    assert tuple(versions) == PACKAGES and versions["ai-dynamo"] == "1.6.1" and versions["vllm"] is None
    frontend, worker = facts.processes
    assert frontend.skipped == "not a dynamo.vllm worker"
    assert worker.crashed is not None and "vllm" in worker.crashed


def test_verdicts_are_cached_by_what_they_depend_on(tmp_path: Path) -> None:
    cache = tmp_path / "engine-verdicts"
    first = engine_facts(request({"LMCACHE_CHUNK_SIZE": "256"}), cache_dir=cache, timeout=60)
    again = engine_facts(request({"LMCACHE_CHUNK_SIZE": "256"}), cache_dir=cache, timeout=60)
    assert not first.cached and again.cached and again.processes == first.processes
    (stored,) = cache.iterdir()
    assert stored.stat().st_mode & 0o777 == 0o600 and json.loads(stored.read_text())["processes"]
    changed = engine_facts(request({"LMCACHE_CHUNK_SIZE": "512"}), cache_dir=cache, timeout=60)
    assert not changed.cached and len(list(cache.iterdir())) == 2


def test_a_missing_interpreter_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "python")
    facts = engine_facts(request(interpreter=missing), cache_dir=None, timeout=60)
    assert facts.problem == f"worker interpreter {missing} not found" and facts.processes == ()
