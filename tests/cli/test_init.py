"""``lmcache-supervise init`` for 1, 2, 4 and 8 GPUs (NVML faked at its boundary, as on an H200 host)
and the fixture models: each written profile passes ``plan``, explains its choices, and passes the
host-sized checks (gpu, host-memory, ports) against the same fake GPUs. What this 2-core, 23 GB
machine lacks beside the GPUs is a GPU server's RAM: the parametrized test fakes that at the same
boundary (``memory_facts``, 1 TiB), and one test sizes against this machine's real RAM."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner
from conftest import CLI
from fakenvml import FakeGpu, FakeNvml

from supervisor.cli import main
from supervisor.cli.app import load_plan
from supervisor.host import facts as host
from supervisor.host import gpu as host_gpu
from supervisor.host.facts import MemoryFacts
from supervisor.preflight import checks as preflight

ROOT = Path(__file__).resolve().parents[2]
MODELS = {p.name: p for p in (ROOT / "tests" / "fixtures" / "models").iterdir() if p.is_dir()}
MODELS["demo-model"] = ROOT / "profiles" / "demo-model"
# What cannot fit a whole number of 141 GB H200s at 90 %: the 131 GiB of a bf16 Llama 70B on one GPU.
DOES_NOT_FIT = {("llama-3.1-70b-instruct", 1)}
SERVER_RAM = MemoryFacts(total_bytes=1024 * 2**30, available_bytes=980 * 2**30)


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> list[FakeNvml]:
    """``set(n, nvlinks)`` below installs a fake NVML with n H200s where init and preflight look for pynvml."""
    made: list[FakeNvml] = []
    monkeypatch.setattr(host_gpu, "load_pynvml", lambda: made[-1])
    return made


def install(made: list[FakeNvml], n: int, nvlinks: int = 18) -> FakeNvml:
    nvml = FakeNvml([FakeGpu(i, nvlinks=nvlinks) for i in range(n)])
    made.append(nvml)
    return nvml


def init(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {"LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path / "state"), "COLUMNS": "200"}
    result = CliRunner().invoke(main, ["init", *args], env=env, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_init_writes_a_profile_plan_accepts_and_this_host_passes(
    tmp_path: Path, fake_gpus: list[FakeNvml], model: str, gpus: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMCACHE_SUPERVISE_STATE_ROOT", str(tmp_path / "state"))
    monkeypatch.setattr(host, "memory_facts", lambda: SERVER_RAM)
    nvml = install(fake_gpus, gpus)
    out = tmp_path / "sized.toml"
    code, output = init(tmp_path, "--model", str(MODELS[model]), "-o", str(out))
    if (model, gpus) in DOES_NOT_FIT:
        assert code == 2 and "does not fit: the weights take" in output and not out.exists()
        return
    assert code == 0, output
    assert output.startswith(f"wrote {out}: ") and "next: lmcache-supervise check" in output
    text = out.read_text()
    data = tomllib.loads(text)
    for why in ("# Tensor parallel", "# Replicas", "# Layout", "GB per rank x", "# LlamaForCausalLM"):
        if why == "# LlamaForCausalLM" and "mixtral" in model:
            why = "# MixtralForCausalLM"
        if why == "# LlamaForCausalLM" and "qwen" in model:
            why = "# Qwen"
        assert why in text, (why, text)
    rendered = load_plan(str(out))
    workers = [p for p in rendered.processes if p.role.is_worker]
    used = sorted(g for w in workers for g in w.gpus)
    assert used == sorted(set(used)) and set(used) <= set(range(gpus)) and len(used) > gpus // 2
    tp = {w.tensor_parallel_size for w in workers}
    assert len(tp) == 1 and all(len(w.gpus) == w.tensor_parallel_size for w in workers)
    roles = {w.role.value for w in workers}
    assert roles == ({"agg"} if len(workers) == 1 else {"decode", "prefill"})  # NVLinked H200s
    ranks = sum(len(w.gpus) for w in workers if w.loads_lmcache)
    assert data["lmcache"]["max_local_cpu_size"] == (1024 // 2) // ranks  # half the RAM over those ranks
    # The host-sized checks against the same fake GPUs and this machine's RAM and ports. The software
    # and model checks judge what is installed and downloaded, not sizing: they are run on the GPU host.
    request = dataclasses.replace(preflight.facts_request(rendered, ()), interpreters=())
    findings = preflight.check(rendered, host.gather(request, nvml=nvml))
    sized = {f.check: f for f in findings if f.check in ("gpu", "host-memory", "ports")}
    assert {c: f.status.value for c, f in sized.items()} == dict.fromkeys(
        ("gpu", "host-memory", "ports"), "ok"
    ), [f.message for f in sized.values()]


def test_on_this_machines_real_ram_one_gpu_passes_host_memory(
    tmp_path: Path, fake_gpus: list[FakeNvml], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMCACHE_SUPERVISE_STATE_ROOT", str(tmp_path / "state"))
    nvml = install(fake_gpus, 1)
    out = tmp_path / "one.toml"
    code, output = init(tmp_path, "--model", str(MODELS["qwen3-0.6b"]), "-o", str(out))
    assert code == 0, output
    rendered = load_plan(str(out))
    request = dataclasses.replace(preflight.facts_request(rendered, ()), interpreters=())
    memory = [
        f for f in preflight.check(rendered, host.gather(request, nvml=nvml)) if f.check == "host-memory"
    ]
    assert [f.status.value for f in memory] == ["ok"], memory
    total_gib = host.memory_facts().total_bytes / 2**30
    assert 1 <= tomllib.loads(out.read_text())["lmcache"]["max_local_cpu_size"] <= total_gib / 2


def test_pcie_gpus_get_agg_replicas_and_the_reason(tmp_path: Path, fake_gpus: list[FakeNvml]) -> None:
    install(fake_gpus, 4, nvlinks=0)
    code, output = init(tmp_path, "--model", str(MODELS["llama-3.1-8b-instruct"]), "-o", "-")
    assert code == 0, output
    data = tomllib.loads(output)
    assert list(data["workers"]) == ["worker"] and data["workers"]["worker"]["replicas"] == 4
    assert data["workers"]["worker"]["gpus"] == [0, 1, 2, 3]
    assert data["frontend"]["router_mode"] == "kv" and "PCIe only" in output


def test_a_described_host_needs_no_gpu_here(tmp_path: Path) -> None:
    """This machine has no NVIDIA driver: --gpus/--gpu-memory/--ram describe the one that will run it."""
    args = (
        "--model",
        str(MODELS["llama-3.1-70b-instruct"]),
        "--gpus",
        "8",
        "--gpu-memory",
        "80",
        "--ram",
        "1024",
    )
    code, output = init(tmp_path, *args, "--nvlink", "-o", "-")
    assert code == 0, output
    data = tomllib.loads(output)
    assert {w["tensor_parallel_size"] for w in data["workers"].values()} == {
        4
    }  # 2 does not hold 128k on 80 GB
    assert sorted(data["workers"]) == ["decode", "prefill"] and "described by flags" in output
    assert data["lmcache"]["max_local_cpu_size"] == 128  # 512 GiB (half of 1024) over the prefill's 4 ranks
    code, output = init(tmp_path, *args, "--layout", "agg", "--port-base", "9000", "-o", "-")
    assert code == 0 and tomllib.loads(output)["ports"]["base"] == 9000
    assert "asked for with --layout" in output and "asked for with --port-base" in output


def test_the_written_file_passes_the_real_plan_command(tmp_path: Path) -> None:
    env = {**os.environ, "LMCACHE_SUPERVISE_STATE_ROOT": str(tmp_path / "state")}
    out = tmp_path / "qwen.toml"
    args = [
        "--model",
        str(MODELS["qwen2.5-7b-instruct"]),
        "--gpus",
        "2",
        "--gpu-memory",
        "24",
        "-o",
        str(out),
    ]
    done = subprocess.run([CLI, "init", *args], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    planned = subprocess.run(
        [CLI, "plan", str(out), "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert planned.returncode == 0, planned.stderr
    assert '"tensor_parallel_size": 1' in planned.stdout


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    # No GPU on this machine and no description of another host.
    code, output = init(tmp_path, "--model", str(MODELS["demo-model"]), "-o", str(tmp_path / "x.toml"))
    if host_gpu.gpu_facts().error:
        assert code == 2 and "describe it with --gpus N --gpu-memory GB" in output
    code, output = init(tmp_path, "--model", str(MODELS["demo-model"]), "--gpus", "2")
    assert code == 2 and "--gpus needs --gpu-memory" in output
    code, output = init(tmp_path, "--model", str(tmp_path), "--gpus", "1", "--gpu-memory", "80")
    assert code == 2 and f"{tmp_path} has no config.json" in output
    code, output = init(tmp_path, "--model", "org/not-downloaded", "--gpus", "1", "--gpu-memory", "80")
    assert code == 2 and "not in the local Hugging Face cache" in output
    existing = tmp_path / "taken.toml"
    existing.write_text("# mine\n")
    code, output = init(
        tmp_path,
        "--model",
        str(MODELS["demo-model"]),
        "--gpus",
        "1",
        "--gpu-memory",
        "8",
        "-o",
        str(existing),
    )
    assert code == 2 and "exists; pass --force" in output and existing.read_text() == "# mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.toml"]  # no scratch left behind
