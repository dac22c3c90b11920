"""Shared fake datasets written in the real on-disk formats, small enough for quick tests."""

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.reference_runs import reference_run  # noqa: F401 - the shared reference runs, a fixture for every file
from tests.slurm_cluster import slurm_cluster  # noqa: F401 - a real single-node Slurm cluster, started on demand


@dataclass
class FakeDataset:
    """Where a fake dataset was written and the pixels/labels it holds (NHWC, in file order)."""

    root: Path
    train_images: np.ndarray
    train_targets: np.ndarray
    test_images: np.ndarray
    test_targets: np.ndarray
    classes: list[str]
    unlabeled_images: np.ndarray | None = None


def _balanced(num_classes: int, per_class: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random images with class-balanced labels in shuffled file order."""
    rng = np.random.default_rng(seed)
    targets = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    images = rng.integers(0, 256, size=(len(targets), side, side, 3), dtype=np.uint8)
    return images, targets


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's row layout: 1024 red, 1024 green, 1024 blue values per image, each channel row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _dump(path: Path, payload: dict) -> None:
    with path.open("wb") as handle:
        pickle.dump(payload, handle, protocol=2)


@pytest.fixture
def fake_cifar_integrity(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks CIFAR files against the md5 sums of the real release, which no fake can
    match; this replaces only that check by an existence check. The readers' own checks stay."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


@pytest.fixture
def fake_cifar10_root(tmp_path: Path) -> FakeDataset:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta, 12 train / 3 test per class."""
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train_images, train_targets = _balanced(10, 12, 32, seed=1)
    test_images, test_targets = _balanced(10, 3, 32, seed=2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for batch, (images, targets) in enumerate(zip(np.array_split(train_images, 5), np.array_split(train_targets, 5))):
        _dump(
            folder / f"data_batch_{batch + 1}",
            {
                "batch_label": f"training batch {batch + 1} of 5",
                "labels": targets.tolist(),
                "data": _cifar_rows(images),
                "filenames": [f"fake_{batch}_{i}.png" for i in range(len(targets))],
            },
        )
    _dump(
        folder / "test_batch",
        {"batch_label": "testing batch 1 of 1", "labels": test_targets.tolist(), "data": _cifar_rows(test_images)},
    )
    _dump(folder / "batches.meta", {"label_names": classes, "num_cases_per_batch": 24, "num_vis": 3072})
    return FakeDataset(tmp_path, train_images, train_targets, test_images, test_targets, classes)


@pytest.fixture
def fake_cifar100_root(tmp_path: Path) -> FakeDataset:
    """cifar-100-python/ with train, test and meta (fine and coarse labels), 6 train / 1 test per class."""
    classes = [f"fine_{index:02d}" for index in range(100)]
    train_images, train_targets = _balanced(100, 6, 32, seed=3)
    test_images, test_targets = _balanced(100, 1, 32, seed=4)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, images, targets in (("train", train_images, train_targets), ("test", test_images, test_targets)):
        _dump(
            folder / name,
            {
                "batch_label": f"{name}ing batch 1 of 1",
                "fine_labels": targets.tolist(),
                "coarse_labels": (targets // 5).tolist(),
                "data": _cifar_rows(images),
                "filenames": [f"fake_{i}.png" for i in range(len(targets))],
            },
        )
    _dump(folder / "meta", {"fine_label_names": classes, "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return FakeDataset(tmp_path, train_images, train_targets, test_images, test_targets, classes)


def _stl_bytes(images: np.ndarray) -> bytes:
    """STL-10's documented layout: per image, one channel after another, each in column-major order."""
    return b"".join(image[:, :, channel].tobytes(order="F") for image in images for channel in range(image.shape[-1]))


@pytest.fixture
def fake_stl10_root(tmp_path: Path) -> FakeDataset:
    """stl10_binary/ with 8 train and 2 test images per class (96x96), 30 unlabeled images, class_names.txt."""
    classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    train_images, train_targets = _balanced(10, 8, 96, seed=5)
    test_images, test_targets = _balanced(10, 2, 96, seed=6)
    unlabeled_images, _ = _balanced(10, 3, 96, seed=7)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    (folder / "train_X.bin").write_bytes(_stl_bytes(train_images))
    (folder / "train_y.bin").write_bytes((train_targets + 1).astype(np.uint8).tobytes())  # 1-based on disk
    (folder / "test_X.bin").write_bytes(_stl_bytes(test_images))
    (folder / "test_y.bin").write_bytes((test_targets + 1).astype(np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(_stl_bytes(unlabeled_images))
    (folder / "class_names.txt").write_text("\n".join(classes) + "\n")
    return FakeDataset(tmp_path, train_images, train_targets, test_images, test_targets, classes, unlabeled_images)


@pytest.fixture
def fake_image_folder_root(tmp_path: Path) -> FakeDataset:
    """root/train/<class>/*.png (10 per class) and root/test/<class>/*.png (2 per class), 8x8 RGB."""
    classes = ["cat", "dog", "emu"]
    rng = np.random.default_rng(8)
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, per_class in (("train", 10), ("test", 2)):
        images = rng.integers(0, 256, size=(3 * per_class, 8, 8, 3), dtype=np.uint8)
        targets = np.repeat(np.arange(3), per_class)
        for position, (image, target) in enumerate(zip(images, targets)):
            folder = tmp_path / split / classes[target]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{position:03d}.png")
        arrays[split] = (images, targets)
    return FakeDataset(tmp_path, *arrays["train"], *arrays["test"], classes)


@pytest.fixture
def small_filesystem(tmp_path: Path, request: pytest.FixtureRequest):
    """A directory on a tmpfs of `request.param` KiB (a real full disk, failing as the kernel fails
    it), or None where no tmpfs can be mounted (not root, no mount permission in a container): the
    tests then inject the exception torch raises on a full disk."""
    import subprocess

    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    size = getattr(request, "param", 1600)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}k", "tmpfs", str(mount_point)],
                             capture_output=True, check=False).returncode == 0 if os.geteuid() == 0 else False
    try:
        yield mount_point if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)
