"""The probe cache: an entry lives while the paths it watches are unchanged, and never from a dir we do not own."""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.host.cache import ProbeCache, cache_root


def test_an_entry_is_returned_until_a_watched_directory_changes(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    site.mkdir()
    cache = ProbeCache(tmp_path / "cache", "software")
    key = {"interpreter": "/x/python", "modules": ["dynamo"]}
    assert cache.get(key) is None
    cache.put(key, {"python": "3.11.7"}, [str(site)])
    assert cache.get(key) == {"python": "3.11.7"}
    assert cache.get({**key, "modules": ["vllm"]}) is None  # another key
    (site / "vllm-0.32.0.dist-info").mkdir()  # what `pip install vllm` leaves behind
    os.utime(site, ns=(1, 1))  # a coarse-mtime filesystem still sees a change of inode/size/mtime
    assert cache.get(key) is None


def test_a_watched_path_that_appears_or_disappears_invalidates(tmp_path: Path) -> None:
    cache = ProbeCache(tmp_path / "cache", "software")
    missing = tmp_path / "later"
    cache.put("k", 1, [str(missing)])
    assert cache.get("k") == 1
    missing.mkdir()
    assert cache.get("k") is None


def test_a_cache_dir_others_can_write_is_not_trusted(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = ProbeCache(root, "software")
    cache.put("k", {"ok": True}, [])
    assert cache.get("k") == {"ok": True}
    os.chmod(root / "software", 0o777)
    assert cache.get("k") is None  # a planted "everything is installed" answer is ignored
    cache.put("k", {"ok": True}, [])  # and nothing is written there either
    os.chmod(root / "software", 0o700)


def test_a_broken_entry_or_an_unwritable_root_means_no_cache(tmp_path: Path) -> None:
    cache = ProbeCache(tmp_path / "cache", "software")
    cache.put("k", 1, [])
    for entry in (tmp_path / "cache" / "software").glob("*.json"):
        entry.write_text("{not json")
    assert cache.get("k") is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    nowhere = ProbeCache(blocker / "cache", "software")
    nowhere.put("k", 1, [])  # no exception: a cache is an optimisation
    assert nowhere.get("k") is None
    assert ProbeCache(None, "software").get("k") is None


def test_the_root_follows_the_environment() -> None:
    assert cache_root({"LMCACHE_SUPERVISE_CACHE_DIR": "/a", "CACHE_DIRECTORY": "/b"}) == Path("/a")
    assert cache_root({"CACHE_DIRECTORY": "/b:/c"}) == Path("/b")
    assert cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/lmcache-supervise")
    assert cache_root({"HOME": "/h"}) == Path("/h/.cache/lmcache-supervise")


def test_the_worker_interpreter_probe_is_cached_until_a_package_is_installed(tmp_path: Path) -> None:
    """A real interpreter (a fresh venv) and a real install (a package and its dist-info appear)."""
    import subprocess
    import sys

    from supervisor.host.software import InterpreterRequest, software_facts

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = next((venv / "lib").glob("python3*/site-packages"))
    cache = ProbeCache(tmp_path / "cache", "software")
    req = InterpreterRequest(python, ("lmcs_fakepkg",), cwd=str(tmp_path))

    first = software_facts(req, 60, cache)
    assert not first.cached and first.module("lmcs_fakepkg").error == "missing"
    again = software_facts(req, 60, cache)
    assert again.cached and again.module("lmcs_fakepkg").error == "missing" and again.python == first.python

    (site / "lmcs_fakepkg").mkdir()
    (site / "lmcs_fakepkg" / "__init__.py").write_text("")
    (site / "lmcs_fakepkg-1.0.dist-info").mkdir()
    installed = software_facts(req, 60, cache)
    assert not installed.cached and installed.module("lmcs_fakepkg").error is None
    assert software_facts(req, 60, cache).cached

    # A directory named like the module in the worker's cwd would shadow it: never answered from the cache.
    (tmp_path / "lmcs_fakepkg.py").write_text("raise ImportError('shadow')\n")
    shadowed = software_facts(req, 60, cache)
    assert not shadowed.cached and "shadow" in (shadowed.module("lmcs_fakepkg").error or "")
    # --fresh: probe again, but keep storing.
    (tmp_path / "lmcs_fakepkg.py").unlink()
    fresh = ProbeCache(tmp_path / "cache", "software", read=False)
    assert not software_facts(req, 60, fresh).cached and software_facts(req, 60, cache).cached
