"""Where deployments keep their state, chosen from the environment (the only IO here is reading it).

Order: ``LMCACHE_SUPERVISE_STATE_ROOT`` (tests, custom installs), systemd's ``STATE_DIRECTORY``
(set by ``StateDirectory=`` in the unit), ``$XDG_STATE_HOME/lmcache-supervise``, then
``~/.local/state/lmcache-supervise``.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_root() -> Path:
    for var in ("LMCACHE_SUPERVISE_STATE_ROOT", "STATE_DIRECTORY"):
        value = os.environ.get(var, "").split(":")[0]
        if value:
            return Path(value)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "lmcache-supervise"


def profiles_dir() -> Path:
    """The built-in profiles shipped beside the package (a source checkout or an editable install)."""
    return Path(__file__).resolve().parent.parent / "profiles"
