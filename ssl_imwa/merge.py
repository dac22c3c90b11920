"""Merging replicas: arithmetic on state dicts and the merge strategies behind one interface."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

MOMENTUM_POLICIES = ("average", "keep", "reset")


def average_tensors(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Floating tensors (parameters, BN running stats) averaged; integer buffers copied from the first.

    The sum is divided by K (not `mean`), the same arithmetic an all-reduce does across processes.
    """
    merged: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            total = first.clone()
            for state in states[1:]:
                total.add_(state[key])
            merged[key] = total.div_(len(states))
        else:
            merged[key] = first.clone()
    return merged


def merge_optimizer_states(states: list[dict[str, Any]], policy: str) -> dict[str, Any] | None:
    """SGD momentum: averaged across replicas, kept per replica (None: do not load), or reset."""
    if policy == "keep":
        return None
    first = states[0]
    if policy == "reset":
        return {"state": {}, "param_groups": first["param_groups"]}
    merged_state = {}
    for index, entry in first["state"].items():
        buffers = [state["state"][index]["momentum_buffer"] for state in states
                   if index in state["state"] and state["state"][index].get("momentum_buffer") is not None]
        if len(buffers) != len(states):
            continue  # a replica has no momentum yet for this parameter: reset it everywhere
        merged_state[index] = {**entry, "momentum_buffer": average_tensors([{"m": b} for b in buffers])["m"]}
    return {"state": merged_state, "param_groups": first["param_groups"]}


@dataclass
class MergeResult:
    """The merged state every replica restarts from, and the merge's own report."""

    model: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    algorithm: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)


def uniform_merge(replica_states: list[dict[str, Any]], momentum_policy: str, merge_algorithm_states: Any
                  ) -> MergeResult:
    """IMWA's merge: the plain mean of students and, separately, of EMA teachers."""
    started = time.perf_counter()
    result = MergeResult(
        model=average_tensors([state["model"] for state in replica_states]),
        teacher=average_tensors([state["teacher"] for state in replica_states]),
        optimizer=merge_optimizer_states([state["optimizer"] for state in replica_states], momentum_policy),
        algorithm=merge_algorithm_states([state["algorithm"] for state in replica_states]),
    )
    result.report = {"strategy": "uniform", "coefficients": [1.0 / len(replica_states)] * len(replica_states),
                     "seconds": time.perf_counter() - started}
    return result
