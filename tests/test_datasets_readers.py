"""Readers on fake files in the real formats, loaded through build_data, and the errors on bad input."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_imwa.data import (
    DatasetConfig,
    DatasetParts,
    ImageArray,
    build_data,
    register_dataset,
)
from ssl_imwa.data.sources.cifar import read_cifar
from ssl_imwa.data.sources.digits import read_digits
from ssl_imwa.data.sources.image_folder import read_image_folder
from ssl_imwa.data.sources.stl10 import read_stl10
from tests.conftest import FakeDataset


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def test_cifar10_reader_keeps_pixels_and_labels(fake_cifar10_root: FakeDataset, fake_cifar_integrity: None) -> None:
    train = read_cifar(str(fake_cifar10_root.root), 10, train=True, download=False)
    np.testing.assert_array_equal(train.images, fake_cifar10_root.train_images)
    np.testing.assert_array_equal(train.targets, fake_cifar10_root.train_targets)
    assert train.classes == fake_cifar10_root.classes
    test = read_cifar(str(fake_cifar10_root.root), 10, train=False, download=False)
    np.testing.assert_array_equal(test.images, fake_cifar10_root.test_images)


def test_cifar10_through_build_data(
    fake_cifar10_root: FakeDataset, fake_cifar_integrity: None, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = DatasetConfig(
        name="cifar10", root=str(fake_cifar10_root.root), n_max=6, m_max=4, imbalance=3, val_per_class=2
    )
    with caplog.at_level(logging.INFO, logger="ssl_imwa.data"):
        data = build_data(cfg)
    assert data.counts["labeled"] == [6, 5, 4, 4, 3, 3, 2, 2, 2, 2]
    assert data.counts["unlabeled"] == [4, 3, 3, 2, 2, 2, 1, 1, 1, 1]
    assert data.counts["validation"] == [2] * 10
    assert data.labeled_images.shape == (33, 3, 32, 32) and data.labeled_images.dtype == torch.uint8
    assert data.val_images is not None and data.val_images.shape == (20, 3, 32, 32)
    assert torch.equal(data.test_images, _nchw(fake_cifar10_root.test_images))
    assert torch.equal(data.labeled_images, _nchw(fake_cifar10_root.train_images[data.split.labeled]))
    assert torch.equal(data.labeled_targets, torch.from_numpy(fake_cifar10_root.train_targets[data.split.labeled]))
    assert (data.num_classes, data.in_channels, data.image_size, data.pad, data.cutout) == (10, 3, 32, 4, 16)
    assert data.mean == [0.4914, 0.4822, 0.4465] and data.std == [0.2471, 0.2435, 0.2616]
    assert "[6, 5, 4, 4, 3, 3, 2, 2, 2, 2]" in caplog.text


def test_cifar100_through_build_data(fake_cifar100_root: FakeDataset, fake_cifar_integrity: None) -> None:
    cfg = DatasetConfig(
        name="cifar100", root=str(fake_cifar100_root.root), protocol="nested", n_max=3, m_max=2, imbalance=3
    )
    data = build_data(cfg)
    assert data.num_classes == 100 and data.class_names == fake_cifar100_root.classes
    assert sum(data.counts["labeled"]) == len(data.labeled_images) == sum(int(3 * 3 ** (-i / 99)) for i in range(100))
    assert torch.equal(data.test_targets, torch.from_numpy(fake_cifar100_root.test_targets))
    assert data.unlabeled_is_labeled.sum().item() == len(data.labeled_images)
    assert data.mean == [0.5071, 0.4865, 0.4409]


def test_cifar_md5_check_is_real(fake_cifar10_root: FakeDataset) -> None:
    with pytest.raises(RuntimeError, match=r"md5.*data_batch_1.*dataset.download=true"):
        read_cifar(str(fake_cifar10_root.root), 10, train=True, download=False)


def test_stl10_reader_decodes_column_major_layout(fake_stl10_root: FakeDataset) -> None:
    root = str(fake_stl10_root.root)
    train = read_stl10(root, "train", download=False)
    np.testing.assert_array_equal(train.images, fake_stl10_root.train_images)
    np.testing.assert_array_equal(train.targets, fake_stl10_root.train_targets)
    assert train.classes == fake_stl10_root.classes
    unlabeled = read_stl10(root, "unlabeled", download=False)
    np.testing.assert_array_equal(unlabeled.images, fake_stl10_root.unlabeled_images)
    assert (unlabeled.targets == -1).all()


def test_stl10_through_build_data_at_32(fake_stl10_root: FakeDataset) -> None:
    cfg = DatasetConfig(
        name="stl10",
        root=str(fake_stl10_root.root),
        n_max=5,
        imbalance=2,
        unlabeled="unknown",
        val_per_class=2,
        image_size=32,
    )
    data = build_data(cfg)
    assert data.counts["labeled"] == [int(5 * 2 ** (-i / 9)) for i in range(10)]
    assert data.counts["unlabeled"] == [] and data.counts["validation"] == [2] * 10
    assert data.labeled_images.shape[1:] == (3, 32, 32)
    assert data.unlabeled_images.shape == (30, 3, 32, 32)
    assert data.test_images.shape == (20, 3, 32, 32)
    assert (data.unlabeled_targets == -1).all() and not data.unlabeled_is_labeled.any()
    assert (data.image_size, data.pad, data.cutout) == (32, 4, 16)
    expected = Image.fromarray(fake_stl10_root.test_images[0]).resize((32, 32), Image.BILINEAR)
    np.testing.assert_array_equal(data.test_images[0].permute(1, 2, 0).numpy(), np.asarray(expected))


def test_image_folder_through_build_data(fake_image_folder_root: FakeDataset) -> None:
    train = read_image_folder(str(fake_image_folder_root.root), "train")
    np.testing.assert_array_equal(train.images, fake_image_folder_root.train_images)
    assert train.classes == ["cat", "dog", "emu"]
    cfg = DatasetConfig(name="imagefolder", root=str(fake_image_folder_root.root), n_max=4, m_max=5, imbalance=2)
    data = build_data(cfg)
    assert data.counts["labeled"] == [4, 2, 2] and data.counts["unlabeled"] == [5, 3, 2]
    assert torch.equal(data.test_images, _nchw(fake_image_folder_root.test_images))
    pixels = fake_image_folder_root.train_images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(data.mean, pixels.mean(0), atol=1e-4)
    np.testing.assert_allclose(data.std, pixels.std(0), atol=1e-4)


def test_digits_are_scikit_learns_load_digits_scaled_to_uint8() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = read_digits(train=True), read_digits(train=False)
    expected = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    joined = np.concatenate([train.images, test.images])
    order = np.concatenate([np.flatnonzero(~np.isin(np.arange(1797), _test_rows(bunch.target))),
                            _test_rows(bunch.target)])
    np.testing.assert_array_equal(joined, expected[order])
    np.testing.assert_array_equal(np.concatenate([train.targets, test.targets]), bunch.target[order])


def _test_rows(targets: np.ndarray) -> np.ndarray:
    """Every third image of each class, in file order (read_digits' fixed test partition)."""
    return np.sort(np.concatenate([np.flatnonzero(targets == digit)[2::3] for digit in range(10)]))


def test_digits_partition_is_fixed_and_stratified() -> None:
    train, test = read_digits(train=True), read_digits(train=False)
    assert len(train.targets) + len(test.targets) == 1797
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8 and train.images.max() == 255
    test_share = np.bincount(test.targets) / (np.bincount(test.targets) + np.bincount(train.targets))
    assert np.all(np.abs(test_share - 1 / 3) < 0.01)
    np.testing.assert_array_equal(read_digits(train=False).images, test.images)


def test_register_dataset_adds_a_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_imwa.data.dataset import _DATASETS

    monkeypatch.setattr(_DATASETS, "_entries", dict(_DATASETS._entries))  # leave the real registry untouched
    monkeypatch.setattr(_DATASETS, "_configs", dict(_DATASETS._configs))
    rng = np.random.default_rng(0)

    def parts(count: int) -> ImageArray:
        return ImageArray(rng.integers(0, 256, (count, 6, 6, 1), dtype=np.uint8), np.arange(count) % 2, ["a", "b"])

    @register_dataset("fake_tiny_for_test")
    def _tiny(cfg: DatasetConfig) -> DatasetParts:
        return DatasetParts(train=parts(20), test=parts(4))

    data = build_data(DatasetConfig(name="fake_tiny_for_test", n_max=5, m_max=5, imbalance=5))
    assert data.counts["labeled"] == [5, 1] and data.in_channels == 1 and len(data.mean) == 1


def test_missing_cifar_files_name_path_and_download() -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/data_batch_1.*dataset.download=true"):
        build_data(DatasetConfig(name="cifar10", root="/nonexistent/cifar"))


def test_missing_stl10_files_name_path_and_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"stl10_binary/train_X.bin.*dataset.download=true"):
        build_data(DatasetConfig(name="stl10", root=str(tmp_path), unlabeled="unknown", n_max=5, imbalance=2))


def test_labeled_count_larger_than_class() -> None:
    with pytest.raises(ValueError, match=r"class 0 \('0'\) has 119 training images, but the split needs 4500"):
        build_data(DatasetConfig(name="digits"))


def test_unknown_test_class_folder(fake_image_folder_root: FakeDataset) -> None:
    (fake_image_folder_root.root / "test" / "yak").mkdir()
    with pytest.raises(ValueError, match=r"test/yak has no counterpart"):
        read_image_folder(str(fake_image_folder_root.root), "test")


def test_mixed_image_sizes_name_the_file(fake_image_folder_root: FakeDataset) -> None:
    odd = fake_image_folder_root.root / "train" / "dog" / "999.png"
    Image.fromarray(np.zeros((9, 8, 3), dtype=np.uint8)).save(odd)
    with pytest.raises(ValueError, match=r"999.png is 8x9, expected 8x8"):
        read_image_folder(str(fake_image_folder_root.root), "train")


def test_channel_mode_is_decided_by_every_image_not_the_first(fake_image_folder_root: FakeDataset) -> None:
    """A grayscale first image does not turn a whole colour split gray (or mismatch the other split)."""
    root = fake_image_folder_root.root
    first_train = min((root / "train" / "cat").iterdir())
    gray = np.asarray(Image.open(first_train).convert("L"))
    Image.fromarray(gray).save(first_train)
    train = read_image_folder(str(root), "train")
    assert train.images.shape[-1] == 3
    np.testing.assert_array_equal(train.images[0], np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(train.images[1:], fake_image_folder_root.train_images[1:])
    # A split that is all grayscale next to a colour one: both come out RGB, so one model fits both.
    for path in (root / "test").rglob("*.png"):
        Image.open(path).convert("L").save(path)
    assert read_image_folder(str(root), "test").images.shape[-1] == 1
    data = build_data(DatasetConfig(name="imagefolder", root=str(root), n_max=4, m_max=5, imbalance=2))
    assert data.in_channels == 3 and data.test_images.shape[1] == 3


def test_an_empty_class_folder_is_an_error(fake_image_folder_root: FakeDataset) -> None:
    for path in (fake_image_folder_root.root / "test" / "emu").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"test/emu holds no images"):
        read_image_folder(str(fake_image_folder_root.root), "test")


def test_unknown_dataset_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"dataset.name='mnist': expected one of .*cifar10, cifar100, digits"):
        build_data(DatasetConfig(name="mnist"))


def test_unknown_unlabeled_only_for_separate_unlabeled_split() -> None:
    with pytest.raises(ValueError, match=r"dataset.unlabeled='unknown' needs a separate unlabeled split.*stl10"):
        build_data(DatasetConfig(name="cifar10", unlabeled="unknown"))
    with pytest.raises(ValueError, match=r"dataset.unlabeled='consistent'.*only valid setting is 'unknown'"):
        build_data(DatasetConfig(name="stl10", unlabeled="consistent"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"protocol": "foo"}, "dataset.protocol='foo': expected one of disjoint, nested"),
        ({"unlabeled": "custom"}, "dataset.imbalance_u must be set"),
        ({"imbalance": 0.5}, r"dataset.imbalance=0.5: expected >= 1"),
        ({"mean": [0.5]}, "dataset.mean and dataset.std must be given together"),
    ],
)
def test_bad_values_name_their_key(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_data(DatasetConfig(name="digits", **override))
