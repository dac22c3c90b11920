"""FixMatch's loss on a hand-made batch equals a hand computation."""
import math

import torch
from torch import nn

from algorithms.fixmatch import FixMatch, FixMatchConfig


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
    algorithm = FixMatch(FixMatchConfig(threshold=0.95, lambda_u=2.0), 2, [10, 1], 100)
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
    algorithm = FixMatch(FixMatchConfig(), 2, [1, 1], 10)
    algorithm.losses(batch, model, model, 0)["loss"].backward()
    assert torch.count_nonzero(model.logits.grad[2]) == 0, "the weak view must not receive gradient"
    assert torch.count_nonzero(model.logits.grad[3]) == 2


def test_no_grad_weak_pass_gives_the_same_loss_without_bn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    wrapped = lambda x: {"features": x, "logits": model(x)}
    batch = {"x": torch.randn(2, 1, 2, 2), "y": torch.tensor([0, 2]), "u_weak": torch.randn(5, 1, 2, 2) * 5,
             "u_strong": [torch.randn(5, 1, 2, 2)], "u_target": torch.full((5,), -1)}
    joint = FixMatch(FixMatchConfig(threshold=0.5), 3, [1, 1, 1], 10).losses(batch, wrapped, wrapped, 0)
    separate = FixMatch(FixMatchConfig(threshold=0.5, weak_pass="no_grad"), 3, [1, 1, 1], 10).losses(
        batch, wrapped, wrapped, 0)
    assert joint["mask_rate"] > 0
    for key in ("loss", "loss_x", "loss_u", "mask_rate"):
        assert torch.allclose(joint[key], separate[key]), key
