"""``lmcache-supervise init``: a commented profile sized for this host (or one described by flags).

The facts come from the host package (NVML with NVLink counts, RAM, free ports, the model's
config.json from a local directory or the HF cache); the decisions from the pure
:mod:`supervisor.profile.advise`; the text from :mod:`supervisor.profile.draft`. The written file is
loaded and rendered exactly as ``plan`` would before it replaces anything, so a profile ``init``
writes always passes ``plan``; on this host its ports are free when it is written.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from supervisor.cli.app import handles_errors, load_plan, main
from supervisor.errors import ProfileError

if TYPE_CHECKING:  # imported where used: every other command starts without them
    from supervisor.plan.spec import Plan
    from supervisor.profile.advise import Advice, HostShape
    from supervisor.profile.shape import ModelShape

DEFAULT_BASE = 8000  # upstream's frontend port
BASE_STEP = 100  # another deployment's block of ports starts 100 higher
BASE_TRIES = 20
DESCRIBED_AVAILABLE = 0.9  # a described host's RAM counts as 90 % available (the kernel and page cache)


def this_host(
    gpus: int | None, gpu_memory_gb: float | None, ram_gb: float | None, nvlink: bool | None = None
) -> HostShape:
    """The host to size for: described by the flags, or this one through NVML and the kernel."""
    from supervisor.host.facts import memory_facts
    from supervisor.profile.advise import GIB, GpuShape, HostShape

    memory = memory_facts()
    if ram_gb is not None:
        total, available = int(ram_gb * GIB), int(ram_gb * DESCRIBED_AVAILABLE * GIB)
    else:
        total, available = memory.total_bytes, memory.available_bytes
    if gpus is not None:
        if gpu_memory_gb is None:
            raise click.UsageError("--gpus needs --gpu-memory GB (each GPU's memory, e.g. 80 for an H100)")
        links = None if nvlink is None else (18 if nvlink else 0)
        shapes = tuple(GpuShape(i, "GPU", int(gpu_memory_gb * GIB), links) for i in range(gpus))
        return HostShape(shapes, total, available, described=True)
    if gpu_memory_gb is not None or nvlink is not None:
        raise click.UsageError("--gpu-memory and --nvlink/--pcie describe another host's GPUs: give --gpus N")
    from supervisor.host.gpu import gpu_facts

    facts = gpu_facts(links=True)
    if facts.error or not facts.gpus:
        why = facts.error or f"NVML (driver {facts.driver}) sees no GPU"
        raise ProfileError(
            "init",
            "gpus",
            f"{why}; to write a profile for another host, describe it with "
            "--gpus N --gpu-memory GB (and --ram GB)",
        )
    unknown = [g.index for g in facts.gpus if g.total_bytes is None]
    if unknown:
        raise ProfileError(
            "init",
            "gpus",
            f"NVML does not report the memory of GPU(s) {unknown}; describe the "
            "host with --gpus N --gpu-memory GB",
        )
    shapes = tuple(GpuShape(g.index, g.name, int(g.total_bytes or 0), g.nvlinks) for g in facts.gpus)
    return HostShape(shapes, total, available, described=ram_gb is not None)


def read_model(name: str) -> tuple[ModelShape, str]:
    """The model's shape, and what ``model.name`` should hold (a local directory as an absolute path)."""
    from supervisor.host.facts import hf_cache_dirs
    from supervisor.host.model_config import model_config_facts
    from supervisor.preflight.needs import is_local_model
    from supervisor.profile.shape import model_shape

    local = is_local_model(name) or Path(name).expanduser().is_dir()
    facts = model_config_facts(name, local=local, hub_dirs=hf_cache_dirs(os.environ))
    if facts.config is None:
        raise ProfileError("--model", "", facts.problem or f"no config.json for {name}")
    value = str(Path(name).expanduser().resolve()) if local else name
    return model_shape(
        name, facts.config, source=facts.location or name, weight_bytes=facts.weight_bytes
    ), value


def slug(name: str) -> str:
    """A profile file name from a model name: ``meta-llama/Llama-3.1-8B-Instruct`` -> ``llama-3.1-8b-instruct``."""
    last = Path(name.rstrip("/")).name.lower()
    text = re.sub(r"[^a-z0-9_-]+", "-", last.replace(".", "-")).strip("-_")
    return (text or "deployment")[:48]


def _validated(text: str, target: Path) -> Plan:
    """Write ``text`` as ``target`` in a private scratch directory beside it, load and render it as
    ``plan`` does, then move it into place: a profile that does not pass ``plan`` is never written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".init-", dir=target.parent))
    try:
        staged = scratch / target.name
        staged.write_text(text)
        rendered = load_plan(str(staged))
        os.replace(staged, target)
        return rendered
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _busy_ports(rendered: Plan) -> list[str]:
    from supervisor.host.facts import port_facts
    from supervisor.preflight.needs import planned_ports

    return [
        f"{p.port} ({p.owner} {p.purpose})"
        for p in planned_ports(rendered)
        if not port_facts(p.host, p.port).free
    ]


def _summary(advice: Advice, rendered: Plan, path: Path) -> str:
    workers = "; ".join(f"{w.name} on GPU {','.join(map(str, w.gpus))}" for w in advice.workers)
    cap = f", --max-model-len {advice.max_model_len}" if advice.max_model_len else ""
    return (
        f"wrote {path}: {advice.layout}, {advice.replicas} replica(s) x tensor-parallel {advice.tensor_parallel_size}"
        f"{cap} ({workers}); LMCache CPU cache {advice.lmcache_cpu_gb:g} GB per rank; "
        f"OpenAI API at {rendered.deployment.base_url}/v1\n"
        f"next: lmcache-supervise check {shlex.quote(str(path))}   (then: up {shlex.quote(str(path))})"
    )


@main.command("init")
@click.option(
    "--model",
    "model",
    required=True,
    metavar="NAME_OR_PATH",
    help="An HF id (its config.json must be in the local HF cache) or a local model directory.",
)
@click.option(
    "--gpus",
    type=click.IntRange(1, 64),
    default=None,
    metavar="N",
    help="Describe another host: its number of GPUs (with --gpu-memory).",
)
@click.option(
    "--gpu-memory",
    "gpu_memory",
    type=click.FloatRange(min=1),
    default=None,
    metavar="GB",
    help="Each GPU's memory in GiB on the described host (nvidia-smi's MiB / 1024; 80 for an H100).",
)
@click.option(
    "--nvlink/--pcie",
    "nvlink",
    default=None,
    help="On the described host, whether the GPUs are linked by NVLink (default: unknown, which means agg).",
)
@click.option(
    "--ram",
    type=click.FloatRange(min=1),
    default=None,
    metavar="GB",
    help="The host's RAM in GiB (default: this host's).",
)
@click.option(
    "--layout",
    type=click.Choice(["agg", "disagg"]),
    default=None,
    help="Force aggregated or disaggregated serving (default: chosen from the GPUs and their links).",
)
@click.option(
    "--tensor-parallel-size",
    "tensor_parallel",
    type=click.IntRange(1, 64),
    default=None,
    help="Force the tensor-parallel size (default: the smallest that holds a full context).",
)
@click.option(
    "--port-base",
    "port_base",
    type=click.IntRange(1024, 65000),
    default=None,
    help=f"ports.base (default {DEFAULT_BASE}; on this host the first block of free ports from there).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the profile (default ./<model>.toml; - prints it).",
)
@click.option("--force", is_flag=True, help="Replace an existing file.")
@handles_errors
def init_command(
    model: str,
    gpus: int | None,
    gpu_memory: float | None,
    ram: float | None,
    nvlink: bool | None,
    layout: str | None,
    tensor_parallel: int | None,
    port_base: int | None,
    output: Path | None,
    force: bool,
) -> None:
    """Write a commented profile for MODEL on this host (or one described by --gpus/--gpu-memory/--ram).

    Reads the model's config.json and the GPUs (count, memory, NVLink or PCIe through NVML), picks agg or
    disagg, replicas and tensor-parallel size, LMCache's CPU cache from RAM and the ports, and explains
    each choice in a comment. The profile passes `plan`; run `check` on the host that will run it."""
    from supervisor.profile.advise import advise
    from supervisor.profile.draft import draft

    host = this_host(gpus, gpu_memory, ram, nvlink)
    shape, model_value = read_model(model)
    # The header quotes what decided the sizing (not -o/--force): the same flags give the same file.
    flags = {
        "--model": model,
        "--gpus": gpus,
        "--gpu-memory": gpu_memory,
        "--ram": ram,
        "--layout": layout,
        "--tensor-parallel-size": tensor_parallel,
        "--port-base": port_base,
    }
    words = [
        w
        for flag, v in flags.items()
        if v is not None
        for w in (flag, f"{v:g}" if isinstance(v, float) else str(v))
    ]
    words += [] if nvlink is None else ["--nvlink" if nvlink else "--pcie"]
    command = shlex.join(["lmcache-supervise", "init", *words]).replace("\n", " ")
    target = output if output is not None and str(output) != "-" else Path(f"{slug(model)}.toml")
    if (output is None or str(output) != "-") and target.exists() and not force:
        raise ProfileError(str(target), "", "exists; pass --force to replace it, or -o to write elsewhere")
    bases = [port_base] if port_base else [DEFAULT_BASE + i * BASE_STEP for i in range(BASE_TRIES)]
    scratch = Path(tempfile.mkdtemp(prefix="lmcs-init-"))
    try:
        for base in bases:
            if port_base:
                note = "asked for with --port-base"
            elif host.described:
                note = "upstream's default (checked on the host that runs it by `check`)"
            else:
                note = f"the first free block from {DEFAULT_BASE}" + (
                    f" ({base - DEFAULT_BASE} higher: lower ones are in use)" if base != DEFAULT_BASE else ""
                )
            advice = advise(
                shape,
                host,
                port_base=base,
                port_note=note,
                layout=layout,  # type: ignore[arg-type]
                tensor_parallel=tensor_parallel,
            )
            text = draft(advice, command=command, model_value=model_value)
            rendered = _validated(text, scratch / target.name)
            busy = [] if (host.described or port_base) else _busy_ports(rendered)
            if not busy:
                break
        else:
            raise ProfileError(
                "init",
                "ports",
                f"no free block of ports from {DEFAULT_BASE} to {bases[-1]}: "
                f"e.g. {', '.join(busy[:3])} are in use; pass --port-base",
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if output is not None and str(output) == "-":
        click.echo(text, nl=False)
        return
    rendered = _validated(text, target)
    click.echo(_summary(advice, rendered, target))
