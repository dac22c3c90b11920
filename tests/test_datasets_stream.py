"""Training streams: seeding by (seed, replica, episode), exact resume, strong views, evaluation batches."""

import pytest
import torch

from datasets import TrainStream, eval_batches
from datasets.stream import InfiniteSampler


def _stream(seed: int = 0, replica: int = 0, episode: int = 0, mu: int = 2, num_strong: int = 1) -> TrainStream:
    generator = torch.Generator().manual_seed(99)
    return TrainStream(
        labeled_images=torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=generator),
        labeled_targets=torch.arange(10) % 3,
        unlabeled_images=torch.randint(0, 256, (25, 3, 16, 16), dtype=torch.uint8, generator=generator),
        unlabeled_targets=torch.full((25,), -1),
        unlabeled_is_labeled=torch.arange(25) < 5,
        batch_size=4,
        mu=mu,
        num_strong=num_strong,
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        pad=2,
        hflip=True,
        cutout=8,
        seed=seed,
        replica=replica,
        episode=episode,
    )


def _assert_batches_equal(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key, value in left.items():
        if key == "u_strong":
            assert len(value) == len(right[key])
            for one, other in zip(value, right[key]):
                assert torch.equal(one, other)
        else:
            assert torch.equal(value, right[key]), key


def test_batch_layout() -> None:
    batch = next(_stream(num_strong=2))
    assert batch["x"].shape == (4, 3, 16, 16) and batch["x"].dtype == torch.float32
    assert batch["y"].shape == (4,) and batch["y"].dtype == torch.long
    assert batch["u_weak"].shape == (8, 3, 16, 16)
    assert len(batch["u_strong"]) == 2 and all(view.shape == (8, 3, 16, 16) for view in batch["u_strong"])
    assert batch["u_index"].dtype == torch.long and batch["u_is_labeled"].dtype == torch.bool
    assert torch.equal(batch["u_is_labeled"], batch["u_index"] < 5)
    assert (batch["u_target"] == -1).all()


def test_same_triple_same_stream_and_replicas_differ() -> None:
    first, again = _stream(), _stream()
    for _ in range(3):
        _assert_batches_equal(next(first), next(again))
    first, other_replica = _stream(), _stream(replica=1)
    order = torch.cat([next(first)["u_index"] for _ in range(3)])
    other_order = torch.cat([next(other_replica)["u_index"] for _ in range(3)])
    assert not torch.equal(order, other_order)


def test_reseed_equals_a_fresh_stream() -> None:
    stream = _stream()
    next(stream)
    stream.reseed(replica=2, episode=3)
    _assert_batches_equal(next(stream), next(_stream(replica=2, episode=3)))


def test_state_dict_round_trip_is_bitwise() -> None:
    stream = _stream(num_strong=2)
    for _ in range(3):
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(2)]
    resumed = _stream(seed=5, replica=4, num_strong=2)  # different seeds: the state must override them
    resumed.load_state_dict(state)
    for batch in expected:
        _assert_batches_equal(batch, next(resumed))


def test_two_strong_views_are_independent() -> None:
    batch = next(_stream(num_strong=2))
    first, second = batch["u_strong"]
    assert not torch.equal(first, second)
    assert not torch.equal(first, batch["u_weak"])


def test_supervised_only_stream_has_empty_unlabeled_parts() -> None:
    batch = next(_stream(mu=0, num_strong=0))
    assert batch["x"].shape == (4, 3, 16, 16)
    assert batch["u_weak"].shape[0] == 0 and batch["u_index"].numel() == 0 and batch["u_strong"] == []


def test_sampler_covers_every_index_each_epoch_and_resumes() -> None:
    sampler = InfiniteSampler(7, generator_seed=1)
    first_epoch, second_epoch = sampler.next_indices(7), sampler.next_indices(7)
    assert sorted(first_epoch.tolist()) == sorted(second_epoch.tolist()) == list(range(7))
    assert not torch.equal(first_epoch, second_epoch)
    state = sampler.state_dict()
    expected = sampler.next_indices(10)
    fresh = InfiniteSampler(7, generator_seed=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.next_indices(10), expected)
    with pytest.raises(ValueError, match="empty"):
        InfiniteSampler(0, generator_seed=0)


def test_eval_batches_cover_everything_in_order_without_augmentation() -> None:
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    targets = torch.arange(10)
    batches = list(eval_batches(images, targets, batch_size=4, mean=[0.5], std=[0.5]))
    assert [len(batch_targets) for _, batch_targets in batches] == [4, 4, 2]
    restored = torch.cat([batch_images for batch_images, _ in batches]) * 0.5 + 0.5
    torch.testing.assert_close(restored, images.float() / 255)
    assert torch.equal(torch.cat([batch_targets for _, batch_targets in batches]), targets)
