"""The engines' own verdict on the planned workers: :mod:`engine_probe` run in the worker interpreter.

The supervisor never imports vLLM, Dynamo or LMCache. It runs ``engine_probe.py`` (a standalone
script beside this module) as ``<worker python> engine_probe.py`` with the planned argv, env and cwd
of every vLLM worker on stdin, and reads back what Dynamo's parser, vLLM's connector registry and
LMCache's config loader made of them. Judging that answer is preflight's job (pure); this module only
runs the probe and records the answer as data, never raising for what it finds.

That run costs 10-25 s (importing vLLM, measured on a 2-core machine), so the answer is kept in the
probe cache (:mod:`supervisor.host.cache`, kind ``engines``), keyed by everything it depends on: the interpreter, the installed
versions of the engines (read by a run of the probe that imports none of them, ~0.1 s), the probe
itself, the requests (argv, env, cwd) and the bytes of the files the engines read (an
``LMCACHE_CONFIG_FILE``, the model's ``config.json``). Any change there is a new key: a stale verdict
cannot be served, and ``up`` after ``check`` pays only the 0.1 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.host.cache import ProbeCache

PROBE = Path(__file__).with_name("engine_probe.py")
MARKER = "@@lmcache-supervise-engine-probe@@"  # the same constant as in engine_probe.py
# Distributions whose versions key the cache and are named in findings.
PACKAGES = ("ai-dynamo", "vllm", "lmcache", "kvbm", "nixl", "torch")
VERSIONS_TIMEOUT_S = 30.0
# The variables the verdict can depend on, for the cache key (the rest of a shell's env, PWD or
# SSH_AUTH_SOCK, would only make every new shell miss the cache).
ENGINE_ENV_PREFIXES = (
    "LMCACHE_",
    "DYN_",
    "VLLM_",
    "HF_",
    "TRANSFORMERS_",
    "CUDA_",
    "NIXL_",
    "UCX_",
    "KVBM_",
    "REDIS_",
    "MOONCAKE_",
    "PYTHON",
    "DO_NOT_TRACK",
)


@dataclass(frozen=True)
class EngineProcess:
    """One planned process as the worker interpreter will see it."""

    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    cwd: str | None = None


@dataclass(frozen=True)
class EngineRequest:
    """Probe ``processes`` (all with argv[0] == ``interpreter``) inside ``interpreter``."""

    interpreter: str
    processes: tuple[EngineProcess, ...]

    def payload(self) -> dict[str, Any]:
        """What the probe reads on stdin: each process's env as its spawn builds it, ours under the
        plan's (engine.process.child_env), because the engines read variables a user exported too."""
        return {
            "packages": list(PACKAGES),
            "processes": [
                {"name": p.name, "argv": list(p.argv), "env": {**os.environ, **dict(p.env)}, "cwd": p.cwd}
                for p in self.processes
            ],
        }


@dataclass(frozen=True)
class Verdict:
    """``ok`` or ``error`` (one line); ``package``: the distribution whose absence caused it;
    ``flag``: the command-line flag argparse refused; ``skipped``: why this step did not run."""

    ok: bool
    error: str | None = None
    package: str | None = None
    flag: str | None = None
    skipped: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Verdict | None:
        if data is None:
            return None
        return cls(
            bool(data.get("ok")),
            data.get("error"),
            data.get("package"),
            data.get("flag"),
            data.get("skipped"),
        )


@dataclass(frozen=True)
class ConnectorVerdict:
    """A connector of the process's --kv-transfer-config; ``depth`` 1 is one nested in a PdConnector."""

    connector: str
    depth: int
    verdict: Verdict
    resolved: str | None = None  # the class vLLM's factory returned, module.qualname
    unread_extra: tuple[str, ...] = ()  # kv_connector_extra_config keys its code never names


@dataclass(frozen=True)
class LMCacheRead:
    """``var=text`` in the process's env, and the value LMCache read for config key ``key``."""

    var: str
    key: str
    text: str
    read: Any
    verdict: Verdict


@dataclass(frozen=True)
class ProcessVerdict:
    name: str
    skipped: str | None = None
    crashed: str | None = None
    args: Verdict | None = None
    mode: str | None = None  # the disaggregation mode Dynamo's parser resolved
    connectors: tuple[ConnectorVerdict, ...] = ()
    engine_config: Verdict | None = None
    lmcache: Verdict | None = None
    lmcache_source: str | None = None
    lmcache_reads: tuple[LMCacheRead, ...] = ()
    lmcache_ignored: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessVerdict:
        lm = data.get("lmcache") or {}
        return cls(
            name=str(data.get("name")),
            skipped=data.get("skipped"),
            crashed=data.get("crashed"),
            args=Verdict.from_json(data.get("args")),
            mode=(data.get("args") or {}).get("disaggregation_mode"),
            connectors=tuple(
                ConnectorVerdict(
                    c["connector"],
                    int(c.get("depth", 0)),
                    Verdict.from_json(c) or Verdict(False),
                    c.get("class"),
                    tuple(c.get("unread_extra") or ()),
                )
                for c in data.get("connectors", [])
            ),
            engine_config=Verdict.from_json(data.get("engine_config")),
            lmcache=Verdict.from_json(data["lmcache"]) if "lmcache" in data else None,
            lmcache_source=lm.get("source"),
            lmcache_reads=tuple(
                LMCacheRead(
                    var,
                    v.get("key", ""),
                    v.get("text", ""),
                    v.get("read"),
                    Verdict.from_json(v) or Verdict(False),
                )
                for var, v in sorted((lm.get("values") or {}).items())
            ),
            lmcache_ignored=tuple(lm.get("ignored") or ()),
        )


@dataclass(frozen=True)
class EngineFacts:
    """The probe's answer for one interpreter; ``problem`` is set when it could not run at all."""

    interpreter: str
    problem: str | None = None
    versions: tuple[tuple[str, str | None], ...] = ()
    device: str | None = None
    processes: tuple[ProcessVerdict, ...] = ()
    cached: bool = False
    seconds: float = 0.0

    def process(self, name: str) -> ProcessVerdict | None:
        return next((p for p in self.processes if p.name == name), None)

    def versions_text(self) -> str:
        """``ai-dynamo 1.6.1, vllm 0.31.0, ... nixl not installed``: what every finding names."""
        return ", ".join(f"{d} {v}" if v else f"{d} not installed" for d, v in self.versions)


def _run_probe(
    interpreter: str, payload: dict[str, Any], args: list[str], cwd: str | None, timeout: float
) -> tuple[dict[str, Any] | None, str | None]:
    """(answer, None), or (None, why the probe gave none)."""
    try:
        done = subprocess.run(
            [interpreter, str(PROBE), *args],
            input=json.dumps(payload),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            errors="replace",
        )
    except FileNotFoundError:
        return None, f"worker interpreter {interpreter} not found"
    except PermissionError:
        return None, f"worker interpreter {interpreter} is not executable"
    except subprocess.TimeoutExpired:
        return None, f"the engine probe in {interpreter} took longer than {timeout:.0f} s"
    except OSError as exc:
        return None, f"worker interpreter {interpreter} could not run: {exc.strerror or exc}"
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(MARKER)]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"the engine probe failed in {interpreter} (exit {done.returncode}: {tail})"
    return json.loads(lines[-1][len(MARKER) :]), None


def _file_digest(path: str | None, cwd: str | None) -> str | None:
    if not path:
        return None
    full = Path(cwd or ".", os.path.expanduser(path))
    try:
        return hashlib.sha256(full.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def _model_of(argv: tuple[str, ...]) -> str | None:
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--model":
            return value
        if flag.startswith("--model="):
            return flag.split("=", 1)[1]
    return None


def cache_key(req: EngineRequest, versions: dict[str, Any]) -> str:
    """Everything the verdict depends on, hashed (secrets in the env never reach the file name)."""
    files = {}
    for p in req.processes:
        env = dict(p.env)
        files[f"{p.name}:lmcache"] = _file_digest(env.get("LMCACHE_CONFIG_FILE"), p.cwd)
        model = _model_of(p.argv)
        files[f"{p.name}:model"] = _file_digest(os.path.join(model, "config.json"), p.cwd) if model else None
    processes = [
        {**p, "env": {k: v for k, v in p["env"].items() if k.startswith(ENGINE_ENV_PREFIXES)}}
        for p in req.payload()["processes"]
    ]
    material = {
        "probe": hashlib.sha256(PROBE.read_bytes()).hexdigest(),
        "interpreter": req.interpreter,
        "resolved": os.path.realpath(req.interpreter),
        "versions": versions,
        "processes": processes,
        "files": files,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def _from_answer(interpreter: str, answer: dict[str, Any], *, cached: bool, seconds: float) -> EngineFacts:
    versions = answer.get("versions") or {}
    return EngineFacts(
        interpreter=interpreter,
        versions=tuple((d, versions.get(d)) for d in PACKAGES),
        device=answer.get("device"),
        processes=tuple(ProcessVerdict.from_json(p) for p in answer.get("processes", [])),
        cached=cached,
        seconds=seconds,
    )


def engine_facts(req: EngineRequest, *, cache: ProbeCache | None, timeout: float) -> EngineFacts:
    """The probe's answer for ``req``: from ``cache`` when an answer for the same key is there, else a
    fresh run (then stored in ``cache``)."""
    start = time.monotonic()
    cwd = next((p.cwd for p in req.processes if p.cwd), None)
    payload = req.payload()
    head, problem = _run_probe(req.interpreter, payload, ["--versions"], cwd, VERSIONS_TIMEOUT_S)
    if head is None:
        return EngineFacts(req.interpreter, problem)
    key = {"engines": cache_key(req, head)}
    stored = cache.get(key) if cache is not None else None
    if isinstance(stored, dict):
        return _from_answer(req.interpreter, stored, cached=True, seconds=time.monotonic() - start)
    answer, problem = _run_probe(req.interpreter, payload, [], cwd, timeout)
    if answer is None:
        return EngineFacts(req.interpreter, problem, tuple((d, head["versions"].get(d)) for d in PACKAGES))
    if cache is not None:
        cache.put(key, answer, [req.interpreter, os.path.realpath(req.interpreter)])
    return _from_answer(req.interpreter, answer, cached=False, seconds=time.monotonic() - start)
