"""LMCache settings -> ``LMCACHE_*`` env, and each worker role's ``--kv-transfer-config`` JSON.

The JSON shapes follow what Dynamo 1.6.1 accepts (stack-facts, "Dynamo worker and frontend command
lines"), not the seed document: ``--connector lmcache`` is rejected by 1.6.1, and the prefill worker's
``PdConnector`` lives in the ``kvbm`` package, so it needs ``kv_connector_module_path``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from supervisor.profile.schema import LMCache, Worker

LMCACHE = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
PD_CONNECTOR_MODULE = "kvbm.vllm_integration.connector"

# scheme -> backend name, as LMCache 0.5.6 parses remote_url
REMOTE_SCHEMES = {
    "redis": "redis",
    "rediss": "redis",
    "redis-sentinel": "redis-sentinel",
    "redis-cluster": "redis-cluster",
    "lm": "lm",
    "infinistore": "infinistore",
    "mooncakestore": "mooncake",
}

# LMCache keys whose env values LMCache reads as booleans: only "true"/"1" mean true there, so
# "yes"/"on" silently mean False. The supervisor accepts only true/false/1/0 for these.
BOOLEAN_KEYS = frozenset(
    {
        "local_cpu",
        "local_cpu_use_hugepages",
        "use_layerwise",
        "save_decode_cache",
        "enable_blending",
        "enable_p2p",
        "enable_controller",
        "enable_pd",
        "pd_skip_proxy_notification",
        "pd_bidirectional",
        "use_gds",
        "save_unfull_chunk",
        "py_enable_gc",
        "enable_async_loading",
        "internal_api_server_enabled",
        "enable_scheduler_bypass_lookup",
        "enable_lazy_memory_allocator",
        "track_usage",
    }
)
BOOLEAN_SPELLINGS = {"true": "true", "false": "false", "1": "true", "0": "false"}
# Read outside LMCache's config class, by plain text comparison: LMCache 0.5.6 turns usage tracking
# off only for LMCACHE_TRACK_USAGE == "false", so "0" or "False" leave it on (found by the engine tier).
EXACT_TEXTS = {"track_usage": ("true", "false")}
NUMBER_KEYS = frozenset(
    {
        "chunk_size",
        "max_local_cpu_size",
        "reserve_local_cpu_size",
        "max_local_disk_size",
        "gds_buffer_size",
        "blocking_timeout_secs",
        "pd_allocation_timeout_sec",
        "lookup_timeout_ms",
    }
)


def remote_backend(url: str) -> str | None:
    """The backend a remote URL selects, or None for an unknown scheme."""
    return REMOTE_SCHEMES.get(urlsplit(url).scheme)


def check_env_value(key: str, value: str) -> str | None:
    """Why ``LMCACHE_<KEY>=value`` would be misread by LMCache, or None when it is fine."""
    name = key.removeprefix("LMCACHE_").lower()
    if name in EXACT_TEXTS and value not in EXACT_TEXTS[name]:
        return f"expected exactly {' or '.join(EXACT_TEXTS[name])} (LMCache compares the text as it is)"
    if name in BOOLEAN_KEYS and value.strip().lower() not in BOOLEAN_SPELLINGS:
        return f"expected true or false (LMCache would silently read {value!r} as false)"
    if name in NUMBER_KEYS:
        try:
            float(value)
        except ValueError:
            unit = " of GB" if name.endswith("_size") and "buffer" not in name else ""
            return f'expected a number{unit}, got "{value}" (LMCache would silently use none)'
    return None


def _env_text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def worker_loads_lmcache(worker: Worker, settings: LMCache) -> bool:
    """Decode workers only receive KV over NIXL; agg and prefill workers offload to LMCache."""
    if not settings.enabled:
        return False
    if worker.lmcache is not None:
        return worker.lmcache
    return worker.role in ("agg", "prefill")


def kv_transfer_config(
    role: str, *, uses_lmcache: bool, connector: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``--kv-transfer-config`` object for one vLLM worker role.

    ``connector``: the LMCache entry to use instead of the in-process ``LMCacheConnectorV1`` (the
    ``LMCacheMPConnector`` entry when a multiprocess cache server runs beside the workers)."""
    lmcache = dict(connector) if connector is not None else dict(LMCACHE)
    if role == "agg":
        return lmcache if uses_lmcache else {}
    if role == "prefill" and uses_lmcache:
        return {
            "kv_connector": "PdConnector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"connectors": [lmcache, dict(NIXL)]},
            "kv_connector_module_path": PD_CONNECTOR_MODULE,
        }
    return dict(NIXL)


def kv_transfer_json(config: dict[str, Any]) -> str:
    return json.dumps(config, separators=(",", ":"), sort_keys=False)


def lmcache_env(settings: LMCache) -> dict[str, str]:
    """Every ``LMCACHE_*`` (and backend helper) variable for a process that loads LMCache."""
    env = {
        "LMCACHE_CHUNK_SIZE": str(settings.chunk_size),
        "LMCACHE_LOCAL_CPU": _env_text(settings.local_cpu),
        "LMCACHE_MAX_LOCAL_CPU_SIZE": _env_text(float(settings.max_local_cpu_size)),
        "LMCACHE_LOG_LEVEL": settings.log_level,
        "LMCACHE_TRACK_USAGE": _env_text(settings.track_usage),
    }
    if settings.local_disk:
        path = settings.local_disk.removeprefix("file://")
        env["LMCACHE_LOCAL_DISK"] = f"file://{path.rstrip('/')}/"
        env["LMCACHE_MAX_LOCAL_DISK_SIZE"] = _env_text(float(settings.max_local_disk_size))
    if settings.remote is not None:
        env["LMCACHE_REMOTE_URL"] = settings.remote.url
        env["LMCACHE_REMOTE_SERDE"] = settings.remote.serde
        if settings.remote.service_name:
            env["REDIS_SERVICE_NAME"] = settings.remote.service_name
        if settings.remote.config_path:
            env["MOONCAKE_CONFIG_PATH"] = settings.remote.config_path
    if settings.gds is not None:
        env["LMCACHE_GDS_PATH"] = settings.gds.path
        if settings.gds.buffer_size_mib is not None:
            env["LMCACHE_GDS_BUFFER_SIZE"] = str(settings.gds.buffer_size_mib)
    for key, value in sorted(settings.extra.items()):
        env[f"LMCACHE_{key.upper()}"] = _env_text(value)
    return env
