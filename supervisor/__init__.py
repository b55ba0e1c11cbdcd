"""lmcache-supervise: a process supervisor for Dynamo + vLLM + LMCache deployments.

The pipeline, one package per stage: ``profile`` -> ``plan`` -> ``host`` + ``preflight`` -> ``engine``
-> ``control``, with ``export`` and ``cli`` on top. The Python API (:mod:`supervisor.api`) is
re-exported here and imported on first use, so ``import supervisor.errors`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["check", "enforce", "load", "load_plan", "render", "systemd_bridge", "up"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from supervisor import api

        return getattr(api, name)
    raise AttributeError(f"module 'supervisor' has no attribute {name!r}")
