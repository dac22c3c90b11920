"""ADSH on FixMatch (Guo & Li, ICML 2022, "Class-Imbalanced Semi-Supervised Learning with Adaptive Thresholding").

A fixed confidence threshold keeps far fewer pseudo-labels of the tail classes, whose predictions are
less confident. ADSH keeps one score s_k per class and masks a pseudo-label k unless its confidence is
at least exp(-s_k). After every epoch the scores are re-estimated from the EMA teacher's predictions on
the whole unlabeled set, so that every class keeps the same fraction rho of its predictions that the
head class keeps under its fixed threshold tau_1: s_k = -log(C_k[int(n_k rho) - 1]), C_k the
confidences of the n_k images predicted as k, in descending order.

This follows USB (semilearn 0.3.2, imb_algorithms/adsh: AdaptiveThresholdingHook); the differences
from USB and from the official code (guolz-ml/Class-Imbalanced-SSL: train.py update_s, algorithms/fixmatch.py
ADSH) are documented where they are made and in docs/algorithms.md.
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
    Outputs,
    StepCount,
    register_algorithm,
    resolve_steps,
)
from ssl_imwa.algorithms.common import (
    USBFixMatchConfig,
    consistency_outputs,
    masked_consistency,
)


@dataclass
class ADSHConfig(USBFixMatchConfig):
    name: str = "adsh"
    # tau_1: the head class's confidence threshold in the re-estimate, and the initial score of every
    # class (USB adsh_tau_1; official --threshold). USB starts s_k at tau_1, i.e. the first epoch masks
    # at exp(-0.95) = 0.387; the official code starts its thresholds at tau_1 = 0.95 itself.
    threshold: float = 0.95
    # Steps between re-estimates: one epoch (USB num_train_iter / epoch = 262144 / 256 = 1024 steps on
    # CIFAR-10-LT; the official code: --eval_steps 512, first re-estimate after its second epoch).
    epoch_length: StepCount = 1024
    # true: USB. An index int(n_k rho) - 1 of -1 (n_k rho < 1: a class with few predictions, or rho = 0
    # when a single head prediction reaches tau_1) reads C_k[-1], the class's LEAST confident prediction,
    # so every prediction of that class passes. false: the index is clamped to 0, the MOST confident one,
    # as the official code's max(0, .) does.
    wrap_rank: bool = True

    def validate(self) -> None:
        super().validate()
        resolve_steps(self.epoch_length, 1, "algorithm.epoch_length", minimum=1)


def adaptive_scores(logits: torch.Tensor, scores: torch.Tensor, head: int, threshold: float, wrap_rank: bool
                    ) -> torch.Tensor:
    """The re-estimated class scores s [C] from the pass's logits [N, C]; classes nobody predicts keep theirs.

    USB's rule, computed on the device without reading anything back: rho is what USB's loop over the
    head class's descending confidences leaves, (m - 1) / n_head for the m of them >= tau_1 (its
    `rho = i / len` at the last such index i), or 1.0 when there are none; then s_k = -log C_k[int(n_k rho) - 1]
    in float64 for n_k rho and int() as Python computes them, so the ranks are USB's exactly.
    """
    num_classes = scores.numel()
    confidence, predicted = torch.softmax(logits.float(), dim=-1).max(dim=-1)
    # Every class's confidences in descending order, one class after another: two stable sorts.
    by_confidence = torch.sort(confidence, descending=True, stable=True).indices
    order = by_confidence.gather(0, torch.sort(predicted.gather(0, by_confidence), stable=True).indices)
    ranked = confidence.gather(0, order)
    lengths = F.one_hot(predicted, num_classes).sum(dim=0)
    starts = lengths.cumsum(dim=0) - lengths
    # Compared in float32 as USB's `C[0][i] < tau_1` (a float32 tensor against a Python float).
    confident = ((predicted == head) & confidence.ge(threshold)).sum()
    rho = torch.where(confident > 0, (confident - 1).double() / lengths[head].double().clamp(min=1), 1.0)
    rank = (lengths.double() * rho).floor().long() - 1
    rank = torch.where(rank < 0, rank + lengths, rank) if wrap_rank else rank.clamp(min=0)
    chosen = ranked.gather(0, (starts + rank).clamp(0, confidence.numel() - 1))
    return torch.where(lengths > 0, -torch.log(chosen), scores)


@register_algorithm("adsh")
class ADSH(Algorithm):
    """State: s (float32 [C]), the class scores; a weak-view pseudo-label k counts if its confidence is >= exp(-s_k).

    The scores change only at the pass after each epoch's last step (`unlabeled_pass_every`), from the
    EMA teacher's logits over every unlabeled image; a data-parallel group's processes all run the same
    pass, so they stay identical with no communication. At an IMWA merge s is averaged over the replicas
    (a geometric mean of their thresholds); the next pass re-estimates it from the merged teacher anyway.

    The head class (rho's reference) is the class with the most labeled images, the first on a tie.
    USB and the official code hard-code class 0: the same class in every split here and in USB's
    CIFAR-LT recipes (class 0 is the labeled head). Where class 0 were a tail class, theirs would take
    rho from a class with few, unconfident predictions (m <= 1, so every class's threshold falls to its
    least confident prediction: almost every pseudo-label passes).
    """

    Config = ADSHConfig
    cfg: ADSHConfig

    s: torch.Tensor

    def __init__(self, cfg: ADSHConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        self.epoch_length = resolve_steps(cfg.epoch_length, self.total_steps, "algorithm.epoch_length", minimum=1)
        self.head = max(range(self.num_classes), key=lambda k: (context.labeled_counts[k], -k))
        # USB: torch.ones(C) * tau_1 (float32), so every class starts at the threshold exp(-tau_1).
        self.register_buffer("s", torch.full((self.num_classes,), cfg.threshold, dtype=torch.float32,
                                             device=self.device))

    def unlabeled_pass_every(self) -> int:
        return self.epoch_length

    def after_unlabeled_pass(self, outputs: Outputs, step: int) -> None:
        self.s = adaptive_scores(outputs["logits"], self.s, self.head, self.cfg.threshold, self.cfg.wrap_rank)

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        labeled, weak, (strong,) = self.forward_views(model, batch)
        loss_x = F.cross_entropy(labeled["logits"], batch["y"])
        max_prob, labels = torch.softmax(weak["logits"].detach(), dim=-1).max(dim=-1)
        mask = max_prob.ge(torch.exp(-self.s[labels])).float()   # USB: exp(-s[pred]), in float32
        loss_u = masked_consistency(strong["logits"], labels, mask)
        return {
            **consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, labels, mask, batch["u_target"]),
            "threshold_min": torch.exp(-self.s).min(),
        }
