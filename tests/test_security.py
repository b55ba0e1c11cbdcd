"""Security properties that need no running deployment: no shell, no flag injection, redacted
logs, and a state directory that is ours and private (docs/reliability.md, "Security")."""

from __future__ import annotations

import ast
import io
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import eventlog
from supervisor.engine import logs, pidfile
from supervisor.errors import EXIT_BAD_INPUT, ProfileError, StateDirError, SupervisorError
from supervisor.paths import secure_state_dir
from supervisor.plan import render as planmod
from supervisor.profile import load as profiles
from supervisor.profile.rules import MANAGED_FLAGS

ROOT = Path(__file__).resolve().parents[1]
STATE = Path("/srv/state")
SPAWNERS = {
    "Popen",
    "run",
    "call",
    "check_call",
    "check_output",
    "run_process",
    "open_process",
    "spawnl",
    "spawnlp",
    "spawnv",
    "spawnvp",
    "execv",
    "execvp",
    "execl",
    "execlp",
}
SPAWN_MODULES = {"subprocess", "os", "anyio", "asyncio", "trio"}
BARE_SPAWNERS = {"Popen", "run_process", "open_process", "check_output", "check_call"}
SHELL_CALLS = {
    ("os", "system"),
    ("os", "popen"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
    ("asyncio", "create_subprocess_shell"),
}


def _sources() -> list[Path]:
    return sorted([*(ROOT / "supervisor").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")])


def _stringish(node: ast.expr) -> bool:
    """A command written as one string (a shell line), not an argv list."""
    if isinstance(node, ast.BinOp):
        return _stringish(node.left) or _stringish(node.right)
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def test_no_shell_anywhere() -> None:
    """No shell=True, os.system/os.popen, shell helpers, or a spawn given one command string."""
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            func = node.func
            attribute = isinstance(func, ast.Attribute)
            name = func.attr if attribute else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if attribute and isinstance(func.value, ast.Name) else ""
            if any(
                k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                found.append(f"{where} shell=")
            if (owner, name) in SHELL_CALLS:
                found.append(f"{where} {owner}.{name}")
            spawner = name in SPAWNERS and (owner in SPAWN_MODULES or (not owner and name in BARE_SPAWNERS))
            if spawner and node.args and _stringish(node.args[0]):
                found.append(f"{where} {name}(<a command string>)")
    assert len(_sources()) > 30  # the scan really covers the package and the scripts
    assert not found, found


# ---- flags ---------------------------------------------------------------------------------


def _load(*overrides: str) -> object:
    profile = profiles.load("demo", overrides=list(overrides))
    return planmod.render(profile, state_root=STATE, python="/usr/bin/python3")


CASES = [(kind, flag) for kind in ("worker", "frontend") for flag in MANAGED_FLAGS[kind]]


@pytest.mark.parametrize(("kind", "flag"), CASES)
def test_managed_flags_are_refused_whole_abbreviated_and_with_a_value(kind: str, flag: str) -> None:
    """argparse (frontend, mocker) takes any unambiguous prefix, and the last flag wins."""
    key = "workers.decode.args" if kind == "worker" else "frontend.args"
    for arg in (flag, flag[:-1], flag[: max(3, len(flag) // 2)], f"{flag[:-2]}=x", f"{flag}=x"):
        with pytest.raises(ProfileError) as err:
            _load(f"{key}={json.dumps([arg, 'x'])}")
        assert err.value.exit_code == EXIT_BAD_INPUT
        assert err.value.key == key and "set by the supervisor" in str(err.value), str(err.value)


def test_ordinary_engine_flags_pass_unchanged() -> None:
    plan = _load('workers.decode.args=["--speedup-ratio", "2"]', 'frontend.args=["--namespace", "x"]')
    assert plan.process("decode").argv[-2:] == ("--speedup-ratio", "2")
    assert plan.process("frontend").argv[-2:] == ("--namespace", "x")


@pytest.mark.parametrize("key", ["frontend.host", "ports.host", "supervisor.metrics_host"])
@pytest.mark.parametrize("value", ["--help", "-h", "127.0.0.1 --http-port 1", "", "a\nb"])
def test_hosts_cannot_carry_flags(key: str, value: str) -> None:
    with pytest.raises(ProfileError) as err:
        _load(f"{key}={json.dumps(value)}")
    assert err.value.key == key and "expected a host name or IP address" in str(err.value)


def _flags(argv: tuple[str, ...]) -> list[str]:
    return [a for a in argv[3:] if a.startswith("-")]


BASELINE = _load()
text_values = st.text(max_size=30) | st.sampled_from(["--help", "-x", "a --b", "--model=/etc", "x=--y", "--"])


@settings(max_examples=300, deadline=None)
@given(
    key=st.sampled_from(
        [
            "model.served_name",
            "frontend.host",
            "ports.host",
            "env.X",
            "workers.decode.env.X",
            "frontend.env.X",
            "supervisor.smoke_prompt",
            "description",
            "lmcache.extra.x",
        ]
    ),
    value=text_values,
)
def test_no_profile_value_becomes_a_flag(key: str, value: str) -> None:
    """Whatever text a value holds, the plan refuses it (exit 2) or argv keeps its shape: the same
    flags at the same places, the value inside one argument at most."""
    try:
        plan = _load(f"{key}={json.dumps(value)}")
    except SupervisorError as exc:
        assert exc.exit_code == EXIT_BAD_INPUT and "\n" not in str(exc)
        return
    for spec, base in zip(plan.processes, BASELINE.processes):
        assert len(spec.argv) == len(base.argv), spec.argv
        assert _flags(spec.argv) == _flags(base.argv), spec.argv


# ---- logs ----------------------------------------------------------------------------------


def test_log_events_never_carry_a_secret() -> None:
    stream = io.StringIO()
    saved = (eventlog.log.sink, eventlog.log.level)
    logs.configure(json=True, stream=stream)
    try:
        log = eventlog.log
        log.error(
            "process failed",
            reason="connect redis://:hunter2@10.0.0.1:6379 refused",
            env={"HF_TOKEN": "hunter2", "LMCACHE_REMOTE_URL": "redis://u:hunter2@h:1", "N": "1"},
            urls=["rediss://:hunter2@h:2"],
            api_token="hunter2",
            max_tokens=8,
        )
        try:
            raise RuntimeError("lm://x:hunter2@h:1 unreachable")
        except RuntimeError:
            log.exception("observer failed")
    finally:
        eventlog.log.sink, eventlog.log.level = saved
    text = stream.getvalue()
    assert "hunter2" not in text
    first = json.loads(text.splitlines()[0])
    assert first["reason"] == "connect redis://:***@10.0.0.1:6379 refused"
    assert first["env"] == {"HF_TOKEN": "***", "LMCACHE_REMOTE_URL": "redis://u:***@h:1", "N": "1"}
    assert first["api_token"] == "***" and first["max_tokens"] == 8  # numbers are not secrets
    assert "RuntimeError" in text  # the traceback is still there, masked


# ---- state directory ------------------------------------------------------------------------


def test_state_dir_is_created_private_and_tightened(tmp_path: Path) -> None:
    with pidfile.PidFile(tmp_path / "root" / "demo", "demo"):
        assert stat.S_IMODE((tmp_path / "root" / "demo").stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    secure_state_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a directory to another user")
def test_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    planted = tmp_path / "demo"
    planted.mkdir()
    planted.chmod(0o777)
    os.chown(planted, 65534, 65534)
    with pytest.raises(StateDirError) as err:
        pidfile.PidFile(planted, "demo").__enter__()
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert str(err.value) == (
        f"state directory {planted}: is owned by uid 65534, not by this user (uid 0); "
        "refusing to use it: remove it or run as its owner"
    )
    assert list(planted.iterdir()) == []  # no pid file written into it
    assert stat.S_IMODE(planted.stat().st_mode) == 0o777  # and nothing of it changed


def test_state_dir_symlink_or_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StateDirError, match="is a symlink"):
        secure_state_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(StateDirError, match="not a directory"):
        secure_state_dir(tmp_path / "file")
