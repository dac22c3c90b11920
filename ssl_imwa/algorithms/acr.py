"""ACR on FixMatch (Wei & Gan, CVPR 2023).

A standard head learns the labeled (long-tailed) distribution and a balanced head the uniform
one; the standard head's pseudo-labels are logit-adjusted by a strength tau that follows an
estimate of the unlabeled class distribution (about 0 if it matches the labeled prior, about 1 if
uniform, about 2 if reversed), so pseudo-labels stay sound when the two distributions differ.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl_imwa.algorithm import (
    Algorithm,
    AlgorithmConfig,
    AlgorithmContext,
    Batch,
    StepCount,
    mean_of_states,
    register_algorithm,
    resolve_steps,
)
from ssl_imwa.algorithms.common import masked_consistency, pseudo_label_accuracy
from ssl_imwa.ema import EMAConfig
from ssl_imwa.validation import expect_range

BALANCED_HEAD = "logits_balanced"


@dataclass
class ACRConfig(AlgorithmConfig):
    name: str = "acr"
    threshold: float = 0.95          # confidence for pseudo-labels and for the distribution estimate
    tau_max: float = 2.0             # adaptive tau = tau_max * w (official: tau1, also its initial tau)
    tau12: float = 2.0               # adjustment of the balanced branch's pseudo-labels
    tau2: float = 2.0                # adjustment of the balanced head's labeled loss
    estimate_momentum: float = 0.99  # u_hat <- m * u_hat + (1 - m) * c_hat (official --ema-u 0.99)
    epoch_length: StepCount = 500    # steps per ACR epoch: tau is recomputed at each epoch start
    estimate_start_epoch: int = 6    # estimation runs in epochs >= this (official: epoch > 5, 0-based)
    # Reproduce the official code where it departs from the paper (see docs/algorithms.md):
    # one-unit-per-class histogram, log(pi^tau + 1e-12) in float64, tau starting at tau_max,
    # distance sums divided by epoch_length even when fewer steps added to them. On by default: the
    # published numbers come from that code; false is the paper's reading.
    follow_official_code: bool = True
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.999, warmup=False, buffers="copy"))

    def validate(self) -> None:
        super().validate()
        expect_range("algorithm.threshold", self.threshold, 0, 1)
        expect_range("algorithm.tau_max", self.tau_max, 0)
        for key in ("tau12", "tau2"):   # any real strength; negative ones are ablations
            expect_range(f"algorithm.{key}", getattr(self, key))
        expect_range("algorithm.estimate_momentum", self.estimate_momentum, 0, 1)
        expect_range("algorithm.estimate_start_epoch", self.estimate_start_epoch, 0)
        resolve_steps(self.epoch_length, 1, "algorithm.epoch_length", minimum=1)


def anchor_distances(estimate: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Symmetric KL, 0.5 KL(u||a) + 0.5 KL(a||u), from the estimate u to the anchors
    (consistent pi_l, uniform, reversed pi_l), as a float64 tensor [3]."""
    estimate = estimate.double()
    prior = prior.double()
    anchors = torch.stack([prior, torch.full_like(prior, 1.0 / prior.numel()), prior.flip(0)])
    forward = torch.xlogy(estimate, estimate).sum() - (estimate * anchors.log()).sum(1)
    backward = (anchors * (anchors.log() - estimate.log())).sum(1)
    return 0.5 * forward + 0.5 * backward


def tau_from_distances(distances: torch.Tensor, tau_max: float) -> torch.Tensor:
    """tau = tau_max * exp(d_con) / sum_a exp(d_a) as a 0-d float64 tensor (NaN if a distance is not finite).

    It stays on the device: reading it back would make the step wait for the GPU.
    """
    return tau_max * torch.softmax(distances.double(), dim=0)[0]


# Exponents that ATen evaluates with a dedicated kernel (x * x, sqrt, 1 / x, ...) when they come as a
# Python number; a tensor exponent always takes pow(), which can differ from those in the last bit.
SPECIAL_EXPONENTS = (0.5, 2.0, 3.0, -0.5, -1.0, -2.0)


def power(base: torch.Tensor, exponent: float | torch.Tensor) -> torch.Tensor:
    """base ** exponent; a tensor exponent (the official adjustment's tau) gives bitwise what a Python float gives."""
    result = base ** exponent
    if isinstance(exponent, torch.Tensor):
        for special in SPECIAL_EXPONENTS:
            result = torch.where(exponent == special, base ** special, result)
    return result


def confident_class_histogram(balanced_logits: torch.Tensor, is_labeled: torch.Tensor, threshold: float,
                              num_classes: int, one_unit_per_class: bool) -> torch.Tensor:
    """Class histogram of argmax f_b(u_w) over confident samples that are not also labeled images.

    one_unit_per_class reproduces the official indexed write `hist[targets] += selected`: with
    repeated indices one write wins (on CPU the last sample of the class), so a class counts 0 or 1.
    """
    max_prob, labels = torch.softmax(balanced_logits.detach().float(), dim=1).max(dim=1)
    selected = (max_prob.ge(threshold) & ~is_labeled).double()
    if one_unit_per_class:
        histogram = torch.zeros(num_classes, dtype=torch.float64, device=balanced_logits.device)
        return histogram.index_put_((labels,), selected)
    return (F.one_hot(labels, num_classes).double() * selected[:, None]).sum(0)


def adjusted_pseudo_labels(logits: torch.Tensor, adjustment: torch.Tensor, confidence_logits: torch.Tensor,
                           threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Target argmax softmax(logits - adjustment); mask: that max >= threshold OR max softmax(confidence_logits) >= threshold."""
    max_adjusted, labels = torch.softmax(logits.detach() - adjustment, dim=1).max(dim=1)
    max_plain = torch.softmax(confidence_logits.detach(), dim=1).max(dim=1).values
    return labels, (max_adjusted.ge(threshold) | max_plain.ge(threshold)).float()


@register_algorithm("acr")
class ACR(Algorithm):
    """State: u_hat, this epoch's distance sums and step count, and tau. At an IMWA merge the
    mean applies to all four (IMWA, Huang et al., arXiv 2404.16331); a merge at an epoch boundary thus derives the next
    tau from the replicas' averaged distances, a mid-epoch merge averages the replicas' taus."""

    Config = ACRConfig
    cfg: ACRConfig
    eval_head = BALANCED_HEAD

    estimate: torch.Tensor
    distance_sum: torch.Tensor
    distance_steps: torch.Tensor
    tau: torch.Tensor

    def __init__(self, cfg: ACRConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        self.epoch_length = resolve_steps(cfg.epoch_length, self.total_steps, "algorithm.epoch_length", minimum=1)
        if cfg.estimate_start_epoch < 0:
            raise ValueError(f"algorithm.estimate_start_epoch={cfg.estimate_start_epoch!r}: expected an epoch index >= 0")
        # u_hat: the estimated unlabeled class distribution, uniform until estimation starts.
        num_classes = self.num_classes
        self.register_buffer("estimate", torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64,
                                                    device=self.device))
        # This epoch's summed anchor distances and the number of steps that added to them. The count
        # and tau are 0-d float64 device tensors, updated with torch.where: no step waits for the GPU.
        self.register_buffer("distance_sum", torch.zeros(3, dtype=torch.float64, device=self.device))
        self.register_buffer("distance_steps", torch.zeros((), dtype=torch.float64, device=self.device))
        if cfg.follow_official_code:
            tau = torch.full((), cfg.tau_max, dtype=torch.float64, device=self.device)
        else:
            tau = tau_from_distances(anchor_distances(self.estimate, self.labeled_prior), cfg.tau_max)
        self.register_buffer("tau", tau)

    def num_strong_views(self) -> int:
        return 2

    def build_heads(self, feature_dim: int, num_classes: int) -> dict[str, nn.Module]:
        head = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(head.bias)
        return {BALANCED_HEAD: head}

    def adjustment(self, tau: float | torch.Tensor) -> torch.Tensor:
        """tau * log pi_l (paper, float32), or log(pi_l^tau + 1e-12) in float64 (official: promotes the logits)."""
        if self.cfg.follow_official_code:
            return torch.log(power(self.labeled_prior, tau) + 1e-12)
        return (tau * self.labeled_prior.log()).float()

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        epoch, offset = divmod(step, self.epoch_length)
        estimating = epoch >= self.cfg.estimate_start_epoch
        if offset == 0:
            self._start_epoch(estimating)

        labeled, weak, (strong1, strong2) = self.forward_views(model, batch)
        loss_x = (F.cross_entropy(labeled["logits"], batch["y"])
                  + F.cross_entropy(labeled[BALANCED_HEAD] + self.adjustment(self.cfg.tau2), batch["y"]))

        threshold = self.cfg.threshold
        labels, mask = adjusted_pseudo_labels(weak["logits"], self.adjustment(self.tau), weak["logits"], threshold)
        labels_b, mask_b = adjusted_pseudo_labels(weak["logits"], self.adjustment(self.cfg.tau12),
                                                  weak[BALANCED_HEAD], threshold)
        # Both strong views against the one weak-view target: a mean over 2U terms.
        loss_u = masked_consistency(torch.cat([strong1["logits"], strong2["logits"]]),
                                    labels.repeat(2), mask.repeat(2))
        loss_u_balanced = masked_consistency(torch.cat([strong1[BALANCED_HEAD], strong2[BALANCED_HEAD]]),
                                             labels_b.repeat(2), mask_b.repeat(2))

        if estimating:   # from the whole batch's predictions (data parallelism: every slice's)
            self._update_estimate(self.batch_group.gather(weak[BALANCED_HEAD].detach()),
                                  self.batch_group.gather(batch["u_is_labeled"]))
        return {
            "loss": loss_x + loss_u + loss_u_balanced,
            "loss_x": loss_x.detach(),
            "loss_u": loss_u.detach(),
            "loss_u_balanced": loss_u_balanced.detach(),
            "mask_rate": mask.mean(),
            "tau": self.tau.float(),
            "pseudo_acc": pseudo_label_accuracy(labels, mask, batch["u_target"]),
        }

    def _start_epoch(self, estimating: bool) -> None:
        """tau from the previous epoch's mean anchor distances; no contributing step (paper) or a
        non-finite result keeps the old tau, chosen on the device."""
        if estimating:
            if self.cfg.follow_official_code:
                # The official code divides by the epoch length even when fewer steps (or none) added distances.
                tau = tau_from_distances(self.distance_sum / self.epoch_length, self.cfg.tau_max)
                valid = torch.isfinite(tau)
            else:
                tau = tau_from_distances(self.distance_sum / self.distance_steps, self.cfg.tau_max)
                valid = torch.isfinite(tau) & (self.distance_steps > 0)
            self.tau = torch.where(valid, tau, self.tau)
        self.distance_sum = torch.zeros_like(self.distance_sum)
        self.distance_steps = torch.zeros_like(self.distance_steps)

    def _update_estimate(self, balanced_logits: torch.Tensor, is_labeled: torch.Tensor) -> None:
        """u_hat and the distance sums move only when the histogram is not empty (chosen on the device)."""
        histogram = confident_class_histogram(balanced_logits, is_labeled, self.cfg.threshold, self.num_classes,
                                              one_unit_per_class=self.cfg.follow_official_code)
        total = histogram.sum()
        found = total > 0
        momentum = self.cfg.estimate_momentum
        estimate = momentum * self.estimate + (1.0 - momentum) * histogram / total
        self.estimate = torch.where(found, estimate, self.estimate)
        self.distance_sum = torch.where(found, self.distance_sum + anchor_distances(estimate, self.labeled_prior),
                                        self.distance_sum)
        self.distance_steps = torch.where(found, self.distance_steps + 1.0, self.distance_steps)

    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The default mean, but tau and the step count summed in replica order as Python's sum did
        when they were floats: torch's mean adds K >= 5 values in another order (last-bit changes)."""
        merged = mean_of_states(states)
        for key in ("tau", "distance_steps"):
            merged[key] = functools.reduce(operator.add, [state[key] for state in states]) / len(states)
        return merged
