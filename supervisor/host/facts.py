"""The only place preflight looks at the machine: one frozen :class:`HostFacts` snapshot per run.

:func:`gather` probes exactly what a :class:`FactsRequest` lists (``preflight.facts_request`` builds
one from a plan), so a mocker-only plan never touches NVML and a plan without a remote cache pings
nothing. Two boundaries are injectable because tests cannot have them for real here: NVML (see
:mod:`supervisor.host.gpu`) and the CPU architecture. Everything else is real: sockets, files,
subprocesses. No probe raises for what it finds; problems are recorded as data for preflight to judge.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import resource
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from supervisor.host import credentials, ports
from supervisor.host.cache import ProbeCache, cache_root
from supervisor.host.engines import EngineFacts, EngineRequest, engine_facts
from supervisor.host.gpu import GpuFacts, gpu_facts
from supervisor.host.redis import RemoteFacts, RemoteTarget, probe_remote
from supervisor.host.software import (
    ExecutableFacts,
    ExecutableRequest,
    InterpreterRequest,
    ModuleFacts,
    NativeFacts,
    SoftwareFacts,
    executable_facts,
    software_facts,
)

__all__ = [
    "EndpointFacts",
    "ExecutableFacts",
    "ExecutableRequest",
    "FactsRequest",
    "HostFacts",
    "InterpreterRequest",
    "LMCacheFileFacts",
    "MemoryFacts",
    "ModelFacts",
    "ModelRequest",
    "ModuleFacts",
    "NativeFacts",
    "PathFacts",
    "PortFacts",
    "RemoteFacts",
    "RemoteTarget",
    "SoftwareFacts",
    "gather",
    "hf_cache_dirs",
]


@dataclass(frozen=True)
class ModelRequest:
    """``name`` is a local directory when ``local``, else an HF id looked up in the HF cache (no network)."""

    name: str
    local: bool
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FactsRequest:
    """What to look at. Empty fields mean "not needed by this plan": nothing is probed for them."""

    gpus: bool = False
    paths: tuple[str, ...] = ()
    ports: tuple[tuple[str, int], ...] = ()
    remotes: tuple[RemoteTarget, ...] = ()
    interpreters: tuple[InterpreterRequest, ...] = ()
    executables: tuple[ExecutableRequest, ...] = ()
    # Read beforehand (read_lmcache_files): what they name decides what else is probed.
    lmcache_files: tuple[LMCacheFileFacts, ...] = ()
    model: ModelRequest | None = None
    etcd: tuple[str, ...] = ()
    # A worker node's copy of the head's cluster credentials (host/credentials.py), to be read.
    credentials_file: str = ""
    network_timeout_s: float = 2.0
    interpreter_timeout_s: float = 180.0
    # The vLLM workers, judged by the engines themselves (host.engines).
    engines: tuple[EngineRequest, ...] = ()
    # Trust the probe cache for interpreters whose packages did not change (``check --fresh``: probe again).
    cached: bool = True


@dataclass(frozen=True)
class LMCacheFileFacts:
    """An ``LMCACHE_CONFIG_FILE`` (``path`` as the env names it, relative to ``cwd``) as LMCache reads
    it: its top-level keys with scalar values as env text; ``problem`` when LMCache could not load it."""

    path: str
    cwd: str | None
    values: tuple[tuple[str, str], ...] = ()
    problem: str | None = None


@dataclass(frozen=True)
class MemoryFacts:
    """``memlock_bytes``: the soft RLIMIT_MEMLOCK the children inherit (None: unlimited);
    ``shm_free_bytes``: free space in /dev/shm (None: no /dev/shm)."""

    total_bytes: int
    available_bytes: int
    memlock_bytes: int | None = None
    shm_free_bytes: int | None = None


@dataclass(frozen=True)
class PathFacts:
    """``path`` need not exist: ``checked`` is the nearest existing ancestor, which it would be made in."""

    path: str
    checked: str
    writable: bool
    free_bytes: int | None
    problem: str | None = None


@dataclass(frozen=True)
class PortFacts:
    """``free``: a listener could bind ``host:port`` now. Owner fields are set when the OS shows them."""

    host: str
    port: int
    free: bool
    owner_pid: int | None = None
    owner_name: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class ModelFacts:
    name: str
    local: bool
    found: bool
    location: str | None
    missing: tuple[str, ...] = ()
    offline: bool = False
    searched: tuple[str, ...] = ()


@dataclass(frozen=True)
class EndpointFacts:
    endpoint: str
    healthy: bool
    problem: str | None = None


@dataclass(frozen=True)
class HostFacts:
    """Everything preflight judges, taken once. ``gpus`` is None when the plan needed no GPU."""

    arch: str
    memory: MemoryFacts
    gpus: GpuFacts | None = None
    paths: tuple[PathFacts, ...] = ()
    ports: tuple[PortFacts, ...] = ()
    remotes: tuple[RemoteFacts, ...] = ()
    software: tuple[SoftwareFacts, ...] = ()
    executables: tuple[ExecutableFacts, ...] = ()
    lmcache_files: tuple[LMCacheFileFacts, ...] = ()
    model: ModelFacts | None = None
    etcd: tuple[EndpointFacts, ...] = ()
    engines: tuple[EngineFacts, ...] = ()
    # Why the requested credentials file cannot be used (None: it can, or none was requested).
    credentials_problem: str | None = None

    def path(self, path: str) -> PathFacts | None:
        return next((p for p in self.paths if p.path == path), None)

    def port(self, host: str, port: int) -> PortFacts | None:
        return next((p for p in self.ports if (p.host, p.port) == (host, port)), None)

    def remote(self, url: str) -> RemoteFacts | None:
        return next((r for r in self.remotes if r.url == url), None)

    def interpreter(self, path: str) -> SoftwareFacts | None:
        return next((s for s in self.software if s.interpreter == path), None)

    def executable(self, name: str) -> ExecutableFacts | None:
        return next((e for e in self.executables if e.name == name), None)

    def engine(self, interpreter: str) -> EngineFacts | None:
        return next((e for e in self.engines if e.interpreter == interpreter), None)


# ------------------------------------------------------------------------------------------- probes


def memory_facts() -> MemoryFacts:
    vm = psutil.virtual_memory()
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    try:
        shm: int | None = shutil.disk_usage("/dev/shm").free
    except OSError:
        shm = None
    memlock = None if soft == resource.RLIM_INFINITY else int(soft)
    return MemoryFacts(int(vm.total), int(vm.available), memlock_bytes=memlock, shm_free_bytes=shm)


def path_facts(path: str) -> PathFacts:
    """Writability by really creating (and removing) a file: ``os.access`` says yes to root even where
    the filesystem refuses (procfs, read-only bind mounts)."""
    checked = Path(path).expanduser()
    while not checked.exists() and checked != checked.parent:
        checked = checked.parent
    if not checked.is_dir():
        return PathFacts(path, str(checked), False, None, f"{checked} exists and is not a directory")
    try:
        free: int | None = shutil.disk_usage(checked).free
    except OSError:
        free = None
    try:
        fd, probe = tempfile.mkstemp(prefix=".lmcache-supervise-check-", dir=checked)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return PathFacts(
            path, str(checked), False, free, f"cannot create a file in {checked} ({exc.strerror or exc})"
        )
    return PathFacts(path, str(checked), True, free)


def port_facts(host: str, port: int) -> PortFacts:
    """Try to bind as a server would (SO_REUSEADDR, so TIME_WAIT leftovers do not count as taken)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        return PortFacts(host, port, False, problem=f"cannot resolve bind address {host!r}: {exc}")
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(1)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            held = ports.holder(port, host=host)
            pid = held.pid if held else None
            return PortFacts(host, port, False, pid, ports.process_name(pid) if pid else None)
        if exc.errno == errno.EADDRNOTAVAIL:
            return PortFacts(host, port, False, problem=f"{host} is not an address of this machine")
        return PortFacts(host, port, False, problem=exc.strerror or str(exc))
    return PortFacts(host, port, True)


def _env(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return {**os.environ, **dict(pairs)}


def lmcache_file_facts(path: str, cwd: str | None) -> LMCacheFileFacts:
    """Load the file as LMCache 0.5.6 does (``yaml.safe_load``; JSON is YAML too)."""
    import yaml  # only plans that name a file pay for the import

    full = Path(cwd or os.getcwd(), path)  # an absolute path replaces the base
    try:
        data = yaml.safe_load(full.read_text(encoding="utf-8"))
    except OSError as exc:
        return LMCacheFileFacts(path, cwd, problem=f"cannot be read: {exc.strerror or exc}")
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        return LMCacheFileFacts(path, cwd, problem=f"is not valid YAML: {str(exc).splitlines()[0]}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        return LMCacheFileFacts(path, cwd, problem=f"holds a {kind}, not a mapping of LMCache keys")
    values = tuple(
        (str(key), ("true" if value else "false") if isinstance(value, bool) else str(value))
        for key, value in data.items()
        if isinstance(value, (str, int, float, bool))
    )
    return LMCacheFileFacts(path, cwd, values)


def read_lmcache_files(requests: tuple[tuple[str, str | None], ...]) -> tuple[LMCacheFileFacts, ...]:
    return tuple(lmcache_file_facts(path, cwd) for path, cwd in dict.fromkeys(requests))


def hf_cache_dirs(env: Mapping[str, str]) -> tuple[Path, ...]:
    """The hub cache huggingface_hub would use under ``env``: HF_HUB_CACHE, HF_HOME/hub, XDG, home."""
    if env.get("HF_HUB_CACHE"):
        return (Path(env["HF_HUB_CACHE"]).expanduser(),)
    if env.get("HF_HOME"):
        return (Path(env["HF_HOME"]).expanduser() / "hub",)
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path(env.get("HOME", str(Path.home()))) / ".cache"
    return (base / "huggingface" / "hub",)


_TRUE = ("1", "true", "yes", "on")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tekken.json")


def model_facts(req: ModelRequest) -> ModelFacts:
    env = _env(req.env)
    offline = (
        env.get("HF_HUB_OFFLINE", "").lower() in _TRUE or env.get("TRANSFORMERS_OFFLINE", "").lower() in _TRUE
    )
    if req.local:
        root = Path(req.name).expanduser()
        if not root.is_dir():
            return ModelFacts(req.name, True, False, str(root), ("the directory itself",), offline)
        missing = [] if (root / "config.json").is_file() else ["config.json"]
        if not any((root / f).is_file() for f in TOKENIZER_FILES) and not any(root.glob("*.tiktoken")):
            missing.append("a tokenizer (" + ", ".join(TOKENIZER_FILES) + ")")
        return ModelFacts(req.name, True, not missing, str(root), tuple(missing), offline)
    dirs = hf_cache_dirs(env)
    folder = "models--" + req.name.replace("/", "--")
    for hub in dirs:
        for snapshot in sorted((hub / folder / "snapshots").glob("*")):
            if (snapshot / "config.json").is_file():
                return ModelFacts(req.name, False, True, str(snapshot), (), offline, tuple(map(str, dirs)))
    return ModelFacts(req.name, False, False, None, (), offline, tuple(map(str, dirs)))


def etcd_facts(endpoint: str, timeout: float) -> EndpointFacts:
    """GET ``/health`` as etcd serves it: 200 with ``{"health": "true"}``."""
    import urllib.error  # here, not at the top: http.client and email cost every start ~20 ms
    import urllib.request

    base = endpoint if "://" in endpoint else f"http://{endpoint}"
    try:
        with urllib.request.urlopen(base.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
            body = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return EndpointFacts(endpoint, False, f"/health answered HTTP {exc.code}")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        return EndpointFacts(endpoint, False, f"/health did not answer: {reason}")
    if str(body.get("health")).lower() != "true":
        return EndpointFacts(
            endpoint, False, f"/health says {body.get('health')!r} ({body.get('reason', '')})"
        )
    return EndpointFacts(endpoint, True)


def gather(request: FactsRequest, *, nvml: Any | None = None, arch: str | None = None) -> HostFacts:
    """Probe what ``request`` lists. ``nvml`` (a pynvml-like object) and ``arch`` replace the real ones."""
    timeout = request.network_timeout_s
    cache = ProbeCache(cache_root(), "software", read=request.cached) if request.interpreters else None
    engines = ProbeCache(cache_root(), "engines", read=request.cached) if request.engines else None
    return HostFacts(
        arch=arch if arch is not None else platform.machine(),
        memory=memory_facts(),
        gpus=gpu_facts(nvml) if request.gpus else None,
        paths=tuple(path_facts(p) for p in dict.fromkeys(request.paths)),
        ports=tuple(port_facts(h, p) for h, p in dict.fromkeys(request.ports)),
        remotes=tuple(probe_remote(t, timeout) for t in dict.fromkeys(request.remotes)),
        software=tuple(software_facts(i, request.interpreter_timeout_s, cache) for i in request.interpreters),
        executables=tuple(executable_facts(e) for e in dict.fromkeys(request.executables)),
        lmcache_files=request.lmcache_files,
        model=model_facts(request.model) if request.model else None,
        etcd=tuple(etcd_facts(e, timeout) for e in dict.fromkeys(request.etcd)),
        engines=tuple(
            engine_facts(e, cache=engines, timeout=request.interpreter_timeout_s) for e in request.engines
        ),
        credentials_problem=credentials.problem(request.credentials_file)
        if request.credentials_file
        else None,
    )
