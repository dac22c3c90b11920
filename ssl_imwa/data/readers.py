"""Readers that turn each on-disk format into one uint8 NHWC array plus int64 targets.

Readers only read: splitting, resizing and tensor conversion happen in `build.py`, so a
new format needs nothing but a function returning an `ImageArray`.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
STL10_SIDE = 96
STL10_FILES = {
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
    "unlabeled": ("unlabeled_X.bin", None),
}
STL10_DEFAULT_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
DIGITS_TEST_EVERY = 3  # per class, every third image in file order is a test image


@dataclass
class ImageArray:
    """One split of a dataset as arrays.

    `images` may be a read-only memory map (STL-10), so consumers copy it in chunks.
    """

    images: np.ndarray  # uint8 [N, H, W, C], C in {1, 3}
    targets: np.ndarray  # int64 [N], -1 = unknown
    classes: list[str]


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


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def read_image_folder(root: str, split: str) -> ImageArray:
    """`root/<split>/<class>/*` images; the sorted train folder names define the classes.

    A split whose images are all grayscale ('L' or '1') stays single-channel; one with any other
    image is read as RGB throughout (a grayscale image becomes R = G = B, as PIL converts it).
    Every class folder must hold images.
    """
    if split not in ("train", "test"):
        raise ValueError(f"image folder split {split!r}: expected train or test")
    root_path = Path(root)
    layout = f"expected {root_path}/train/<class>/* and {root_path}/test/<class>/*"
    for needed in ("train", split):
        if not (root_path / needed).is_dir():
            raise FileNotFoundError(f"image folder {root_path / needed} not found: {layout}")
    classes = _class_folders(root_path / "train")
    if not classes:
        raise FileNotFoundError(f"no class folders in {root_path / 'train'}: {layout}")
    split_dir = root_path / split
    if split != "train":
        found = _class_folders(split_dir)
        unknown = [name for name in found if name not in classes]
        if unknown:
            raise ValueError(
                f"class folder {split_dir / unknown[0]} has no counterpart in {root_path / 'train'} "
                f"(train classes: {', '.join(classes)})"
            )
        missing = [name for name in classes if name not in found]
        if missing:
            raise ValueError(f"{split_dir} lacks class folders present in train: {', '.join(missing)}")

    files: list[Path] = []
    targets: list[int] = []
    for class_index, name in enumerate(classes):
        class_files = sorted(path for path in (split_dir / name).iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS)
        if not class_files:
            raise ValueError(f"class folder {split_dir / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): every "
                             "class needs images in train and test (an empty test class would drop out of the "
                             "balanced accuracy)")
        files.extend(class_files)
        targets.extend([class_index] * len(class_files))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}: {layout}")

    modes = set()
    for path in files:  # headers only: PIL reads pixels lazily
        with Image.open(path) as image:
            modes.add(image.mode)
    mode = "L" if modes <= {"L", "1"} else "RGB"
    with Image.open(files[0]) as first:
        width, height = first.size
    images = np.empty((len(files), height, width, 1 if mode == "L" else 3), dtype=np.uint8)
    for position, path in enumerate(files):
        with Image.open(path) as image:
            if image.size != (width, height):
                raise ValueError(
                    f"{path} is {image.size[0]}x{image.size[1]}, expected {width}x{height} like {files[0]}: "
                    "all images of an image folder must share one size"
                )
            pixels = image if image.mode == mode else image.convert(mode)
            images[position] = np.asarray(pixels).reshape(images.shape[1:])
    return ImageArray(images=images, targets=np.asarray(targets, dtype=np.int64), classes=classes)


def digits_file() -> Path:
    """scikit-learn's digits.csv.gz, found without importing scikit-learn (2-3 s at every start):
    what `sklearn.datasets.load_digits` reads."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dataset.name=digits reads scikit-learn's bundled digits: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"scikit-learn's digits file {path} is missing: reinstall scikit-learn")
    return path


def read_digits(train: bool) -> ImageArray:
    """scikit-learn's bundled 8x8 digits (0..16 scaled to 0..255), with a fixed seedless partition.

    Per class, in file order, every third image (positions 2, 5, 8, ...) is a test image,
    which gives a stratified one-third test set that never changes.
    """
    table = np.loadtxt(digits_file(), delimiter=",")   # 1797 rows: 64 pixels (0..16), then the digit
    images = np.round(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    targets = table[:, -1].astype(np.int64)
    position_in_class = np.empty(len(targets), dtype=np.int64)
    for digit in range(10):
        members = np.flatnonzero(targets == digit)
        position_in_class[members] = np.arange(len(members))
    is_test = position_in_class % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
    keep = ~is_test if train else is_test
    return ImageArray(
        images=np.ascontiguousarray(images[keep]),
        targets=targets[keep],
        classes=[str(digit) for digit in range(10)],
    )
