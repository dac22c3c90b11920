"""STL-10 (binary release): labeled train and test splits, and a separate 100k unlabeled split whose labels are unknown."""

from pathlib import Path

import numpy as np

from ssl_imwa.data.config import DatasetConfig
from ssl_imwa.data.dataset import DatasetParts, ImageArray, register_dataset

STL10_SIDE = 96
STL10_FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
STL10_DEFAULT_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
# The values of kekmodel/FixMatch-pytorch and USB (112.4 109.1 98.6 / 68.4 66.6 68.5, over 255).
STL10_STATISTICS = ((0.4408, 0.4278, 0.3867), (0.2682, 0.2612, 0.2686))


def read_stl10(root: str, split: str, download: bool) -> ImageArray:
    """STL-10 binaries as a lazy memory-mapped view, so the 2.7 GB unlabeled split is never copied whole.

    The files store each image channel by channel in column-major order; the returned view is
    transposed to NHWC without reading anything. Sizes are checked instead of md5 sums, which
    would re-read 2.7 GB at every start.
    """
    from torchvision.datasets import STL10
    from torchvision.datasets.utils import download_and_extract_archive

    if split not in STL10_FILES:
        raise ValueError(f"STL-10 split {split!r}: expected one of {', '.join(STL10_FILES)}")
    folder = Path(root) / STL10.base_folder
    all_files = [name for name, _ in STL10.train_list + STL10.test_list]
    if download and not all((folder / name).is_file() for name in all_files):
        download_and_extract_archive(STL10.url, root, filename=STL10.filename, md5=STL10.tgz_md5)
    image_file, label_file = STL10_FILES[split]
    for name in (image_file, label_file):
        if name is not None and not (folder / name).is_file():
            raise FileNotFoundError(
                f"STL-10 file {folder / name} not found: expected the binary version ({STL10.filename} "
                f"extracted under {root}, giving {folder}/ with {', '.join(all_files)}). "
                "Set dataset.download=true to fetch it with torchvision, or point dataset.root at it."
            )
    image_path = folder / image_file
    bytes_per_image = 3 * STL10_SIDE * STL10_SIDE
    size = image_path.stat().st_size
    if size == 0 or size % bytes_per_image:
        raise RuntimeError(
            f"STL-10 file {image_path} is corrupt: {size} bytes is not a positive multiple of "
            f"{bytes_per_image} (one 3x96x96 image); delete it and set dataset.download=true"
        )
    count = size // bytes_per_image
    stored = np.memmap(image_path, dtype=np.uint8, mode="r", shape=(count, 3, STL10_SIDE, STL10_SIDE))
    images = stored.transpose(0, 3, 2, 1)  # stored as [N, C, W, H]
    if label_file is None:
        targets = np.full(count, -1, dtype=np.int64)
    else:
        label_path = folder / label_file
        targets = np.fromfile(label_path, dtype=np.uint8).astype(np.int64) - 1  # stored 1-based
        if len(targets) != count or targets.min(initial=0) < 0:
            raise RuntimeError(
                f"STL-10 file {label_path} is corrupt: expected {count} labels in 1..10 to match "
                f"{image_path}; delete the folder and set dataset.download=true"
            )
    class_file = folder / STL10.class_names_file
    classes = class_file.read_text().split() if class_file.is_file() else list(STL10_DEFAULT_CLASSES)
    return ImageArray(images=images, targets=targets, classes=classes)


@register_dataset("stl10", statistics=STL10_STATISTICS, separate_unlabeled=True, num_classes=10)
def stl10(cfg: DatasetConfig) -> DatasetParts:
    return DatasetParts(
        train=read_stl10(cfg.root, "train", download=cfg.download),
        test=read_stl10(cfg.root, "test", download=False),
        unlabeled=read_stl10(cfg.root, "unlabeled", download=False),
    )
