"""Ask the released engines themselves whether they accept a planned worker. Runs INSIDE the worker
interpreter, as a script: ``<worker python> engine_probe.py < request.json``. It imports nothing of
the supervisor (the supervisor never imports the engines; this file is the boundary), only the
standard library until it reaches the engines.

For each planned ``python -m dynamo.vllm`` process, with that process's env and cwd:

1. Dynamo 1.6.1's own argument handling, ``dynamo.vllm.args.parse_args``: its Dynamo parsers, vLLM's
   ``FlexibleArgumentParser``, ``AsyncEngineArgs.from_cli_args``, ``Config.validate``,
   ``cross_validate_config`` and the engine-config updates. It starts no engine and loads no weights.
   An unknown flag ends in argparse's exit 2, caught here with its message.
2. Each ``--kv-transfer-config`` connector (the parsed ``KVTransferConfig``) through vLLM's
   ``KVConnectorFactory.get_connector_class`` (its registry, or ``kv_connector_module_path``), then
   what that connector imports only once constructed (NIXL's agent, LMCache's vLLM adapter), and the
   connectors nested in a ``PdConnector``, with kvbm's rules for them. Import only.
3. LMCache's config loading as its vLLM adapter does it (``lmcache_get_or_create_config``: the
   ``LMCACHE_CONFIG_FILE`` then the env on top, else the env alone, then ``validate``), and what it
   read for every ``LMCACHE_*`` the process sets; ``LMCACHE_TRACK_USAGE`` and ``LMCACHE_LOG_LEVEL``
   through the functions that read them (they are not config keys).

``--versions``: only the installed versions of ``packages``, without importing any engine.

Request (stdin, JSON): ``{"processes": [{"name", "argv", "env", "cwd"}], "packages": [...]}``.
Answer: one line on stdout starting with :data:`MARKER` (vLLM may print before it), then JSON:
``{"python", "versions": {package: version|null}, "device", "processes": [...]}``; each process has
``args``, ``connectors`` and ``lmcache`` verdicts, each with ``ok`` and, when not ok, ``error`` (one
line) and ``package`` (the missing distribution, when an import failed for want of one).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import io
import json
import os
import re
import sys
import traceback
from collections.abc import Iterator
from typing import Any

MARKER = "@@lmcache-supervise-engine-probe@@"
DYNAMO_VLLM = "dynamo.vllm"
# The top-level module of each distribution a worker imports: a ModuleNotFoundError names the module,
# the finding should name what to install.
DISTRIBUTIONS = {
    "dynamo": "ai-dynamo",
    "nixl": "nixl",
    "kvbm": "kvbm",
    "lmcache": "lmcache",
    "vllm": "vllm",
    "torch": "torch",
}
# What a connector imports only in its constructor, past what resolving its class imports.
# Read in vLLM 0.31/0.32: NixlConnector's worker loads ``nixl._api.nixl_agent`` through
# ``vllm.distributed.nixl_utils``; LMCacheConnectorV1.__init__ imports LMCache's adapter.
NIXL_CONNECTORS = frozenset({"NixlConnector", "NixlPullConnector", "NixlPushConnector"})
LMCACHE_ADAPTER = "lmcache.integration.vllm.vllm_v1_adapter"
# LMCACHE_* variables LMCache reads outside its config class, and the function that reads each.
ENV_ONLY_READERS = {
    "LMCACHE_TRACK_USAGE": ("lmcache.usage_telemetry.identity", "is_usage_tracking_enabled"),
    "LMCACHE_LOG_LEVEL": ("lmcache.logging", "get_log_level"),
}
ENV_ONLY_NAMES = frozenset({"LMCACHE_CONFIG_FILE", "LMCACHE_DISABLE_BANNER", *ENV_ONLY_READERS})


def one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure(exc: BaseException) -> dict[str, Any]:
    """A verdict for ``exc``: its one-line message and, for a missing module, the distribution."""
    verdict: dict[str, Any] = {"ok": False, "error": one_line(f"{type(exc).__name__}: {exc}")}
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if missing:
        verdict["package"] = DISTRIBUTIONS.get(missing.split(".")[0], missing.split(".")[0])
    return verdict


def version_of(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


@contextlib.contextmanager
def process_environment(env: dict[str, str], cwd: str | None) -> Iterator[None]:
    """The process's own env and cwd for the duration: Dynamo's parsers read DYN_* defaults from the
    env, LMCache reads LMCACHE_*, and a relative LMCACHE_CONFIG_FILE is relative to the cwd."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    if cwd:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)


def parse_worker_args(argv: list[str]) -> tuple[dict[str, Any], Any]:
    """Dynamo's own parse + validation of ``argv`` (the part after ``-m dynamo.vllm``)."""
    from dynamo.vllm import args as dynamo_args

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            config = dynamo_args.parse_args(argv)
    except SystemExit as exc:  # argparse: an unknown flag or a bad value
        lines = [ln for ln in stderr.getvalue().splitlines() if ln.strip()]
        message = next((ln for ln in reversed(lines) if "error:" in ln), lines[-1] if lines else "")
        message = message.split("error:", 1)[-1].strip() or f"argument parsing exited {exc.code}"
        verdict = {"ok": False, "error": one_line(message), "exit_code": exc.code}
        flags = re.findall(r"(?<![\w-])(--?[A-Za-z][\w.-]*)", message)
        if flags:
            verdict["flag"] = flags[0]
        return verdict, None
    except Exception as exc:  # Dynamo's and vLLM's validation raise ValueError/TypeError and the like
        return failure(exc), None
    engine = config.engine_args
    return {
        "ok": True,
        "disaggregation_mode": str(getattr(config.disaggregation_mode, "value", config.disaggregation_mode)),
        "component": config.component,
        "model": config.model,
    }, engine


def planned_kv_transfer_config(argv: list[str], engine: Any) -> Any:
    """The parsed KVTransferConfig; when the arguments as a whole were refused, the one the argv
    names, so that a refused flag does not hide a connector that cannot load."""
    if engine is not None:
        return getattr(engine, "kv_transfer_config", None)
    from vllm.config import KVTransferConfig

    for flag, value in zip(argv, argv[1:]):
        if flag == "--kv-transfer-config":
            try:
                return KVTransferConfig(**json.loads(value))
            except Exception:
                return None
    return None


def model_config_dir(model: str) -> str | None:
    """Where the model's config.json is without the network: a local directory, or the HF cache."""
    path = os.path.expanduser(model)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json")
    except Exception:
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def engine_config(engine: Any) -> dict[str, Any]:
    """vLLM's own engine-config validation (model config, parallelism, cache, KV transfer), which
    reads the model's config.json and nothing else of the model. Skipped when that file is not on
    this machine: the probe never downloads."""
    if model_config_dir(engine.model) is None:
        return {"ok": True, "skipped": f"{engine.model}: config.json is not on this machine"}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = engine.create_engine_config()
    except Exception as exc:
        return failure(exc)
    return {
        "ok": True,
        "max_model_len": config.model_config.max_model_len,
        "device": str(config.device_config.device),
    }


def runtime_imports(name: str, extra: dict[str, Any]) -> dict[str, Any] | None:
    """Import what connector ``name`` imports when constructed; a failure verdict, or None when fine."""
    if name in NIXL_CONNECTORS:
        from vllm.distributed import nixl_utils

        if nixl_utils.NixlWrapper is None:  # vLLM's own loader found no NIXL agent
            try:
                module = importlib.import_module("nixl._api")
            except ImportError as exc:
                return failure(exc)
            if getattr(module, "nixl_agent", None) is None:
                return {"ok": False, "error": "nixl._api has no nixl_agent", "package": "nixl"}
    if name == "LMCacheConnectorV1" and not extra.get("use_native", False):
        try:
            importlib.import_module(LMCACHE_ADAPTER)
        except ImportError as exc:
            return failure(exc)
    return None


def unread_extra_keys(cls: Any, extra: dict[str, Any]) -> list[str]:
    """``kv_connector_extra_config`` keys that no module of the connector's class hierarchy names as a
    string literal: the connector never reads them (vLLM ignores unknown keys, so a misspelt
    ``lmcache.mp.port`` would silently leave the default)."""
    import inspect

    sources = []
    for klass in cls.__mro__:
        try:
            sources.append(inspect.getsource(sys.modules[klass.__module__]))
        except (KeyError, TypeError, OSError):
            continue
    text = "\n".join(sources)
    return [k for k in extra if f'"{k}"' not in text and f"'{k}'" not in text]


def resolve_connector(config: Any, depth: int = 0) -> list[dict[str, Any]]:
    """``config`` (a KVTransferConfig) resolved the way vLLM creates it, then its nested connectors."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    name = config.kv_connector
    entry: dict[str, Any] = {
        "connector": name,
        "depth": depth,
        "ok": True,
        "module_path": config.kv_connector_module_path,
    }
    extra = dict(config.kv_connector_extra_config or {})
    try:
        cls = KVConnectorFactory.get_connector_class(config)
    except Exception as exc:
        entry.update(failure(exc))
        return [entry]
    entry["class"] = f"{cls.__module__}.{cls.__qualname__}"
    entry["unread_extra"] = unread_extra_keys(cls, extra)
    problem = runtime_imports(name, extra)
    if problem:
        entry.update(problem)
    found = [entry]
    nested = extra.get("connectors")
    if isinstance(nested, list):
        classes: list[Any] = []
        for item in nested:
            try:
                child = KVTransferConfig(**item)
            except Exception as exc:
                found.append(
                    {
                        "connector": str(item.get("kv_connector") if isinstance(item, dict) else item),
                        "depth": depth + 1,
                        **failure(exc),
                    }
                )
                classes.append(None)
                continue
            resolved = resolve_connector(child, depth + 1)
            found.extend(resolved)
            classes.append(resolved[0].get("class") and KVConnectorFactory.get_connector_class(child))
        if name == "PdConnector" and entry["ok"]:
            rule = pd_connector_rule(cls, classes)
            if rule:
                entry.update(ok=False, error=rule)
    return found


def pd_connector_rule(pd_class: Any, children: list[Any]) -> str | None:
    """kvbm's PdConnector checks in its constructor: two connectors, LMCache/KVBM/FlexKV then NIXL."""
    module = sys.modules[pd_class.__module__]
    if len(children) != 2:
        return f"PdConnector requires exactly two connectors (got {len(children)})"
    names = ("DynamoConnector", "_LMCacheConnectorV1", "_FlexKVConnectorV1")
    first_allowed = tuple(c for c in (getattr(module, n, None) for n in names) if isinstance(c, type))
    nixl = getattr(module, "NixlConnector", None)
    first, second = children
    if first is not None and first_allowed and not issubclass(first, first_allowed):
        return f"PdConnector's first connector must be LMCache, KVBM or FlexKV, not {first.__name__}"
    if second is not None and isinstance(nixl, type) and not issubclass(second, nixl):
        return f"PdConnector's second connector must be NixlConnector, not {second.__name__}"
    return None


def jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)


def read_lmcache(env: dict[str, str]) -> dict[str, Any]:
    """LMCache's config as its vLLM adapter loads it, and what it read for each variable set."""
    try:
        from lmcache.v1 import config as lmcache_config
    except ImportError as exc:
        return failure(exc)
    cls = lmcache_config.LMCacheEngineConfig
    definitions = getattr(lmcache_config, "_CONFIG_DEFINITIONS", {})
    aliases = getattr(lmcache_config, "_CONFIG_ALIASES", {})
    source = "env"
    try:
        if "LMCACHE_CONFIG_FILE" in os.environ:
            source = "file+env"
            config = cls.from_file(os.environ["LMCACHE_CONFIG_FILE"])
            config.update_config_from_env()
        else:
            config = cls.from_env()
            config.validate()
    except Exception as exc:
        return {**failure(exc), "source": source}
    values: dict[str, Any] = {}
    ignored: list[str] = []
    # LMCACHE_SUPERVISE_*: the supervisor's own variables (state root, test marker), not LMCache's.
    for var in sorted(k for k in env if k.startswith("LMCACHE_") and not k.startswith("LMCACHE_SUPERVISE_")):
        key = var.removeprefix("LMCACHE_").lower()
        key = aliases.get(key, key)
        if var in ENV_ONLY_READERS:
            module_name, func = ENV_ONLY_READERS[var]
            try:
                read = getattr(importlib.import_module(module_name), func)()
            except Exception as exc:
                values[var] = {"key": key, "text": env[var], **failure(exc)}
                continue
            if var == "LMCACHE_LOG_LEVEL":
                import logging

                read = logging.getLevelName(read)
            values[var] = {"key": key, "text": env[var], "read": jsonable(read), "ok": True}
        elif key in definitions:
            values[var] = {
                "key": key,
                "text": env[var],
                "read": jsonable(getattr(config, key, None)),
                "ok": True,
            }
        elif var not in ENV_ONLY_NAMES:
            ignored.append(var)
    file_values = {}
    if source == "file+env":  # keys set in the file and not overridden by the env
        for key in sorted(getattr(config, "_user_set_keys", ())):
            if f"LMCACHE_{key.upper()}" not in env:
                file_values[key] = jsonable(getattr(config, key, None))
    return {"ok": True, "source": source, "values": values, "file_values": file_values, "ignored": ignored}


def probe_process(spec: dict[str, Any]) -> dict[str, Any]:
    argv = list(spec["argv"])
    out: dict[str, Any] = {"name": spec["name"]}
    if argv[1:3] != ["-m", DYNAMO_VLLM]:
        out["skipped"] = f"not a {DYNAMO_VLLM} worker"
        return out
    env = {k: str(v) for k, v in spec.get("env", {}).items()}
    with process_environment(env, spec.get("cwd")):
        out["args"], engine = parse_worker_args(argv[3:])
        kv = planned_kv_transfer_config(argv, engine)
        out["connectors"] = resolve_connector(kv) if kv is not None and kv.kv_connector else []
        if engine is not None:
            out["engine_config"] = engine_config(engine)
        uses_lmcache = any(c["connector"].startswith("LMCache") for c in out["connectors"])
        if uses_lmcache or any(k.startswith("LMCACHE_") for k in env):
            out["lmcache"] = read_lmcache(env)
    return out


def device() -> str:
    """``cpu`` where no NVIDIA driver is loaded: vLLM then needs VLLM_TARGET_DEVICE=cpu to get past
    device detection while parsing (stack-facts). Set before vLLM is first imported."""
    return "cuda" if os.path.exists("/proc/driver/nvidia/version") else "cpu"


def main() -> int:
    request = json.load(sys.stdin)
    if "--versions" in sys.argv[1:]:  # cheap: no engine import (the verdict cache is keyed on these)
        versions = {d: version_of(d) for d in request.get("packages", [])}
        sys.stdout.write(MARKER + json.dumps({"python": sys.version.split()[0], "versions": versions}) + "\n")
        return 0
    result: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "versions": {d: version_of(d) for d in request.get("packages", [])},
        "device": device(),
    }
    processes = []
    for spec in request.get("processes", []):
        if result["device"] == "cpu":
            spec.setdefault("env", {}).setdefault("VLLM_TARGET_DEVICE", "cpu")
        try:
            processes.append(probe_process(spec))
        except Exception as exc:  # a probe bug or an engine that breaks on import: say so, per process
            message = one_line("".join(traceback.format_exception_only(type(exc), exc)))
            processes.append({"name": spec.get("name"), "crashed": message})
    result["processes"] = processes
    sys.stdout.flush()
    sys.stdout.write("\n" + MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
