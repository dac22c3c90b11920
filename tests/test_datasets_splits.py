"""Per-class counts (the published check values) and the two split protocols (the DASO/ACR split protocols)."""

import numpy as np
import pytest
import torch

from ssl_imwa.data import (
    DatasetConfig,
    build_data,
    long_tailed_counts,
    make_split,
    unlabeled_counts,
)


@pytest.mark.parametrize(
    ("head", "imbalance", "expected"),
    [
        (500, 100, [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]),
        (1500, 100, [1500, 899, 539, 323, 193, 116, 69, 41, 25, 15]),
        (4000, 100, [4000, 2397, 1437, 861, 516, 309, 185, 111, 66, 40]),
        (3000, 100, [3000, 1798, 1078, 646, 387, 232, 139, 83, 50, 30]),
        (500, 150, [500, 286, 164, 94, 53, 30, 17, 10, 5, 3]),
        (150, 10, [150, 116, 89, 69, 53, 41, 32, 25, 19, 15]),
    ],
)
def test_ten_class_check_values(head: int, imbalance: float, expected: list[int]) -> None:
    assert long_tailed_counts(head, 10, imbalance) == expected


def test_ten_class_check_totals() -> None:
    assert sum(long_tailed_counts(500, 10, 100)) == 1236
    assert sum(long_tailed_counts(1500, 10, 100)) == 3720
    assert sum(long_tailed_counts(4000, 10, 100)) == 9922
    assert sum(long_tailed_counts(3000, 10, 100)) == 7443
    assert sum(long_tailed_counts(500, 10, 150)) == 1162
    assert sum(long_tailed_counts(150, 10, 10)) == 609


@pytest.mark.parametrize(("head", "total"), [(50, 1911), (150, 5835), (400, 15651), (300, 11720)])
def test_cifar100_check_totals(head: int, total: int) -> None:
    counts = long_tailed_counts(head, 100, 10)
    assert counts[0] == head and counts[-1] == int(head / 10)
    assert sum(counts) == total


def test_unlabeled_settings() -> None:
    consistent = long_tailed_counts(4000, 10, 100)
    assert unlabeled_counts("consistent", 4000, 10, 100) == consistent
    assert unlabeled_counts("uniform", 4000, 10, 100) == [4000] * 10
    assert unlabeled_counts("reversed", 4000, 10, 100) == consistent[::-1]
    assert unlabeled_counts("custom", 4000, 10, 100, imbalance_u=10) == long_tailed_counts(4000, 10, 10)
    with pytest.raises(ValueError, match="imbalance_u"):
        unlabeled_counts("custom", 4000, 10, 100)
    with pytest.raises(ValueError, match="unknown"):
        unlabeled_counts("unknown", 4000, 10, 100)


def _targets(per_class: int = 60, num_classes: int = 5) -> np.ndarray:
    return np.random.default_rng(123).permutation(np.repeat(np.arange(num_classes), per_class))


LABELED = [20, 12, 8, 5, 3]
UNLABELED = [30, 18, 11, 7, 4]


def test_disjoint_parts_are_disjoint_with_exact_counts() -> None:
    targets = _targets()
    split = make_split(targets, 5, "disjoint", LABELED, UNLABELED, val_per_class=6, split_seed=0)
    labeled, unlabeled, validation = set(split.labeled), set(split.unlabeled), set(split.validation)
    assert len(labeled) == len(split.labeled) and len(unlabeled) == len(split.unlabeled)
    assert not labeled & unlabeled and not labeled & validation and not unlabeled & validation
    counts = split.counts()
    assert counts == {"labeled": LABELED, "unlabeled": UNLABELED, "validation": [6] * 5}
    assert not split.unlabeled_is_labeled.any()
    assert split.labeled.dtype == split.unlabeled.dtype == split.validation.dtype == np.int64


def test_nested_unlabeled_pool_contains_labeled() -> None:
    targets = _targets()
    split = make_split(targets, 5, "nested", LABELED, UNLABELED, val_per_class=6, split_seed=0)
    assert split.counts()["labeled"] == LABELED
    assert split.counts()["unlabeled"] == [n + m for n, m in zip(LABELED, UNLABELED)]
    assert set(split.labeled) <= set(split.unlabeled)
    assert set(split.unlabeled[split.unlabeled_is_labeled]) == set(split.labeled)
    assert split.unlabeled_is_labeled.sum() == len(split.labeled)
    assert not set(split.validation) & set(split.unlabeled)


def test_nested_and_disjoint_share_the_labeled_set() -> None:
    targets = _targets()
    nested = make_split(targets, 5, "nested", LABELED, UNLABELED, 0, split_seed=4)
    disjoint = make_split(targets, 5, "disjoint", LABELED, UNLABELED, 0, split_seed=4)
    np.testing.assert_array_equal(nested.labeled, disjoint.labeled)


def test_split_depends_only_on_its_seed() -> None:
    targets = _targets()
    np.random.seed(1)
    torch.manual_seed(1)
    first = make_split(targets, 5, "disjoint", LABELED, UNLABELED, 2, split_seed=7)
    np.random.seed(2)
    torch.manual_seed(2)
    again = make_split(targets, 5, "disjoint", LABELED, UNLABELED, 2, split_seed=7)
    other = make_split(targets, 5, "disjoint", LABELED, UNLABELED, 2, split_seed=8)
    for part in ("labeled", "unlabeled", "validation"):
        np.testing.assert_array_equal(getattr(first, part), getattr(again, part))
    assert set(first.labeled) != set(other.labeled)


def test_impossible_split_names_class_and_numbers() -> None:
    targets = _targets(per_class=10)
    with pytest.raises(ValueError, match=r"class 0 \('zero'\) has 10 training images, but the split needs 21"):
        make_split(targets, 5, "disjoint", [20, 1, 1, 1, 1], [0] * 5, 1, 0, class_names=["zero", "a", "b", "c", "d"])


def test_bad_protocol_is_named() -> None:
    with pytest.raises(ValueError, match="dataset.protocol='foo': expected one of disjoint, nested"):
        make_split(_targets(), 5, "foo", LABELED, UNLABELED, 0, 0)


def test_split_is_independent_of_stream_seed_and_replica() -> None:
    cfg = DatasetConfig(name="digits", n_max=30, m_max=40, imbalance=10, hflip=False, split_seed=3)
    data = build_data(cfg)
    before = {part: getattr(data.split, part).copy() for part in ("labeled", "unlabeled")}
    for seed, replica in ((0, 0), (5, 1)):
        next(data.make_stream(batch_size=4, mu=2, num_strong=1, seed=seed, replica=replica, episode=0))
    rebuilt = build_data(cfg)
    for part, indices in before.items():
        np.testing.assert_array_equal(getattr(data.split, part), indices)
        np.testing.assert_array_equal(getattr(rebuilt.split, part), indices)
    assert torch.equal(rebuilt.labeled_images, data.labeled_images)


def test_a_class_without_a_labeled_image_is_refused_by_name() -> None:
    """`dataset.imbalance=1e9` gave labeled counts [40, 4, 0, ..., 0] and trained without a word."""
    from ssl_imwa.config import validate
    from tests.utils import compose_config

    with pytest.raises(ValueError) as error:
        validate(compose_config(["experiment=quickstart", "dataset.imbalance=100"]))
    assert str(error.value) == (
        "dataset.n_max=40 (N1) with dataset.imbalance=100 (gamma) leaves 2 of 10 classes without a labeled image "
        "(class 8, class 9; N_i = int(N1 * gamma^(-i/(C-1)))): raise dataset.n_max to 100 or lower "
        "dataset.imbalance to at most 40")
    with pytest.raises(ValueError, match=r"^dataset.n_max=40 \(N1\) with dataset.imbalance=1e\+09 \(gamma\) leaves 8 "
                                         r"of 10 classes without a labeled image \(class 2, class 3, class 4 and 5 more"):
        validate(compose_config(["experiment=quickstart", "dataset.imbalance=1e9"]))
    with pytest.raises(ValueError, match=r"^train.batch_size=200 is larger than the labeled set \(159 images from "
                                         r"dataset.n_max=40, dataset.imbalance=10\)"):
        validate(compose_config(["experiment=quickstart", "train.batch_size=200"]))
    # reading the data says the same, with the class names
    with pytest.raises(ValueError, match=r"leaves 2 of 10 classes without a labeled image \(class 8 \('8'\), class 9"):
        build_data(DatasetConfig(name="digits", n_max=40, m_max=10, imbalance=100, hflip=False))


def test_every_preset_gives_every_class_a_labeled_image() -> None:
    """The quick start's digits_lt (N1=40, gamma=10) gives [40, 30, 23, 18, 14, 11, 8, 6, 5, 4]."""
    from pathlib import Path

    from ssl_imwa.config import validate
    from tests.utils import CONFIG_DIR, compose_config

    assert long_tailed_counts(40, 10, 10) == [40, 30, 23, 18, 14, 11, 8, 6, 5, 4]
    for preset in sorted(Path(CONFIG_DIR / "experiment").glob("*.yaml")):
        validate(compose_config([f"experiment={preset.stem}"]))
