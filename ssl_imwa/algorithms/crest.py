"""CReST and CReST+ on FixMatch (Wei et al., CVPR 2021, "CReST: A Class-Rebalancing Self-Training Framework
for Imbalanced Semi-Supervised Learning").

A model trained on long-tailed data is biased toward the head classes in recall but precise on the tail:
its confident predictions on minority classes are worth adopting. CReST trains G generations, each
from scratch; between two, the last model labels the unlabeled set and, per predicted class sorted by
confidence, a fraction mu^((C-1-r)/alpha) of it joins the labeled set (r: the class's rank by labeled
frequency, 0 the most frequent; mu = (N_min / N_max)^(1/(C-1))), so the rarer the class the more of its
pseudo-labels are kept. CReST+ adds progressive distribution alignment: weak-view probabilities are
rescaled toward the labeled distribution sharpened to the power T_g, T going linearly from 1 in the
first generation to `alignment_temperature` in the last.

The engine runs the generations (each a whole IMWA run: ssl_imwa.imwa); this module picks the
pseudo-labels and aligns. As in USB (semilearn 0.3.2, imb_algorithms/crest) and the official code
(google-research/crest), each generation adds its picks to the dataset's own labeled set (they do not
accumulate), the pick is made by the EMA teacher, and the alignment's running estimate of the model's
distribution carries over from one generation to the next. Deliberate differences (docs/algorithms.md):
- the engine's pass over the unlabeled set is unaugmented (USB's eval_ulb loader applies the weak
  augmentation: random crop and flip), so the pick is deterministic;
- the exponent uses the class's rank by labeled frequency, not its index: the same for every built-in
  dataset (class 0 the head, counts non-increasing), and the paper's rule where an order differs;
- ties in confidence are kept in index order (a stable sort; USB's is not stable).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_imwa.algorithm import (
    Algorithm,
    AlgorithmContext,
    Batch,
    Outputs,
    register_algorithm,
)
from ssl_imwa.algorithms.common import (
    USBFixMatchConfig,
    consistency_outputs,
    masked_consistency,
)
from ssl_imwa.validation import expect_positive, expect_range

# Added to both sides of the alignment's ratio (USB DistAlignEMAHook).
ALIGNMENT_EPSILON = 1e-6


@dataclass
class CReSTConfig(USBFixMatchConfig):
    name: str = "crest"
    generations: int = 6                  # G (USB crest_num_gens; official num_generation)
    alpha: float = 3.0                    # sampling power: larger keeps fewer head pseudo-labels (USB crest_alpha)
    progressive_alignment: bool = False   # CReST+ (USB crest_pro_dist_align)
    alignment_temperature: float = 0.5    # T of the last generation (USB crest_dist_align_t)
    alignment_momentum: float = 0.999     # of the model-distribution estimate (USB DistAlignEMAHook's m)

    def validate(self) -> None:
        super().validate()
        expect_positive("algorithm.generations", self.generations)
        expect_range("algorithm.alpha", self.alpha, 0, low_open=True)
        expect_range("algorithm.alignment_temperature", self.alignment_temperature, 0, 1)
        expect_range("algorithm.alignment_momentum", self.alignment_momentum, 0, 1)

    def generation_count(self) -> int:
        return self.generations


def alignment_temperature(generation: int, generations: int, final: float) -> float:
    """T_g = (1 - g / (G - 1)) * 1 + g / (G - 1) * T (USB's CReST.train; G = 1 takes T)."""
    progress = generation / (generations - 1) if generations > 1 else 1.0
    return (1.0 - progress) * 1.0 + progress * final


def sharpened_target(labeled_counts: Sequence[int], temperature: float) -> torch.Tensor:
    """The labeled class distribution (float64, as USB's numpy one) raised to `temperature` and renormalised;
    at T = 1 left as it is, as USB does (its renormalisation would move the last bits)."""
    counts = np.asarray(labeled_counts, dtype=np.float64)
    target = torch.from_numpy(counts / counts.sum())
    if temperature != 1:
        target = target ** temperature
        target = target / target.sum()
    return target


def kept_fraction(rank: int, num_classes: int, imbalance: float, alpha: float) -> float:
    """mu^((C-1-rank)/alpha) with mu = (1/imbalance)^(1/(C-1)), computed as USB's get_split does."""
    mu = math.pow(1.0 / imbalance, 1 / (num_classes - 1))
    return math.pow(math.pow(mu, (num_classes - 1) - rank), 1 / alpha)


def rebalanced_pseudo_labels(logits: torch.Tensor, labeled_counts: Sequence[int], alpha: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(unlabeled indices, classes) CReST adds to the labeled set: per predicted class, the most confident
    int(n_c * kept_fraction) of the images predicted as it, most frequent labeled class first."""
    score, predicted = torch.softmax(logits.float(), dim=1).max(dim=1)
    score, predicted = score.cpu(), predicted.cpu()
    distribution = np.asarray(labeled_counts, dtype=np.float64)
    distribution = distribution / distribution.sum()
    by_frequency = np.argsort(-distribution, kind="stable")
    imbalance = distribution[by_frequency[0]] / distribution[by_frequency[-1]]
    indices, classes = [], []
    for rank, cls in enumerate(by_frequency.tolist()):
        members = torch.nonzero(predicted == cls).flatten()
        members = members[torch.argsort(score[members], descending=True, stable=True)]
        keep = int(len(members) * kept_fraction(rank, len(distribution), imbalance, alpha))
        indices.append(members[:keep])
        classes.append(torch.full((keep,), cls, dtype=torch.long))
    return torch.cat(indices), torch.cat(classes)


@register_algorithm("crest")
class CReST(Algorithm):
    """State (CReST+ only): p_model, the EMA of the batch-mean weak-view prediction (float32 [C]), started
    from the first batch's mean (`p_model_started`), as USB's DistAlignEMAHook. It is gathered over
    the data-parallel group, averaged at IMWA merges, and inherited by the next generation."""

    Config = CReSTConfig
    cfg: CReSTConfig

    p_model: torch.Tensor
    p_model_started: torch.Tensor
    alignment_target: torch.Tensor

    def __init__(self, cfg: CReSTConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        self.register_buffer("p_model", torch.zeros(self.num_classes, device=self.device))
        self.register_buffer("p_model_started", torch.zeros((), dtype=torch.bool, device=self.device))
        temperature = alignment_temperature(context.generation, cfg.generations, cfg.alignment_temperature)
        # p_target: the dataset's own labeled distribution in every generation (USB computes it once).
        target = sharpened_target(context.original_labeled_counts, temperature)
        self.register_buffer("alignment_target", target.to(self.device), persistent=False)

    def align(self, probs: torch.Tensor) -> torch.Tensor:
        """Update p_model with this (whole, gathered) batch, then rescale `probs` by target / p_model
        (float64, as USB's product with its float64 target)."""
        batch_mean = self.batch_group.gather(probs).mean(dim=0)
        momentum = self.cfg.alignment_momentum
        self.p_model = torch.where(self.p_model_started, self.p_model * momentum + batch_mean * (1 - momentum),
                                   batch_mean)
        self.p_model_started = torch.ones_like(self.p_model_started)
        aligned = probs * (self.alignment_target + ALIGNMENT_EPSILON) / (self.p_model + ALIGNMENT_EPSILON)
        return aligned / aligned.sum(dim=-1, keepdim=True)

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        labeled, weak, (strong,) = self.forward_views(model, batch)
        loss_x = F.cross_entropy(labeled["logits"], batch["y"])
        probs = torch.softmax(weak["logits"].detach(), dim=-1)
        if self.cfg.progressive_alignment:
            probs = self.align(probs)
        max_prob, labels = probs.max(dim=-1)
        mask = max_prob.ge(self.cfg.threshold).to(max_prob.dtype)
        loss_u = masked_consistency(strong["logits"], labels, mask)
        return consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, labels, mask, batch["u_target"])

    def pseudo_labels_for_next_generation(self, outputs: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        return rebalanced_pseudo_labels(outputs["logits"], self.context.original_labeled_counts, self.cfg.alpha)

    def inherit(self, previous: Algorithm) -> None:
        """USB's alignment hook lives across generations: its p_model goes on."""
        assert isinstance(previous, CReST)
        self.p_model = previous.p_model.clone()
        self.p_model_started = previous.p_model_started.clone()
