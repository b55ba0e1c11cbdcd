"""What software the plan's processes will find: the worker interpreter's modules, and the other binaries.

The interpreter probe runs a snippet INSIDE each worker interpreter, with the worker's env and cwd,
because that is what the worker will import: the supervisor never imports the engines itself. Other
processes (etcd, nats-server, custom commands) only need their executable to resolve the way the
spawn resolves it, on the PATH the child gets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from supervisor.host.cache import ProbeCache

# Where the JSON of the interpreter probe starts: imports (vLLM's above all) may print to stdout first.
_MARKER = "@@lmcache-supervise-software@@"
# Runs INSIDE the worker interpreter: the supervisor never imports the engines itself.
_SOFTWARE_PROBE = r"""
import importlib, importlib.metadata as md, json, sys
PREFERRED = {"dynamo": "ai-dynamo"}
dists = md.packages_distributions()
def version(mod):
    top = mod.split(".")[0]
    for dist in [PREFERRED.get(top)] + list(dists.get(top, [])):
        if dist:
            try:
                return md.version(dist)
            except md.PackageNotFoundError:
                pass
    return getattr(sys.modules.get(top), "__version__", None)
def attempt(mod):
    try:
        importlib.import_module(mod)
        return None
    except ModuleNotFoundError as exc:
        return "missing" if exc.name in (mod, mod.split(".")[0]) else f"ModuleNotFoundError: {exc}"
    except BaseException as exc:
        return f"{type(exc).__name__}: {exc}"
out = {"python": sys.version.split()[0], "modules": {}, "native": None}
for mod in [m for m in sys.argv[1].split(",") if m]:
    out["modules"][mod] = {"error": attempt(mod), "version": version(mod)}
if sys.argv[2] == "1" and out["modules"].get("lmcache", {}).get("error") is None:
    native = {"module": None, "error": "missing", "lmcache": version("lmcache"), "torch": version("torch")}
    # lmcache 0.5.x ships lmcache.cuda_ops; older wheels called it lmcache.c_ops.
    for mod in ("lmcache.cuda_ops", "lmcache.c_ops"):
        error = attempt(mod)
        if error != "missing":
            native.update(module=mod, error=error, torch=version("torch"))
            break
    out["native"] = native
# What the answer depends on, for the cache: every sys.path directory, each imported package's own
# directory (or module file), and the native ops' file.
import os
watch = [p for p in sys.path if p and os.path.isdir(p)]
for mod in list(out["modules"]) + ["lmcache.cuda_ops", "lmcache.c_ops"]:
    found = sys.modules.get(mod)
    path = getattr(found, "__file__", None)
    if path:
        watch.append(os.path.dirname(path) if path.endswith("__init__.py") else path)
out["watch"] = [os.path.abspath(p) for p in watch]
sys.stdout.write("\n" + sys.argv[3] + json.dumps(out) + "\n")
"""


@dataclass(frozen=True)
class InterpreterRequest:
    """Probe ``path`` (a worker's argv[0]) for ``modules``; ``native``: also LMCache's compiled ops."""

    path: str
    modules: tuple[str, ...]
    native: bool = False
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    cwd: str | None = None


@dataclass(frozen=True)
class ModuleFacts:
    """``error`` is None when the import worked, ``"missing"`` when not installed, else the exception."""

    name: str
    version: str | None
    error: str | None


@dataclass(frozen=True)
class NativeFacts:
    module: str | None
    error: str | None
    lmcache_version: str | None
    torch_version: str | None


@dataclass(frozen=True)
class SoftwareFacts:
    """The interpreter probe's result; ``problem`` is set when it could not run at all."""

    interpreter: str
    problem: str | None
    python: str | None = None
    modules: tuple[ModuleFacts, ...] = ()
    native: NativeFacts | None = None
    cached: bool = False  # from the probe cache: nothing the answer depends on changed since it was probed

    def module(self, name: str) -> ModuleFacts | None:
        return next((m for m in self.modules if m.name == name), None)


# Environment that changes what an interpreter imports (search paths, the user site, native libraries).
# Everything else in a worker's env (ports, directories, LMCACHE_* values) leaves the answer alone, so
# a second deployment on other ports reuses it.
IMPORT_ENV_PREFIXES = ("PYTHON", "LD_")
IMPORT_ENV = ("HOME", "CUDA_HOME", "VLLM_TARGET_DEVICE")


def cache_key(req: InterpreterRequest) -> dict[str, Any]:
    env = {**os.environ, **dict(req.env)}
    relevant = {k: v for k, v in sorted(env.items()) if k.startswith(IMPORT_ENV_PREFIXES) or k in IMPORT_ENV}
    return {
        "interpreter": req.path,
        "real": os.path.realpath(req.path),
        "modules": list(req.modules),
        "native": req.native,
        "env": relevant,
    }


def _shadowed(req: InterpreterRequest) -> bool:
    """Whether the worker's cwd (first on its sys.path) holds something named like a module it imports:
    the answer then depends on that directory, which the cache does not watch, so it is not cached."""
    cwd = req.cwd or os.getcwd()
    tops = {m.split(".")[0] for m in req.modules} | ({"lmcache"} if req.native else set())
    return any(
        os.path.exists(os.path.join(cwd, t)) or os.path.exists(os.path.join(cwd, t + ".py")) for t in tops
    )


def software_facts(req: InterpreterRequest, timeout: float, cache: ProbeCache | None = None) -> SoftwareFacts:
    """What the worker interpreter imports: from ``cache`` while nothing it depends on changed (see
    :mod:`supervisor.host.cache`), else by running the probe snippet in it with the worker's env and cwd."""
    use_cache = cache is not None and not _shadowed(req)
    if use_cache:
        assert cache is not None
        stored = cache.get(cache_key(req))
        if isinstance(stored, dict):
            return _facts(req, stored, cached=True)
    facts, data = _probe(req, timeout)
    if use_cache and data is not None and facts.problem is None:
        assert cache is not None
        watch = [*data.get("watch", []), req.path, os.path.realpath(req.path)]
        cache.put(cache_key(req), data, watch)
    return facts


def _probe(req: InterpreterRequest, timeout: float) -> tuple[SoftwareFacts, dict[str, Any] | None]:
    """Run the probe snippet in the worker interpreter, with the worker's env and cwd."""
    argv = [req.path, "-c", _SOFTWARE_PROBE, ",".join(req.modules), "1" if req.native else "0", _MARKER]
    try:
        done = subprocess.run(
            argv,
            env={**os.environ, **dict(req.env)},
            cwd=req.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            errors="replace",
        )
    except FileNotFoundError:
        return SoftwareFacts(req.path, f"worker interpreter {req.path} not found"), None
    except PermissionError:
        return SoftwareFacts(req.path, f"worker interpreter {req.path} is not executable"), None
    except subprocess.TimeoutExpired:
        return SoftwareFacts(
            req.path, f"the import probe in {req.path} took longer than {timeout:.0f} s"
        ), None
    except OSError as exc:
        return SoftwareFacts(
            req.path, f"worker interpreter {req.path} could not run: {exc.strerror or exc}"
        ), None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(_MARKER)]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return SoftwareFacts(
            req.path, f"{req.path} is not a working Python (exit {done.returncode}: {tail})"
        ), None
    data: dict[str, Any] = json.loads(lines[-1][len(_MARKER) :])
    return _facts(req, data, cached=False), data


def _facts(req: InterpreterRequest, data: dict[str, Any], *, cached: bool) -> SoftwareFacts:
    modules = tuple(
        ModuleFacts(name, m.get("version"), m.get("error")) for name, m in data["modules"].items()
    )
    native = data.get("native")
    return SoftwareFacts(
        req.path,
        None,
        data.get("python"),
        modules,
        NativeFacts(native["module"], native["error"], native["lmcache"], native["torch"])
        if native
        else None,
        cached=cached,
    )


@dataclass(frozen=True)
class ExecutableRequest:
    """Resolve ``name`` (a process's argv[0]) as the spawn will: a path as is, else on ``search_path``."""

    name: str
    search_path: str


@dataclass(frozen=True)
class ExecutableFacts:
    """``path`` is what ``name`` resolved to, or None with ``problem`` saying why not."""

    name: str
    path: str | None
    problem: str | None = None


def executable_facts(req: ExecutableRequest) -> ExecutableFacts:
    if "/" in req.name:
        if not os.path.isfile(req.name):
            return ExecutableFacts(req.name, None, f"{req.name} does not exist")
        if not os.access(req.name, os.X_OK):
            return ExecutableFacts(req.name, None, f"{req.name} is not executable")
        return ExecutableFacts(req.name, req.name)
    found = shutil.which(req.name, path=req.search_path)
    if found is None:
        return ExecutableFacts(req.name, None, f"{req.name} is not on the PATH the process gets")
    return ExecutableFacts(req.name, os.path.abspath(found))
