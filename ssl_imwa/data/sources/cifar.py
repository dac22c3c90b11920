"""CIFAR-10 and CIFAR-100 (python-pickle batches, read by torchvision, which also checks their md5 sums)."""

from pathlib import Path

import numpy as np

from ssl_imwa.data.config import DatasetConfig
from ssl_imwa.data.dataset import DatasetParts, ImageArray, register_dataset

CIFAR10_STATISTICS = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
CIFAR100_STATISTICS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def read_cifar(root: str, num_classes: int, train: bool, download: bool) -> ImageArray:
    """CIFAR-10/100 python-pickle batches through torchvision, which also checks their md5 sums."""
    # Imported here: torchvision's package import pulls in torch._dynamo (about 2.5 s at every start).
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets import cifar as torchvision_cifar

    if num_classes not in (10, 100):
        raise ValueError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes}")
    dataset_class = CIFAR10 if num_classes == 10 else CIFAR100
    folder = Path(root) / dataset_class.base_folder
    expected = [name for name, _ in dataset_class.train_list + dataset_class.test_list]
    expected.append(dataset_class.meta["filename"])
    if not download:
        for name in expected:
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"CIFAR-{num_classes} file {folder / name} not found: expected the python version "
                    f"({dataset_class.filename} extracted under {root}, giving {folder}/ with {', '.join(expected)}). "
                    "Set dataset.download=true to fetch it with torchvision, or point dataset.root at it."
                )
    try:
        dataset = dataset_class(root, train=train, download=download)
    except RuntimeError as error:
        checks = [*dataset_class.train_list, *dataset_class.test_list]
        checks.append([dataset_class.meta["filename"], dataset_class.meta["md5"]])
        corrupt = [name for name, md5 in checks if not torchvision_cifar.check_integrity(str(folder / name), md5)]
        raise RuntimeError(
            f"CIFAR-{num_classes} files under {folder} failed torchvision's md5 check ({', '.join(corrupt)}); "
            "delete the folder and set dataset.download=true to fetch a fresh copy"
        ) from error
    return ImageArray(
        images=np.ascontiguousarray(dataset.data),
        targets=np.asarray(dataset.targets, dtype=np.int64),
        classes=list(dataset.classes),
    )


@register_dataset("cifar10", statistics=CIFAR10_STATISTICS, num_classes=10)
def cifar10(cfg: DatasetConfig) -> DatasetParts:
    return DatasetParts(
        train=read_cifar(cfg.root, 10, train=True, download=cfg.download),
        test=read_cifar(cfg.root, 10, train=False, download=False),
    )


@register_dataset("cifar100", statistics=CIFAR100_STATISTICS, num_classes=100)
def cifar100(cfg: DatasetConfig) -> DatasetParts:
    return DatasetParts(
        train=read_cifar(cfg.root, 100, train=True, download=cfg.download),
        test=read_cifar(cfg.root, 100, train=False, download=False),
    )
