"""Training streams: seeding by (seed, replica, episode), exact resume, strong views, evaluation batches,
pinned output, and a device step that is one non-blocking copy with no sync."""

import hashlib

import pytest
import torch

from ssl_imwa.data import DatasetConfig, TrainStream, build_data, eval_batches
from ssl_imwa.data.stream import InfiniteSampler
from ssl_imwa.data.transforms import normalize
from ssl_imwa.sync_audit import SyncAudit

META = torch.device("meta")


def _stream(
    seed: int = 0,
    replica: int = 0,
    episode: int = 0,
    mu: int = 2,
    num_strong: int = 1,
    device: str | torch.device = "cpu",
    shard: tuple[int, int] = (0, 1),
    num_labeled_strong: int = 0,
) -> TrainStream:
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
        device=device,
        shard=shard,
        num_labeled_strong=num_labeled_strong,
    )


def _assert_batches_equal(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for key, value in left.items():
        if key in ("u_strong", "x_strong"):
            assert len(value) == len(right[key])
            for one, other in zip(value, right[key]):
                assert torch.equal(one, other)
        else:
            assert torch.equal(value, right[key]), key


@pytest.mark.parametrize("shards", [2, 4])
def test_data_parallel_shards_are_slices_of_the_whole_batch(shards: int) -> None:
    """imwa.data_parallel=D: process i of D gets rows i/D..(i+1)/D of the very batch one process
    would draw (indices and augmentations bitwise), step after step, so the data does not depend on D."""
    whole = _stream(num_strong=2)
    parts = [_stream(num_strong=2, shard=(index, shards)) for index in range(shards)]
    for _ in range(7):   # crosses epochs of both samplers (10 labeled, 25 unlabeled images)
        expected = next(whole)
        pieces = [next(part) for part in parts]
        assert pieces[0]["x"].shape[0] == 4 // shards
        joined = {key: torch.cat([piece[key] for piece in pieces]) for key in expected
                  if key not in ("u_strong", "x_strong")}
        joined["u_strong"] = [torch.cat([piece["u_strong"][view] for piece in pieces]) for view in range(2)]
        joined["x_strong"] = []
        _assert_batches_equal(expected, joined)
    assert all(part.state_dict()["labeled_sampler"]["position"] == whole.state_dict()["labeled_sampler"]["position"]
               for part in parts)
    with pytest.raises(ValueError, match="shard 0 of 3"):
        _stream(shard=(0, 3))


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


def test_eval_batches_values_are_normalize_of_the_slices() -> None:
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    mean, std = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
    std_tensor, mean_tensor = torch.tensor(std).view(1, 3, 1, 1), torch.tensor(mean).view(1, 3, 1, 1)
    for start, (batch, _) in zip(range(0, 10, 4), eval_batches(images, torch.arange(10), 4, mean, std)):
        expected = images[start : start + 4].float().mul_(1.0 / (255.0 * std_tensor)).sub_(mean_tensor / std_tensor)
        assert torch.equal(batch, expected)
        assert torch.equal(batch, normalize(images[start : start + 4], mean, std))


def _pinned_stream(channels: int, side: int, pad: int, cutout: int, hflip: bool, mu: int, num_strong: int) -> TrainStream:
    generator = torch.Generator().manual_seed(2024)
    return TrainStream(
        labeled_images=torch.randint(0, 256, (7, channels, side, side), dtype=torch.uint8, generator=generator),
        labeled_targets=torch.arange(7) % 3,
        unlabeled_images=torch.randint(0, 256, (19, channels, side, side), dtype=torch.uint8, generator=generator),
        unlabeled_targets=torch.arange(19) % 4 - 1,
        unlabeled_is_labeled=torch.arange(19) % 5 == 0,
        batch_size=4,
        mu=mu,
        num_strong=num_strong,
        mean=[0.4] * channels,
        std=[0.3] * channels,
        pad=pad,
        hflip=hflip,
        cutout=cutout,
        seed=11,
        replica=1,
        episode=2,
    )


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ((3, 16, 2, 8, True, 2, 2), "215240b7790c121328b6c5ef256f9be690fc02381bcd6c319036b29ca7a52a07"),
        ((1, 8, 1, 4, False, 3, 1), "906c432fadcf7daa13b839f38d8c3f4ff2cd7f61b6621cdd2539c4bb8fcc1835"),
        ((3, 16, 2, 8, True, 0, 1), "56c786ba6a46ab5d68efcaa7c0e2ac639641d00754f32ef44cb008bfa2b2056b"),
    ],
)
def test_batches_are_pinned_bit_for_bit(config: tuple, expected: str) -> None:
    """Digests of the first 8 batches, computed before the stream planned on the host: any change of draws,
    draw order or pixel arithmetic changes them (channels, side, pad, cutout, hflip, mu, num_strong)."""
    stream = _pinned_stream(*config)
    digest = hashlib.sha256()
    for _ in range(8):
        batch = next(stream)
        parts = (batch["x"], batch["y"], batch["u_weak"], *batch["u_strong"])
        for tensor in (*parts, batch["u_index"], batch["u_is_labeled"], batch["u_target"]):
            digest.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    assert digest.hexdigest() == expected


@pytest.mark.parametrize(("mu", "num_strong"), [(16, 1), (16, 2), (0, 0), (0, 1)])
def test_a_device_step_is_one_non_blocking_copy_without_sync(mu: int, num_strong: int) -> None:
    """On a stand-in device a step sends its parameters in one non-blocking copy, small (no per-pixel maps),
    and nothing waits for the device. The first batch builds the cached normalisation constants."""
    stream = _stream(mu=mu, num_strong=num_strong, device=META)
    next(stream)
    for _ in range(2):
        with SyncAudit(META) as audit:
            batch = next(stream)
        assert audit.syncs == []
        assert len(audit.copies_to_device) == 1 and audit.copies_to_device[0].non_blocking
        assert audit.copies_to_device[0].nbytes < 8 * (4 + 4 * mu) * 16 * 16  # under one int64 per pixel
    assert batch["x"].device == META and all(view.device == META for view in batch["u_strong"])


def test_a_device_stream_has_the_cpu_batch_layout() -> None:
    on_cpu, on_meta = next(_stream(num_strong=2)), next(_stream(num_strong=2, device=META))
    assert on_cpu.keys() == on_meta.keys()
    for key in on_cpu:
        pairs = zip(on_cpu[key], on_meta[key]) if key in ("u_strong", "x_strong") else [(on_cpu[key], on_meta[key])]
        for cpu_tensor, meta_tensor in pairs:
            assert (cpu_tensor.shape, cpu_tensor.dtype) == (meta_tensor.shape, meta_tensor.dtype), key


def test_replica_streams_share_the_resident_tensors() -> None:
    data = build_data(DatasetConfig(name="digits", n_max=30, m_max=40, imbalance=10, hflip=False))
    names = ("labeled_images", "labeled_targets", "unlabeled_images", "unlabeled_targets", "unlabeled_is_labeled")
    first, second = (data.make_stream(4, 2, 1, seed=0, replica=replica, device=META) for replica in (0, 1))
    for name in names:
        assert getattr(first, name) is getattr(second, name), name
        assert getattr(first, name).device == META
    on_cpu = data.make_stream(4, 2, 1, seed=0)
    assert all(getattr(on_cpu, name).data_ptr() == getattr(data, name).data_ptr() for name in names)


def test_pseudo_labels_join_the_labeled_set_and_share_the_resident_unlabeled_set() -> None:
    """CReST's next generation: picked unlabeled images first, as their picked classes, then the labeled set;
    the unlabeled set is the same tensors, on the host and on a device that already holds the data."""
    data = build_data(DatasetConfig(name="digits", n_max=30, m_max=40, imbalance=10, hflip=False))
    data.make_stream(4, 2, 1, seed=0, device=META)
    index, labels = torch.tensor([5, 0, 17]), torch.tensor([9, 2, 2])
    picked = data.with_pseudo_labels(index, labels)
    assert torch.equal(picked.labeled_images, torch.cat([data.unlabeled_images[index], data.labeled_images]))
    assert torch.equal(picked.labeled_targets, torch.cat([labels, data.labeled_targets]))
    expected = list(data.counts["labeled"])
    expected[9] += 1
    expected[2] += 2
    assert picked.counts["labeled"] == expected and data.counts["labeled"] != expected
    assert picked.unlabeled_images is data.unlabeled_images
    on_meta = picked.make_stream(4, 2, 1, seed=0, device=META)
    held = data.make_stream(4, 2, 1, seed=0, device=META)
    assert on_meta.unlabeled_images is held.unlabeled_images
    assert on_meta.labeled_targets.shape == (len(data.labeled_targets) + 3,)
    with pytest.raises(IndexError, match="outside the unlabeled set"):
        data.with_pseudo_labels(torch.tensor([len(data.unlabeled_images)]), torch.tensor([0]))
    with pytest.raises(ValueError, match="classes outside"):
        data.with_pseudo_labels(torch.tensor([0]), torch.tensor([10]))
    with pytest.raises(ValueError, match="two 1-D tensors"):
        data.with_pseudo_labels(torch.tensor([0, 1]), torch.tensor([0]))


def test_labeled_strong_views_come_after_every_other_draw() -> None:
    """SimPro's labeled strong view: the batches of a stream without one, plus x_strong (strong augmentations
    of the same labeled images, from a generator of their own), sharded and resumed like the rest."""
    plain, with_view = _stream(), _stream(num_labeled_strong=1)
    for _ in range(3):
        before, after = next(plain), next(with_view)
        assert before["x_strong"] == [] and len(after["x_strong"]) == 1
        _assert_batches_equal(before, {**after, "x_strong": []})
        assert after["x_strong"][0].shape == after["x"].shape and not torch.equal(after["x_strong"][0], after["x"])
    whole = next(_stream(num_labeled_strong=2))
    halves = [next(_stream(num_labeled_strong=2, shard=(index, 2))) for index in range(2)]
    for view in range(2):
        assert torch.equal(torch.cat([half["x_strong"][view] for half in halves]), whole["x_strong"][view])
    resumed = _stream(num_labeled_strong=1)
    resumed.load_state_dict(with_view.state_dict())
    _assert_batches_equal(next(resumed), next(with_view))
