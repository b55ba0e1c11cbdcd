"""``init``'s pure half: model shapes from real config.json files, and the sizing decisions with reasons.

The fixtures under tests/fixtures/models are the public config.json files of real models; their
published parameter counts are the reference the estimate is held to.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.errors import ProfileError
from supervisor.profile.advise import GIB, GpuShape, HostShape, advise, kv_tokens
from supervisor.profile.shape import model_shape

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
DEMO = Path(__file__).resolve().parents[2] / "profiles" / "demo-model"
# name -> (published parameter count in billions, KV bytes per token: 2 x layers x KV heads x head_dim x 2 B)
PUBLISHED = {
    "llama-3.1-8b-instruct": (8.03, 2 * 32 * 8 * 128 * 2),
    "llama-3.1-70b-instruct": (70.6, 2 * 80 * 8 * 128 * 2),
    "qwen2.5-7b-instruct": (7.62, 2 * 28 * 4 * 128 * 2),
    "qwen3-0.6b": (0.60, 2 * 28 * 8 * 128 * 2),  # head_dim 128 is explicit, not hidden/heads (64)
    "mixtral-8x7b-instruct": (46.7, 2 * 32 * 8 * 128 * 2),
}


def shape(name: str):  # noqa: ANN201 - a test helper
    folder = DEMO if name == "demo" else FIXTURES / name
    return model_shape(name, json.loads((folder / "config.json").read_text()))


def host(n: int, gib: float, *, nvlinks: int | None = 18, ram_gib: float = 1024) -> HostShape:
    gpus = tuple(GpuShape(i, "NVIDIA H100 80GB HBM3", int(gib * GIB), nvlinks) for i in range(n))
    return HostShape(gpus, int(ram_gib * GIB), int(ram_gib * 0.95 * GIB), described=True)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameters_and_kv_per_token_match_the_published_figures(name: str) -> None:
    model = shape(name)
    billions, kv = PUBLISHED[name]
    assert model.parameters / 1e9 == pytest.approx(billions, rel=0.01)
    assert model.kv_bytes_per_token == kv
    assert model.weight_bytes == pytest.approx(model.parameters * 2, rel=0.001)  # bfloat16


def test_moe_counts_every_expert_and_demo_is_tiny() -> None:
    assert shape("mixtral-8x7b-instruct").experts == 8
    demo = shape("demo")
    assert demo.parameters < 200_000 and demo.kv_bytes_per_token == 2 * 2 * 4 * 16 * 2


def test_a_safetensors_size_replaces_the_estimate() -> None:
    config = json.loads((FIXTURES / "llama-3.1-8b-instruct" / "config.json").read_text())
    model = model_shape("x", config, weight_bytes=16_060_522_496)
    assert model.weight_bytes == 16_060_522_496 and model.weight_source == "model.safetensors.index.json"


def test_a_missing_or_bad_key_is_named() -> None:
    with pytest.raises(ProfileError, match="num_hidden_layers: is missing"):
        model_shape("x", {"hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10})
    with pytest.raises(ProfileError, match="hidden_size: expected a positive integer, got '64'"):
        model_shape(
            "x", {"hidden_size": "64", "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 10}
        )


def test_an_8b_model_on_one_gpu_is_one_agg_replica() -> None:
    advice = advise(shape("llama-3.1-8b-instruct"), host(1, 80))
    assert (advice.layout, advice.tensor_parallel_size, advice.replicas) == ("agg", 1, 1)
    assert [(w.name, w.role, w.gpus) for w in advice.workers] == [("worker", "agg", (0,))]
    assert advice.max_model_len is None and advice.router_mode == "round-robin"
    assert "fit one replica" in advice.notes["layout"][0]


def test_nvlinked_gpus_get_disagg_with_the_odd_replica_on_decode() -> None:
    advice = advise(shape("llama-3.1-8b-instruct"), host(8, 80))
    roles = [w.role for w in advice.workers]
    assert advice.layout == "disagg" and roles == ["decode"] * 4 + ["prefill"] * 4
    assert advise(shape("qwen2.5-7b-instruct"), host(3, 80)).workers[-1].role == "prefill"
    three = [w.role for w in advise(shape("qwen2.5-7b-instruct"), host(3, 80)).workers]
    assert three == ["decode", "decode", "prefill"]
    assert advice.router_mode == "kv" and "NVLink" in advice.notes["layout"][0]


def test_pcie_gpus_get_agg_replicas_behind_the_kv_router() -> None:
    advice = advise(shape("llama-3.1-8b-instruct"), host(4, 80, nvlinks=0))
    assert advice.layout == "agg" and [w.name for w in advice.workers] == [f"worker-{i}" for i in range(4)]
    assert "PCIe" in advice.notes["layout"][0] and advice.router_mode == "kv"
    unknown = advise(shape("llama-3.1-8b-instruct"), host(2, 80, nvlinks=None))
    assert unknown.layout == "agg" and "unknown topology" in unknown.notes["layout"][0]


def test_70b_takes_the_smallest_tensor_parallel_size_that_holds_a_full_context() -> None:
    h200 = advise(shape("llama-3.1-70b-instruct"), host(8, 140))
    assert (h200.tensor_parallel_size, h200.replicas, h200.layout) == (2, 4, "disagg")
    assert [w.gpus for w in h200.workers] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    h100 = advise(shape("llama-3.1-70b-instruct"), host(8, 80))
    assert h100.tensor_parallel_size == 4 and h100.replicas == 2
    assert "only" in " ".join(h100.notes["tensor_parallel"])  # why not 2
    assert h200.startup_timeout_s == 1800  # 131 GiB of weights


def test_a_context_that_does_not_fit_is_capped_with_max_model_len() -> None:
    advice = advise(shape("llama-3.1-70b-instruct"), host(2, 80))
    assert advice.tensor_parallel_size == 2 and advice.max_model_len is not None
    assert 4096 <= advice.max_model_len <= advice.kv_tokens_per_replica < 131072
    assert advice.max_model_len % 1024 == 0 and "--max-model-len" in advice.notes["tensor_parallel"][0]


def test_tensor_parallel_sizes_that_do_not_divide_the_heads_are_skipped() -> None:
    qwen = shape("qwen2.5-7b-instruct")  # 28 attention heads, 4 KV heads
    assert qwen.splits_over(4) and not qwen.splits_over(8)
    assert kv_tokens(qwen, 80 * GIB, 1) > 0


def test_a_model_that_cannot_fit_says_what_it_needs() -> None:
    with pytest.raises(ProfileError, match=r"does not fit: the weights take 131\.4 GiB"):
        advise(shape("llama-3.1-70b-instruct"), host(1, 80))
    with pytest.raises(ProfileError, match="no GPU to size for"):
        advise(shape("demo"), HostShape((), 64 * GIB, 60 * GIB))
    with pytest.raises(ProfileError, match="disagg needs two replicas"):
        advise(shape("llama-3.1-8b-instruct"), host(1, 80), layout="disagg")


def test_lmcache_gets_half_the_ram_over_the_ranks_that_load_it() -> None:
    agg = advise(shape("llama-3.1-8b-instruct"), host(4, 80, nvlinks=0, ram_gib=512))
    assert agg.lmcache_cpu_gb == 64  # 256 GiB over 4 agg ranks
    disagg = advise(shape("llama-3.1-8b-instruct"), host(4, 80, ram_gib=512))
    assert disagg.lmcache_cpu_gb == 128  # only the 2 prefill ranks load LMCache
    tight = HostShape(host(1, 80).gpus, 64 * GIB, 20 * GIB, described=False)
    small = advise(shape("llama-3.1-8b-instruct"), tight)
    assert small.lmcache_cpu_gb == 11  # 20 - 6.4 margin - 2 runtime, floored: less than half of 64
    assert "20.0 GiB available now" in small.notes["lmcache"][0]


def test_the_runtime_reserve_and_margin_are_the_ones_preflight_checks() -> None:
    from supervisor.preflight import needs
    from supervisor.profile import advise as sizing

    assert sizing.RUNTIME_RESERVE_GB == needs.RUNTIME_RESERVE_GB["vllm"]
    assert sizing.HOST_MEMORY_MARGIN == needs.HOST_MEMORY_MARGIN
