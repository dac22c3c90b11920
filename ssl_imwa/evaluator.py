"""The Evaluator used during training: a (teacher) model on the held-out splits. (`ssl_imwa.evaluate` is the
command that evaluates a saved checkpoint again.)"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ssl_imwa.data import eval_batches
from ssl_imwa.data.transforms import normalize
from ssl_imwa.metrics import class_groups, classification_metrics

# (evaluated model, one normalised evaluation image) -> what is subtracted from the evaluated head's logits,
# or None for nothing: an algorithm's `eval_logit_offset` (ssl_imwa.algorithm.Algorithm).
LogitOffset = Callable[[nn.Module, torch.Tensor], torch.Tensor | None]


def measure_logit_offset(logit_offset: LogitOffset | None, model: nn.Module, sample: torch.Tensor,
                         autocast: Callable[[], contextlib.AbstractContextManager[Any]]) -> torch.Tensor | None:
    """`logit_offset(model, sample)` under `autocast`, as float32 (None: no hook, or the hook's None).
    `model` is already in eval mode, `sample` one normalised image as the evaluated batches hold them."""
    if logit_offset is None:
        return None
    with torch.no_grad(), autocast():
        offset = logit_offset(model, sample)
    return None if offset is None else offset.float()


def offset_logits(logits: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """The logits evaluation reads: as they are without an offset (exactly the plain path), else float32 minus it."""
    return logits if offset is None else logits.float() - offset


class Evaluator:
    """Evaluates a model's `head` on the test split and, when the protocol has one, the validation split."""

    def __init__(self, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                 labeled_counts: list[int], mean: list[float], std: list[float], head: str, batch_size: int,
                 device: torch.device, channels_last: bool,
                 autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                 logit_offset: LogitOffset | None = None) -> None:
        self.splits = splits
        self.num_classes = num_classes
        self.groups = class_groups(labeled_counts)
        self.mean, self.std = mean, std
        self.head = head
        self.batch_size = batch_size
        self.device = device
        self.channels_last = channels_last
        self.autocast = autocast
        self.logit_offset = logit_offset

    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        return self.evaluate_heads(model, split, [self.head])[self.head]

    def offset_for(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor | None:
        """The evaluated head's logit offset for `model` (in eval mode), from its first image; once per evaluation."""
        if self.logit_offset is None:
            return None
        sample = normalize(images[:1].to(self.device), self.mean, self.std)
        if self.channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        return measure_logit_offset(self.logit_offset, model, sample, self.autocast)

    @torch.no_grad()
    def evaluate_heads(self, model: nn.Module, split: str, heads: list[str]) -> dict[str, dict[str, Any]]:
        """Metrics of several heads from one pass over the split."""
        images, targets = self.splits[split]
        was_training = model.training
        model.eval()
        offset = self.offset_for(model, images) if self.head in heads else None
        predictions: dict[str, list[torch.Tensor]] = {head: [] for head in heads}
        for batch, _ in eval_batches(images, targets, self.batch_size, self.mean, self.std, self.device):
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                outputs = model(batch)
            for head in heads:
                predictions[head].append(offset_logits(outputs[head], offset if head == self.head else None
                                                       ).argmax(dim=1))
        model.train(was_training)
        # One transfer for all heads at the end, not one per batch.
        predicted = torch.stack([torch.cat(predictions[head]) for head in heads]).cpu()
        return {head: classification_metrics(predicted[index], targets.cpu(), self.num_classes, self.groups)
                for index, head in enumerate(heads)}
