"""Classification metrics for long-tailed evaluation: balanced accuracy and head/medium/tail groups."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def class_groups(labeled_counts: list[int]) -> dict[str, list[int]]:
    """Split classes into head / medium / tail thirds by labeled count (ties broken by class index).

    With C=10 this gives 3/3/4 classes; the remainder goes to the tail.
    """
    order = sorted(range(len(labeled_counts)), key=lambda c: (-labeled_counts[c], c))
    third = len(order) // 3
    return {"head": order[:third], "medium": order[third:2 * third], "tail": order[2 * third:]}


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predictions."""
    index = targets.long() * num_classes + predictions.long()
    counts = torch.bincount(index.cpu(), minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).numpy()


def macro_f1(matrix: np.ndarray) -> float:
    """Mean over all classes of 2 TP / (2 TP + FP + FN), 0 for a class never true nor predicted:
    scikit-learn's f1_score(average='macro', zero_division=0), from the confusion matrix (which
    also spares every process the 2 s import of sklearn.metrics)."""
    true_positives = np.diag(matrix).astype(float)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)   # (TP + FP) + (TP + FN)
    scores = np.divide(2 * true_positives, denominator, out=np.zeros_like(true_positives), where=denominator > 0)
    return float(scores.mean())


def classification_metrics(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int,
                           groups: dict[str, list[int]]) -> dict[str, Any]:
    """top1, balanced accuracy (mean per-class recall), macro-F1, per-class and group accuracies."""
    matrix = confusion_matrix(predictions, targets, num_classes)
    support = matrix.sum(axis=1)
    per_class = np.divide(np.diag(matrix), support, out=np.full(num_classes, np.nan), where=support > 0)
    present = support > 0
    metrics: dict[str, Any] = {
        "top1": float(np.trace(matrix) / max(matrix.sum(), 1)),
        "balanced_acc": float(per_class[present].mean()) if present.any() else float("nan"),
        "macro_f1": macro_f1(matrix),
        "per_class": [float(value) for value in per_class],
    }
    for name, classes in groups.items():
        values = [per_class[c] for c in classes if present[c]]
        metrics[name] = float(np.mean(values)) if values else float("nan")
    metrics["confusion"] = matrix.tolist()
    return metrics


def median_of_last(values: list[float], n: int = 20) -> float:
    """Median of the last n evaluations (DASO's reporting protocol)."""
    if not values:
        return float("nan")
    return float(np.median(values[-n:]))
