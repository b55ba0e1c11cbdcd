"""An :class:`~supervisor.profile.advise.Advice` written out as a commented TOML profile.

The output is deterministic (no date, no host name): the same advice gives the same file, so a test
can compare it and a user can diff two runs. Every value the advice chose carries the reason beside
it; the reader should be able to change any of them knowing what it trades.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable

from supervisor.profile.advise import GIB, Advice, WorkerAdvice

WIDTH = 100


def _comment(lines: Iterable[str], indent: str = "") -> list[str]:
    out: list[str] = []
    for line in lines:
        out += textwrap.wrap(
            line,
            WIDTH - len(indent) - 2,
            initial_indent=f"{indent}# ",
            subsequent_indent=f"{indent}#   ",
            break_on_hyphens=False,
            break_long_words=False,
        )
    return out


def _string(value: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's."""
    return json.dumps(value, ensure_ascii=False)


def _kib(value: int) -> str:
    return f"{value / 1024:g} KiB" if value < 1024**2 else f"{value / 1024**2:.2f} MiB"


def _model_lines(advice: Advice, model_value: str) -> list[str]:
    m = advice.model
    kind = f"{m.experts} experts, " if m.experts else ""
    kv = (
        f"a {m.latent_kv_dim}-wide latent KV per layer"
        if m.latent_kv_dim
        else f"{m.kv_heads} KV heads x {m.head_dim}"
    )
    facts = (
        f"{m.architecture}: {m.parameters / 1e9:.2f} B parameters ({kind}{m.weight_bytes / GIB:.1f} GiB of "
        f"weights, {m.weight_source}), {m.layers} layers, {m.attention_heads} attention heads, {kv}: "
        f"{_kib(m.kv_bytes_per_token)} of KV cache per token; native context {m.max_context:,} tokens"
    )
    return ["[model]", f"name = {_string(model_value)}", *_comment([facts]), ""]


def _group_lines(advice: Advice, group: list[WorkerAdvice], first: bool) -> list[str]:
    """One table per role: ``replicas = N`` over a pool of GPUs (replica i takes the i-th block)."""
    table = "worker" if group[0].role == "agg" else group[0].role
    pool = [g for w in group for g in w.gpus]
    lines = [f"[workers.{table}]", f"role = {_string(group[0].role)}"]
    if len(group) > 1:
        lines.append(
            f"replicas = {len(group)}" + (f"  # {', '.join(w.name for w in group)}" if first else "")
        )
    lines += [
        f"gpus = [{', '.join(str(g) for g in pool)}]"
        + (
            "  # CUDA_VISIBLE_DEVICES: replica i takes the i-th block of tensor_parallel_size"
            if first
            else ""
        ),
        f"tensor_parallel_size = {advice.tensor_parallel_size}",
    ]
    if advice.max_model_len is not None:
        lines.append(
            f'args = ["--max-model-len", "{advice.max_model_len}"]'
            + ("  # see the tensor-parallel note above" if first else "")
        )
    if advice.startup_timeout_s is not None:
        lines.append(
            f"health = {{ startup_timeout_s = {advice.startup_timeout_s:g} }}"
            + ("  # see the startup note above" if first else "")
        )
    return [*lines, ""]


def model_label(name: str) -> str:
    """An HF id as is; a local directory by its last component (the path is in model.name)."""
    return name.rstrip("/").rsplit("/", 1)[-1] if name.startswith(("/", ".", "~")) else name


def draft(advice: Advice, *, command: str, model_value: str) -> str:
    """The profile text. ``command`` is the init command line (quoted in the header), ``model_value``
    what ``model.name`` holds (an HF id, or the local path as the profile should spell it)."""
    n = advice.notes
    where = "the host it describes" if advice.host.described else "this host"
    head = [
        f"Written by `{command}` for {where}: {n['host'][0]}.",
        "Each choice says why. `lmcache-supervise plan FILE` shows the processes, ports and GPUs it "
        "starts; `lmcache-supervise check FILE` judges the host against it. The file is yours to edit.",
    ]
    description = (
        f"{model_label(advice.model.name)}: {advice.layout}, {advice.replicas} replica(s) x "
        f"TP {advice.tensor_parallel_size}, LMCache CPU cache {advice.lmcache_cpu_gb:g} GB per rank"
    )
    lines = [*_comment(head), f"description = {_string(description)}", 'engine = "vllm"', ""]
    lines += _model_lines(advice, model_value)
    lines += [
        "[ports]",
        f"base = {advice.port_base}",
        *_comment(
            [
                n["ports"][0] + "; the frontend listens on the base, each worker's health server on "
                "base+81, +82, ..., the supervisor's metrics on base+90 (all on 127.0.0.1)"
            ]
        ),
        "",
    ]
    lines += ["[frontend]", f"router_mode = {_string(advice.router_mode)}", *_comment(n["router"]), ""]
    lines += _comment(
        [
            f"Tensor parallel {advice.tensor_parallel_size}: " + "; ".join(n["tensor_parallel"]),
            f"Replicas {n['replicas'][0]}.",
            f"Layout {'; '.join(n['layout'])}.",
            *n["workers"],
        ]
    )
    if "startup" in n:
        lines += _comment([f"Startup: {n['startup'][0]}."])
    groups: dict[str, list[WorkerAdvice]] = {}
    for worker in advice.workers:
        groups.setdefault(worker.role, []).append(worker)
    for i, group in enumerate(groups.values()):
        lines += _group_lines(advice, group, i == 0)
    lines += [
        "[lmcache]",
        f"max_local_cpu_size = {advice.lmcache_cpu_gb:g}  # GB per tensor-parallel rank",
        *_comment(n["lmcache"]),
        "chunk_size = 256  # tokens per cached chunk (LMCache's default)",
        "track_usage = false  # LMCache reports no usage to an outside host",
        "",
    ]
    return "\n".join(lines)
