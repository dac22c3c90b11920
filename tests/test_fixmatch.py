"""FixMatch's loss on a hand-made batch equals a hand computation; its step never waits for the device."""
import copy
import math
from typing import Any

import torch
from torch import nn

from ssl_imwa.algorithm import Algorithm, AlgorithmConfig
from ssl_imwa.algorithms.common import pseudo_label_accuracy
from ssl_imwa.algorithms.fixmatch import FixMatch, FixMatchConfig
from ssl_imwa.models import create_model
from ssl_imwa.sync_audit import SyncAudit
from tests.utils import algorithm_context

META = torch.device("meta")


def meta_setup(algorithm_cls: type[Algorithm], config: AlgorithmConfig) -> tuple[Algorithm, nn.Module, nn.Module]:
    """The algorithm, a small CNN with the algorithm's heads, and its teacher, all on the meta device."""
    num_classes = 4
    algorithm = algorithm_cls(config, algorithm_context([5, 3, 2, 1], 100, META))
    model = create_model("small_cnn", num_classes, 3, bn_momentum=0.001)
    for name, head in algorithm.build_heads(model.feature_dim, num_classes).items():
        model.add_head(name, head)
    model = model.to(META)
    return algorithm, model, copy.deepcopy(model).eval()


def meta_batch(num_strong: int, batch_size: int = 8, mu: int = 2) -> dict[str, Any]:
    """Meta tensors in the layout of ssl_imwa.data.stream.TrainStream.next."""
    unlabeled = batch_size * mu

    def images(count: int) -> torch.Tensor:
        return torch.empty(count, 3, 32, 32, device=META)

    def longs(count: int) -> torch.Tensor:
        return torch.empty(count, dtype=torch.long, device=META)

    return {"x": images(batch_size), "y": longs(batch_size), "u_weak": images(unlabeled),
            "u_strong": [images(unlabeled) for _ in range(num_strong)], "u_index": longs(unlabeled),
            "u_is_labeled": torch.empty(unlabeled, dtype=torch.bool, device=META), "u_target": longs(unlabeled)}


def audit_steps(algorithm: Algorithm, model: nn.Module, teacher: nn.Module, steps: list[int]
                ) -> dict[int, tuple[list[Any], list[Any], list[str]]]:
    """Per step: the syncs, the host-to-device copies and the outputs not on the device (all should be empty)."""
    found = {}
    for step in steps:
        with SyncAudit(META, tolerate=True) as audit:
            outputs = algorithm.losses(meta_batch(algorithm.num_strong_views()), model, teacher, step)
        off_device = [key for key, value in outputs.items() if value.device != META]
        found[step] = (audit.syncs, audit.copies_to_device, off_device)
    return found


class FixedLogits(nn.Module):
    """A 'model' that returns preset logits for the concatenated batch, ignoring its input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert x.shape[0] == self.logits.shape[0], "FixMatch must forward x, u_w and u_s in one batch"
        return {"features": torch.zeros(x.shape[0], 1), "logits": self.logits * 1.0}


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def test_fixmatch_loss_matches_hand_computation() -> None:
    labeled = [[2.0, 0.0], [0.0, 1.0]]
    weak = [[5.0, 0.0], [0.2, 0.0], [0.0, 4.0]]    # confidences 0.9933, 0.5498, 0.9820
    strong = [[1.0, 0.0], [0.0, 3.0], [0.5, 0.5]]
    model = FixedLogits(torch.tensor(labeled + weak + strong))
    batch = {
        "x": torch.zeros(2, 1, 2, 2), "y": torch.tensor([0, 0]),
        "u_weak": torch.zeros(3, 1, 2, 2), "u_strong": [torch.zeros(3, 1, 2, 2)],
        "u_target": torch.tensor([0, -1, 0]),
    }
    algorithm = FixMatch(FixMatchConfig(threshold=0.95, lambda_u=2.0), algorithm_context([10, 1], 100))
    out = algorithm.losses(batch, model, model, step=0)

    loss_x = (ce(labeled[0], 0) + ce(labeled[1], 0)) / 2
    # sample 1 is below threshold; sample 0 -> class 0, sample 2 -> class 1; mean over all 3
    loss_u = (ce(strong[0], 0) + 0.0 + ce(strong[2], 1)) / 3
    assert math.isclose(out["loss_x"].item(), loss_x, rel_tol=1e-6)
    assert math.isclose(out["loss_u"].item(), loss_u, rel_tol=1e-6)
    assert math.isclose(out["loss"].item(), loss_x + 2.0 * loss_u, rel_tol=1e-6)
    assert math.isclose(out["mask_rate"].item(), 2 / 3, rel_tol=1e-6)
    # sample 0 correct, sample 2 wrong (truth 0, label 1): 1/2
    assert math.isclose(out["pseudo_acc"].item(), 0.5)


def test_pseudo_labels_carry_no_gradient() -> None:
    logits = torch.tensor([[0.0, 1.0]] * 2 + [[9.0, 0.0]] + [[0.0, 1.0]])
    model = FixedLogits(logits)
    batch = {"x": torch.zeros(2, 1, 1, 1), "y": torch.tensor([1, 1]), "u_weak": torch.zeros(1, 1, 1, 1),
             "u_strong": [torch.zeros(1, 1, 1, 1)], "u_target": torch.tensor([-1])}
    algorithm = FixMatch(FixMatchConfig(), algorithm_context([1, 1], 10))
    algorithm.losses(batch, model, model, 0)["loss"].backward()
    assert torch.count_nonzero(model.logits.grad[2]) == 0, "the weak view must not receive gradient"
    assert torch.count_nonzero(model.logits.grad[3]) == 2


def test_no_grad_weak_pass_gives_the_same_loss_without_bn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    wrapped = lambda x: {"features": x, "logits": model(x)}
    batch = {"x": torch.randn(2, 1, 2, 2), "y": torch.tensor([0, 2]), "u_weak": torch.randn(5, 1, 2, 2) * 5,
             "u_strong": [torch.randn(5, 1, 2, 2)], "u_target": torch.full((5,), -1)}
    joint = FixMatch(FixMatchConfig(threshold=0.5), algorithm_context([1, 1, 1], 10)).losses(batch, wrapped, wrapped, 0)
    separate = FixMatch(FixMatchConfig(threshold=0.5, weak_pass="no_grad"), algorithm_context([1, 1, 1], 10)).losses(
        batch, wrapped, wrapped, 0)
    assert joint["mask_rate"] > 0
    for key in ("loss", "loss_x", "loss_u", "mask_rate"):
        assert torch.allclose(joint[key], separate[key]), key


def test_pseudo_label_accuracy_is_nan_without_known_samples() -> None:
    # The NaN is the one torch.tensor(nan) gives (sign bit clear), not 0/0's (sign bit set on x86).
    labels = torch.tensor([0, 1, 1])
    accuracy = pseudo_label_accuracy(labels, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([-1, 1, -1]))
    assert accuracy.view(torch.int32).item() == torch.tensor(float("nan")).view(torch.int32).item()
    assert pseudo_label_accuracy(labels, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 0, -1])).item() == 0.5


def test_step_never_waits_for_the_device() -> None:
    algorithm, model, teacher = meta_setup(FixMatch, FixMatchConfig())
    algorithm.losses(meta_batch(1), model, teacher, 0)   # warm-up
    assert audit_steps(algorithm, model, teacher, [1, 2]) == {1: ([], [], []), 2: ([], [], [])}
