"""DARP on FixMatch (Kim et al., NeurIPS 2020, "Distribution Aligning Refinery of Pseudo-label for Imbalanced
Semi-supervised Learning").

Pseudo-labels of a classifier trained on long-tailed data are biased toward the head classes. DARP keeps
the latest weak-view prediction of every unlabeled image and, every few steps after a warm-up, solves a
convex problem over all of them: the pseudo-label matrix closest to the predictions (entropy-weighted KL)
whose class sums equal a target distribution (the labeled distribution scaled to the unlabeled set's
size, as USB and the official code without `--est`). The refined rows replace the predictions as
FixMatch's pseudo-labels. Solver and schedule follow the official code (bbuing9/DARP, common.py
`estimate_pseudo`, `opt_solver`; training_functions.py `train_fix`) and USB 0.3.2
(semilearn/imb_algorithms/darp); each departure is noted where it is made.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_imwa.algorithm import (
    Algorithm,
    AlgorithmContext,
    Batch,
    StepCount,
    register_algorithm,
    resolve_steps,
)
from ssl_imwa.algorithms.common import (
    USBFixMatchConfig,
    consistency_outputs,
    masked_consistency,
)
from ssl_imwa.validation import expect_range

# scipy.optimize.newton's defaults as the official code and USB call it: at most 30 secant steps
# (num_newton=30) from a second point 1e-4 away.
SECANT_STEPS = 30
SECANT_OFFSET = 1e-4
# The official code's floors: added to probabilities inside the entropy's log, to the rescaled
# predictions, and to both sides of the per-class rescaling factor.
FLOOR = 1e-6


@dataclass
class DARPConfig(USBFixMatchConfig):
    name: str = "darp"
    alpha: float = 2.0                # the int(alpha q_c) most confident predictions of class c enter the solver (USB darp_alpha; official --alpha)
    solver_iterations: int = 10       # T, alternating updates of the solver (USB darp_iter_T; official --iter_T)
    solver_tol: float = 0.1           # secant tolerance on each class's dual variable (USB: 0.1; official th: 0.1, 0.3 on STL-10 and CIFAR-100)
    refine_every: int = 10            # steps between solver runs (USB darp_num_refine_iter; official --num_iter)
    warmup_epochs: int = 200          # refinement starts with epoch warmup_epochs + 1, 0-based (USB darp_warmup_epochs; official --warm)
    # Steps per epoch (int), or a fraction of train.iterations: 1/256, USB num_train_iter / epoch = 262144 / 256 = 1024.
    epoch_length: StepCount = 0.00390625
    # true: the mask thresholds the refined pseudo-label's confidence (official train_fix: max of the refined row);
    # false: the model's own confidence, as USB (its FixMatch masks the unrefined probabilities before the DARP hook).
    threshold_refined: bool = True

    def validate(self) -> None:
        super().validate()
        expect_range("algorithm.alpha", self.alpha, 0, low_open=True)
        expect_range("algorithm.solver_iterations", self.solver_iterations, 1)
        expect_range("algorithm.solver_tol", self.solver_tol, 0, low_open=True)
        expect_range("algorithm.refine_every", self.refine_every, 1)
        expect_range("algorithm.warmup_epochs", self.warmup_epochs, 0)
        resolve_steps(self.epoch_length, 1, "algorithm.epoch_length", minimum=1)


def target_distribution(labeled_counts: list[int], num_unlabeled: int) -> torch.Tensor:
    """q: the labeled class distribution scaled to the unlabeled set's size (float64 [C]), as USB computes it."""
    counts = torch.tensor(labeled_counts, dtype=torch.float64)
    distribution = counts / counts.sum()
    return distribution * num_unlabeled / distribution.sum()


def solver_input(predictions: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The official `estimate_pseudo` and the rescaling after it: in each class column c only the keep_c
    largest predictions are kept, scaled so that they sum to q_c; the rest drop to the floor; rows are
    renormalised. float64 [N, C] from float32 [N, C] predictions.

    Ties in a column are broken by image index (a stable sort, the same on every device). The official code
    and USB use torch's default sort, which does not promise an order among equal values: exact ties arise
    between images never seen yet (uniform rows), where the two may keep different ones of them. The kept
    mass is summed in float64 (official and USB: float32).
    """
    ranked, order = predictions.sort(dim=0, descending=True, stable=True)
    rank = torch.arange(predictions.shape[0], device=predictions.device)
    kept_ranked = rank[:, None] < keep[None, :]
    kept = torch.zeros_like(kept_ranked).scatter(0, order, kept_ranked)
    kept_mass = (ranked.double() * kept_ranked).sum(dim=0)
    scale = (target + FLOOR) / (kept_mass + FLOOR)
    rescaled = predictions.double() * (kept * scale) + FLOOR
    return rescaled / rescaled.sum(dim=1, keepdim=True)


def secant_roots(func: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, tol: float,
                 steps: int = SECANT_STEPS, early_exit: bool = False) -> torch.Tensor:
    """A root of each entry of the vector function `func` (entry c depends on x_c only) by
    scipy.optimize.newton without a derivative, the secant method, as the official code calls it once per
    class: the same second point, swap, update formulas and stopping rule |x_new - x| <= tol.

    All classes move together for a fixed number of steps, each frozen at its first accepted iterate, so
    the device never reports back. Where scipy raises (flat function with distinct points, or no
    convergence within `steps`) this keeps the midpoint or the last iterate. `early_exit` stops once every
    class has converged (the result is the same: converged entries are frozen); only worth a read-back on
    the CPU.
    """
    p0 = start
    p1 = start * (1 + SECANT_OFFSET)
    p1 = torch.where(p1 >= 0, p1 + SECANT_OFFSET, p1 - SECANT_OFFSET)
    q0, q1 = func(p0), func(p1)
    swap = q1.abs() < q0.abs()
    p0, p1, q0, q1 = (torch.where(swap, p1, p0), torch.where(swap, p0, p1),
                      torch.where(swap, q1, q0), torch.where(swap, q0, q1))
    root = p1
    done = torch.zeros_like(start, dtype=torch.bool)
    for step in range(steps):
        flat = q1 == q0
        p = torch.where(q1.abs() > q0.abs(), (-q0 / q1 * p1 + p0) / (1 - q0 / q1),
                        (-q1 / q0 * p0 + p1) / (1 - q1 / q0))
        p = torch.where(flat, (p1 + p0) / 2, p)
        root = torch.where(done, root, p)
        done = done | flat | ((p - p1).abs() <= tol)
        if step + 1 == steps or (early_exit and bool(done.all())):
            break
        p0, q0, p1 = p1, q1, p
        q1 = func(p1)
    return root


def align_distribution(probs: torch.Tensor, target: torch.Tensor, iterations: int, tol: float,
                       early_exit: bool = False) -> torch.Tensor:
    """The official `opt_solver`: for predictions P (float64 [N, C], rows summing to 1) and class sums q,
    M_ic = P_ic / e * x_i * exp(-nu_c / w_i) with w_i = 1 / entropy(P_i), by `iterations` alternating
    updates: x from the row sums (= 1), then each nu_c by the secant method from the previous nu (the
    first from 0) on the column sums (= q_c), then x once more. Returns float64 [N, C] with rows summing
    to 1 and columns to q up to the secant tolerance.

    The first row update reads exp(-1 / w_i) (nu = 1) while the first secant starts from nu = 0: the
    official initialisation, kept.
    """
    entropy = (-probs * torch.log(probs + FLOOR)).sum(dim=1)
    weights = 1 / entropy
    scaled = probs / math.e
    columns = torch.exp(-1 / weights)[:, None].expand_as(probs)
    nu = torch.zeros_like(target)
    for _ in range(iterations):
        rows = 1 / (scaled * columns).sum(dim=1)
        base = scaled * rows[:, None]

        def column_excess(values: torch.Tensor, base: torch.Tensor = base) -> torch.Tensor:
            return (base * torch.exp(-values[None, :] / weights[:, None])).sum(dim=0) - target

        nu = secant_roots(column_excess, nu, tol, early_exit=early_exit)
        columns = torch.exp(-nu[None, :] / weights[:, None])
    rows = 1 / (scaled * columns).sum(dim=1)
    return scaled * rows[:, None] * columns


def latest_occurrence(index: torch.Tensor) -> torch.Tensor:
    """For each position, the last position holding the same index: a batch that crosses a sampler epoch
    may hold an image twice, and the later prediction is the one kept (as the official code's CPU write)."""
    positions = torch.arange(index.shape[0], device=index.device)
    same = index[:, None] == index[None, :]
    return torch.where(same, positions[None, :], -1).amax(dim=1)


@register_algorithm("darp")
class DARP(Algorithm):
    """State: the latest weak-view prediction of every unlabeled image (float32 [N, C], uniform until the
    image is first seen) and the refined pseudo-labels of the last solver run (float32 [N, C], uniform
    until then), both indexed by `u_index`.

    Every step writes the batch's predictions (gathered over `batch_group` under data parallelism, so every
    process holds what D = 1 would). From step `refine_start` = (warmup_epochs + 1) * epoch_length on, the
    solver runs over all stored predictions at every `refine_every`-th step, and the batch's pseudo-labels
    are the rows of the last refinement. At an IMWA merge both are averaged over the replicas (the default):
    the mean prediction is the ensemble's, and the mean of refined matrices still has rows summing to 1 and
    class sums q, the solver's constraints being linear; the next solver run starts from the mean predictions.
    """

    Config = DARPConfig
    cfg: DARPConfig

    predictions: torch.Tensor
    refined: torch.Tensor
    target: torch.Tensor
    keep: torch.Tensor

    def __init__(self, cfg: DARPConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        epoch_length = resolve_steps(cfg.epoch_length, self.total_steps, "algorithm.epoch_length", minimum=1)
        # USB and official: `epoch > warmup_epochs` with 0-based epochs.
        self.refine_start = (cfg.warmup_epochs + 1) * epoch_length
        target = target_distribution(list(context.labeled_counts), context.num_unlabeled)
        keep = [min(int(cfg.alpha * value), context.num_unlabeled) for value in target.tolist()]
        self.register_buffer("target", target.to(self.device), persistent=False)
        self.register_buffer("keep", torch.tensor(keep, device=self.device), persistent=False)
        uniform = torch.full((context.num_unlabeled, self.num_classes), 1.0 / self.num_classes, device=self.device)
        self.register_buffer("predictions", uniform)
        self.register_buffer("refined", uniform.clone())

    def is_refine_step(self, step: int) -> bool:
        """The solver runs at refine_start and every refine_every steps after it.

        Official: at within-epoch batch indices divisible by refine_every; USB: at global steps divisible by
        it, so up to refine_every - 1 steps after the warm-up read the never-written uniform refined labels
        (argmax: class 0). Here the first step after the warm-up always refines; the three agree when
        refine_every divides the epoch length (official) or refine_start (USB).
        """
        return step >= self.refine_start and (step - self.refine_start) % self.cfg.refine_every == 0

    def store(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        """Write the (gathered) batch's predictions at its images' rows."""
        index, probs = self.batch_group.gather(index), self.batch_group.gather(probs)
        self.predictions.index_copy_(0, index, probs[latest_occurrence(index)])

    def refine(self) -> torch.Tensor:
        """Refined pseudo-labels of every unlabeled image from the stored predictions (float32 [N, C])."""
        inputs = solver_input(self.predictions, self.target, self.keep)
        early_exit = self.device.type == "cpu"   # reading back is free on the CPU; on an accelerator it would stall
        return align_distribution(inputs, self.target, self.cfg.solver_iterations, self.cfg.solver_tol,
                                  early_exit).float()

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        labeled, weak, (strong,) = self.forward_views(model, batch)
        loss_x = F.cross_entropy(labeled["logits"], batch["y"])
        probs = torch.softmax(weak["logits"].detach(), dim=1)
        self.store(batch["u_index"], probs)
        targets = probs
        if step >= self.refine_start:
            if self.is_refine_step(step):
                self.refined = self.refine()
            targets = self.refined[batch["u_index"]]
        labels = targets.argmax(dim=1)
        confidence = (targets if self.cfg.threshold_refined else probs).max(dim=1).values
        mask = confidence.ge(self.cfg.threshold).float()
        loss_u = masked_consistency(strong["logits"], labels, mask)
        return {
            **consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, labels, mask, batch["u_target"]),
            "relabel_rate": labels.ne(probs.argmax(dim=1)).float().mean(),
        }
