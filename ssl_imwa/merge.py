"""Merging replicas, the engine's side: arithmetic on state dicts, the strategy contract and its registry.

A merge strategy is a plugin (`imwa.merge=<name>`): a class registered with
`@register_merge(name, config=Options)`, built once per run from a narrow `MergeContext` (its typed
options, K, the seed, the communicator and, only for a strategy that asks, the run's data) and
called at every episode end with this process's replicas' student and teacher weights. It returns
the merged weights and its report; the orchestrator merges optimizer momentum (`imwa.momentum`) and
the algorithm's state itself, the same way for every strategy (`merge_optimizers_and_algorithms`).

Built-in strategies live in `ssl_imwa/merges/` (found by a package scan on first lookup), user
strategies in modules named under `plugins=[...]`; the engine names none of them. A strategy's
options live in `imwa.<name>.*` and are typed by its registered dataclass in `ssl_imwa.config.validate`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ssl_imwa.distributed import Communicator, average_across
from ssl_imwa.registry import Registry

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from ssl_imwa.data import SSLData

MOMENTUM_POLICIES = ("average", "keep", "reset")
MergeAlgorithmStates = Callable[[list[dict[str, Any]]], dict[str, Any]]
BUILTIN_PACKAGE = "ssl_imwa.merges"


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


def merge_model_momentum(models: list[dict[str, torch.Tensor]], keys: list[str], policy: str, total: int,
                         comm: Communicator | None = None) -> list[dict[str, torch.Tensor]]:
    """The momentum an algorithm keeps in the model (`Algorithm.momentum_buffers`), per `imwa.momentum` as
    the main optimiser's: each replica's own (keep), zeros (reset) or the mean over all K replicas
    (average). One dict per replica of `models` (copies), to load over the merged weights."""
    if policy == "reset":
        return [{key: torch.zeros_like(model[key]) for key in keys} for model in models]
    own = [{key: model[key].detach().clone() for key in keys} for model in models]
    if not keys or policy == "keep":
        return own
    averaged = average_across(own, total, comm, "momentum merge")
    return [{key: value.clone() for key, value in averaged.items()} for _ in models]


def gather_algorithm_states(local: list[tuple[int, dict[str, Any]]], comm: Communicator) -> list[dict[str, Any]]:
    """Every replica's algorithm state, ordered by replica index, on every process."""
    everything = [item for chunk in comm.all_gather_object(local, "algorithm state gather") for item in chunk]
    return [state for _, state in sorted(everything, key=lambda item: item[0])]


def merge_optimizers_and_algorithms(replica_states: list[dict[str, Any]], indices: list[int], momentum_policy: str,
                                    merge_algorithm_states: MergeAlgorithmStates, total: int,
                                    comm: Communicator | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """What the orchestrator merges the same way whatever the strategy: SGD momentum (per
    `momentum_policy`) and the algorithm's own state (its `merge_states`, over all K replicas in index order)."""
    algorithm_states = gather_algorithm_states(
        [(index, state["algorithm"]) for index, state in zip(indices, replica_states)], comm or Communicator())
    optimizer = merge_optimizer_states([state["optimizer"] for state in replica_states], momentum_policy, total, comm)
    return optimizer, merge_algorithm_states(algorithm_states)


@dataclass
class MergeResult:
    """What a strategy returns: the student and teacher weights every replica restarts from, and its report
    (logged per episode in results.json; `coefficients`: the weights it applied, if it has any). The
    orchestrator adds `strategy` (the registered name) and `seconds` (the whole merge) unless given."""

    model: dict[str, torch.Tensor]
    teacher: dict[str, torch.Tensor]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeData:
    """The run's images, for a strategy that learns or checks its merge on them (`uses_data = True`):
    the data, a template model (its architecture only; its tensors are not the replicas'), the output head
    the algorithm evaluates, and the device."""

    data: SSLData
    template: torch.nn.Module
    eval_head: str
    device: torch.device


@dataclass(frozen=True)
class MergeContext:
    """What a strategy is given once per run, and nothing more (not the run's config)."""

    options: Any               # its registered options dataclass, from `imwa.<name>.*` (None: it registered none)
    replicas: int              # K, the replicas merged across all processes
    seed: int                  # the run's seed, for any randomness of its own
    comm: Communicator         # the processes holding the other replicas
    data: MergeData | None = None  # only for a strategy with `uses_data = True`


@dataclass(frozen=True)
class MergePlan:
    """What a strategy may check its options against while the config is validated, before any work."""

    replicas: int              # imwa.k
    held_out_per_class: int    # labeled held-out images per class (dataset.val_per_class; 0: none)


class MergeStrategy:
    """Base of every merge strategy: `__call__` turns the replicas' weights into one merged pair.

    `states` are this process's replicas, each `{"model": ..., "teacher": ...}` (`indices` their
    replica numbers; all K when there is one process), `start` the episode's common start point
    (same keys), `episode` the 0-based episode just ended.
    """

    name: ClassVar[str] = "base"
    uses_data: ClassVar[bool] = False  # True: the context carries MergeData

    def __init__(self, context: MergeContext) -> None:
        self.context = context

    @classmethod
    def check(cls, options: Any, plan: MergePlan) -> None:
        """Raise ValueError naming the keys when `options` cannot work for this run (validation time)."""

    @property
    def needs_episode_start(self) -> bool:
        """True when `start` is used: it is then saved with every checkpoint of the episode, since
        after a resume mid-episode no replica holds it any more."""
        return False

    def __call__(self, states: list[dict[str, Any]], indices: list[int], start: dict[str, Any], episode: int
                 ) -> MergeResult:
        raise NotImplementedError


_MERGES: Registry[type[MergeStrategy]] = Registry("merge strategy (imwa.merge)", BUILTIN_PACKAGE)


def register_merge(name: str, config: type | None = None) -> Callable[[type[MergeStrategy]], type[MergeStrategy]]:
    """Class decorator: `@register_merge("soup", config=SoupOptions)` makes `imwa.merge=soup` find the class
    and types `imwa.soup.*` by the dataclass `SoupOptions` (whose optional `validate()` checks values)."""

    def decorator(cls: type[MergeStrategy]) -> type[MergeStrategy]:
        if not (isinstance(cls, type) and issubclass(cls, MergeStrategy)):
            raise TypeError(f"@register_merge('{name}') decorates {cls!r}: expected a subclass of "
                            "ssl_imwa.merge.MergeStrategy")
        cls.name = name
        return _MERGES.register(name, config)(cls)

    return decorator


def list_merges() -> list[str]:
    return _MERGES.names()


def get_merge(name: str) -> type[MergeStrategy]:
    return _MERGES.get(name)


def merge_option_types(plugins: list[str]) -> dict[str, type]:
    """Strategy name -> the dataclass typing its `imwa.<name>` section, for the strategies with options
    that this run can see: the built-ins and those of the modules in its `plugins`. A strategy another
    run in the same process loaded is not part of this run's config (nor of its resume fingerprint)."""
    def ours(name: str) -> bool:
        module = _MERGES.get(name).__module__
        return module.startswith(f"{BUILTIN_PACKAGE}.") or module in plugins

    return {name: config for name in _MERGES.names()
            if (config := _MERGES.config_of(name)) is not None and ours(name)}


def merge_options(imwa: DictConfig) -> Any:
    """The options of the strategy `imwa.merge` names, from a validated `imwa` section, as its dataclass
    (None: it registered none)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(imwa[imwa.merge]) if _MERGES.config_of(imwa.merge) is not None else None


def build_merge(imwa: DictConfig, seed: int, comm: Communicator, data: Callable[[], MergeData]) -> MergeStrategy:
    """The strategy `imwa.merge` names, built with its typed options; `data()` is called only for a
    strategy that uses data."""
    cls = _MERGES.get(imwa.merge)
    return cls(MergeContext(merge_options(imwa), imwa.k, seed, comm, data() if cls.uses_data else None))
