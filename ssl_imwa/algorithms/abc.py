"""ABC on FixMatch (Lee et al., NeurIPS 2021, "ABC: Auxiliary Balanced Classifier for Class-imbalanced
Semi-supervised Learning").

A second linear head on the shared features, the auxiliary balanced classifier, learns from a
class-balanced subset of each batch, drawn afresh every step with 0/1 Bernoulli masks: a labeled image
of class c counts with probability N_min / N_c, so every class contributes as if it had N_min images;
an unlabeled image counts when the ABC head is confident on its weak view and a draw with probability
1 - progress * (1 - N_min / N_c) for its pseudo-label c succeeds (all confident images at the start,
the labeled balance by the end). The backbone and the standard head train with FixMatch on every image,
so the features see all the data; evaluation reads the ABC head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_imwa.algorithm import (
    Algorithm,
    AlgorithmContext,
    Batch,
    register_algorithm,
)
from ssl_imwa.algorithms.common import (
    USBFixMatchConfig,
    confident_pseudo_labels,
    consistency_outputs,
    masked_consistency,
)
from ssl_imwa.validation import expect_range

ABC_HEAD = "logits_abc"
MASK64 = (1 << 64) - 1


@dataclass
class ABCConfig(USBFixMatchConfig):
    name: str = "abc"
    abc_threshold: float = 0.95      # confidence of the ABC head's pseudo-labels (USB abc_p_cutoff; official 0.95)
    abc_weight: float = 1.0          # weight of the ABC head's loss (USB abc_loss_ratio; official 1)
    # The unlabeled masks' Bernoulli parameter 1 - (e / E)(1 - N_min / N_c) moves at each of E equal
    # parts of train.iterations, e = 0 .. E - 1 (USB: epoch / epochs, E = 256 epochs of 1,024 steps;
    # official ABCfix.py: epoch / 500, 500 epochs of 500 steps).
    schedule_epochs: int = 256
    # false: draws from a generator seeded by (run seed, step), the same for any imwa.data_parallel and
    # on resume. true: torch.bernoulli on the device's global generator, labeled rows then unlabeled
    # rows, as USB 0.3.2 draws them (for bench/parity_oracle.py; refused with imwa.data_parallel > 1).
    usb_rng: bool = False

    def validate(self) -> None:
        super().validate()
        expect_range("algorithm.abc_threshold", self.abc_threshold, 0, 1)
        expect_range("algorithm.abc_weight", self.abc_weight, 0)
        expect_range("algorithm.schedule_epochs", self.schedule_epochs, 1)


def _mix64(value: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit integers that scatters neighbouring inputs."""
    value = (value + 0x9E3779B97F4A7C15) & MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def step_seed(key: int, step: int) -> int:
    """The generator seed of `step` in a run keyed `key`: 32 bits, because a CPU generator (mt19937)
    keeps only the low 32 bits of its seed, and mixed so that nearby (key, step) pairs stay unrelated."""
    return _mix64(_mix64(key & MASK64) ^ step) & 0xFFFFFFFF


@register_algorithm("abc")
class ABC(Algorithm):
    """No checkpointed state: the keep probabilities N_min / N_c come from the exact labeled counts
    (derived, float64 as USB's numpy ratio), the schedule from the step, and the Bernoulli draws from
    (run seed, step, row). So a resume, an IMWA merge (nothing to merge) and D data-parallel slices (each
    keeps its rows of the batch-wide draw) all reproduce what one uninterrupted process draws.
    """

    Config = ABCConfig
    cfg: ABCConfig
    eval_head = ABC_HEAD

    keep_probability: torch.Tensor

    def __init__(self, cfg: ABCConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        if cfg.schedule_epochs < 1:
            raise ValueError(f"algorithm.schedule_epochs={cfg.schedule_epochs!r}: expected at least 1")
        # A class without a labeled image counts 1 (USB would divide 0 by 0).
        counts = torch.tensor(list(context.labeled_counts), dtype=torch.float64).clamp(min=1)
        self.register_buffer("keep_probability", (counts.min() / counts).to(self.device), persistent=False)
        self.epoch_length = max(1, self.total_steps // cfg.schedule_epochs)
        # The run's seed: ssl_imwa.run seeds every process with cfg.seed before it builds the algorithms,
        # so the key is the same in every process, replica and resumed launch of a run.
        self.key = torch.initial_seed()

    def build_heads(self, feature_dim: int, num_classes: int) -> dict[str, nn.Module]:
        """The ABC head, initialised as the standard head (default weights, zero bias; USB: PyTorch's
        default bias too; official: Xavier-normal weights, zero bias)."""
        head = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(head.bias)
        return {ABC_HEAD: head}

    def progress(self, step: int) -> float:
        """e / E for the schedule epoch e of `step` (USB's epoch / epochs); from the last epoch on, (E - 1) / E."""
        epochs = self.cfg.schedule_epochs
        return min(step // self.epoch_length, epochs - 1) / epochs

    def uniforms(self, step: int, labeled_rows: int, unlabeled_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This slice's float64 uniforms in [0, 1) for its labeled and unlabeled rows at `step`.

        Every data-parallel process draws the whole batch's numbers from the same seed and keeps its own
        rows (slices are equal and contiguous in rank order, ssl_imwa.data.stream), so D processes draw
        what one does. The generator lives on the device (no copy); `meta` takes a CPU one (shapes only).
        """
        rank, world = self.batch_group.rank, self.batch_group.world_size
        device = self.device
        generator = torch.Generator(device=torch.device("cpu") if device.type == "meta" else device)
        generator.manual_seed(step_seed(self.key, step))
        draws = torch.rand(world * (labeled_rows + unlabeled_rows), generator=generator, dtype=torch.float64,
                           device=device)
        labeled, unlabeled = draws.split([world * labeled_rows, world * unlabeled_rows])
        return (labeled[rank * labeled_rows:(rank + 1) * labeled_rows],
                unlabeled[rank * unlabeled_rows:(rank + 1) * unlabeled_rows])

    def balance_masks(self, labels: torch.Tensor, pseudo_labels: torch.Tensor, step: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 0/1 masks: a labeled row of class c kept with probability N_min / N_c, an unlabeled row
        pseudo-labeled c with probability 1 - progress (1 - N_min / N_c) (before the confidence test)."""
        keep = self.keep_probability
        keep_labeled = keep[labels]
        keep_unlabeled = (1 - self.progress(step) * (1 - keep))[pseudo_labels]
        if self.cfg.usb_rng:
            if self.batch_group.world_size > 1:
                raise ValueError("algorithm.usb_rng=true draws from each process's global generator, so "
                                 "imwa.data_parallel > 1 would not draw what one process draws; use usb_rng=false")
            return torch.bernoulli(keep_labeled).float(), torch.bernoulli(keep_unlabeled).float()
        uniform_labeled, uniform_unlabeled = self.uniforms(step, labels.shape[0], pseudo_labels.shape[0])
        return uniform_labeled.lt(keep_labeled).float(), uniform_unlabeled.lt(keep_unlabeled).float()

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        labeled, weak, (strong,) = self.forward_views(model, batch)
        loss_x = F.cross_entropy(labeled["logits"], batch["y"])
        labels, mask, _ = confident_pseudo_labels(weak["logits"], self.cfg.threshold)
        loss_u = masked_consistency(strong["logits"], labels, mask)

        # The ABC head: its own weak-view pseudo-labels (hard, as USB; the official code trains on the
        # head's soft weak-view distribution), kept by confidence AND a class-balancing draw.
        labels_abc, confident_abc, _ = confident_pseudo_labels(weak[ABC_HEAD], self.cfg.abc_threshold)
        mask_labeled, balance_unlabeled = self.balance_masks(batch["y"], labels_abc, step)
        mask_abc = confident_abc * balance_unlabeled
        loss_abc = ((F.cross_entropy(labeled[ABC_HEAD], batch["y"], reduction="none") * mask_labeled).mean()
                    + masked_consistency(strong[ABC_HEAD], labels_abc, mask_abc))

        outputs = consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, labels, mask, batch["u_target"])
        return {
            **outputs,
            "loss": outputs["loss"] + self.cfg.abc_weight * loss_abc,
            "loss_abc": loss_abc.detach(),
            "abc_labeled_rate": mask_labeled.mean(),
            "abc_mask_rate": mask_abc.mean(),
        }
