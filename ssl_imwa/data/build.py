"""From a `DatasetConfig` to resident uint8 tensors, a logged long-tailed split and a stream factory.

Datasets are found by name in the dataset registry (`ssl_imwa.data.dataset`); what happens after a
reader returns its arrays (the long-tailed split, resizing, statistics, tensors) is the same for all.
"""

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssl_imwa.data.config import PROTOCOLS, UNLABELED_SETTINGS, DatasetConfig
from ssl_imwa.data.counts import long_tailed_counts, unlabeled_counts
from ssl_imwa.data.dataset import (
    Dataset,
    DatasetParts,
    ImageArray,
    Statistics,
    get_dataset,
    list_datasets,
    with_own_options,
)
from ssl_imwa.data.splits import (
    Split,
    make_split,
    refuse_a_batch_larger_than_the_labeled_set,
    refuse_empty_classes,
)
from ssl_imwa.data.stream import TrainStream

logger = logging.getLogger("ssl_imwa.data")

CONVERSION_PIXELS = 1 << 24  # uint8 values converted at a time, so memory-mapped splits are never copied whole


@dataclass
class SSLData:
    """Every part of a long-tailed SSL dataset as uint8 NCHW / int64 tensors, plus its description."""

    labeled_images: torch.Tensor
    labeled_targets: torch.Tensor
    unlabeled_images: torch.Tensor
    unlabeled_targets: torch.Tensor  # true labels for diagnostics, -1 where unknown
    unlabeled_is_labeled: torch.Tensor  # bool: the unlabeled image is also in the labeled set (nested)
    val_images: torch.Tensor | None
    val_targets: torch.Tensor | None
    test_images: torch.Tensor
    test_targets: torch.Tensor
    num_classes: int
    class_names: list[str]
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    split: Split
    counts: dict[str, list[int]]  # labeled / unlabeled / validation per class; unlabeled is [] when unknown
    pad: int  # weak-augmentation reflect padding in pixels
    hflip: bool
    cutout: int  # cutout side in pixels
    # Training tensors per device, copied once and shared by every replica's stream.
    _resident: dict[torch.device, tuple[torch.Tensor, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _resident_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Labeled images and targets, unlabeled images, targets and is_labeled flags on `device`."""
        if device not in self._resident:
            parts = (
                self.labeled_images,
                self.labeled_targets,
                self.unlabeled_images,
                self.unlabeled_targets,
                self.unlabeled_is_labeled,
            )
            self._resident[device] = tuple(part.to(device) for part in parts)
        return self._resident[device]

    def with_pseudo_labels(self, unlabeled_index: torch.Tensor, labels: torch.Tensor) -> "SSLData":
        """This data with unlabeled images `unlabeled_index` added to the labeled set as classes `labels`.

        The picked images come first, then the labeled set, as in CReST's official code and USB's; the
        unlabeled set, validation and test splits are unchanged (the picks stay unlabeled images too).
        `counts["labeled"]` becomes the new set's; the split's record (`split`) stays the dataset's own.
        """
        unlabeled_index, labels = unlabeled_index.long().cpu(), labels.long().cpu()
        if unlabeled_index.shape != labels.shape or unlabeled_index.dim() != 1:
            raise ValueError(f"pseudo-labels: {tuple(unlabeled_index.shape)} indices for {tuple(labels.shape)} labels, "
                             "expected two 1-D tensors of one length")
        if len(unlabeled_index) and not (0 <= int(unlabeled_index.min()) and
                                         int(unlabeled_index.max()) < len(self.unlabeled_images)):
            raise IndexError(f"pseudo-labels: indices outside the unlabeled set of {len(self.unlabeled_images)}")
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(f"pseudo-labels: classes outside 0..{self.num_classes - 1}")
        targets = torch.cat([labels, self.labeled_targets])
        counts = {**self.counts, "labeled": torch.bincount(targets, minlength=self.num_classes).tolist()}
        picked = dataclasses.replace(
            self, labeled_images=torch.cat([self.unlabeled_images[unlabeled_index], self.labeled_images]),
            labeled_targets=targets, counts=counts)
        # Devices holding this data keep one copy of the unlabeled set, shared by both.
        for device, (images, targets_on, unlabeled, unlabeled_targets, is_labeled) in self._resident.items():
            index = unlabeled_index.to(device)
            picked._resident[device] = (torch.cat([unlabeled[index], images]), torch.cat([labels.to(device), targets_on]),
                                        unlabeled, unlabeled_targets, is_labeled)
        return picked

    def make_stream(
        self,
        batch_size: int,
        mu: int,
        num_strong: int,
        seed: int,
        replica: int = 0,
        episode: int = 0,
        device: str | torch.device = "cpu",
        shard: tuple[int, int] = (0, 1),
        num_labeled_strong: int = 0,
        balanced: str | None = None,
    ) -> TrainStream:
        """A training stream over this data, seeded by (seed, replica, episode); all streams on a device share its
        tensors. `shard` (i, n): only rows i/n to (i+1)/n of every batch (one of n data-parallel processes)."""
        labeled_images, labeled_targets, unlabeled_images, unlabeled_targets, unlabeled_is_labeled = (
            self._resident_on(torch.device(device))
        )
        return TrainStream(
            labeled_images=labeled_images,
            labeled_targets=labeled_targets,
            unlabeled_images=unlabeled_images,
            unlabeled_targets=unlabeled_targets,
            unlabeled_is_labeled=unlabeled_is_labeled,
            batch_size=batch_size,
            mu=mu,
            num_strong=num_strong,
            mean=self.mean,
            std=self.std,
            pad=self.pad,
            hflip=self.hflip,
            cutout=self.cutout,
            seed=seed,
            replica=replica,
            episode=episode,
            device=device,
            shard=shard,
            num_labeled_strong=num_labeled_strong,
            balanced=balanced,
            host_labeled_targets=self.labeled_targets,
        )


def validate_dataset(cfg: Any) -> Dataset:
    """Reject bad values before any file is read, naming the offending key (also part of the run's one
    validation pass, `ssl_imwa.config.validate`): the common keys here, then the dataset's own checks
    (`validate()` of its config class). `cfg`: a DatasetConfig (or its dataset's subclass), or its config node."""
    entry = get_dataset(cfg.name)
    cfg = with_own_options(cfg, entry)
    if cfg.protocol not in PROTOCOLS:
        raise ValueError(f"dataset.protocol={cfg.protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if cfg.unlabeled not in UNLABELED_SETTINGS:
        raise ValueError(f"dataset.unlabeled={cfg.unlabeled!r}: expected one of {', '.join(UNLABELED_SETTINGS)}")
    if entry.separate_unlabeled and cfg.unlabeled != "unknown":
        raise ValueError(
            f"dataset.unlabeled={cfg.unlabeled!r}: {cfg.name} has a separate unlabeled split whose labels are "
            "unknown, so the only valid setting is 'unknown'"
        )
    if not entry.separate_unlabeled and cfg.unlabeled == "unknown":
        separate = [name for name in list_datasets() if get_dataset(name).separate_unlabeled]
        raise ValueError(
            f"dataset.unlabeled='unknown' needs a separate unlabeled split, which {cfg.name} lacks "
            f"(datasets that have one: {', '.join(separate)}); use consistent, uniform, reversed or custom"
        )
    _check_common_values(cfg)
    cfg.validate()
    return entry


def _check_common_values(cfg: DatasetConfig) -> None:
    """The long-tailed protocol's counts and ratios, the augmentation fractions and the statistics."""
    if cfg.unlabeled == "custom" and cfg.imbalance_u is None:
        raise ValueError("dataset.imbalance_u must be set when dataset.unlabeled='custom'")
    if cfg.imbalance_u is not None and cfg.imbalance_u < 1:
        raise ValueError(f"dataset.imbalance_u={cfg.imbalance_u}: expected >= 1")
    if cfg.imbalance < 1:
        raise ValueError(f"dataset.imbalance={cfg.imbalance}: expected >= 1")
    if cfg.n_max < 1:
        raise ValueError(f"dataset.n_max={cfg.n_max}: expected >= 1")
    if cfg.m_max < 0:
        raise ValueError(f"dataset.m_max={cfg.m_max}: expected >= 0")
    if cfg.val_per_class < 0:
        raise ValueError(f"dataset.val_per_class={cfg.val_per_class}: expected >= 0")
    if cfg.image_size is not None and cfg.image_size < 3:
        raise ValueError(f"dataset.image_size={cfg.image_size}: expected None or >= 3")
    if not 0 <= cfg.crop_pad_fraction < 1:
        raise ValueError(f"dataset.crop_pad_fraction={cfg.crop_pad_fraction}: expected in [0, 1)")
    if not 0 <= cfg.cutout_fraction <= 1:
        raise ValueError(f"dataset.cutout_fraction={cfg.cutout_fraction}: expected in [0, 1]")
    if (cfg.mean is None) != (cfg.std is None):
        raise ValueError("dataset.mean and dataset.std must be given together")
    if cfg.std is not None and any(value <= 0 for value in cfg.std):
        raise ValueError(f"dataset.std={list(cfg.std)}: expected positive values")


def expected_labeled_counts(cfg: DatasetConfig) -> list[int] | None:
    """The labeled per-class counts the split will have, when the class count is known without reading
    images (see register_dataset); None otherwise."""
    num_classes = get_dataset(cfg.name).classes_known_before_reading(cfg)
    return None if num_classes is None else long_tailed_counts(cfg.n_max, num_classes, cfg.imbalance)


def check_labeled_counts(cfg: DatasetConfig, batch_size: int | None = None) -> None:
    """Part of validation: every class gets a labeled image, and a batch fits in the labeled set
    (checked here where the class count is known before reading; build_data checks every dataset)."""
    counts = expected_labeled_counts(cfg)
    if counts is None:
        return
    refuse_empty_classes(counts, cfg.n_max, cfg.imbalance)
    if batch_size is not None:
        refuse_a_batch_larger_than_the_labeled_set(batch_size, counts, cfg.n_max, cfg.imbalance)


def _to_tensor(images: np.ndarray, image_size: int | None) -> torch.Tensor:
    """uint8 NHWC (possibly memory-mapped) -> uint8 NCHW tensor, resized with antialiasing, chunk by chunk.

    torch resizes uint8 directly (bilinear with antialiasing, matching PIL's resize), so no
    float copy of the data is ever made; chunks bound the memory read from a memory map at once.
    """
    count, height, width, channels = images.shape
    side_h, side_w = (height, width) if image_size is None else (image_size, image_size)
    output = torch.empty((count, channels, side_h, side_w), dtype=torch.uint8)
    chunk_size = max(1, CONVERSION_PIXELS // (height * width * channels))
    for start in range(0, count, chunk_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk_size])).permute(0, 3, 1, 2)
        if (side_h, side_w) != (height, width):
            chunk = F.interpolate(chunk, size=(side_h, side_w), mode="bilinear", antialias=True)
        output[start : start + len(chunk)] = chunk
    return output


def _channel_statistics(images: np.ndarray) -> Statistics:
    """Exact per-channel mean and std of uint8 NHWC images in [0, 1], from 256-bin histograms."""
    channels = images.shape[-1]
    histograms = np.zeros((channels, 256), dtype=np.int64)
    chunk_size = max(1, CONVERSION_PIXELS // int(np.prod(images.shape[1:])))
    for start in range(0, len(images), chunk_size):
        chunk = np.asarray(images[start : start + chunk_size]).reshape(-1, channels)
        for channel in range(channels):
            histograms[channel] += np.bincount(chunk[:, channel], minlength=256)
    levels = np.arange(256) / 255.0
    pixels = histograms.sum(1)
    mean = histograms @ levels / pixels
    std = np.sqrt(np.maximum(histograms @ levels**2 / pixels - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(std.tolist())


def _check_targets(parts: ImageArray, num_classes: int, what: str) -> None:
    if len(parts.targets) != len(parts.images):
        raise ValueError(f"{what}: {len(parts.images)} images but {len(parts.targets)} targets")
    known = parts.targets[parts.targets >= 0]
    if len(known) and known.max() >= num_classes:
        raise ValueError(f"{what}: target {known.max()} out of range for {num_classes} classes")


def build_data(cfg: Any) -> SSLData:
    """Read the dataset, split it (the DASO/ACR split protocols), convert every part to tensors once and log the counts.

    `cfg`: a DatasetConfig (a plain one gets the dataset's defaults for its own options) or the run's
    `dataset` config node."""
    entry = validate_dataset(cfg)
    cfg = with_own_options(cfg, entry)
    parts, class_names = _read_checked(cfg, entry)
    num_classes = len(class_names)
    train_targets = np.asarray(parts.train.targets, dtype=np.int64)
    in_channels = parts.train.images.shape[-1]
    image_size = cfg.image_size if cfg.image_size is not None else parts.train.images.shape[1]
    mean, std = _statistics(cfg, entry, parts.train.images)

    split = _long_tailed_split(cfg, train_targets, class_names)
    counts = split.counts()

    def images_of(indices: np.ndarray) -> torch.Tensor:
        return _to_tensor(parts.train.images[indices], cfg.image_size)

    def targets_of(indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(train_targets[indices])

    if parts.unlabeled is not None:
        unlabeled_images = _to_tensor(parts.unlabeled.images, cfg.image_size)
        unlabeled_targets = torch.from_numpy(np.asarray(parts.unlabeled.targets, dtype=np.int64).copy())
        unlabeled_is_labeled = torch.zeros(len(unlabeled_images), dtype=torch.bool)
        counts["unlabeled"] = []  # per-class counts of an unlabeled split with unknown labels do not exist
    else:
        unlabeled_images, unlabeled_targets = images_of(split.unlabeled), targets_of(split.unlabeled)
        unlabeled_is_labeled = torch.from_numpy(split.unlabeled_is_labeled.copy())

    has_validation = len(split.validation) > 0
    data = SSLData(
        labeled_images=images_of(split.labeled), labeled_targets=targets_of(split.labeled),
        unlabeled_images=unlabeled_images, unlabeled_targets=unlabeled_targets,
        unlabeled_is_labeled=unlabeled_is_labeled,
        val_images=images_of(split.validation) if has_validation else None,
        val_targets=targets_of(split.validation) if has_validation else None,
        test_images=_to_tensor(parts.test.images, cfg.image_size),
        test_targets=torch.from_numpy(np.asarray(parts.test.targets, dtype=np.int64).copy()),
        num_classes=num_classes, class_names=class_names, in_channels=in_channels, image_size=image_size,
        mean=mean, std=std, split=split, counts=counts,
        pad=int(cfg.crop_pad_fraction * image_size),  # truncated, as int(32 * 0.125) in kekmodel
        hflip=cfg.hflip,
        cutout=int(cfg.cutout_fraction * image_size),
    )
    _log_summary(cfg, data)
    return data


def _read_checked(cfg: DatasetConfig, entry: Dataset) -> tuple[DatasetParts, list[str]]:
    """The reader's arrays and class names; targets checked against the classes, the side against image_size."""
    parts = entry.reader(cfg)
    class_names = list(parts.train.classes)
    _check_targets(parts.train, len(class_names), f"{cfg.name} train split")
    _check_targets(parts.test, len(class_names), f"{cfg.name} test split")
    height, width = parts.train.images.shape[1:3]
    if cfg.image_size is None and height != width:
        raise ValueError(f"{cfg.name} images are {height}x{width}; set dataset.image_size to train on square images")
    return parts, class_names


def _long_tailed_split(cfg: DatasetConfig, train_targets: np.ndarray, class_names: list[str]) -> Split:
    """The labeled, unlabeled and validation indices of the training images (the DASO/ACR protocols)."""
    num_classes = len(class_names)
    labeled_counts = long_tailed_counts(cfg.n_max, num_classes, cfg.imbalance)
    refuse_empty_classes(labeled_counts, cfg.n_max, cfg.imbalance, class_names)
    if cfg.unlabeled == "unknown":
        unlabeled_from_train = [0] * num_classes
    else:
        unlabeled_from_train = unlabeled_counts(cfg.unlabeled, cfg.m_max, num_classes, cfg.imbalance, cfg.imbalance_u)
    return make_split(train_targets, num_classes, cfg.protocol, labeled_counts, unlabeled_from_train,
                      cfg.val_per_class, cfg.split_seed, class_names=class_names)


def _statistics(cfg: DatasetConfig, entry: Dataset, train_images: np.ndarray) -> tuple[list[float], list[float]]:
    """Normalisation from the config, else the dataset's registered values, else computed from its train images."""
    if cfg.mean is not None and cfg.std is not None:
        mean, std = list(cfg.mean), list(cfg.std)
    elif entry.statistics is not None:
        mean, std = list(entry.statistics[0]), list(entry.statistics[1])
    else:
        computed_mean, computed_std = _channel_statistics(train_images)
        mean, std = [round(value, 4) for value in computed_mean], [round(value, 4) for value in computed_std]
        flat = [channel for channel, value in enumerate(std) if value <= 0]
        if flat:  # normalising would divide by zero: "loss is not finite at step 1"
            where = f"{cfg.root}/train" if cfg.name == "imagefolder" else f"the {cfg.name} training images"
            channel = (f"channel {flat[0]} of {len(std)}" if len(std) > 1 else "the one channel") + (
                f" (and {len(flat) - 1} more)" if len(flat) > 1 else "")
            raise ValueError(
                f"{where}: {channel} has the same value {round(mean[flat[0]] * 255)}/255 in every pixel (std 0), "
                "so normalising by it divides by zero, as dataset.std=0 would; check the images, or give "
                "dataset.mean and dataset.std yourself"
            )
        logger.info(
            "%s: no standard statistics, computed from the training images: mean %s std %s", cfg.name, mean, std
        )
    channels = train_images.shape[-1]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"dataset.mean/std have {len(mean)}/{len(std)} values, but {cfg.name} has {channels} channels")
    return mean, std


def _log_summary(cfg: DatasetConfig, data: SSLData) -> None:
    unlabeled = "unknown labels" if cfg.unlabeled == "unknown" else f"{cfg.unlabeled}, M1={cfg.m_max}"
    logger.info(
        "%s (%s protocol, split_seed %d): %d classes, %dx%dx%d; labeled N1=%d gamma=%g; unlabeled %s",
        cfg.name,
        cfg.protocol,
        cfg.split_seed,
        data.num_classes,
        data.in_channels,
        data.image_size,
        data.image_size,
        cfg.n_max,
        cfg.imbalance,
        unlabeled,
    )
    logger.info("labeled per class (%d): %s", len(data.labeled_targets), data.counts["labeled"])
    if data.counts["unlabeled"]:
        logger.info("unlabeled per class (%d): %s", len(data.unlabeled_targets), data.counts["unlabeled"])
    else:
        logger.info("unlabeled: %d images, per-class counts unknown", len(data.unlabeled_targets))
    if data.val_targets is not None:
        logger.info("validation per class (%d): %s", len(data.val_targets), data.counts["validation"])
    logger.info("test: %d images", len(data.test_targets))
