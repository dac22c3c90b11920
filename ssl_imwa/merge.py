"""Merging replicas: arithmetic on state dicts and the merge strategies behind one interface.

Every function takes this process's replica states plus the communicator, so the same code
merges time-sliced replicas on one device and replicas spread over processes.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ssl_imwa.distributed import Communicator, average_across

MOMENTUM_POLICIES = ("average", "keep", "reset")
MergeAlgorithmStates = Callable[[list[dict[str, Any]]], dict[str, Any]]


def average_tensors(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Floating tensors (parameters, BN running stats) averaged; integer buffers copied from the first."""
    return average_across(states, len(states), Communicator(), "average")


def merge_optimizer_states(states: list[dict[str, Any]], policy: str, total: int | None = None,
                           comm: Communicator | None = None) -> dict[str, Any] | None:
    """SGD momentum: averaged across replicas, kept per replica (None: do not load), or reset."""
    if policy == "keep":
        return None
    first = states[0]
    if policy == "reset":
        return {"state": {}, "param_groups": first["param_groups"]}
    comm = comm or Communicator()
    buffers = [{str(index): entry["momentum_buffer"] for index, entry in state["state"].items()
                if entry.get("momentum_buffer") is not None} for state in states]
    averaged = average_across(buffers, total or len(states), comm, "momentum merge")
    merged_state = {index: {**entry, "momentum_buffer": averaged[str(index)]}
                    for index, entry in first["state"].items() if str(index) in averaged}
    return {"state": merged_state, "param_groups": first["param_groups"]}


@dataclass
class MergeResult:
    """The merged state every replica restarts from, and the merge's own report."""

    model: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    algorithm: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)


def gather_algorithm_states(local: list[tuple[int, dict[str, Any]]], comm: Communicator) -> list[dict[str, Any]]:
    """Every replica's algorithm state, ordered by replica index, on every process."""
    everything = [item for chunk in comm.all_gather_object(local, "algorithm state gather") for item in chunk]
    return [state for _, state in sorted(everything, key=lambda item: item[0])]


def uniform_merge(replica_states: list[dict[str, Any]], momentum_policy: str,
                  merge_algorithm_states: MergeAlgorithmStates, total: int | None = None,
                  comm: Communicator | None = None, replica_indices: list[int] | None = None) -> MergeResult:
    """IMWA's merge: the plain mean of students and, separately, of EMA teachers.

    `replica_states` are this process's replicas (all of them when there is one process);
    `total` is K across all processes.
    """
    started = time.perf_counter()
    comm = comm or Communicator()
    total = total or len(replica_states)
    indices = replica_indices if replica_indices is not None else list(range(len(replica_states)))
    algorithm_states = gather_algorithm_states(
        [(index, state["algorithm"]) for index, state in zip(indices, replica_states)], comm)
    result = MergeResult(
        model=average_across([state["model"] for state in replica_states], total, comm, "student merge"),
        teacher=average_across([state["teacher"] for state in replica_states], total, comm, "teacher merge"),
        optimizer=merge_optimizer_states([state["optimizer"] for state in replica_states], momentum_policy,
                                         total, comm),
        algorithm=merge_algorithm_states(algorithm_states),
    )
    result.report = {"strategy": "uniform", "coefficients": [1.0 / total] * total,
                     "seconds": time.perf_counter() - started}
    return result
