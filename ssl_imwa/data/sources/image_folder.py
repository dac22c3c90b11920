"""Your own images: `root/train/<class>/*` and `root/test/<class>/*`, all one size; statistics computed at load."""

from pathlib import Path

import numpy as np
from PIL import Image

from ssl_imwa.data.config import DatasetConfig
from ssl_imwa.data.dataset import DatasetParts, ImageArray, register_dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


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

    images = _decode(files)
    return ImageArray(images=images, targets=np.asarray(targets, dtype=np.int64), classes=classes)


def _decode(files: list[Path]) -> np.ndarray:
    """uint8 [N, H, W, C] of `files`: C = 1 when every image is grayscale, else 3; one size for all."""
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
    return images


def image_folder_classes(cfg: DatasetConfig) -> int | None:
    """The class folders under root/train, counted without opening an image (None: no such folder yet)."""
    train = Path(cfg.root) / "train" if cfg.root is not None else None
    if train is None or not train.is_dir():
        return None
    return sum(1 for entry in train.iterdir() if entry.is_dir() and not entry.name.startswith(".")) or None


@register_dataset("imagefolder", num_classes=image_folder_classes)
def image_folder(cfg: DatasetConfig) -> DatasetParts:
    if cfg.root is None:
        raise ValueError("dataset.root is not set: dataset.name=imagefolder reads train/<class>/* and "
                         "test/<class>/* from there (set dataset.root=/path/to/folder)")
    train, test = read_image_folder(cfg.root, "train"), read_image_folder(cfg.root, "test")
    if train.images.shape[-1] != test.images.shape[-1]:  # one split all grayscale, the other not: both RGB
        train, test = (ImageArray(np.repeat(part.images, 3, axis=-1) if part.images.shape[-1] == 1 else part.images,
                                  part.targets, part.classes) for part in (train, test))
    return DatasetParts(train=train, test=test)
