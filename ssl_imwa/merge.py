"""Merging replicas: arithmetic on state dicts, and merge strategies found by name.

A strategy is a class registered with `@register_merge(name)` (`imwa.merge=<name>`): built from
a `MergeContext` once per run, called once per episode end with this process's replica states.
Every piece takes the communicator, so the same code merges time-sliced replicas on one device
and replicas spread over processes. The uniform mean lives here, TWA in `ssl_imwa/twa.py`; a new
strategy (a greedy soup, say) is one module named in `plugins=[...]` or in BUILTIN_MERGE_MODULES.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ssl_imwa.distributed import Communicator, average_across
from ssl_imwa.registry import Registry

if TYPE_CHECKING:
    from ssl_imwa.config import Config
    from ssl_imwa.data import SSLData

MOMENTUM_POLICIES = ("average", "keep", "reset")
MergeAlgorithmStates = Callable[[list[dict[str, Any]]], dict[str, Any]]
# Strategies that ship with the project, imported (so registered) on first lookup, as plugins are.
BUILTIN_MERGE_MODULES = ("ssl_imwa.twa",)


def average_tensors(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Floating tensors (parameters, BN running stats) averaged; integer buffers copied from the first."""
    return average_across(states, len(states))


def merge_optimizer_states(states: list[dict[str, Any]], policy: str, total: int | None = None,
                           comm: Communicator | None = None) -> dict[str, Any] | None:
    """SGD momentum: averaged across replicas, kept per replica (None: do not load), or reset."""
    if policy == "keep":
        return None
    first = states[0]
    if policy == "reset":
        return {"state": {}, "param_groups": first["param_groups"]}
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


def merge_optimizers_and_algorithms(replica_states: list[dict[str, Any]], indices: list[int], momentum_policy: str,
                                    merge_algorithm_states: MergeAlgorithmStates, total: int,
                                    comm: Communicator | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """What every strategy merges the same way: SGD momentum (per `momentum_policy`) and the
    algorithm's own state (its `merge_states`, over all K replicas in index order)."""
    algorithm_states = gather_algorithm_states(
        [(index, state["algorithm"]) for index, state in zip(indices, replica_states)], comm or Communicator())
    optimizer = merge_optimizer_states([state["optimizer"] for state in replica_states], momentum_policy, total, comm)
    return optimizer, merge_algorithm_states(algorithm_states)


def uniform_merge(replica_states: list[dict[str, Any]], momentum_policy: str,
                  merge_algorithm_states: MergeAlgorithmStates, total: int | None = None,
                  comm: Communicator | None = None, replica_indices: list[int] | None = None) -> MergeResult:
    """IMWA's merge: the plain mean of students and, separately, of EMA teachers.

    `replica_states` are this process's replicas (all of them when there is one process);
    `total` is K across all processes.
    """
    started = time.perf_counter()
    total = total or len(replica_states)
    indices = replica_indices if replica_indices is not None else list(range(len(replica_states)))
    optimizer, algorithm = merge_optimizers_and_algorithms(replica_states, indices, momentum_policy,
                                                           merge_algorithm_states, total, comm)
    result = MergeResult(
        model=average_across([state["model"] for state in replica_states], total, comm, "student merge"),
        teacher=average_across([state["teacher"] for state in replica_states], total, comm, "teacher merge"),
        optimizer=optimizer, algorithm=algorithm)
    result.report = {"strategy": "uniform", "coefficients": [1.0 / total] * total,
                     "seconds": time.perf_counter() - started}
    return result


@dataclass
class MergeContext:
    """What a strategy may use, given once per run: the config, how the algorithm merges its state and
    which head it evaluates, the communicator, the data (e.g. a held-out split to fit on), a template
    model and the device."""

    cfg: Config
    merge_algorithm_states: MergeAlgorithmStates
    algorithm_eval_head: str
    comm: Communicator
    data: SSLData
    template: torch.nn.Module
    device: torch.device


class MergeStrategy:
    """Base of every merge strategy: `__call__` turns the replicas' states into one state.

    `states` are this process's replicas (`indices` their replica numbers), `start` the episode's
    common start point (student and teacher), `episode` the 0-based episode just ended.
    """

    name: ClassVar[str] = "base"

    def __init__(self, context: MergeContext) -> None:
        self.context = context

    @property
    def needs_episode_start(self) -> bool:
        """True when `start` is used: it is then saved with every checkpoint of the episode, since
        after a resume mid-episode no replica holds it any more."""
        return False

    def __call__(self, states: list[dict[str, Any]], indices: list[int], start: dict[str, Any], episode: int
                 ) -> MergeResult:
        raise NotImplementedError


_MERGES: Registry[type[MergeStrategy]] = Registry("merge strategy (imwa.merge)")


def register_merge(name: str) -> Callable[[type[MergeStrategy]], type[MergeStrategy]]:
    """Class decorator: `@register_merge("soup")` makes `imwa.merge=soup` find the class."""

    def decorator(cls: type[MergeStrategy]) -> type[MergeStrategy]:
        cls.name = name
        return _MERGES.register(name)(cls)

    return decorator


def _load_builtins() -> None:
    for module in BUILTIN_MERGE_MODULES:
        importlib.import_module(module)


def list_merges() -> list[str]:
    _load_builtins()
    return _MERGES.names()


def create_merge(name: str, context: MergeContext) -> MergeStrategy:
    """The strategy registered as `name`, built for this run."""
    _load_builtins()
    return _MERGES.get(name)(context)


@register_merge("uniform")
class UniformMerge(MergeStrategy):
    """The plain mean of the K students and, separately, of the K teachers (IMWA, MWA)."""

    def __call__(self, states: list[dict[str, Any]], indices: list[int], start: dict[str, Any], episode: int
                 ) -> MergeResult:
        context = self.context
        return uniform_merge(states, context.cfg.imwa.momentum, context.merge_algorithm_states, context.cfg.imwa.k,
                             context.comm, indices)
