"""Bad input: every case exits 2 with one line naming the file and key path, and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Each case: (id, profile text or None to use the demo profile, extra CLI args, text the message must contain)
DEMO_EXTENDS = 'extends = "demo"\n'
CASES = [
    ("toml-syntax", 'name = "x"\n[model\nname = "a"\n', [], "invalid TOML"),
    ("toml-syntax-line", DEMO_EXTENDS + "[ports]\nbase = \n", [], "line 3"),
    (
        "unknown-key-did-you-mean",
        DEMO_EXTENDS + "[lmcache]\nchunk_sise = 256\n",
        [],
        "lmcache.chunk_sise: unknown key; did you mean 'chunk_size'?",
    ),
    (
        "unknown-top-key",
        DEMO_EXTENDS + 'enigne = "vllm"\n',
        [],
        "enigne: unknown key; did you mean 'engine'?",
    ),
    (
        "unknown-worker-key",
        DEMO_EXTENDS + "[workers.decode]\ngpu = [0]\n",
        [],
        "workers.decode.gpu: unknown key; did you mean 'gpus'?",
    ),
    (
        "size-with-unit",
        DEMO_EXTENDS + '[lmcache]\nmax_local_cpu_size = "10GB"\n',
        [],
        'lmcache.max_local_cpu_size: expected a number of GB, got "10GB"',
    ),
    ("wrong-type-port", DEMO_EXTENDS + '[ports]\nbase = "eighteen"\n', [], "ports.base: expected an integer"),
    (
        "wrong-type-gpus",
        'extends = "disagg"\n[workers.decode]\ngpus = "0"\n',
        [],
        "workers.decode.gpus: expected an array",
    ),
    (
        "gpu-twice",
        'extends = "disagg"\n[workers.prefill]\ngpus = [0]\n',
        [],
        "workers.prefill.gpus: GPU 0 is already given to worker 'decode'",
    ),
    ("port-collision", DEMO_EXTENDS + "[frontend]\nport = 18082\n", [], "port 18082"),
    (
        "system-port-16-bit",
        DEMO_EXTENDS + "[workers.decode]\nsystem_port = 40000\n",
        [],
        "workers.decode.system_port: DYN_SYSTEM_PORT 40000 is above 32767",
    ),
    (
        "prefill-without-decode",
        'extends = "demo"\n',
        ["--set", 'workers.decode.role="prefill"'],
        "workers: a prefill worker needs a decode worker",
    ),
    (
        "lmcache-bool-yes",
        DEMO_EXTENDS + '[lmcache]\nlocal_cpu = "yes"\n',
        [],
        "lmcache.local_cpu: expected true or false",
    ),
    (
        "lmcache-env-bool-on",
        DEMO_EXTENDS + '[workers.decode.env]\nLMCACHE_LOCAL_CPU = "on"\n',
        [],
        "workers.decode.env.LMCACHE_LOCAL_CPU: expected true or false (LMCache would silently read 'on' as false)",
    ),
    (
        # LMCache 0.5.6 turns usage tracking off only for the exact text "false" (tests/engines/)
        "lmcache-env-track-usage-zero",
        DEMO_EXTENDS + '[workers.decode.env]\nLMCACHE_TRACK_USAGE = "0"\n',
        [],
        "workers.decode.env.LMCACHE_TRACK_USAGE: expected exactly true or false",
    ),
    (
        "lmcache-extra-bool",
        DEMO_EXTENDS + '[lmcache.extra]\nsave_unfull_chunk = "yes"\n',
        [],
        "lmcache.extra.save_unfull_chunk: expected true or false",
    ),
    (
        "disk-size-zero",
        DEMO_EXTENDS + '[lmcache]\nlocal_disk = "/var/cache/lmcache"\n',
        [],
        "lmcache.max_local_disk_size: must be above 0",
    ),
    (
        "gds-without-buffer",
        DEMO_EXTENDS + '[lmcache.gds]\npath = "/mnt/gds"\n',
        [],
        "lmcache.gds.buffer_size_mib: is required",
    ),
    (
        "remote-unknown-scheme",
        DEMO_EXTENDS + '[lmcache.remote]\nurl = "memcached://h:11211"\n',
        [],
        "lmcache.remote.url: unknown scheme in 'memcached'",
    ),
    (
        "sentinel-without-master",
        DEMO_EXTENDS + '[lmcache.remote]\nurl = "redis-sentinel://h1:26379"\n',
        [],
        "lmcache.remote.service_name: is required",
    ),
    (
        "model-flag-smuggling",
        DEMO_EXTENDS + '[model]\nname = "--trust-remote-code"\n',
        [],
        "model.name: expected a model name or path, got '--trust-remote-code' (it would be read as a flag)",
    ),
    (
        "model-flag-via-cli",
        None,
        ["--model", "--enforce-eager"],
        "--model: model.name: expected a model name or path",
    ),
    (
        "managed-flag-in-args",
        'extends = "disagg"\n[workers.decode]\nargs = ["--connector", "lmcache"]\n',
        [],
        "workers.decode.args: --connector is set by the supervisor",
    ),
    (
        "mocker-bootstrap-rendezvous",
        DEMO_EXTENDS + '[workers.prefill]\nargs = ["--bootstrap-ports", "18601"]\n',
        [],
        "workers.prefill.args: --bootstrap-ports is set by the supervisor; use nothing: the mocker's "
        "bootstrap rendezvous stays off",
    ),
    (
        "managed-env",
        DEMO_EXTENDS + '[workers.decode.env]\nPROMETHEUS_MULTIPROC_DIR = "/tmp/shared"\n',
        [],
        "workers.decode.env.PROMETHEUS_MULTIPROC_DIR: is set by the supervisor",
    ),
    (
        "bad-role",
        DEMO_EXTENDS + '[workers.decode]\nrole = "encoder"\n',
        [],
        "workers.decode.role: expected one of 'agg', 'decode' or 'prefill', got 'encoder'",
    ),
    (
        "bad-worker-name",
        DEMO_EXTENDS + '[workers."Decode Worker"]\nrole = "agg"\n',
        [],
        "workers.Decode Worker",
    ),
    (
        "tp-mismatch",
        'extends = "disagg"\n[workers.decode]\ntensor_parallel_size = 2\n',
        [],
        "workers.decode.gpus: expected 2 GPU indices",
    ),
    (
        "spare-given-to-a-worker",
        'extends = "disagg"\nspare_gpus = [0]\n',
        [],
        "spare_gpus: GPU 0 is a spare but also given to worker 'decode'",
    ),
    ("spare-twice", 'extends = "disagg"\nspare_gpus = [2, 2]\n', [], "spare_gpus: lists a GPU twice"),
    (
        "vllm-worker-without-gpu",
        'extends = "agg"\n[workers.worker]\ngpus = []\n',
        [],
        "workers.worker.gpus: expected at least one GPU index",
    ),
    ("negative-timeout", DEMO_EXTENDS + "[frontend]\nstop_timeout_s = -1\n", [], "frontend.stop_timeout_s"),
    (
        "bad-signal",
        DEMO_EXTENDS + '[frontend]\nstop_signal = "SIGFOO"\n',
        [],
        "frontend.stop_signal: expected one of",
    ),
    ("bad-set-syntax", None, ["--set", "ports.base"], "--set: ports.base: expected dotted.key=value"),
    (
        "set-wrong-type",
        None,
        ["--set", "ports.base=true"],
        "--set: ports.base: expected an integer, got True",
    ),
    ("extends-missing", 'extends = "nosuchprofile"\n', [], "extends: unknown profile"),
    ("extends-cycle", "CYCLE", [], "extends: cycle:"),
    (
        "unknown-profile-name",
        "UNKNOWN",
        [],
        "unknown profile (did you mean 'disagg'?); built-in profiles: agg, agg-nolmcache, demo",
    ),
    ("missing-model", 'name = "x"\nengine = "mocker"\n[workers.w]\nrole = "agg"\n', [], "model: is required"),
]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize(("case", "text", "extra", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_profile(tmp_path: Path, case: str, text: str | None, extra: list[str], expected: str) -> None:
    if text is None:
        target = "demo"
    elif text == "UNKNOWN":
        target = "disagq"
    elif text == "CYCLE":
        (tmp_path / "a.toml").write_text('extends = "./b.toml"\n')
        (tmp_path / "b.toml").write_text('extends = "./a.toml"\n')
        target = str(tmp_path / "a.toml")
    else:
        (tmp_path / "bad.toml").write_text(text)
        target = str(tmp_path / "bad.toml")
    result = run_cli(["plan", target, *extra], cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in lines[0], lines[0]
    if text not in (None, "UNKNOWN"):
        assert lines[0].startswith(
            ("lmcache-supervise: bad.toml", "lmcache-supervise: a.toml", f"lmcache-supervise: {tmp_path}")
        ), lines[0]


def test_override_and_model_flag_apply(tmp_path: Path) -> None:
    result = run_cli(
        [
            "plan",
            "demo",
            "--json",
            "--set",
            "ports.base=21000",
            "--model",
            str(ROOT / "profiles" / "demo-model"),
        ],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert '"base_url": "http://127.0.0.1:21000"' in result.stdout
