"""A small on-disk cache for host probes that are slow and change only when software is installed.

The worker-interpreter probe (``host.software``) starts the worker's Python and imports Dynamo, vLLM
and LMCache: 0.4 s for the demo's Dynamo alone, ~10 s with vLLM. Its answer changes only when the
interpreter or the packages on its ``sys.path`` change, so an entry is stored with the paths it
depends on (the interpreter, every ``sys.path`` directory, each imported package's directory) and
their ``stat`` (mtime, size, inode) at the time: ``pip install``/``uninstall``/upgrade adds or removes a
``*.dist-info`` entry, which changes its directory's mtime, and the entry is then probed again.
What the watch cannot see (a file edited inside an installed package) is what ``--fresh`` is for.

Where: ``LMCACHE_SUPERVISE_CACHE_DIR``, systemd's ``CACHE_DIRECTORY``, ``$XDG_CACHE_HOME/lmcache-supervise``,
``~/.cache/lmcache-supervise``; a directory made ``0700`` and owned by us, else no cache at all (a
cache is an optimisation: any trouble with it means probing for real, never a failure). Entries are
JSON files named by a hash of their key, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SCHEMA = 1  # bump when an entry's meaning changes: old entries are then ignored


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    for var in ("LMCACHE_SUPERVISE_CACHE_DIR", "CACHE_DIRECTORY"):
        value = env.get(var, "").split(":")[0]
        if value:
            return Path(value)
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "lmcache-supervise"


def stamp(paths: Iterable[str]) -> list[list[Any]]:
    """``[path, mtime_ns, size, inode]`` per path (``[path, None, None, None]`` when it is missing)."""
    out: list[list[Any]] = []
    for path in sorted(set(paths)):
        try:
            info = os.stat(path)
        except OSError:
            out.append([path, None, None, None])
            continue
        out.append([path, info.st_mtime_ns, info.st_size, info.st_ino])
    return out


class ProbeCache:
    """Entries under ``root/<kind>/``; ``get`` returns a value only while its watched paths are unchanged."""

    def __init__(self, root: Path | None, kind: str, *, read: bool = True) -> None:
        self.dir = root / kind if root is not None else None
        self.read = read  # False: never answer from the cache, but store fresh answers (``check --fresh``)

    @staticmethod
    def _name(key: Any) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40] + ".json"

    def _usable_dir(self, create: bool) -> Path | None:
        if self.dir is None:
            return None
        try:
            if create:
                self.dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.dir.mkdir(mode=0o700, exist_ok=True)
            for d in (self.dir.parent, self.dir):
                info = os.lstat(d)
                # Someone else's (or a symlinked) cache could feed us a forged "all installed" answer.
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
                    return None
        except OSError:
            return None
        return self.dir

    def get(self, key: Any) -> Any | None:
        folder = self._usable_dir(create=False) if self.read else None
        if folder is None:
            return None
        try:
            entry = json.loads((folder / self._name(key)).read_text())
        except (OSError, ValueError):
            return None
        if (
            not isinstance(entry, dict)
            or entry.get("schema") != SCHEMA
            or entry.get("key") != json.loads(json.dumps(key))
        ):
            return None
        watched = entry.get("stamp")
        if not isinstance(watched, list) or stamp(p[0] for p in watched) != watched:
            return None
        return entry.get("value")

    def put(self, key: Any, value: Any, watch: Iterable[str]) -> None:
        folder = self._usable_dir(create=True)
        if folder is None:
            return
        entry = {"schema": SCHEMA, "key": key, "stamp": stamp(watch), "value": value}
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as out:
                json.dump(entry, out)
            os.replace(tmp, folder / self._name(key))
        except OSError:
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass
