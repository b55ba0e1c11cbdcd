"""Where deployments keep their state, chosen from the environment (the only IO here is reading it).

Order: ``LMCACHE_SUPERVISE_STATE_ROOT`` (tests, custom installs), systemd's ``STATE_DIRECTORY``
(set by ``StateDirectory=`` in the unit), ``$XDG_STATE_HOME/lmcache-supervise``, then
``~/.local/state/lmcache-supervise``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from supervisor.errors import StateDirError


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


def secure_state_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (a deployment's state directory) mode 0700, or vouch for an existing one.

    It holds the pid file, the control socket, logs that may quote secrets and the file-discovery
    entries the workers trust, so a directory someone else owns (planted before us, in a shared
    root) or a symlink to elsewhere is refused instead of used; one of ours is tightened to 0700.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise StateDirError(str(path), f"is a symlink to {os.readlink(path)}; refusing to follow it")
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(str(path), "exists and is not a directory")
    if info.st_uid != os.geteuid():
        uid = os.geteuid()
        raise StateDirError(
            str(path),
            f"is owned by uid {info.st_uid}, not by this user (uid {uid}); "
            "refusing to use it: remove it or run as its owner",
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path
