"""The Evaluator used during training: a (teacher) model on the held-out splits. (`ssl_imwa.evaluate` is the
command that evaluates a saved checkpoint again.)"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ssl_imwa.data import eval_batches
from ssl_imwa.metrics import class_groups, classification_metrics


class Evaluator:
    """Evaluates a model's `head` on the test split and, when the protocol has one, the validation split."""

    def __init__(self, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                 labeled_counts: list[int], mean: list[float], std: list[float], head: str, batch_size: int,
                 device: torch.device, channels_last: bool,
                 autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext) -> None:
        self.splits = splits
        self.num_classes = num_classes
        self.groups = class_groups(labeled_counts)
        self.mean, self.std = mean, std
        self.head = head
        self.batch_size = batch_size
        self.device = device
        self.channels_last = channels_last
        self.autocast = autocast

    def evaluate(self, model: nn.Module, split: str) -> dict[str, Any]:
        return self.evaluate_heads(model, split, [self.head])[self.head]

    @torch.no_grad()
    def evaluate_heads(self, model: nn.Module, split: str, heads: list[str]) -> dict[str, dict[str, Any]]:
        """Metrics of several heads from one pass over the split."""
        images, targets = self.splits[split]
        was_training = model.training
        model.eval()
        predictions: dict[str, list[torch.Tensor]] = {head: [] for head in heads}
        for batch, _ in eval_batches(images, targets, self.batch_size, self.mean, self.std, self.device):
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with self.autocast():
                outputs = model(batch)
            for head in heads:
                predictions[head].append(outputs[head].argmax(dim=1))
        model.train(was_training)
        # One transfer for all heads at the end, not one per batch.
        predicted = torch.stack([torch.cat(predictions[head]) for head in heads]).cpu()
        return {head: classification_metrics(predicted[index], targets.cpu(), self.num_classes, self.groups)
                for index, head in enumerate(heads)}
