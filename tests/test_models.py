"""The small CNN's max-pooling: the same bits as `nn.MaxPool2d(2)` forward and backward, whichever
kernel runs it."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ssl_imwa.models.pooling import MaxPool2x2


@pytest.mark.parametrize("shape", [(6, 3, 16, 16), (4, 2, 7, 9), (2, 1, 2, 2), (3, 4, 2, 6)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_values_and_gradients_are_those_of_max_pool2d(shape: tuple[int, ...], layout: torch.memory_format) -> None:
    generator = torch.Generator().manual_seed(0)
    # rounded ReLU output: most windows hold ties (zeros, and equal integers), where the kernels must agree
    features = torch.randn(shape, generator=generator).mul(2).round().relu().contiguous(memory_format=layout)
    ours, theirs = features.clone().requires_grad_(), features.clone().requires_grad_()
    pooled_ours, pooled_theirs = MaxPool2x2()(ours), nn.MaxPool2d(2)(theirs)
    grad = torch.randn(pooled_theirs.shape, generator=generator)
    pooled_ours.backward(grad)
    pooled_theirs.backward(grad)
    assert torch.equal(pooled_ours, pooled_theirs)
    assert torch.equal(ours.grad, theirs.grad)
    assert pooled_ours.stride() == pooled_theirs.stride()
    assert ours.grad.stride() == theirs.grad.stride()
    with torch.no_grad():
        assert torch.equal(MaxPool2x2()(features), nn.MaxPool2d(2)(features))


def test_the_input_of_a_pool_gets_the_gradient_of_the_first_maximum_of_its_window() -> None:
    features = torch.tensor([[[[1.0, 3.0], [3.0, 2.0]]]], requires_grad=True)
    MaxPool2x2()(features).sum().backward()
    assert features.grad.tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]


def test_on_a_cuda_tensor_it_is_the_plain_operator() -> None:
    with FakeTensorMode():
        features = torch.empty(2, 3, 8, 8, device="cuda", requires_grad=True)
        pooled = MaxPool2x2()(features)
        assert pooled.shape == (2, 3, 4, 4) and pooled.device.type == "cuda"
        assert type(pooled.grad_fn).__name__ == "MaxPool2DWithIndicesBackward0"
