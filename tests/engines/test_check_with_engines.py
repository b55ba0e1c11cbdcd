"""``lmcache-supervise check`` with ``python`` = the engines venv: what a user on a GPU server runs.

GPU checks are skipped (this machine has none). The built-in profiles pass; an unknown flag in a
worker's ``args`` fails naming it; an engines venv without ``nixl`` or ``kvbm`` (a hard-linked copy of
the real one, the package really uninstalled with pip) fails ``check disagg`` naming the package."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from enginekit import VLLM_PROFILES
from proctools import CLI, free_port_base


def check(tmp_path: Path, python: str, profile: str, *sets: str) -> tuple[int, list[dict[str, str]], str]:
    env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path / "state")}
    argv = [CLI, "check", profile, "--json", "--skip-check", "gpu", "--set", f"python={json.dumps(python)}"]
    argv += [
        "--set",
        f"ports.base={free_port_base(range(300))}",
    ]  # the built-ins' 8000s may be someone else's
    for item in sets:
        argv += ["--set", item]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    return done.returncode, json.loads(done.stdout), done.stderr


def failed(rows: list[dict[str, str]]) -> list[str]:
    return [f"{r['check']}: {r['message']}" for r in rows if r["status"] == "fail"]


@pytest.mark.parametrize("profile", VLLM_PROFILES)
def test_builtin_profiles_pass_check_with_the_engines_venv(
    tmp_path: Path, engines_python: str, profile: str
) -> None:
    code, rows, err = check(tmp_path, engines_python, profile)
    assert code == 0, (failed(rows), err)
    (engine,) = [r for r in rows if r["check"] == "engine"]
    assert engine["status"] == "ok" and "the installed engines accept" in engine["message"]


def test_an_unknown_flag_in_args_fails_check_naming_it(tmp_path: Path, engines_python: str) -> None:
    code, rows, err = check(tmp_path, engines_python, "agg", 'workers.worker.args=["--no-such-flag", "3"]')
    assert code == 3
    assert failed(rows) == [
        "engine: worker: --no-such-flag refused by Dynamo's vLLM argument parsing: unrecognized arguments: "
        f"--no-such-flag 3 ({engine_versions(rows, err)})"
    ]
    assert "--no-such-flag" in err.splitlines()[-1]


def engine_versions(rows: list[dict[str, str]], err: str) -> str:
    """The versions the failing line names (read back from it: they are whatever is installed)."""
    line = next(r["message"] for r in rows if r["check"] == "engine")
    return line.rsplit(" (", 1)[1].rstrip(")")


def venv_without(tmp_path: Path, engines_python: str, *dists: str) -> str:
    """A copy of the engines venv (hard links: seconds, no disk) with ``dists`` uninstalled by pip."""
    venv = Path(engines_python).parent.parent
    copy = tmp_path / f"venv-without-{dists[0]}"
    subprocess.run(["cp", "-al", str(venv), str(copy)], check=True, timeout=300)
    pip = [str(copy / "bin" / "python"), "-m", "pip", "uninstall", "--quiet", "--yes", *dists]
    subprocess.run(pip, check=True, timeout=300, capture_output=True)
    return str(copy / "bin" / "python")


@pytest.mark.parametrize(
    ("dists", "needed_by"),
    [
        (("nixl", "nixl-cu12", "nixl-cu13"), "decode: NixlConnector cannot load: nixl is not importable"),
        (("kvbm",), "prefill: PdConnector cannot load: kvbm is not importable"),
    ],
)
def test_disagg_fails_naming_a_missing_connector_package(
    tmp_path: Path, engines_python: str, dists: tuple[str, ...], needed_by: str
) -> None:
    python = venv_without(tmp_path, engines_python, *dists)
    code, rows, err = check(tmp_path, python, "disagg")
    assert code == 3
    engine = [m for m in failed(rows) if m.startswith("engine: ")]
    assert any(m.startswith(f"engine: {needed_by} in {python}") for m in engine), engine
    assert f"{dists[0]} not installed" in engine[0]  # the versions it names say so too
    software = [m for m in failed(rows) if m.startswith("software: ")]
    users = "decode, prefill" if dists[0] == "nixl" else "prefill"
    assert software[0] == f"software: {dists[0]} is not installed in {python} (needed by {users})"
    assert Path(engines_python).exists()  # the real venv is untouched
