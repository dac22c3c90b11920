"""The algorithm contract: what an algorithm is, what it is told when built, and how it is found by name.

An algorithm computes losses for one batch and owns its own state (DASO's queues, ACR's
estimates) as buffers of an `nn.Module`, so `state_dict`, `load_state_dict` and `.to(device)`
work as for any module. The trainer owns the loop, optimiser, EMA update, evaluation and
checkpoints; the orchestrator owns replicas and merges. An algorithm never sees any of those.

The built-in algorithms (`ssl_imwa/algorithms/`) are plugins like any other: this module never
imports them by name: its registry imports every module of that package on first lookup, and
`ssl_imwa.registry.load_plugins` the modules a config names under `plugins`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ssl_imwa.distributed import Communicator
from ssl_imwa.ema import BUFFER_POLICIES, EMAConfig
from ssl_imwa.registry import Registry
from ssl_imwa.validation import expect_choice, expect_range

Batch = dict[str, Any]
Outputs = dict[str, torch.Tensor]
StepCount = int | float

WEAK_PASSES = ("joint", "no_grad")
PASS_MODELS = ("teacher", "student")
BUILTIN_PACKAGE = "ssl_imwa.algorithms"


@dataclass(frozen=True)
class DatasetPass:
    """A one-off pass of the algorithm's pass model over the whole training set (`Algorithm.dataset_pass_steps`):
    its float32 outputs over every labeled image (`labeled[head]` is [num_labeled, ...], row i the labeled image
    i) and over every unlabeled image (row i the image whose `u_index` is i), unaugmented, in eval mode."""

    labeled: Outputs
    labeled_targets: torch.Tensor   # int64 [num_labeled] on the CPU: known on the host, so reading it never syncs
    unlabeled: Outputs


@dataclass
class AlgorithmConfig:
    name: str = "???"
    ema: EMAConfig = field(default_factory=EMAConfig)
    # joint: labeled, weak and strong views in one forward, so BN batch statistics cover the whole
    # step (FixMatch and the official codes). no_grad: the weak view in its own forward without
    # autograd (about 1.3-1.5x faster steps; BN then normalises the weak batch by its own
    # statistics and its running stats are updated twice per step). docs/performance.md.
    weak_pass: str = "joint"

    def validate(self) -> None:
        """Raise ValueError naming `algorithm.<key>` for a value out of range; subclasses add their keys."""
        expect_choice("algorithm.weak_pass", self.weak_pass, WEAK_PASSES)
        expect_range("algorithm.ema.decay", self.ema.decay, 0, 1, high_open=True)
        expect_choice("algorithm.ema.buffers", self.ema.buffers, BUFFER_POLICIES)

    def generation_count(self) -> int:
        """How many whole trainings of train.iterations steps the run chains (CReST's generations;
        `Algorithm.pseudo_labels_for_next_generation`). Asked of the config, so that validation
        knows the run's length before anything is built."""
        return 1


@dataclass(frozen=True)
class AlgorithmContext:
    """What an algorithm is told about its run when it is built.

    One object instead of positional arguments, so a field can be added (with a default)
    without touching any algorithm's constructor.
    """

    labeled_counts: Sequence[int]   # labeled images per class, in class order
    total_steps: int                # train.iterations: schedules given as fractions resolve against it
    num_unlabeled: int              # size of the unlabeled set (FlexMatch-style per-sample state needs it)
    device: torch.device | str = "cpu"
    generation: int = 0             # which of the config's generation_count() this algorithm trains (0-based)
    # The dataset's labeled counts, before any generation added pseudo-labels (None: labeled_counts).
    dataset_labeled_counts: Sequence[int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labeled_counts)

    @property
    def original_labeled_counts(self) -> Sequence[int]:
        """The labeled counts of the dataset's own split (what labeled_counts is in generation 0)."""
        return self.labeled_counts if self.dataset_labeled_counts is None else self.dataset_labeled_counts


def resolve_steps(value: StepCount, total_steps: int, key: str, minimum: int = 0) -> int:
    """A step-based schedule value: an int >= minimum is a step count; a float in (0, 1) a fraction of
    the run (at least 1 step).

    Fractions let a short run keep a paper's proportions (DASO's 5,000 of 250,000 steps = 0.02).
    A config's validate() calls it with total_steps=1 to check the value before any data loads.
    """
    if isinstance(value, bool):
        raise TypeError(f"{key}={value!r}: expected a step count (int) or a fraction of train.iterations (float)")
    if isinstance(value, float) and not value.is_integer():
        if not 0.0 < value < 1.0:
            raise ValueError(f"{key}={value}: a fractional value must lie in (0, 1)")
        return max(1, round(value * total_steps))
    steps = int(value)
    if steps < minimum:
        raise ValueError(f"{key}={value}: expected a step count >= {minimum} or a fraction in (0, 1)")
    return steps


def mean_of_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Default merge: float tensors and floats averaged; anything else taken from the first state."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    merged: dict[str, Any] = {}
    for key, first in states[0].items():
        values = [state[key] for state in states]
        if isinstance(first, torch.Tensor) and first.is_floating_point():
            merged[key] = torch.stack(values).mean(dim=0)
        elif isinstance(first, float):
            merged[key] = sum(values) / len(values)
        elif isinstance(first, dict):
            merged[key] = mean_of_states(values)
        else:
            merged[key] = first
    return merged


def forward_concat(model: nn.Module, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One forward over the concatenated inputs (so BN sees the whole step's batch), split back.

    Outputs are cast to float32 so losses are computed in full precision under autocast.
    """
    sizes = [tensor.shape[0] for tensor in inputs]
    outputs = model(torch.cat(inputs))
    parts: list[dict[str, torch.Tensor]] = [{} for _ in inputs]
    for key, value in outputs.items():
        for index, chunk in enumerate(value.float().split(sizes)):
            parts[index][key] = chunk
    return parts


class Algorithm(nn.Module):
    """Base class of every SSL algorithm plugin.

    Subclasses set `Config` (a dataclass deriving from AlgorithmConfig), register with
    `@register_algorithm(name)`, implement `losses`, and keep any state that must survive a
    checkpoint as registered buffers (`self.register_buffer(name, tensor)`).

    `batch_group`: the processes that share each step's batch (`imwa.data_parallel=D`); `losses`
    sees this process's 1/D slice. State computed from the batch (a histogram, a feature queue)
    must be reduced with `self.batch_group.sum(t)` or `.gather(t)` (the slices concatenated in
    batch order), so that every process keeps the state D = 1 would. Both are the identity when
    D = 1. Losses need nothing: DDP averages the slices' gradients.
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    # The head evaluation reads from the teacher's outputs.
    eval_head: ClassVar[str] = "logits"
    # The model a periodic pass over the unlabeled set runs: the EMA "teacher" (what USB's evaluate()
    # uses for ADSH's and CReST's passes) or the "student".
    unlabeled_pass_model: ClassVar[str] = "teacher"
    # Old checkpoint key -> current buffer name, for state written before a buffer was renamed.
    renamed_state_keys: ClassVar[dict[str, str]] = {}

    labeled_prior: torch.Tensor

    def __init__(self, cfg: AlgorithmConfig, context: AlgorithmContext) -> None:
        super().__init__()
        self.cfg = cfg
        self.context = context
        self.batch_group = Communicator()   # the engine sets the data-parallel group when D > 1
        counts = torch.tensor(list(context.labeled_counts), dtype=torch.float64)
        # pi_l: the labeled class prior (float64 so log-adjustments are exact); derived, so not checkpointed.
        self.register_buffer("labeled_prior", (counts / counts.sum()).to(context.device), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.context.num_classes

    @property
    def total_steps(self) -> int:
        return self.context.total_steps

    @property
    def device(self) -> torch.device:
        """Where the algorithm's state lives (follows `.to(device)`)."""
        return self.labeled_prior.device

    def forward_views(self, model: nn.Module, batch: Batch) -> tuple[Outputs, Outputs, list[Outputs]]:
        """Model outputs for the labeled batch, the weak view and each strong view, per `cfg.weak_pass`."""
        labeled, weak, strong = self.forward_all_views(model, batch)
        return labeled[0], weak, strong

    def forward_all_views(self, model: nn.Module, batch: Batch) -> tuple[list[Outputs], Outputs, list[Outputs]]:
        """As `forward_views`, with the labeled strong views (`num_labeled_strong_views`) after the labeled
        batch: ([x, *x_strong], u_w, [u_s...]), in one forward in that order when `weak_pass` is joint."""
        labeled = [batch["x"], *batch.get("x_strong", [])[:self.num_labeled_strong_views()]]
        strong = batch["u_strong"][:self.num_strong_views()]
        if self.cfg.weak_pass not in WEAK_PASSES:
            raise ValueError(f"algorithm.weak_pass='{self.cfg.weak_pass}': expected one of {', '.join(WEAK_PASSES)}")
        if self.cfg.weak_pass == "joint":
            outputs = forward_concat(model, [*labeled, batch["u_weak"], *strong])
            return outputs[:len(labeled)], outputs[len(labeled)], outputs[len(labeled) + 1:]
        with torch.no_grad():
            (weak,) = forward_concat(model, [batch["u_weak"]])
        outputs = forward_concat(model, [*labeled, *strong])
        return outputs[:len(labeled)], weak, outputs[len(labeled):]

    def num_strong_views(self) -> int:
        """Strong views per unlabeled image that the data stream must provide."""
        return 1

    def num_labeled_strong_views(self) -> int:
        """Strong views per labeled image (`batch["x_strong"]`, a list; SimPro's labeled loss uses one); 0 by
        default, and then the stream draws exactly what it drew before this option existed."""
        return 0

    @classmethod
    def uses_unlabeled(cls) -> bool:
        """A class property: config validation asks it before any algorithm is built."""
        return True

    @classmethod
    def eval_logit_offset(cls, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor | None:
        """What evaluation subtracts from every image's `eval_head` logits before the argmax; None (the
        default): nothing, and evaluation reads the logits as they are.

        Called once per evaluation (and per `LoadedRun.predict`) with the evaluated model, in eval mode,
        without autograd, under the run's autocast, and `inputs`: one normalised evaluation image [1, C, H, W]
        (its shape, dtype, device and memory format). Returns a [num_classes] tensor. A classmethod: it
        may read only the model (CDMAD's test-time refinement: the model's logits of a solid image).
        """
        return None

    def build_heads(self, feature_dim: int, num_classes: int) -> dict[str, nn.Module]:
        """Extra heads beyond the standard 'logits' head."""
        return {}

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        """Losses for one batch at global step `step`; must contain 'loss' (the one to minimise)."""
        raise NotImplementedError

    def unlabeled_pass_every(self) -> int:
        """Steps between passes over the whole unlabeled set; 0 (the default) for none.

        After each step `s` with (s + 1) a multiple of it, the trainer runs `unlabeled_pass_model` in eval
        mode over every unlabeled image (unaugmented, normalised, in index order) and hands the outputs to
        `after_unlabeled_pass`. The pass is part of that step: a checkpoint after it holds the state it
        produced, and a run killed during it redoes the step on resume.
        """
        return 0

    def after_unlabeled_pass(self, outputs: Outputs, step: int) -> None:
        """Update state from a pass: `outputs[head]` is [num_unlabeled, ...] (float32), row i the image
        whose `u_index` is i, identical on every process of a data-parallel group."""
        raise NotImplementedError(f"algorithm '{self.name}' asks for unlabeled passes (unlabeled_pass_every() > 0) "
                                  "but does not define after_unlabeled_pass(outputs, step)")

    def dataset_pass_steps(self) -> tuple[int, ...]:
        """Steps at whose start the trainer runs a one-off pass over the labeled AND the unlabeled set; () (the
        default): none.

        At the start of each such step `s`, before its batch, the trainer runs `unlabeled_pass_model` in eval mode
        over every labeled and every unlabeled image (unaugmented, normalised, in index order) and calls
        `after_dataset_pass`. The pass is part of step `s`: a checkpoint after it holds what it produced, one
        written before it does not, and a run killed during it redoes it on resume (CoSSL's classifier warm-up).
        """
        return ()

    def after_dataset_pass(self, outputs: DatasetPass, model: nn.Module, teacher: nn.Module, step: int) -> None:
        """Update state (or the heads of the student `model` and of the EMA `teacher`) from a pass. Autograd is on
        and no autocast applies. With a data-parallel group the outputs are the same on every process, and after
        this call the trainer broadcasts group rank 0's student, teacher and algorithm buffers to the group, so the
        copies stay identical even where the device's arithmetic is not deterministic."""
        raise NotImplementedError(f"algorithm '{self.name}' asks for dataset passes (dataset_pass_steps()) but does "
                                  "not define after_dataset_pass(outputs, model, teacher, step)")

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after the optimiser's step of `step` and before the EMA update, with the student `model` (not its
        DDP wrapper) whose `.grad` still hold the step's gradients (unscaled under fp16; averaged over a
        data-parallel group). A second update of some parameters (USB's CoSSL steps its teacher classifier with an
        optimiser of its own); the default does nothing."""

    def balanced_labeled_batch(self) -> str | None:
        """Augmentation ('weak' or 'strong') of a second labeled batch per step, `batch["x_balanced"]` with labels
        `batch["y_balanced"]`: `train.batch_size` images drawn with replacement, each class equally likely (an
        image of class c with probability proportional to 1 / n_c), from a generator of its own, so the stream's
        other draws stay what they are without it. None (the default): no such batch."""
        return None

    def pseudo_labels_for_next_generation(self, outputs: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(unlabeled indices, classes): what joins the labeled set for the next generation.

        Asked only when the config's generation_count() > 1, at the end of every generation but the
        last: `outputs` are the merged EMA teacher's over the whole unlabeled set (as for
        `after_unlabeled_pass`). The next generation trains from scratch (a fresh model, optimiser,
        EMA teacher, schedule and data stream) on the labeled set with these added, with an algorithm
        built for it that `inherit`s what it keeps of this one.
        """
        raise NotImplementedError(f"algorithm '{self.name}' chains generations (generation_count() > 1) but does "
                                  "not define pseudo_labels_for_next_generation(outputs)")

    def inherit(self, previous: Algorithm) -> None:
        """Take what carries over from the previous generation's (merged) algorithm; nothing by default."""

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """nn.Module's strict load, after renaming old keys (`renamed_state_keys`) and turning the plain
        floats that older checkpoints hold (ACR's tau, for one) into tensors."""
        state = {self.renamed_state_keys.get(key, key): value if isinstance(value, torch.Tensor)
                 else torch.tensor(value, dtype=torch.float64) for key, value in state_dict.items()}
        return super().load_state_dict(state, strict=strict, assign=assign)

    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """How K replicas' states combine at an IMWA merge (default: mean of float tensors)."""
        return mean_of_states(states)

    def momentum_buffers(self, model: nn.Module) -> list[str]:
        """Keys of `model`'s state that hold the momentum of an optimiser of the algorithm's own (CoSSL's
        second one): an IMWA merge treats them per `imwa.momentum`, as the main optimiser's. None by default."""
        return []


_ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm", BUILTIN_PACKAGE)


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: `@register_algorithm("fixmatch")` makes `algorithm=fixmatch` find the class."""

    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"@register_algorithm('{name}') decorates {cls!r}: expected a subclass of "
                            "ssl_imwa.algorithm.Algorithm")
        if cls.unlabeled_pass_model not in PASS_MODELS:
            raise TypeError(f"algorithm '{name}': unlabeled_pass_model={cls.unlabeled_pass_model!r}, expected one of "
                            f"{', '.join(PASS_MODELS)}")
        if cls.losses is Algorithm.losses:
            raise TypeError(f"algorithm '{name}' ({cls.__module__}.{cls.__qualname__}) does not define "
                            "losses(self, batch, model, teacher, step), which returns a dict with the 'loss' to "
                            "minimise (docs/adding_an_algorithm.md)")
        cls.name = name
        return _ALGORITHMS.register(name)(cls)

    return decorator


def get_algorithm(name: str) -> type[Algorithm]:
    return _ALGORITHMS.get(name)


def list_algorithms() -> list[str]:
    return _ALGORITHMS.names()


