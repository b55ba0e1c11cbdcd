"""The rendered unit: checked by the real ``systemd-analyze verify``, and its numbers from the plan.

What ``systemd-analyze verify`` (systemd 252, Debian 12) does here, found by trying it in this
container, which runs no systemd: it loads the unit offline, fails (exit 1) when an ``Exec*=``
binary does not exist or is not executable, and only WARNS, exit status 0, on unknown keys and
unparsable values (``Type=notfy``, ``TimeoutStopSec=abc``). So a unit passes here only with exit 0
AND nothing on stderr; the two control tests prove both halves catch what they should. It does not
look up ``User=``, so no user is created on the host. ``--man=no`` (no man pages in the image) and
``--generators=no`` (nothing of the host's to generate) keep it to our unit and fast (~50 ms).
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from supervisor.cli.app import main
from supervisor.export import systemd
from supervisor.plan import nodes
from supervisor.plan import render as planmod
from supervisor.plan.spec import Plan
from supervisor.profile import load as profiles

ROOT = Path(__file__).resolve().parents[2]
EXE = str(Path(sys.executable).absolute().with_name("lmcache-supervise"))
TEMPLATE = ROOT / "systemd" / "lmcache-supervise@.service"
TEMPLATE_COMMAND = [
    "systemd",
    "render",
    "disagg",
    "--template",
    "--executable",
    "/usr/local/bin/lmcache-supervise",
]

# /proc/devices of an H200 host (driver with MIG caps, NVLink, NVSwitch, InfiniBand), copied verbatim.
H200_PROC_DEVICES = """\
Character devices:
  1 mem
  4 tty
  5 /dev/tty
 10 misc
136 pts
195 nvidia
195 nvidiactl
231 infiniband_mad
231 infiniband_verbs
238 nvidia-uvm
239 nvidia-nvswitch
240 nvidia-nvlink
241 nvidia-caps
242 nvidia-caps-imex-channels
243 hidraw
250 ptp
"""


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze is missing: run `make system-deps` (Debian's systemd package provides it)"
    return found


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze(), "verify", "--man=no", "--generators=no", str(unit)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_verifies(unit: Path) -> None:
    result = verify(unit)
    assert result.returncode == 0 and result.stderr == "", f"{unit.name}:\n{result.stderr}"


def plan_of(name: str, *overrides: str) -> Plan:
    return planmod.render(
        profiles.load(name, overrides=overrides), state_root=Path(systemd.SYSTEM_STATE_ROOT)
    )


def render(name: str, *overrides: str, **options: object) -> str:
    opts = systemd.UnitOptions(**{"executable": EXE, "profile_ref": name, "overrides": overrides, **options})
    return systemd.render_unit(plan_of(name, *overrides), opts)  # type: ignore[arg-type]


def settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines (comments dropped), every value of repeated keys kept in order."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def one(text: str, key: str) -> str:
    values = settings(text)[key]
    assert len(values) == 1, (key, values)
    return values[0]


def write_unit(directory: Path, deployment: str, text: str) -> Path:
    path = directory / systemd.unit_name(deployment)
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", profiles.builtin_names())
def test_every_builtin_renders_a_unit_systemd_accepts(name: str, tmp_path: Path) -> None:
    assert_verifies(write_unit(tmp_path, name, render(name)))


def test_verify_fails_on_a_missing_executable(tmp_path: Path) -> None:
    text = render("demo").replace(EXE, "/nonexistent/lmcache-supervise")
    result = verify(write_unit(tmp_path, "demo", text))
    assert result.returncode != 0 and "/nonexistent/lmcache-supervise" in result.stderr


def test_verify_warnings_count_as_failures(tmp_path: Path) -> None:
    text = render("demo").replace("Type=notify", "Type=notfy")
    result = verify(write_unit(tmp_path, "demo", text))
    assert result.returncode == 0  # systemd only warns ...
    assert "notfy" in result.stderr  # ... which assert_verifies refuses


def test_the_notify_contract() -> None:
    text = render("demo")
    assert one(text, "Type") == "notify"
    assert one(text, "NotifyAccess") == "main"
    assert one(text, "Restart") == "on-failure"
    assert one(text, "KillMode") == "control-group"
    assert one(text, "WatchdogSec") == "30"
    assert one(text, "ExecStart") == f"{EXE} up demo"
    assert one(text, "ExecReload") == f"{EXE} reload demo"
    assert one(text, "ExecStop") == f"-{EXE} down demo --timeout 120"
    assert one(text, "RestartPreventExitStatus") == "2"  # a profile that does not validate


def test_timeouts_follow_the_plan() -> None:
    # disagg: decode (900 s load budget), then prefill once decode is healthy (900 s more); ready
    # timeout 1800 s; smoke request 30 s; margin 120 s. Stop: 3 x (30 s grace + 5 s kill wait) + 30.
    text = render("disagg")
    assert one(text, "TimeoutStartSec") == "1950"
    assert one(text, "TimeoutStopSec") == "135"
    slow = render(
        "disagg", "workers.prefill.stop_timeout_s=100", "workers.decode.health.startup_timeout_s=3000"
    )
    assert one(slow, "TimeoutStopSec") == str(135 + 70)
    assert one(slow, "TimeoutStartSec") == str(3000 + 900 + 30 + 120)
    # The stop budget exceeds what the supervisor may spend, and `down` gives up before systemd.
    plan = plan_of("disagg", "workers.prefill.stop_timeout_s=100")
    stop_sum = sum(p.stop_timeout_s for p in plan.processes)
    assert int(one(slow, "TimeoutStopSec")) > stop_sum + len(plan.processes) * systemd.KILL_WAIT_S
    assert one(slow, "ExecStop").endswith(f"--timeout {135 + 70 - 15}")


def test_demo_start_timeout_counts_started_dependencies_as_spawned() -> None:
    # frontend and decode start together (decode waits for "frontend started"); prefill waits for
    # decode healthy: 60 + 60 s of mocker budgets, above the 60 s ready timeout, + 30 + 120.
    assert systemd.critical_start_s(plan_of("demo")) == pytest.approx(120.0)
    assert one(render("demo"), "TimeoutStartSec") == "270"


def test_directories_user_and_state_root() -> None:
    s = settings(render("demo"))
    assert s["User"] == ["lmcache"] and s["Group"] == ["lmcache"]
    assert s["StateDirectory"] == ["lmcache-supervise"]
    assert s["LogsDirectory"] == ["lmcache-supervise"]
    assert s["RuntimeDirectory"] == ["lmcache-supervise/demo"]
    env = dict(v.split("=", 1) for v in s["Environment"])
    assert env["LMCACHE_SUPERVISE_STATE_ROOT"] == "%S/lmcache-supervise"
    assert env["HOME"] == "%S/lmcache-supervise" and env["XDG_CACHE_HOME"] == "%C/lmcache-supervise"


def test_hardening_keeps_the_gpus() -> None:
    s = settings(render("disagg"))
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DevicePolicy": "closed",
    }.items():
        assert s[key] == [value], key
    for absent in ("PrivateDevices", "MemoryDenyWriteExecute", "ProcSubset", "RestrictAddressFamilies"):
        assert absent not in s, absent
    groups = [line.split()[-1] for line in H200_PROC_DEVICES.splitlines()[1:]]
    patterns = [v.split()[0].removeprefix("char-") for v in s["DeviceAllow"] if v.startswith("char-")]
    allowed = {g for g in groups if any(fnmatch.fnmatch(g, p) for p in patterns)}
    assert allowed == {
        "nvidia",
        "nvidiactl",
        "nvidia-uvm",
        "nvidia-nvswitch",
        "nvidia-nvlink",
        "nvidia-caps",
        "nvidia-caps-imex-channels",
        "infiniband_verbs",
    }
    assert "/dev/infiniband/rdma_cm rw" in s["DeviceAllow"]


def test_rdma_devices_only_for_plans_that_use_nixl() -> None:
    assert settings(render("demo"))["DeviceAllow"] == ["char-nvidia* rw"]
    assert settings(render("agg"))["DeviceAllow"] == ["char-nvidia* rw"]
    assert len(settings(render("disagg"))["DeviceAllow"]) == 3


def test_lmcache_disk_tier_is_writable_and_home_is_read_only_where_needed(tmp_path: Path) -> None:
    text = render("agg", 'lmcache.local_disk="/srv/lmcache cache"', "lmcache.max_local_disk_size=10")
    assert settings(text)["ReadWritePaths"] == ['-"/srv/lmcache cache"']
    assert one(text, "ProtectHome") == "yes"
    home_exe = render("agg", executable="/home/ops/venv/bin/lmcache-supervise")
    assert one(home_exe, "ProtectHome") == "read-only"
    assert_verifies(write_unit(tmp_path, "agg", text))


def test_awkward_paths_are_quoted_and_escaped(tmp_path: Path) -> None:
    odd = tmp_path / "my 100% $profile.toml"
    odd.write_text(f'extends = "{ROOT / "profiles" / "demo.toml"}"\nname = "odd"\n')
    plan = planmod.render(profiles.load(str(odd)), state_root=Path(systemd.SYSTEM_STATE_ROOT))
    text = systemd.render_unit(
        plan, systemd.UnitOptions(executable=EXE, profile_ref=str(odd), overrides=("env.GREETING=hi there",))
    )
    assert (
        one(text, "ExecStart")
        == f'{EXE} up "{tmp_path}/my 100%% $$profile.toml" --set "env.GREETING=hi there"'
    )
    assert_verifies(write_unit(tmp_path, "odd", text))


def test_a_line_break_cannot_reach_the_unit() -> None:
    from supervisor.errors import PlanError

    with pytest.raises(PlanError, match="line break"):
        render("demo", executable=EXE, overrides=("env.X=a\nExecStartPre=/bin/sh",))


def test_static_template_is_the_renderer_output_and_verifies(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, TEMPLATE_COMMAND)
    assert result.exit_code == 0, result.output
    assert TEMPLATE.read_text() == result.output, (
        "systemd/lmcache-supervise@.service is stale: regenerate with "
        f"`lmcache-supervise {' '.join(TEMPLATE_COMMAND)} > {TEMPLATE.relative_to(ROOT)}`"
    )
    text = TEMPLATE.read_text()
    assert one(text, "ExecStart") == "/usr/local/bin/lmcache-supervise up %i"
    # verify checks that the executable exists: point the copy at this installation's.
    assert_verifies(write_unit(tmp_path, "", text.replace("/usr/local/bin/lmcache-supervise", EXE)))


def test_render_command_fills_in_this_installation(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["systemd", "render", "demo", "--set", "ports.base=19000"])
    assert result.exit_code == 0, result.output
    assert one(result.output, "ExecStart") == f"{EXE} up demo --set ports.base=19000"
    path_form = CliRunner().invoke(main, ["systemd", "render", "profiles/demo-agg.toml"])
    assert one(path_form.output, "ExecStart") == f"{EXE} up {ROOT / 'profiles' / 'demo-agg.toml'}"
    bad = CliRunner().invoke(main, ["systemd", "render", "demo", "--set", "ports.base=80"])
    assert bad.exit_code == 2


def test_install_writes_the_unit_and_says_what_to_run(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["systemd", "install", "demo", "--unit-dir", str(tmp_path), "--user", "root"]
    )
    assert result.exit_code == 0, result.output
    unit = tmp_path / "lmcache-supervise@demo.service"
    assert (
        unit.read_text() == CliRunner().invoke(main, ["systemd", "render", "demo", "--user", "root"]).output
    )
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == [unit.name]  # no temporary file left
    lines = result.output.splitlines()
    assert "  systemctl daemon-reload" in lines
    assert "  systemctl enable --now lmcache-supervise@demo.service" in lines
    assert not any("useradd" in line for line in lines)  # root exists
    missing = CliRunner().invoke(
        main, ["systemd", "install", "demo", "--unit-dir", str(tmp_path), "--user", "lmcache-no-such-user"]
    )
    assert any(line.strip().startswith("useradd --system") for line in missing.output.splitlines())
    assert_verifies(unit)


def test_install_without_permission_says_to_use_root() -> None:
    # sysfs refuses to create files for everyone, root included: the same PermissionError an
    # ordinary user gets from /etc/systemd/system.
    result = CliRunner().invoke(main, ["systemd", "install", "demo", "--unit-dir", "/sys"])
    assert result.exit_code == 1, result.output
    assert "/sys: permission denied" in result.output and "sudo" in result.output


FLAGS = "--set discovery.backend=etcd --set discovery.insecure_planes=true"


def test_a_node_of_a_several_machine_deployment_keeps_its_flags(tmp_path: Path) -> None:
    etcd = FLAGS.split()
    head = CliRunner().invoke(
        main, ["systemd", "render", "demo", *etcd, "--role", "head", "--advertise", "10.0.0.1"]
    )
    assert head.exit_code == 0, head.output
    assert one(head.output, "ExecStart") == (f"{EXE} up demo {FLAGS} --role head --advertise 10.0.0.1")
    # The head runs etcd and the frontend (the workers run elsewhere): its timeouts are that plan's.
    loaded = profiles.load("demo", overrides=["discovery.backend=etcd", "discovery.insecure_planes=true"])
    node = nodes.node_options(loaded, "head", advertise="10.0.0.1")
    head_plan = planmod.render(loaded, state_root=Path(systemd.SYSTEM_STATE_ROOT), **node.as_kwargs())
    assert [p.name for p in head_plan.processes] == ["etcd", "frontend"]
    assert one(head.output, "TimeoutStopSec") == str(
        round(sum(p.stop_timeout_s + 5 for p in head_plan.processes)) + 30
    )
    assert_verifies(write_unit(tmp_path, "demo", head.output))
    worker = CliRunner().invoke(
        main, ["systemd", "render", "demo", *etcd, "--role", "worker", "--head", "10.0.0.1"]
    )
    assert worker.exit_code == 0, worker.output
    assert one(worker.output, "ExecStart") == f"{EXE} up demo {FLAGS} --role worker --head 10.0.0.1"
