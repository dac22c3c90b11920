"""Batched augmentation: shapes, reference semantics (torch.flip, reflect padding, PIL ops) and determinism."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

from ssl_imwa.data import randaugment_ops, transforms
from ssl_imwa.data.transforms import (
    ParameterBuffer,
    normalize,
    strong_augment,
    weak_augment,
)
from ssl_imwa.sync_audit import SyncAudit


def _images(count: int = 16, channels: int = 3, side: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, channels, side, side), dtype=torch.uint8, generator=generator)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_dtypes(channels: int) -> None:
    images = _images(channels=channels)
    weak = weak_augment(images, _generator(), pad=4, hflip=True)
    strong = strong_augment(images, _generator(), pad=4, hflip=True, cutout=16)
    assert weak.shape == strong.shape == images.shape
    assert weak.dtype == strong.dtype == torch.uint8
    normalized = normalize(strong, [0.5] * channels, [0.25] * channels)
    assert normalized.dtype == torch.float32 and normalized.shape == images.shape


def test_weak_without_pad_or_flip_is_identity() -> None:
    images = _images()
    assert torch.equal(weak_augment(images, _generator(), pad=0, hflip=False), images)


def test_flip_only_matches_torch_flip() -> None:
    images = _images(count=64)
    flipped = torch.flip(images, dims=[-1])
    out = weak_augment(images, _generator(), pad=0, hflip=True)
    is_flipped = (out == flipped).flatten(1).all(1)
    is_kept = (out == images).flatten(1).all(1)
    assert (is_flipped | is_kept).all()
    assert 10 < is_flipped.sum() < 54


def test_crop_is_a_window_of_the_reflect_padded_image() -> None:
    images = _images(count=8)
    padded = F.pad(images.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    out = weak_augment(images, _generator(3), pad=4, hflip=False)
    windows = [padded[:, :, y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
    matches = torch.stack([(out == window).flatten(1).all(1) for window in windows])
    assert matches.any(0).all()
    assert len({int(position) for position in matches.int().argmax(0)}) > 1


def test_same_generator_seed_same_output() -> None:
    images = _images()
    first = strong_augment(images, _generator(7), pad=4, hflip=True, cutout=16)
    second = strong_augment(images, _generator(7), pad=4, hflip=True, cutout=16)
    third = strong_augment(images, _generator(8), pad=4, hflip=True, cutout=16)
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_strong_differs_from_weak() -> None:
    images = _images()
    weak = weak_augment(images, _generator(1), pad=4, hflip=True)
    strong = strong_augment(images, _generator(1), pad=4, hflip=True, cutout=16)
    assert not torch.equal(weak, strong)
    # Same seed means the same flip and crop; RandAugment and cutout then change every image.
    assert (weak != strong).flatten(1).any(1).all()


def test_cutout_fills_a_clipped_square_with_gray() -> None:
    images = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    out = transforms._cutout(images, _generator(), size=16)
    filled = (out == 127).all(1)
    assert ((out == 127) | (out == 0)).all()
    heights = filled.any(2).sum(1)
    widths = filled.any(1).sum(1)
    assert torch.equal(filled.flatten(1).sum(1), heights * widths)  # a rectangle
    assert heights.min() >= 8 and widths.min() >= 8 and heights.max() == widths.max() == 16


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]


def _pil_reference(op: str, image: Image.Image, level: int, sign: int) -> Image.Image:
    """kekmodel's op at magnitude `level`, with the geometric fill of 128 used here."""
    factor = level * 0.9 / 10 + 0.05
    shear = sign * level * 0.3 / 10
    fill = (128,) * 3
    references = {
        "auto_contrast": lambda: ImageOps.autocontrast(image),
        "brightness": lambda: ImageEnhance.Brightness(image).enhance(factor),
        "color": lambda: ImageEnhance.Color(image).enhance(factor),
        "contrast": lambda: ImageEnhance.Contrast(image).enhance(factor),
        "equalize": lambda: ImageOps.equalize(image),
        "posterize": lambda: ImageOps.posterize(image, int(level * 4 / 10) + 4),
        "sharpness": lambda: ImageEnhance.Sharpness(image).enhance(factor),
        "solarize": lambda: ImageOps.solarize(image, 256 - int(level * 256 / 10)),
        "rotate": lambda: image.rotate(sign * int(level * 30 / 10), fillcolor=fill),
        "shear_x": lambda: image.transform(image.size, Image.AFFINE, (1, shear, 0, 0, 1, 0), fillcolor=fill),
        "shear_y": lambda: image.transform(image.size, Image.AFFINE, (1, 0, 0, shear, 1, 0), fillcolor=fill),
        "translate_x": lambda: image.transform(
            image.size, Image.AFFINE, (1, 0, int(shear * image.size[0]), 0, 1, 0), fillcolor=fill
        ),
        "translate_y": lambda: image.transform(
            image.size, Image.AFFINE, (1, 0, 0, 0, 1, int(shear * image.size[1])), fillcolor=fill
        ),
    }
    return references[op]()


@pytest.mark.parametrize("op", [op for op in transforms.RANDAUGMENT_OPS if op != "identity"])
def test_batched_ops_match_pil(op: str) -> None:
    images = _images(count=6)
    images[3:] = torch.linspace(20, 220, 32).to(torch.uint8).view(1, 1, 1, 32)  # smooth images too
    levels = torch.tensor([1, 5, 9, 2, 6, 8])
    signs = torch.tensor([1, -1, 1, -1, 1, -1])
    if op in transforms.GEOMETRIC_OPS:
        op_index = torch.full((6,), transforms.RANDAUGMENT_OPS.index(op))
        ours = randaugment_ops.geometric(images, randaugment_ops.geometric_matrices(op_index, levels, signs, 32, 32))
    else:
        ours = randaugment_ops.apply_pixel_op(op, images, levels)
    expected = [
        np.asarray(_pil_reference(op, image, int(level), int(sign)))
        for image, level, sign in zip(_to_pil(images), levels, signs)
    ]
    np.testing.assert_array_equal(ours.permute(0, 2, 3, 1).numpy(), np.stack(expected))


def test_normalize_matches_definition() -> None:
    images = _images(count=2)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(images, mean, std), expected)


def test_normalize_is_bitwise_the_folded_multiply_add_and_copies_nothing_once_warm() -> None:
    images = _images(count=3)
    mean, std = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]
    std_tensor, mean_tensor = torch.tensor(std).view(1, 3, 1, 1), torch.tensor(mean).view(1, 3, 1, 1)
    expected = images.float().mul_(1.0 / (255.0 * std_tensor)).sub_(mean_tensor / std_tensor)
    assert torch.equal(normalize(images, mean, std), expected)
    on_meta = images.to("meta")
    normalize(on_meta, mean, std)
    with SyncAudit(torch.device("meta")) as audit:
        normalize(on_meta, mean, std)
    assert audit.copies_to_device == [] and audit.syncs == []


def test_parameter_buffer_round_trip_is_bit_for_bit() -> None:
    buffer = ParameterBuffer()
    integers = torch.tensor([[-(2**62), -1, 0], [1, 7, 2**62]])
    flags = torch.tensor([True, False, True])
    floats = torch.tensor([-0.0, float("nan"), 5e-324, 0.1, -1e300, float("inf")], dtype=torch.float64).view(3, 2)
    slots = [buffer.add(values) for values in (integers, flags, floats, torch.zeros(0, dtype=torch.long))]
    packed = buffer.send(torch.device("cpu"))
    assert packed.dtype == torch.int64 and packed.numel() == 6 + 3 + 6
    read = [slot.read(packed) for slot in slots]
    assert torch.equal(read[0], integers) and torch.equal(read[1], flags.long())
    assert read[2].dtype == torch.float64 and torch.equal(read[2].view(torch.int64), floats.view(torch.int64))
    assert read[3].shape == (0,)


@pytest.mark.parametrize("strong", [False, True])
def test_augmenting_on_a_device_is_one_non_blocking_copy_without_sync(strong: bool) -> None:
    """Warm: the first strong batch on a device builds the cached luma weights."""
    images = _images(count=64).to("meta")
    strong_augment(images, _generator(), pad=4, hflip=True, cutout=16)
    with SyncAudit(torch.device("meta")) as audit:
        if strong:
            out = strong_augment(images, _generator(1), pad=4, hflip=True, cutout=16)
        else:
            out = weak_augment(images, _generator(1), pad=4, hflip=True)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert audit.syncs == []
    assert len(audit.copies_to_device) == 1 and audit.copies_to_device[0].non_blocking
