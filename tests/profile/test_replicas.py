"""Replica names and GPU assignment (supervisor.profile.replicas), pure."""

from __future__ import annotations

import pytest

from supervisor.profile.replicas import gpu_problem, replica_gpus, replica_names


def test_one_replica_keeps_the_table_name_and_several_are_numbered() -> None:
    assert replica_names("decode", 1) == ("decode",)
    assert replica_names("decode", 3) == ("decode-0", "decode-1", "decode-2")


def test_a_pool_is_cut_by_tensor_parallel_size_in_order() -> None:
    assert replica_gpus([0, 1, 2, 3], replicas=2, tensor_parallel_size=2) == ((0, 1), (2, 3))
    assert replica_gpus([5, 4, 7, 6], replicas=4, tensor_parallel_size=1) == ((5,), (4,), (7,), (6,))
    assert gpu_problem([0, 1, 2, 3], replicas=2, tensor_parallel_size=2, needs_gpus=True) is None


def test_explicit_lists_are_taken_as_written() -> None:
    assert replica_gpus([[4, 5], [6, 7]], replicas=2, tensor_parallel_size=2) == ((4, 5), (6, 7))
    assert gpu_problem([[4, 5], [6, 7]], replicas=2, tensor_parallel_size=2, needs_gpus=True) is None


def test_no_gpus_means_empty_tuples_for_the_mocker_and_an_error_for_vllm() -> None:
    assert replica_gpus([], replicas=2, tensor_parallel_size=1) == ((), ())
    assert gpu_problem([], replicas=2, tensor_parallel_size=1, needs_gpus=False) is None
    assert "expected at least one GPU index for a vLLM worker (2 x 1" in str(
        gpu_problem([], replicas=2, tensor_parallel_size=1, needs_gpus=True)
    )


@pytest.mark.parametrize(
    ("gpus", "replicas", "tp", "expected"),
    [
        ([0, 1, 2], 2, 2, "expected 4 GPU indices (2 replicas x tensor_parallel_size 2), got 3"),
        ([0, 1, 2, 3, 4], 2, 2, "expected 4 GPU indices (2 replicas x tensor_parallel_size 2), got 5"),
        ([0], 1, 2, "expected 2 GPU indices (1 replica x tensor_parallel_size 2), got 1"),
        ([[0, 1]], 2, 2, "lists GPUs for 1 replicas, but replicas is 2"),
        ([[0, 1], [2]], 2, 2, "replica 1 gets 1 GPUs, expected 2 (tensor_parallel_size)"),
        ([[0, 1], [1, 2]], 2, 2, "lists a GPU twice"),
        ([3, 3], 2, 1, "lists a GPU twice"),
    ],
)
def test_bad_combinations_are_named(gpus: list, replicas: int, tp: int, expected: str) -> None:
    problem = gpu_problem(gpus, replicas=replicas, tensor_parallel_size=tp, needs_gpus=True)
    assert problem is not None and expected in problem
