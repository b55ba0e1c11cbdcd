"""Sizing a deployment for a host: the pure half of ``lmcache-supervise init``.

Given a model's shape (:mod:`supervisor.profile.shape`) and a host's shape (GPUs, their memory and
links, RAM), :func:`advise` picks the tensor-parallel size, the number of replicas, agg or disagg, the
GPUs of each worker, LMCache's CPU cache per rank and the longest context that fits, and keeps the
reason for every choice beside it; :mod:`supervisor.profile.draft` writes the result as a commented
profile. No IO here: the CLI gathers the facts (NVML, RAM, ports, config.json) and passes them in.

The arithmetic is vLLM's: a worker may use ``gpu_memory_utilization`` of each GPU; the weights are
split evenly over the tensor-parallel ranks; what is left after activations is KV cache, and vLLM
refuses to start when it cannot hold one sequence of ``max_model_len`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from supervisor.errors import ProfileError
from supervisor.profile.shape import ModelShape

GIB = 1024**3
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default and the schema's: the share of each GPU a worker takes
# Per GPU, outside weights and KV: CUDA context, activations of the profiling run, CUDA graphs. vLLM
# measures it at start; 3 GiB covers a 70B model's 8k-token profiling batch with room to spare.
ACTIVATION_RESERVE_BYTES = 3 * GIB
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)  # powers of two: what NCCL rings and head counts divide best
CONTEXT_CAP = 131072  # a longer native context is capped: few deployments serve more per request
MIN_CONTEXT = 4096  # below this a replica is not worth serving: the model needs more GPU memory
# Host memory. The runtime reserve per rank is the one preflight's host-memory check counts
# (preflight.needs.RUNTIME_RESERVE_GB["vllm"]; a test keeps them equal), and so is the margin.
RUNTIME_RESERVE_GB = 2.0
HOST_MEMORY_MARGIN = 0.10
# LMCache may take at most this share of RAM: the rest is the OS, the page cache the weights load
# through, vLLM's pinned buffers and the workers' own memory.
LMCACHE_RAM_SHARE = 0.5
LONG_LOAD_BYTES = 60 * GIB  # weights above this get a longer startup budget (disk read + compile)

Layout = Literal["agg", "disagg"]


@dataclass(frozen=True)
class GpuShape:
    index: int
    name: str
    memory_bytes: int
    nvlinks: int | None = None  # active NVLink links; 0 on PCIe-only GPUs, None when NVML cannot tell


@dataclass(frozen=True)
class HostShape:
    """What ``init`` sizes against: this host as NVML and the kernel see it, or one described by flags."""

    gpus: tuple[GpuShape, ...]
    ram_total_bytes: int
    ram_available_bytes: int
    described: bool = False  # True when --gpus/--gpu-memory/--ram described another host

    @property
    def nvlink(self) -> bool | None:
        """True when every GPU has an active NVLink, False when one has none, None when unknown."""
        links = [g.nvlinks for g in self.gpus]
        if not links or any(n is None for n in links):
            return None
        return all(n for n in links)


@dataclass(frozen=True)
class WorkerAdvice:
    name: str
    role: Literal["agg", "decode", "prefill"]
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class Advice:
    """Every decision ``init`` makes, and why; ``notes`` maps a decision to its reasons, in order."""

    model: ModelShape
    host: HostShape
    layout: Layout
    tensor_parallel_size: int
    replicas: int
    workers: tuple[WorkerAdvice, ...]
    max_model_len: int | None  # None: the model's own context fits; else the --max-model-len to pass
    kv_tokens_per_replica: int
    lmcache_cpu_gb: float
    router_mode: str
    startup_timeout_s: float | None
    port_base: int
    notes: dict[str, list[str]] = field(default_factory=dict)


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def kv_room_per_gpu(model: ModelShape, gpu_bytes: int, tensor_parallel: int) -> int:
    """Bytes of KV cache one GPU of a ``tensor_parallel``-way replica holds (negative: weights do not fit)."""
    usable = int(gpu_bytes * GPU_MEMORY_UTILIZATION)
    return usable - math.ceil(model.weight_bytes / tensor_parallel) - ACTIVATION_RESERVE_BYTES


def kv_tokens(model: ModelShape, gpu_bytes: int, tensor_parallel: int) -> int:
    """Tokens of KV cache one replica holds: every rank holds its share of each token."""
    room = kv_room_per_gpu(model, gpu_bytes, tensor_parallel)
    return max(0, room // model.kv_bytes_per_token_per_gpu(tensor_parallel))


def choose_tensor_parallel(
    model: ModelShape, gpu_count: int, gpu_bytes: int
) -> tuple[int, int | None, list[str]]:
    """(TP size, --max-model-len or None, reasons): the smallest TP whose replica holds one sequence of
    the model's full context (capped at 128k); failing that, the smallest whose replica holds at least
    MIN_CONTEXT tokens, with the context capped to what it holds."""
    context = min(model.max_context, CONTEXT_CAP)
    valid = [tp for tp in TENSOR_PARALLEL_SIZES if tp <= gpu_count and model.splits_over(tp)]
    skipped = [tp for tp in TENSOR_PARALLEL_SIZES if tp <= gpu_count and not model.splits_over(tp)]
    why: list[str] = []
    weights = (
        f"the weights take {_gib(model.weight_bytes)} ({model.parameters / 1e9:.1f} B parameters, "
        f"{model.weight_source})"
    )
    for tp in valid:
        if kv_tokens(model, gpu_bytes, tp) >= context:
            why.append(
                f"{weights}; with tensor_parallel_size = {tp} each GPU holds {_gib(model.weight_bytes / tp)} "
                f"of them and a replica has KV room for {kv_tokens(model, gpu_bytes, tp):,} tokens, "
                f"more than one {context:,}-token sequence"
            )
            if tp > 1:
                smaller = valid[valid.index(tp) - 1] if valid.index(tp) else None
                if smaller and kv_room_per_gpu(model, gpu_bytes, smaller) <= 0:
                    why.append(f"with tensor_parallel_size = {smaller} the weights alone would not fit a GPU")
                elif smaller:
                    why.append(
                        f"tensor_parallel_size = {smaller} would leave KV room for only "
                        f"{kv_tokens(model, gpu_bytes, smaller):,} tokens per replica"
                    )
            if [s for s in skipped if s < tp]:
                why.append(
                    f"{', '.join(str(s) for s in skipped if s < tp)} would not divide the {model.attention_heads} attention "
                    f"heads / {model.kv_heads} KV heads evenly"
                )
            return tp, None, why
    for tp in valid:
        tokens = kv_tokens(model, gpu_bytes, tp)
        if tokens >= MIN_CONTEXT:
            cap = tokens // 1024 * 1024
            why.append(
                f"{weights}; even with every GPU ({valid[-1]}-way) no replica holds one "
                f"{context:,}-token sequence, so tensor_parallel_size = {tp} is the smallest that serves "
                f"at all, and --max-model-len {cap} caps the context to the {tokens:,} tokens of KV room "
                "it has (vLLM refuses to start when one full-length sequence does not fit)"
            )
            return tp, cap, why
    largest = valid[-1] if valid else 1
    raise ProfileError(
        "init",
        "model",
        f"{model.name} does not fit: {weights}, and {gpu_count} GPU(s) of {_gib(gpu_bytes)} at "
        f"{GPU_MEMORY_UTILIZATION:.0%} leave KV room for {kv_tokens(model, gpu_bytes, largest):,} tokens at "
        f"tensor_parallel_size = {largest} (at least {MIN_CONTEXT} needed); use more or larger GPUs, or a "
        "quantized checkpoint",
    )


def choose_layout(replicas: int, host: HostShape, forced: Layout | None) -> tuple[Layout, list[str]]:
    if forced == "disagg" and replicas < 2:
        raise ProfileError(
            "init",
            "--layout",
            f"disagg needs two replicas' worth of GPUs (one prefill, one "
            f"decode), and this host fits {replicas}",
        )
    if forced:
        return forced, [f"{forced}: asked for with --layout"]
    if replicas < 2:
        return "agg", [
            "agg: the GPUs fit one replica, and disaggregation needs a prefill and a decode replica"
        ]
    if host.nvlink:
        return "disagg", [
            f"disagg: {replicas} replicas fit and the GPUs are linked by NVLink, so the prefill "
            "workers hand KV to the decode workers over NIXL without crossing PCIe; long prompts "
            "no longer stall the token streams of running requests"
        ]
    link = "not linked by NVLink (PCIe only)" if host.nvlink is False else "of unknown topology"
    return "agg", [
        f"agg: {replicas} replicas fit, but the GPUs are {link}, so a prefill-to-decode KV handoff "
        "would cross PCIe; aggregated replicas behind the KV router serve repeated prefixes from "
        "their own caches instead (--layout disagg overrides)"
    ]


def place_workers(
    layout: Layout, replicas: int, tp: int, gpu_indices: tuple[int, ...]
) -> tuple[tuple[WorkerAdvice, ...], list[str]]:
    """Contiguous GPU blocks of ``tp``: neighbours by index usually share a PCIe switch or NVLink domain."""
    blocks = [gpu_indices[i * tp : (i + 1) * tp] for i in range(replicas)]
    if layout == "agg":
        roles: list[Literal["agg", "decode", "prefill"]] = ["agg"] * replicas
        why = []
    else:
        prefill = replicas // 2
        roles = [*(["decode"] * (replicas - prefill)), *(["prefill"] * prefill)]  # type: ignore[list-item]
        why = [
            f"{replicas - prefill} decode and {prefill} prefill replica(s): decode holds every running "
            "sequence's KV for its whole life, prefill only for a moment, so an odd replica goes to decode"
        ]
    counts = {role: roles.count(role) for role in set(roles)}
    seen: dict[str, int] = {}
    workers = []
    for role, block in zip(roles, blocks):
        base = "worker" if role == "agg" else role
        n = seen.get(role, 0)
        seen[role] = n + 1
        workers.append(WorkerAdvice(base if counts[role] == 1 else f"{base}-{n}", role, tuple(block)))
    return tuple(workers), why


def lmcache_cpu_gb(host: HostShape, workers: tuple[WorkerAdvice, ...]) -> tuple[float, list[str]]:
    """GB per tensor-parallel rank for LMCache's CPU cache: LMCACHE_RAM_SHARE of RAM over the ranks that
    load LMCache (agg and prefill; decode only receives KV over NIXL), within what preflight allows."""
    ranks = sum(len(w.gpus) for w in workers)
    cache_ranks = sum(len(w.gpus) for w in workers if w.role in ("agg", "prefill"))
    total, available = host.ram_total_bytes, host.ram_available_bytes
    share = LMCACHE_RAM_SHARE * total
    free = available - HOST_MEMORY_MARGIN * total - ranks * RUNTIME_RESERVE_GB * GIB
    budget = max(0.0, min(share, free))
    per_rank = math.floor(budget / cache_ranks / GIB) if cache_ranks else 0
    ram = f"{_gib(total)} of RAM" + ("" if host.described else f" ({_gib(available)} available now)")
    why = [
        f"{per_rank} GB per rank x {cache_ranks} rank(s) that load LMCache = {per_rank * cache_ranks} GB: "
        f"at most {LMCACHE_RAM_SHARE:.0%} of {ram}, leaving {RUNTIME_RESERVE_GB:g} GB per worker rank and a "
        f"{HOST_MEMORY_MARGIN:.0%} margin as `check` requires; LMCache allocates it per rank at start and the "
        "kernel OOM-kills a worker that asks for more than there is"
    ]
    if per_rank < 1:
        why.append(
            "this host's RAM leaves less than 1 GB per rank: 1 GB is written, and `check` will say "
            "whether it fits"
        )
        per_rank = 1
    return float(per_rank), why


def advise(
    model: ModelShape,
    host: HostShape,
    *,
    port_base: int = 8000,
    port_note: str = "",
    layout: Layout | None = None,
    tensor_parallel: int | None = None,
) -> Advice:
    """Every decision for serving ``model`` on ``host``, with reasons. Raises :class:`ProfileError` when the
    model cannot be served there (it names what is missing)."""
    if not host.gpus:
        raise ProfileError(
            "init",
            "gpus",
            "no GPU to size for: NVML sees none here; describe the target host with "
            "--gpus N --gpu-memory GB (and --ram GB)",
        )
    gpu_bytes = min(g.memory_bytes for g in host.gpus)
    indices = tuple(sorted(g.index for g in host.gpus))
    notes: dict[str, list[str]] = {}
    if tensor_parallel is not None:
        if tensor_parallel > len(indices) or not model.splits_over(tensor_parallel):
            raise ProfileError(
                "init",
                "--tensor-parallel-size",
                f"{tensor_parallel} does not fit {len(indices)} GPU(s) and {model.attention_heads} "
                f"attention / {model.kv_heads} KV heads",
            )
        tokens = kv_tokens(model, gpu_bytes, tensor_parallel)
        if tokens < MIN_CONTEXT:
            raise ProfileError(
                "init",
                "--tensor-parallel-size",
                f"at {tensor_parallel} a replica has KV room for "
                f"{tokens:,} tokens (at least {MIN_CONTEXT} needed)",
            )
        context = min(model.max_context, CONTEXT_CAP)
        tp, cap = tensor_parallel, (None if tokens >= context else tokens // 1024 * 1024)
        notes["tensor_parallel"] = [
            f"{tp}: asked for with --tensor-parallel-size; a replica has KV room for {tokens:,} tokens"
        ]
    else:
        tp, cap, notes["tensor_parallel"] = choose_tensor_parallel(model, len(indices), gpu_bytes)
    replicas = len(indices) // tp
    spare = len(indices) - replicas * tp
    notes["replicas"] = [
        f"{replicas}: {len(indices)} GPU(s) / {tp} per replica"
        + (f"; {spare} GPU(s) left unused (a replica needs {tp})" if spare else "")
    ]
    chosen, notes["layout"] = choose_layout(replicas, host, layout)
    workers, notes["workers"] = place_workers(chosen, replicas, tp, indices)
    notes["lmcache"] = []
    cpu_gb, notes["lmcache"] = lmcache_cpu_gb(host, workers)
    agg_replicas = sum(w.role == "agg" for w in workers)
    decodes = sum(w.role == "decode" for w in workers)
    if agg_replicas > 1 or decodes > 1:
        router = "kv"
        notes["router"] = [
            "kv: with several replicas the frontend sends a request to the one whose cache "
            "already holds the most of its prefix; with two or more replicas of a role the frontend also "
            "moves a request off a replica that dies mid-stream (frontend.migration_limit defaults to 3)"
        ]
    else:
        router = "round-robin"
        notes["router"] = ["round-robin: one replica serves each phase, so there is nothing to route"]
    startup = None
    if model.weight_bytes > LONG_LOAD_BYTES:
        startup = 1800.0
        notes["startup"] = [
            f"1800 s to load: {_gib(model.weight_bytes)} of weights read from disk and compiled "
            "take longer than the default 900 s budget on a slow disk"
        ]
    notes["ports"] = [f"base {port_base}" + (f": {port_note}" if port_note else "")]
    gpu_names = sorted({g.name for g in host.gpus})
    notes["host"] = [
        f"{len(indices)} x {'/'.join(gpu_names)} with {_gib(gpu_bytes)} each"
        + ({True: ", NVLink", False: ", PCIe only", None: ""}[host.nvlink])
        + f"; {_gib(host.ram_total_bytes)} RAM"
        + (" (described by flags)" if host.described else "")
    ]
    return Advice(
        model=model,
        host=host,
        layout=chosen,
        tensor_parallel_size=tp,
        replicas=replicas,
        workers=workers,
        max_model_len=cap,
        kv_tokens_per_replica=kv_tokens(model, gpu_bytes, tp),
        lmcache_cpu_gb=cpu_gb,
        router_mode=router,
        startup_timeout_s=startup,
        port_base=port_base,
        notes=notes,
    )
