"""The rendered plan of an unchanged profile, kept between runs so that pydantic stays off the start path.

Validating a profile means importing pydantic and building the schema's models: ~90 ms of the
~350 ms between exec and the first spawn of ``up demo``, paid again on every start although the
profile rarely changes. So the plan rendered from a profile is stored (in the probe cache's
directory, ``host.cache``: ``0700``, ours, else no cache) and reused while everything it was made
from is the same:

* in the key (hashed; the entry holds only the hash): the profile's merged data after ``--set``
  and ``--model`` (``profile.raw``: TOML only, no pydantic), the file it was named by, the
  environment (but for a terminal's size and the like, :data:`VOLATILE_ENV`), the working
  directory and the interpreter;
* watched (``stat`` before every use, as the probe cache does): every module of this package and
  its directories (an edit or a new file), the site-packages directory pydantic came from (any
  ``pip install``/upgrade there), the directories searched for infrastructure binaries (one
  installed or removed) and the binaries found.

Only a single-node plan (``--role all``) is cached: a head or worker node's plan also depends on
routes (the advertise address), which no ``stat`` can watch. Invalid profiles are never cached, so
their errors stay exactly as ``load`` reports them. The entry is a pickle: only this user can write
the directory, as with Python's own ``__pycache__``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import pickle
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from supervisor.errors import ProfileError
from supervisor.host.cache import ProbeCache, cache_root
from supervisor.plan.spec import Plan
from supervisor.profile import raw

KIND = "plans"
SCHEMA = 1  # bump when what a plan holds changes in a way the watched files would not show
MAX_ENTRIES = 32  # one per profile, flag set and environment in use; the oldest go first
#: Variables a shell or terminal changes between otherwise identical commands, none of which a plan
#: reads (the working directory is keyed on its own). Everything else in the environment is keyed.
VOLATILE_ENV = frozenset({"COLUMNS", "LINES", "OLDPWD", "PWD", "SHLVL", "_"})


def _code_paths() -> list[str]:
    root = Path(__file__).resolve().parents[1]  # the supervisor package
    paths: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        paths.append(folder)
        paths.extend(os.path.join(folder, f) for f in files if f.endswith(".py"))
    spec = importlib.util.find_spec("pydantic")  # found, not imported
    if spec is not None and spec.origin:
        paths.append(str(Path(spec.origin).parent.parent))
    return paths


class PlanCache:
    """One profile invocation's entry: :meth:`get` a plan, or :meth:`put` the one rendered afresh."""

    def __init__(self, digest: str, root: Path | None = None) -> None:
        self.digest = digest
        self.store = ProbeCache(root or cache_root(), KIND)

    @classmethod
    def for_profile(cls, profile: str, overrides: Sequence[str], model: str | None) -> PlanCache | None:
        """None when the raw profile cannot be read: loading it for real reports why."""
        try:
            path, data = raw.merged(profile, overrides, model)
        except ProfileError:
            return None
        key = {
            "schema": SCHEMA,
            "file": str(path.resolve()),
            "profile": data,
            "env": {k: v for k, v in os.environ.items() if k not in VOLATILE_ENV},
            "cwd": os.getcwd(),
            "python": sys.executable,
        }
        text = json.dumps(key, sort_keys=True, default=repr)  # TOML dates are not JSON
        return cls(hashlib.sha256(text.encode()).hexdigest())

    def get(self) -> Plan | None:
        value = self.store.get(self.digest)
        if not isinstance(value, str):
            return None
        try:
            plan = pickle.loads(base64.b64decode(value))
        except Exception:  # noqa: BLE001  (an entry from another version of the code: render afresh)
            return None
        return plan if isinstance(plan, Plan) else None

    def put(self, plan: Plan, *, search_path: str, binaries: Iterable[str]) -> None:
        watch = [*_code_paths(), *search_path.split(os.pathsep), *binaries]
        value = base64.b64encode(pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)).decode()
        self.store.put(self.digest, value, watch)
        self._prune()

    def _prune(self) -> None:
        folder = self.store.dir
        try:
            entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime) if folder else []
            for old in entries[:-MAX_ENTRIES]:
                old.unlink()
        except OSError:
            pass  # a cache: trouble with it never fails a command
