"""Labeled / unlabeled / validation split of a training set (the DASO/ACR split protocols).

The split is a pure function of the targets, the counts, the protocol and `split_seed`,
so every replica, episode and training seed sees the same images.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ssl_imwa.data.config import PROTOCOLS


@dataclass
class Split:
    """Index arrays into the training-set arrays, plus what is needed to count them per class."""

    labeled: np.ndarray  # int64
    unlabeled: np.ndarray  # int64
    validation: np.ndarray  # int64, empty when no hold-out
    unlabeled_is_labeled: np.ndarray  # bool, aligned with `unlabeled` (True only under 'nested')
    targets: np.ndarray  # int64 targets of the whole training set the indices point into
    num_classes: int

    def counts(self) -> dict[str, list[int]]:
        """Per-class image counts of each part, for logging and for algorithms that need priors."""
        return {
            part: np.bincount(self.targets[getattr(self, part)], minlength=self.num_classes).tolist()
            for part in ("labeled", "unlabeled", "validation")
        }


def _class_label(class_index: int, class_names: Sequence[str] | None) -> str:
    if class_names is not None and class_index < len(class_names):
        return f"class {class_index} ({class_names[class_index]!r})"
    return f"class {class_index}"


def refuse_empty_classes(
    labeled_counts: Sequence[int], n_max: int, imbalance: float, class_names: Sequence[str] | None = None
) -> None:
    """Every class needs a labeled image: with none, a class is trained on without a single label
    (and a balanced accuracy averages in a class the model can only guess)."""
    from ssl_imwa.data.counts import long_tailed_counts

    empty = [index for index, count in enumerate(labeled_counts) if count < 1]
    if not empty:
        return
    num_classes = len(labeled_counts)
    named = ", ".join(_class_label(index, class_names) for index in empty[:3])
    more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
    head = max(1, math.ceil(imbalance))  # the tail class gets int(N1 / gamma): N1 >= gamma, up to rounding
    for _ in range(100):
        if min(long_tailed_counts(head, num_classes, imbalance)) >= 1:
            break
        head += 1
    ratio = "at most" if min(long_tailed_counts(n_max, num_classes, float(n_max))) >= 1 else "below"
    raise ValueError(
        f"dataset.n_max={n_max} (N1) with dataset.imbalance={imbalance:g} (gamma) leaves {len(empty)} of "
        f"{num_classes} classes without a labeled image ({named}{more}; N_i = int(N1 * gamma^(-i/(C-1)))): "
        f"raise dataset.n_max to {head} or lower dataset.imbalance to {ratio} {n_max}"
    )


def refuse_a_batch_larger_than_the_labeled_set(
    batch_size: int, labeled_counts: Sequence[int], n_max: int, imbalance: float
) -> None:
    """A step draws train.batch_size labeled images: more than the labeled set holds is not a batch of it."""
    total = sum(labeled_counts)
    if batch_size > total:
        raise ValueError(
            f"train.batch_size={batch_size} is larger than the labeled set ({total} images from dataset.n_max="
            f"{n_max}, dataset.imbalance={imbalance:g}): lower train.batch_size to at most {total} or raise "
            "dataset.n_max"
        )


def _check_split_arguments(num_classes: int, protocol: str, labeled_counts: Sequence[int],
                           unlabeled_counts: Sequence[int], val_per_class: int) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"dataset.protocol={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if len(labeled_counts) != num_classes or len(unlabeled_counts) != num_classes:
        raise ValueError(
            f"expected {num_classes} labeled and unlabeled counts, "
            f"got {len(labeled_counts)} and {len(unlabeled_counts)}"
        )
    if val_per_class < 0:
        raise ValueError(f"dataset.val_per_class={val_per_class}: expected >= 0")


def make_split(
    targets: np.ndarray,
    num_classes: int,
    protocol: str,
    labeled_counts: Sequence[int],
    unlabeled_counts: Sequence[int],
    val_per_class: int,
    split_seed: int,
    class_names: Sequence[str] | None = None,
) -> Split:
    """Split per class after a shuffle seeded by (split_seed, class index).

    Both protocols first hold out `val_per_class` images per class. 'disjoint' then takes
    labeled = next N_i and unlabeled = next M_i; 'nested' takes labeled = next N_i and
    unlabeled = next N_i + M_i, so the unlabeled pool contains the labeled images.
    Seeding each class separately keeps one class's order independent of the others' sizes.
    """
    _check_split_arguments(num_classes, protocol, labeled_counts, unlabeled_counts, val_per_class)
    targets = np.asarray(targets, dtype=np.int64)
    labeled, unlabeled, validation, is_labeled = [], [], [], []
    for class_index in range(num_classes):
        n_labeled, n_unlabeled = int(labeled_counts[class_index]), int(unlabeled_counts[class_index])
        members = np.flatnonzero(targets == class_index)
        needed = val_per_class + n_labeled + n_unlabeled
        if needed > len(members):
            raise ValueError(
                f"{_class_label(class_index, class_names)} has {len(members)} training images, but the split "
                f"needs {needed} (validation {val_per_class} + labeled {n_labeled} + unlabeled {n_unlabeled}); "
                "lower dataset.n_max, dataset.m_max or dataset.val_per_class"
            )
        order = np.random.default_rng([split_seed, class_index]).permutation(members)
        validation.append(order[:val_per_class])
        rest = order[val_per_class:]
        labeled.append(rest[:n_labeled])
        nested = protocol == "nested"   # the unlabeled pool then begins with the labeled images
        unlabeled.append(rest[0 if nested else n_labeled : n_labeled + n_unlabeled])
        is_labeled.append(np.arange(n_labeled + n_unlabeled) < n_labeled if nested else np.zeros(n_unlabeled, bool))

    def join(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    return Split(
        labeled=join(labeled, np.int64),
        unlabeled=join(unlabeled, np.int64),
        validation=join(validation, np.int64),
        unlabeled_is_labeled=join(is_labeled, bool),
        targets=targets,
        num_classes=num_classes,
    )
