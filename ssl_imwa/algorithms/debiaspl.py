"""DebiasPL on FixMatch (Wang et al., CVPR 2022, "Debiased Learning from Naturally Imbalanced Pseudo-Labels").

Pseudo-labels inherit the classifier's bias toward frequent classes. DebiasPL keeps p_hat, an
exponential moving average of the mean weak-view prediction, and (1) takes pseudo-labels from the
counterfactual logits `f(u_w) - tau * log p_hat` ("adaptive debiasing"), (2) trains the strong view
with the logit-adjusted `f(u_s) + tau * log p_hat` ("adaptive marginal loss"). Labeled loss as FixMatch.
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
from ssl_imwa.algorithms.common import USBFixMatchConfig, consistency_outputs
from ssl_imwa.validation import expect_range


@dataclass
class DebiasPLConfig(USBFixMatchConfig):
    name: str = "debiaspl"
    threshold: float = 0.95      # applied to the debiased pseudo-label (USB p_cutoff; official --threshold)
    tau: float = 0.4             # strength of the debiasing and of the margin (USB debiaspl_tau; official --tau)
    momentum: float = 0.999      # p_hat <- m p_hat + (1 - m) mean softmax(f(u_w)) (USB debiaspl_ema_p; official --qhat_m)
    # false (default): the official order (frank-xwang/debiased-pseudo-labeling, main_DebiasPL.py):
    # pseudo-labels from the p_hat of the previous steps, then p_hat takes this batch, and the margin
    # reads the new p_hat. true: USB's (semilearn 0.3.2): p_hat takes this batch first
    # (DebiasPL.compute_prob), so the pseudo-labels see it, while the margin reads the p_hat of the
    # previous steps (DebiasPLHook handed the loss that tensor before compute_prob replaced it).
    usb_order: bool = False

    def validate(self) -> None:
        super().validate()
        expect_range("algorithm.tau", self.tau)
        expect_range("algorithm.momentum", self.momentum, 0, 1)


def debiased_pseudo_labels(weak_logits: torch.Tensor, log_prior: torch.Tensor, tau: float, threshold: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, float mask) from softmax(f(u_w) - tau log p_hat): argmax, and max >= threshold."""
    max_prob, labels = torch.softmax(weak_logits.detach() - tau * log_prior, dim=-1).max(dim=-1)
    return labels, max_prob.ge(threshold).float()


def marginal_consistency(strong_logits: torch.Tensor, log_prior: torch.Tensor, tau: float,
                         labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean_i mask_i CE(f(u_s,i) + tau log p_hat, target_i): the adaptive marginal loss."""
    return (F.cross_entropy(strong_logits + tau * log_prior, labels, reduction="none") * mask).mean()


@register_algorithm("debiaspl")
class DebiasPL(Algorithm):
    """State: p_hat (float32 [C], uniform at the start), the EMA of the batch-mean weak-view softmax.

    With `imwa.data_parallel=D` the mean is over the whole batch (gathered), as with D = 1. At an
    IMWA merge p_hat is the mean over the replicas (still a distribution).
    """

    Config = DebiasPLConfig
    cfg: DebiasPLConfig

    p_hat: torch.Tensor

    def __init__(self, cfg: DebiasPLConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        uniform = torch.ones(self.num_classes, device=self.device) / self.num_classes   # as USB and official
        self.register_buffer("p_hat", uniform)

    def update_estimate(self, weak_logits: torch.Tensor) -> None:
        """p_hat <- m p_hat + (1 - m) mean_i softmax(f(u_w,i)), the mean over the whole (gathered) batch."""
        probs = self.batch_group.gather(torch.softmax(weak_logits.detach(), dim=-1))
        momentum = self.cfg.momentum
        self.p_hat = momentum * self.p_hat + (1 - momentum) * probs.mean(dim=0)

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        labeled, weak, (strong,) = self.forward_views(model, batch)
        loss_x = F.cross_entropy(labeled["logits"], batch["y"])
        previous = self.p_hat
        if self.cfg.usb_order:
            self.update_estimate(weak["logits"])
        labels, mask = debiased_pseudo_labels(weak["logits"], torch.log(self.p_hat), self.cfg.tau, self.cfg.threshold)
        if not self.cfg.usb_order:
            self.update_estimate(weak["logits"])
        margin_prior = previous if self.cfg.usb_order else self.p_hat
        loss_u = marginal_consistency(strong["logits"], torch.log(margin_prior), self.cfg.tau, labels, mask)
        return {
            **consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, labels, mask, batch["u_target"]),
            "p_hat_max": self.p_hat.max(),
        }
