"""A model's shape, read from its Hugging Face ``config.json``: the numbers ``init`` sizes a host with.

Pure: the caller reads the file (``host.model_config``) and passes the parsed object. Parameters are
estimated from the layer arithmetic of decoder-only transformers (attention with grouped KV heads, a
gated MLP or a mixture of gated experts, embeddings); where the model directory has a safetensors
index its ``total_size`` is used instead, since it is the weights' exact size on disk. The KV cache
per token is what vLLM allocates: K and V for every layer and KV head (or, for multi-head latent
attention, one compressed latent per layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from supervisor.errors import ProfileError

# What one element takes, by config dtype. vLLM's dtype "auto" serves float32 checkpoints in
# 16 bits, so float32 weights and KV are counted at 2 bytes too.
DTYPE_BYTES = {
    "bfloat16": 2.0,
    "float16": 2.0,
    "half": 2.0,
    "float32": 2.0,
    "float": 2.0,
    "float8_e4m3fn": 1.0,
    "float8": 1.0,
    "fp8": 1.0,
}
# Quantized checkpoints: bytes per weight by quantization method (bits where the config says).
QUANT_BYTES = {"fp8": 1.0, "fbgemm_fp8": 1.0, "compressed-tensors": 1.0, "bitsandbytes": 0.5, "mxfp4": 0.5}


@dataclass(frozen=True)
class ModelShape:
    """The facts about a model that decide how it is served. Sizes are bytes."""

    name: str
    architecture: str
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    parameters: int
    weight_bytes: int
    weight_source: str  # "estimated from config.json" or "model.safetensors.index.json"
    kv_element_bytes: float
    experts: int = 0  # 0 for a dense model
    latent_kv_dim: int = 0  # multi-head latent attention (DeepSeek): per-layer compressed KV width

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache for one token of one sequence, all layers, K and V, over the whole replica."""
        return self.kv_bytes_per_token_per_gpu(1)

    def kv_bytes_per_token_per_gpu(self, tensor_parallel: int) -> int:
        """What one GPU of a ``tensor_parallel``-way replica holds per token: KV heads are split over the
        ranks, but never below one head per rank (vLLM replicates a head when TP exceeds the KV heads);
        a latent KV is replicated on every rank."""
        if self.latent_kv_dim:
            return int(self.layers * self.latent_kv_dim * self.kv_element_bytes)
        heads_per_rank = -(-self.kv_heads // tensor_parallel)
        return int(2 * self.layers * heads_per_rank * self.head_dim * self.kv_element_bytes)

    def splits_over(self, tensor_parallel: int) -> bool:
        """Whether vLLM accepts this tensor-parallel size: attention heads divide evenly, and KV heads
        divide evenly or are replicated a whole number of times."""
        if self.attention_heads % tensor_parallel:
            return False
        if self.latent_kv_dim:
            return True
        if tensor_parallel <= self.kv_heads:
            return self.kv_heads % tensor_parallel == 0
        return tensor_parallel % self.kv_heads == 0


def _int(config: Mapping[str, Any], source: str, *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ProfileError(source, key, f"expected a positive integer, got {value!r}")
            return value
    if default is not None:
        return default
    raise ProfileError(source, keys[0], "is missing: init needs it to size the model")


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """Multimodal configs (Llava, Qwen2-VL, Gemma 3) keep the language model's numbers in text_config."""
    inner = config.get("text_config")
    if isinstance(inner, Mapping) and "num_hidden_layers" in inner and "num_hidden_layers" not in config:
        return {**config, **inner}
    return config


def _weight_element_bytes(config: Mapping[str, Any], dtype: str) -> float:
    quant = config.get("quantization_config")
    if isinstance(quant, Mapping):
        bits = quant.get("bits") or quant.get("weight_bits")
        if isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 16:
            return bits / 8
        method = str(quant.get("quant_method", "")).lower()
        if method in QUANT_BYTES:
            return QUANT_BYTES[method]
    return DTYPE_BYTES.get(dtype, 2.0)


def estimate_parameters(config: Mapping[str, Any], source: str) -> tuple[int, int]:
    """(total parameters, experts) from the layer arithmetic; norms and biases are left out (<0.1 %)."""
    config = _text_config(config)
    hidden = _int(config, source, "hidden_size", "d_model", "n_embd")
    layers = _int(config, source, "num_hidden_layers", "n_layer", "num_layers")
    heads = _int(config, source, "num_attention_heads", "n_head")
    kv_heads = _int(config, source, "num_key_value_heads", default=heads)
    head_dim = _int(config, source, "head_dim", default=hidden // heads)
    vocab = _int(config, source, "vocab_size")
    intermediate = _int(config, source, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
    experts = 0
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            experts = value
            break
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q and o; k and v
    if experts:
        expert_width = _int(config, source, "moe_intermediate_size", default=intermediate)
        shared = config.get("n_shared_experts") or 0
        shared_width = config.get("shared_expert_intermediate_size") or expert_width * int(shared)
        mlp = 3 * hidden * expert_width * experts + 3 * hidden * int(shared_width) + hidden * experts
    else:
        mlp = 3 * hidden * intermediate  # gate, up, down
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    return layers * (attention + mlp) + embeddings, experts


def model_shape(
    name: str, config: Mapping[str, Any], *, source: str = "config.json", weight_bytes: int | None = None
) -> ModelShape:
    """The shape of ``name`` from its parsed ``config.json``; ``weight_bytes`` from a safetensors index
    replaces the estimate. Raises :class:`ProfileError` naming the key when one is missing or bad."""
    if not isinstance(config, Mapping):
        raise ProfileError(source, "", "expected a JSON object (a Hugging Face config.json)")
    flat = _text_config(config)
    parameters, experts = estimate_parameters(config, source)
    hidden = _int(flat, source, "hidden_size", "d_model", "n_embd")
    heads = _int(flat, source, "num_attention_heads", "n_head")
    dtype = str(flat.get("torch_dtype") or flat.get("dtype") or "bfloat16").lower().removeprefix("torch.")
    element = _weight_element_bytes(flat, dtype)
    latent = 0
    if isinstance(flat.get("kv_lora_rank"), int):
        latent = int(flat["kv_lora_rank"]) + int(flat.get("qk_rope_head_dim") or 0)
    architectures = flat.get("architectures")
    return ModelShape(
        name=name,
        architecture=str(architectures[0])
        if isinstance(architectures, list) and architectures
        else str(flat.get("model_type", "unknown")),
        layers=_int(flat, source, "num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=hidden,
        attention_heads=heads,
        kv_heads=_int(flat, source, "num_key_value_heads", default=heads),
        head_dim=_int(flat, source, "head_dim", default=hidden // heads),
        vocab_size=_int(flat, source, "vocab_size"),
        max_context=_int(flat, source, "max_position_embeddings", "n_positions", "seq_length", default=4096),
        parameters=parameters,
        weight_bytes=weight_bytes if weight_bytes else int(parameters * element),
        weight_source="model.safetensors.index.json" if weight_bytes else "estimated from config.json",
        kv_element_bytes=DTYPE_BYTES.get(dtype, 2.0),
        experts=experts,
        latent_kv_dim=latent,
    )
