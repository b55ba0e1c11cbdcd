"""Replicas of one worker table: their names and the GPUs each one gets.

``[workers.decode] replicas = 2`` runs ``decode-0`` and ``decode-1``; one replica keeps the table's
own name (``decode``), so a profile without ``replicas`` plans exactly as before. GPUs come either
as a pool (``gpus = [0, 1, 2, 3]``: replica i takes ``tensor_parallel_size`` of them in order) or
explicitly per replica (``gpus = [[0, 1], [2, 3]]``). The pool must hold exactly
``replicas x tensor_parallel_size`` GPUs: a GPU left over is almost always a typo, and a GPU too
few would start a replica on nothing.

Pure functions of the schema's values: :mod:`supervisor.profile.rules` reports what is wrong, the
plan uses what is right.
"""

from __future__ import annotations

from collections.abc import Sequence

GpuSpec = Sequence[int] | Sequence[Sequence[int]]


def replica_names(group: str, replicas: int) -> tuple[str, ...]:
    """``decode`` for one replica, ``decode-0 .. decode-{n-1}`` for several."""
    if replicas == 1:
        return (group,)
    return tuple(f"{group}-{i}" for i in range(replicas))


def is_explicit(gpus: GpuSpec) -> bool:
    """A list of lists (one list per replica) rather than a pool."""
    return bool(gpus) and not isinstance(gpus[0], int)


def gpu_problem(gpus: GpuSpec, *, replicas: int, tensor_parallel_size: int, needs_gpus: bool) -> str | None:
    """What is wrong with ``gpus`` for this many replicas of this TP size (None: nothing)."""
    tp = tensor_parallel_size
    if not gpus:
        if not needs_gpus:
            return None
        return f"expected at least one GPU index for a vLLM worker ({replicas} x {tp}: replicas x tensor_parallel_size)"
    if is_explicit(gpus):
        if len(gpus) != replicas:
            return f"lists GPUs for {len(gpus)} replicas, but replicas is {replicas}"
        for i, chunk in enumerate(gpus):
            assert isinstance(chunk, list)
            if len(chunk) != tp:
                return f"replica {i} gets {len(chunk)} GPUs, expected {tp} (tensor_parallel_size)"
        flat = [g for chunk in gpus for g in chunk]  # type: ignore[union-attr]
    else:
        flat = list(gpus)
        if len(flat) != replicas * tp:
            what = "replica" if replicas == 1 else "replicas"
            return (
                f"expected {replicas * tp} GPU indices ({replicas} {what} x tensor_parallel_size {tp}), "
                f"got {len(flat)}"
            )
    if len(set(flat)) != len(flat):
        return f"lists a GPU twice: {list(gpus)}"
    return None


def replica_gpus(gpus: GpuSpec, *, replicas: int, tensor_parallel_size: int) -> tuple[tuple[int, ...], ...]:
    """The GPUs of each replica (assumes :func:`gpu_problem` found nothing); empty tuples without GPUs."""
    if not gpus:
        return tuple(() for _ in range(replicas))
    if is_explicit(gpus):
        return tuple(tuple(chunk) for chunk in gpus)  # type: ignore[arg-type]
    flat = [int(g) for g in gpus]  # type: ignore[arg-type]
    tp = tensor_parallel_size
    return tuple(tuple(flat[i * tp : (i + 1) * tp]) for i in range(replicas))
