"""DASO on FixMatch (Oh et al., CVPR 2022).

Linear pseudo-labels are biased toward head classes; DASO blends them with semantic
pseudo-labels (similarity to class prototypes, which are balanced by construction), and
blends more for classes that the current pseudo-labels over-predict.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
from ssl_imwa.algorithms.common import (
    confident_pseudo_labels,
    masked_consistency,
    pseudo_label_accuracy,
)
from ssl_imwa.ema import EMAConfig
from ssl_imwa.validation import expect_range


@dataclass
class DASOConfig(AlgorithmConfig):
    name: str = "daso"
    threshold: float = 0.95           # FixMatch confidence threshold, applied to the blended pseudo-label
    lambda_u: float = 1.0             # weight of the consistency loss
    lambda_align: float = 1.0         # weight of the semantic alignment loss (0 turns it off)
    queue_size: int = 256             # L: labeled features kept per class
    proto_temperature: float = 0.05   # T_proto of the cosine-similarity softmax
    # T_dist: 1.5 when gamma_l == gamma_u on CIFAR-10, else 0.3 (official configs: CIFAR-100 and STL-10 use 0.3).
    dist_temperature: float = 1.5
    dist_aware: bool = True           # False: blend with the fixed weight interp_alpha (official ablation)
    interp_alpha: float = 0.5
    warmup_steps: StepCount = 5000    # plain FixMatch before this global step
    dist_update_period: StepCount = 100   # m_hat is replaced by the last period's histogram this often
    ema: EMAConfig = field(default_factory=lambda: EMAConfig(decay=0.999, warmup=True, buffers="ema"))

    def validate(self) -> None:
        super().validate()
        expect_range("algorithm.threshold", self.threshold, 0, 1)
        for key in ("lambda_u", "lambda_align"):
            expect_range(f"algorithm.{key}", getattr(self, key), 0)
        expect_range("algorithm.queue_size", self.queue_size, 1)
        for key in ("proto_temperature", "dist_temperature"):
            expect_range(f"algorithm.{key}", getattr(self, key), 0, low_open=True)
        expect_range("algorithm.interp_alpha", self.interp_alpha, 0, 1)
        resolve_steps(self.warmup_steps, 1, "algorithm.warmup_steps")
        resolve_steps(self.dist_update_period, 1, "algorithm.dist_update_period", minimum=1)


class FeatureQueue(nn.Module):
    """Per-class ring buffers of labeled features; their means are the class prototypes.

    A fixed size per class keeps the prototypes balanced however skewed the labeled set is.
    Valid entries of class k are slots [0, fill[k]); `pointer[k]` is the slot written next, so
    the newest entry sits just before it.
    """

    features: torch.Tensor
    fill: torch.Tensor
    pointer: torch.Tensor

    def __init__(self, num_classes: int, size: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"algorithm.queue_size={size}: expected a positive size")
        self.size = size
        # The feature dimension is learnt from the first push (shape [C, L, 0] until then).
        self.register_buffer("features", torch.zeros(num_classes, size, 0, device=device))
        self.register_buffer("fill", torch.zeros(num_classes, dtype=torch.long, device=device))
        self.register_buffer("pointer", torch.zeros(num_classes, dtype=torch.long, device=device))

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Append in batch order; when more than L of a class arrive at once, the last L are kept.

        Static shapes only (no boolean indexing), so a CUDA step never waits for the device. Every
        slot that a kept row writes is set to -0.0, then all rows are added to their slots, the
        rows not kept as -0.0. x + -0.0 == x bitwise for every x (-0.0 and NaN included) and each
        slot gets at most one kept row, so the result is exactly the kept rows, in any order of
        accumulation (CUDA atomics included).
        """
        features = features.detach().float()
        if self.features.shape[2] != features.shape[1]:
            # Any push sets D, so a queue still at D = 0 is empty (checked without reading `fill`).
            if self.features.shape[2] > 0:
                raise ValueError(f"DASO queue holds {self.features.shape[2]}-d features, got {features.shape[1]}-d")
            self.features = torch.zeros(*self.features.shape[:2], features.shape[1], device=self.features.device)
        num_classes = self.features.shape[0]
        one_hot = F.one_hot(labels, num_classes)
        rank = (one_hot.cumsum(0) * one_hot).sum(1) - 1       # position among same-class samples
        arrivals = one_hot.sum(0)
        keep = rank >= arrivals[labels] - self.size
        slots = (self.pointer[labels] + rank) % self.size
        # Class k's kept rows fill the min(arrivals_k, L) slots from its pointer on.
        age = (torch.arange(self.size, device=self.pointer.device) - self.pointer[:, None]) % self.size
        self.features.masked_fill_((age < arrivals[:, None])[..., None], -0.0)
        self.features.index_put_((labels, slots), torch.where(keep[:, None], features, -0.0), accumulate=True)
        self.pointer = (self.pointer + arrivals) % self.size
        self.fill = torch.clamp(self.fill + arrivals, max=self.size)

    def prototypes(self) -> torch.Tensor:
        """[C, D] queue means; a class never pushed has a zero prototype (cosine 0 to everything)."""
        valid = torch.arange(self.size, device=self.fill.device) < self.fill[:, None]
        total = (self.features * valid[..., None]).sum(1)
        return total / self.fill.clamp(min=1)[:, None]

    def most_recent(self, cls: int, count: int) -> torch.Tensor:
        """The newest min(count, fill) entries of class `cls`, oldest first."""
        count = min(count, int(self.fill[cls]))
        slots = (self.pointer[cls] - count + torch.arange(count, device=self.fill.device)) % self.size
        return self.features[cls, slots]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A queue that never saw a feature adopts the checkpoint's feature dimension before the strict load."""
        features = state_dict.get(prefix + "features")
        if features is not None:
            if tuple(features.shape[:2]) != tuple(self.features.shape[:2]):
                raise ValueError(f"DASO queue state has shape {tuple(features.shape)}, expected "
                                 f"[{self.features.shape[0]}, {self.size}, D] (num_classes, algorithm.queue_size, D)")
            if self.features.shape[2] == 0:
                self.features = self.features.new_zeros(features.shape)
        super()._load_from_state_dict(state_dict, prefix, *args)


def merge_queues(queues: list[FeatureQueue]) -> FeatureQueue:
    """One queue from the K replicas' newest L/K entries per class, oldest first, replicas
    interleaved by recency (entries of equal age in replica order), so the merged ring overwrites
    the oldest features first.

    Computed for all classes at once with static shapes: no value is read back to the host, so a
    merge on a GPU does not wait for it.
    """
    size, replicas = queues[0].size, len(queues)
    shares = torch.tensor([size // replicas + (k < size % replicas) for k in range(replicas)],
                          device=queues[0].fill.device)
    depth = -(-size // replicas)   # the largest share
    fill = torch.stack([queue.fill for queue in queues])                      # [K, C]
    pointer = torch.stack([queue.pointer for queue in queues])                # [K, C]
    age = torch.arange(depth, device=fill.device)                            # 0 = newest
    # exists[k, c, a]: replica k contributes its entry of age a for class c.
    exists = age < torch.minimum(shares[:, None], fill)[..., None]
    source_slot = (pointer[..., None] - 1 - age) % size                       # [K, C, A]
    present = exists.long()
    per_age = present.sum(0)                                                  # [C, A]
    older = per_age.flip(1).cumsum(1).flip(1) - per_age                       # entries older than age a
    before = present.cumsum(0) - present                                      # same age, earlier replicas
    position = older + before                                                 # [K, C, A]
    num_classes = fill.shape[1]
    classes = torch.arange(num_classes, device=fill.device)[None, :, None].expand_as(position)
    # A replica that never pushed still has 0-d features (and nothing valid): give it zeros of the others' size.
    dim = max(queue.features.shape[2] for queue in queues)
    features = torch.stack([queue.features if queue.features.shape[2] == dim
                            else queue.features.new_zeros(num_classes, size, dim) for queue in queues])  # [K, C, L, D]
    chosen = features[torch.arange(replicas, device=fill.device)[:, None, None], classes, source_slot]
    # Absent entries go to a spare slot L, dropped afterwards.
    target = torch.where(exists, position, size)
    merged_features = features.new_zeros(num_classes, size + 1, features.shape[-1])
    merged_features.index_put_((classes, target), chosen)
    merged = FeatureQueue(num_classes, size, fill.device)
    merged.features = merged_features[:, :size].contiguous()
    total = present.sum((0, 2))
    merged.fill = total.clamp(max=size)
    merged.pointer = total % size
    return merged


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """cos(z, c_k) / T_proto for every class k, in float32 even under autocast (1/T_proto = 20 amplifies rounding)."""
    device_type = features.device.type
    # A device type without autocast (meta, the stand-in of sync audits) has none to turn off.
    no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                   else contextlib.nullcontext())
    with no_autocast:
        return F.normalize(features.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).t() / temperature


def distribution_weights(pl_dist: torch.Tensor, temperature: float) -> torch.Tensor:
    """v_k = m_k^(1/T) / max_j m_j^(1/T): classes the pseudo-labels over-predict get the most semantic blending."""
    sharpened = pl_dist.double() ** (1.0 / temperature)
    return sharpened / sharpened.max()


def blend_pseudo_labels(linear_probs: torch.Tensor, semantic_probs: torch.Tensor, class_weights: torch.Tensor
                        ) -> torch.Tensor:
    """p' = (1 - v_k') p_hat + v_k' q with k' = argmax p_hat (the linear pseudo-label)."""
    weight = class_weights.to(linear_probs.dtype)[linear_probs.argmax(dim=1)].unsqueeze(1)
    return (1.0 - weight) * linear_probs + weight * semantic_probs


def semantic_alignment_loss(weak_semantic_probs: torch.Tensor, strong_prototype_logits: torch.Tensor
                            ) -> torch.Tensor:
    """Mean over all unlabeled samples of CE(q_weak, softmax(cos(z_strong, c) / T_proto))."""
    return -(weak_semantic_probs * F.log_softmax(strong_prototype_logits, dim=1)).sum(dim=1).mean()


@register_algorithm("daso")
class DASO(Algorithm):
    """State (buffers): the per-class feature queues, m_hat and the pseudo-label counts since its last refresh.

    Schedules (warm-up, refresh period) run on the trainer's global step, so no step counter is kept.
    """

    Config = DASOConfig
    cfg: DASOConfig
    # Checkpoints before the queue became a submodule named its buffers queue_<name>.
    renamed_state_keys: ClassVar[dict[str, str]] = {f"queue_{name}": f"queue.{name}" for name in ("features", "fill", "pointer")}
    pl_dist: torch.Tensor
    pl_counts: torch.Tensor

    def __init__(self, cfg: DASOConfig, context: AlgorithmContext) -> None:
        super().__init__(cfg, context)
        self.warmup_steps = resolve_steps(cfg.warmup_steps, self.total_steps, "algorithm.warmup_steps")
        self.dist_update_period = resolve_steps(cfg.dist_update_period, self.total_steps,
                                                "algorithm.dist_update_period", minimum=1)
        num_classes = self.num_classes
        self.queue = FeatureQueue(num_classes, cfg.queue_size, self.device)
        # m_hat, uniform until the first refresh (the official code starts from zeros, i.e. 0/0).
        self.register_buffer("pl_dist", torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64,
                                                   device=self.device))
        # Final pseudo-labels counted since the last refresh.
        self.register_buffer("pl_counts", torch.zeros(num_classes, dtype=torch.float64, device=self.device))

    def losses(self, batch: Batch, model: nn.Module, teacher: nn.Module, step: int) -> dict[str, torch.Tensor]:
        self._push_labeled_features(batch, teacher)
        labeled, weak, (strong,) = self.forward_views(model, batch)
        loss_x = F.cross_entropy(labeled["logits"], batch["y"])

        if step < self.warmup_steps:
            labels, mask, _ = confident_pseudo_labels(weak["logits"], self.cfg.threshold)
            loss_align = torch.zeros((), device=loss_x.device)
        else:
            prototypes = self.queue.prototypes()
            # z_w from this very forward (same batch), detached: q is a target.
            semantic_probs = torch.softmax(
                prototype_logits(weak["features"].detach(), prototypes, self.cfg.proto_temperature), dim=1)
            linear_probs = torch.softmax(weak["logits"].detach(), dim=1)
            if self.cfg.dist_aware:
                class_weights = distribution_weights(self.pl_dist, self.cfg.dist_temperature)
            else:
                class_weights = torch.full_like(self.pl_dist, self.cfg.interp_alpha)
            blended = blend_pseudo_labels(linear_probs, semantic_probs, class_weights)
            max_prob, labels = blended.max(dim=1)
            mask = max_prob.ge(self.cfg.threshold).float()
            loss_align = semantic_alignment_loss(
                semantic_probs, prototype_logits(strong["features"], prototypes, self.cfg.proto_temperature))

        loss_u = masked_consistency(strong["logits"], labels, mask)
        self._count_pseudo_labels(labels, step)
        return {
            "loss": loss_x + self.cfg.lambda_u * loss_u + self.cfg.lambda_align * loss_align,
            "loss_x": loss_x.detach(),
            "loss_u": loss_u.detach(),
            "loss_align": loss_align.detach(),
            "mask_rate": mask.mean(),
            "pseudo_acc": pseudo_label_accuracy(labels, mask, batch["u_target"]),
        }

    @torch.no_grad()
    def _push_labeled_features(self, batch: Batch, teacher: nn.Module) -> None:
        """The EMA teacher embeds the labeled batch in train mode, as the official EMA model does (it
        stays in train mode: ytaek-oh/daso lib/models/ema_model.py, daso_model.py forward_train): the
        features come from the batch's own BN statistics, and the forward moves the TEACHER's running
        statistics (kept with ema.buffers=ema, overwritten by the student's with copy), never the
        student's, which see only the one concatenated forward of `losses`.

        With data parallelism every process embeds the whole labeled batch (gathered: B images, no
        gradient), so the statistics, the features and the teacher's buffers are those of D = 1 and
        the same on every process. Pushed before the prototypes are read.
        """
        images, labels = self.batch_group.gather(batch["x"]), self.batch_group.gather(batch["y"])
        teacher.train()
        try:
            features = teacher(images)["features"]
        finally:
            teacher.eval()
        self.queue.push(features, labels)

    def _count_pseudo_labels(self, labels: torch.Tensor, step: int) -> None:
        """Histogram of final pseudo-labels (all samples, no threshold); m_hat is replaced every period.

        A one-hot sum, not bincount: bincount reads the largest label back to size its output.
        """
        self.pl_counts += self.batch_group.sum(F.one_hot(labels, self.num_classes).sum(0).to(self.pl_counts))
        if (step + 1) % self.dist_update_period == 0:
            self.pl_dist = self.pl_counts / self.pl_counts.sum()
            self.pl_counts = torch.zeros_like(self.pl_counts)

    def merge_states(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """Histograms averaged; each class queue rebuilt from the K replicas' newest L/K features.

        Entries are ordered oldest first, replicas interleaved by recency, so the merged ring
        overwrites the oldest features first.
        """
        merged = mean_of_states([{"pl_dist": s["pl_dist"], "pl_counts": s["pl_counts"]} for s in states])
        queues = []
        for state in states:
            queue = FeatureQueue(self.num_classes, self.cfg.queue_size, self.device)
            queue.load_state_dict({key.removeprefix("queue."): value for key, value in state.items()
                                   if key.startswith("queue.")})
            queues.append(queue)
        merged_queue = merge_queues(queues)
        return {**{f"queue.{key}": value for key, value in merged_queue.state_dict().items()}, **merged}
