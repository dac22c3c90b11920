"""SimPro on FixMatch (Du, Han & Huang, ICML 2024, "SimPro: A Simple Probabilistic Framework Towards
Realistic Long-Tailed Semi-Supervised Learning"; official code LeapLabTHU/SimPro, `SimPro/train.py`).

In realistic long-tailed SSL the unlabeled class distribution is unknown and may differ from the
labeled one (uniform, reversed, ...). SimPro models p(x|y) with the network and the class marginals
with explicit priors, and runs an EM procedure:

- the network is trained with logit adjustment, `f(x) + tau log pi`, so its raw logits model the
  balanced (class-conditional) part and the test-time argmax of the raw logits is the balanced
  prediction: evaluation reads the plain `logits` head, as the official `test()` does;
- E-step: the pseudo-label is the Bayes posterior under the estimated unlabeled prior,
  `softmax(f(u_w) + tau log pi_u)`, kept as a soft target and masked by its confidence;
- M-step (closed form, once per epoch of `epoch_length` steps): pi_u is re-estimated from the summed
  masked soft pseudo-labels of the epoch, pi (the prior of all training samples) from those plus the
  labeled counts seen, both by an exponential moving average of momentum `prior_momentum`.

What the official code does, and this code with it (SimPro/train.py at aa2425d; line numbers there):
- adjustments `log(pi^tau + 1e-12)` recomputed at each epoch start from the current estimates
  (`compute_adjustment_by_py`, l. 90-93, 587-588); pi_u starts uniform, pi at the labeled prior (l. 577-578);
- pseudo-label `softmax(f(u_w).detach() + log(pi_u^tau + 1e-12))` and mask `max >= threshold` (l. 637-642);
- `L_x = CE(f(x) + log(pi^tau + 1e-12), y) / scale_ratio`, scale_ratio = len(unlabeled loader) /
  len(labeled loader) (drop_last, l. 565-568, 659-662);
- `L_u = mean over both strong views of mask * CE(f(u_s) + log(pi^tau + 1e-12), soft pseudo-label)`:
  the unlabeled loss is adjusted by pi, the prior of ALL training samples, not by pi_u (l. 664-671);
- `L = L_x + L_u` (l. 673);
- M-step after the epoch's last step (l. 688-705): `pi_u <- m pi_u + (1 - m) s / (sum(s) + 1)` with s the
  summed masked soft pseudo-labels (the "+ 1" is the official code's: pi_u then sums to a bit less than
  1), `pi <- m pi + (1 - m) (n + s) / sum(n + s)` with n the labeled images counted in the epoch's batches.

L_x covers the labeled batch's weak and strong views, as the official (its TransformFixMatch2), through
the stream's labeled strong view (`num_labeled_strong_views`); `labeled_strong_view=false` leaves it out.

Deliberate differences (each also noted at its place below):
- scale_ratio's loader lengths are floor(set size / global batch) as with drop_last on one process,
  at least 1 (a set smaller than its batch would give the official code an empty loader).
- Under data parallelism the epoch sums are over the whole (gathered) batch, so every process keeps the
  state of one process; the official code, run over several GPUs, sums each GPU's own slice.
- The masked sum multiplies by the mask instead of indexing with it (`pseudo_label[mask]`), so no step
  waits for the device; float32 sums may differ from the official ones in the last bits.
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
    StepCount,
    register_algorithm,
    resolve_steps,
)
from ssl_imwa.algorithms.common import USBFixMatchConfig, consistency_outputs
from ssl_imwa.validation import expect_range

ADJUSTMENT_EPSILON = 1e-12   # official compute_adjustment_by_py: log(pi^tau + 1e-12)


@dataclass
class SimProConfig(USBFixMatchConfig):
    name: str = "simpro"
    threshold: float = 0.95           # on the Bayes pseudo-label's confidence (official --threshold; CIFAR-10 0.95)
    lambda_u: float = 1.0             # weight of L_u (the official loss is L_x + L_u: 1)
    tau: float = 2.0                  # exponent of the priors in the adjustments (official --tau; CIFAR-10 2.0)
    prior_momentum: float = 0.9       # EMA momentum of both prior estimates per epoch (official --ema-u 0.9)
    epoch_length: StepCount = 500     # steps between M-steps (official --eval-step 500: one "epoch")
    # true: L_x / scale_ratio, the official ratio of the unlabeled to the labeled loader's length;
    # false: L_x unscaled (FixMatch's weighting).
    scale_labeled_loss: bool = True
    # true: L_x over the labeled batch's weak and strong views (official TransformFixMatch2: (weak, strong),
    # L_x over both, train.py l. 656-662); false: over the weak view alone (FixMatch's).
    labeled_strong_view: bool = True

    def validate(self) -> None:
        super().validate()
        expect_range("algorithm.tau", self.tau, 0)
        expect_range("algorithm.prior_momentum", self.prior_momentum, 0, 1)
        resolve_steps(self.epoch_length, 1, "algorithm.epoch_length", minimum=1)


def prior_adjustment(prior: torch.Tensor, tau: float) -> torch.Tensor:
    """log(pi^tau + 1e-12): the official logit adjustment (the epsilon keeps a zero prior finite)."""
    return torch.log(prior ** tau + ADJUSTMENT_EPSILON)


def bayes_pseudo_labels(weak_logits: torch.Tensor, unlabeled_adjustment: torch.Tensor, threshold: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """E-step: (soft pseudo-labels softmax(f(u_w) + log pi_u^tau), float mask max >= threshold).

    Adding the estimated unlabeled prior turns the balanced logits into the posterior of the unlabeled
    distribution (Bayes' rule), so head classes of a long-tailed unlabeled set are not under-predicted
    and absent classes of a reversed one not over-predicted."""
    probs = torch.softmax(weak_logits.detach() + unlabeled_adjustment, dim=-1)
    return probs, probs.max(dim=-1).values.ge(threshold).float()


def adjusted_soft_consistency(strong_logits: list[torch.Tensor], adjustment: torch.Tensor,
                              targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over every strong view and sample of mask * CE(f(u_s) + adjustment, soft target)."""
    views = len(strong_logits)
    losses = F.cross_entropy(torch.cat(strong_logits) + adjustment, torch.cat([targets] * views), reduction="none")
    return (losses * torch.cat([mask] * views)).mean()


def loader_length_ratio(num_unlabeled: int, unlabeled_batch: int, num_labeled: int, labeled_batch: int) -> float:
    """The official scale_ratio: len(unlabeled loader) / len(labeled loader), both with drop_last
    (a loader shorter than one batch counts as 1 here; the official code would have none)."""
    return max(1, num_unlabeled // unlabeled_batch) / max(1, num_labeled // labeled_batch)


def class_histogram(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float32 counts per class: the official bincount, without its data-dependent output size."""
    ones = torch.ones_like(labels, dtype=torch.float32)
    return torch.zeros(num_classes, dtype=torch.float32, device=labels.device).index_add_(0, labels, ones)


def unlabeled_prior_step(prior: torch.Tensor, pseudo_label_mass: torch.Tensor, momentum: float) -> torch.Tensor:
    """M-step for pi_u: m pi_u + (1 - m) s / (sum s + 1), as the official code (the + 1 included)."""
    estimate = pseudo_label_mass / (pseudo_label_mass.sum() + 1)
    return prior * momentum + estimate * (1 - momentum)


def training_prior_step(prior: torch.Tensor, labeled_count: torch.Tensor, pseudo_label_mass: torch.Tensor,
                        momentum: float) -> torch.Tensor:
    """M-step for pi, the prior of all training samples: m pi + (1 - m) (n + s) / sum(n + s)."""
    counts = labeled_count + pseudo_label_mass
    return prior * momentum + (counts / counts.sum()) * (1 - momentum)


@register_algorithm("simpro")
class SimPro(Algorithm):
    """State (float32 [C] buffers, as the official tensors): pi_u (`unlabeled_prior`), pi
    (`training_prior`), and this epoch's sums: masked soft pseudo-labels (`pseudo_label_mass`) and
    labeled images seen (`labeled_count`).

    At an IMWA merge every entry is the mean over the replicas (the default): the priors stay
    distributions, and a merge inside an epoch averages the partial sums, whose M-step normalises them.
    """

    Config = SimProConfig
    cfg: SimProConfig

    unlabeled_prior: torch.Tensor
    training_prior: torch.Tensor
    pseudo_label_mass: torch.Tensor
    labeled_count: torch.Tensor

    def __init__(self, cfg: SimProConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        self.epoch_length = resolve_steps(cfg.epoch_length, self.total_steps, "algorithm.epoch_length", minimum=1)
        num_classes, device = self.num_classes, self.device
        # float32 as the official py_l (counts / counts.sum()); the base class's labeled_prior is float64.
        counts = torch.tensor(list(context.labeled_counts), dtype=torch.float32, device=device)
        self.register_buffer("unlabeled_prior", torch.ones(num_classes, device=device) / num_classes)
        self.register_buffer("training_prior", counts / counts.sum())
        self.register_buffer("pseudo_label_mass", torch.zeros(num_classes, device=device))
        self.register_buffer("labeled_count", torch.zeros(num_classes, device=device))

    def num_strong_views(self) -> int:
        return 2   # official TransformFixMatch: (weak, strong, strong1)

    def num_labeled_strong_views(self) -> int:
        return 1 if self.cfg.labeled_strong_view else 0

    def labeled_loss_divisor(self, batch: Batch) -> float:
        """scale_ratio from the global batch sizes (a process sees 1/D of each) and the two set sizes."""
        if not self.cfg.scale_labeled_loss:
            return 1.0
        world = self.batch_group.world_size
        return loader_length_ratio(self.context.num_unlabeled, batch["u_weak"].shape[0] * world,
                                   sum(self.context.labeled_counts), batch["x"].shape[0] * world)

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        # One forward over (x, x_strong, u_w, u_s, u_s1), the official order (train.py l. 623-635).
        labeled, weak, strong = self.forward_all_views(model, batch)
        # Both adjustments read the estimates of the previous M-step (official: computed at the epoch start).
        adjustment = prior_adjustment(self.training_prior, self.cfg.tau)
        probs, mask = bayes_pseudo_labels(weak["logits"], prior_adjustment(self.unlabeled_prior, self.cfg.tau),
                                          self.cfg.threshold)
        labeled_logits = torch.cat([view["logits"] for view in labeled])
        loss_x = F.cross_entropy(labeled_logits + adjustment, torch.cat([batch["y"]] * len(labeled))) \
            / self.labeled_loss_divisor(batch)
        loss_u = adjusted_soft_consistency([view["logits"] for view in strong], adjustment, probs, mask)
        self.accumulate(batch["y"], probs, mask)
        if (step + 1) % self.epoch_length == 0:
            self.maximization_step()
        return {
            **consistency_outputs(loss_x, loss_u, self.cfg.lambda_u, probs.argmax(dim=-1), mask, batch["u_target"]),
            "pi_u_max": self.unlabeled_prior.max(),
            "pi_u_min": self.unlabeled_prior.min(),
        }

    def accumulate(self, labels: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> None:
        """Add the step's labeled counts and masked soft pseudo-labels to the epoch sums, over the whole
        batch: counts are summed over the group (integers, exact), the pseudo-labels gathered and summed
        in batch order, so a data-parallel group keeps bitwise the sums of one process."""
        self.labeled_count = self.labeled_count + self.batch_group.sum(class_histogram(labels, self.num_classes))
        # Difference: the official torch.sum(pseudo_label[mask], dim=0) indexes (a host sync); the product
        # adds zeros instead, which can change the float32 sum's last bits.
        self.pseudo_label_mass = self.pseudo_label_mass + self.batch_group.gather(probs * mask[:, None]).sum(dim=0)

    def maximization_step(self) -> None:
        """Closed-form M-step at the end of an epoch (official: after its last step), then empty sums."""
        momentum = self.cfg.prior_momentum
        self.unlabeled_prior = unlabeled_prior_step(self.unlabeled_prior, self.pseudo_label_mass, momentum)
        self.training_prior = training_prior_step(self.training_prior, self.labeled_count, self.pseudo_label_mass,
                                                  momentum)
        self.pseudo_label_mass = torch.zeros_like(self.pseudo_label_mass)
        self.labeled_count = torch.zeros_like(self.labeled_count)
