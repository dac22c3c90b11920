import math

import pytest
import torch

from ssl_imwa.metrics import class_groups, classification_metrics, median_of_last


def test_metrics_by_hand() -> None:
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 1, 0, 2, 0])
    groups = class_groups([100, 10, 1])
    assert groups == {"head": [0], "medium": [1], "tail": [2]}
    m = classification_metrics(predictions, targets, 3, groups)
    assert math.isclose(m["top1"], 5 / 8)
    assert m["per_class"] == [0.75, 0.5, 0.5]
    assert math.isclose(m["balanced_acc"], (0.75 + 0.5 + 0.5) / 3)
    assert (m["head"], m["medium"], m["tail"]) == (0.75, 0.5, 0.5)
    assert m["confusion"] == [[3, 1, 0], [1, 1, 0], [1, 0, 1]]
    # macro-F1: class 0 p=3/5 r=3/4; class 1 p=1/2 r=1/2; class 2 p=1 r=1/2
    f1 = [2 * p * r / (p + r) for p, r in ((0.6, 0.75), (0.5, 0.5), (1.0, 0.5))]
    assert math.isclose(m["macro_f1"], sum(f1) / 3, rel_tol=1e-9)


def test_groups_for_ten_classes_sorted_by_count() -> None:
    counts = [5, 500, 299, 179, 107, 64, 38, 23, 13, 8]
    groups = class_groups(counts)
    assert groups["head"] == [1, 2, 3] and groups["medium"] == [4, 5, 6] and groups["tail"] == [7, 8, 9, 0]


def test_median_of_last_twenty() -> None:
    assert median_of_last(list(range(100))) == 89.5
    assert math.isnan(median_of_last([]))


@pytest.mark.slow
def test_macro_f1_is_scikit_learns_with_absent_and_never_predicted_classes() -> None:
    from sklearn.metrics import f1_score

    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        targets = torch.randint(0, 7, (50,), generator=generator)
        predictions = torch.randint(0, 9, (50,), generator=generator)   # classes 7, 8 never true; some never hit
        predictions[predictions == trial % 9] = (trial + 1) % 9
        ours = classification_metrics(predictions, targets, 10, class_groups([1] * 10))["macro_f1"]
        theirs = f1_score(targets.numpy(), predictions.numpy(), labels=list(range(10)), average="macro",
                          zero_division=0)
        assert math.isclose(ours, theirs, rel_tol=1e-12, abs_tol=1e-15)
