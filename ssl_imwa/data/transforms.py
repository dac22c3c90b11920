"""Batched augmentation on uint8 image tensors [N, C, H, W] (FixMatch's weak and strong augmentation, kekmodel/FixMatch-pytorch).

Augmenting is planned on the host and applied on the images' device. Planning draws every
random number from an explicit CPU `torch.Generator` in a fixed order and reduces the draws to
small per-sample parameters (flips, crop offsets, op groups, magnitudes, affine matrices,
cutout boxes) in a `ParameterBuffer`; applying reads them from that buffer after one
non-blocking copy, with every shape known on the host, so the host never waits for the device.
The draws do not depend on the device, and a generator state is enough to resume.
Each operation works on uint8 in and uint8 out, like the PIL pipeline it replaces, and
follows kekmodel/FixMatch-pytorch's `RandAugmentMC(n=2, m=10)` + `CutoutAbs` semantics.
"""

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# kekmodel's fixmatch_augment_pool, in its order.
RANDAUGMENT_OPS = (
    "auto_contrast",
    "brightness",
    "color",
    "contrast",
    "equalize",
    "identity",
    "posterize",
    "rotate",
    "sharpness",
    "shear_x",
    "shear_y",
    "solarize",
    "translate_x",
    "translate_y",
)
GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
PIXEL_OPS = tuple(op for op in RANDAUGMENT_OPS if op not in GEOMETRIC_OPS and op != "identity")
_IS_GEOMETRIC = torch.tensor([op in GEOMETRIC_OPS for op in RANDAUGMENT_OPS])
OPS_PER_IMAGE = 2
OP_PROBABILITY = 0.5
MAGNITUDE_LEVELS = 10  # magnitudes are integers in [1, MAGNITUDE_LEVELS)
GEOMETRIC_FILL = 128
CUTOUT_FILL = 127
# PIL's ITU-R 601-2 luma transform in 16-bit fixed point, as Image.convert("L") computes it.
LUMA_WEIGHTS = (19595, 38470, 7471)


@dataclass(frozen=True)
class Slot:
    """Where one parameter tensor lies in a packed buffer; the offsets live on the host, so reading never syncs."""

    start: int
    shape: tuple[int, ...]
    is_float: bool  # float64 stored bit for bit in the int64 buffer

    def read(self, buffer: torch.Tensor) -> torch.Tensor:
        values = buffer[self.start : self.start + math.prod(self.shape)].view(self.shape)
        return values.view(torch.float64) if self.is_float else values


class ParameterBuffer:
    """A step's planned parameters packed into one int64 tensor, so they reach the device in a single copy."""

    def __init__(self) -> None:
        self._pieces: list[torch.Tensor] = []
        self._size = 0

    def add(self, values: torch.Tensor) -> Slot:
        """Append an integer, bool or float tensor (floats as float64); returns where to read it back."""
        is_float = values.is_floating_point()
        flat = (values.to(torch.float64).view(torch.int64) if is_float else values.to(torch.int64)).reshape(-1)
        slot = Slot(self._size, tuple(values.shape), is_float)
        self._pieces.append(flat)
        self._size += flat.numel()
        return slot

    def send(self, device: torch.device) -> torch.Tensor:
        """The packed buffer on `device`: no copy on the CPU, one non-blocking copy (pinned on CUDA) elsewhere."""
        buffer = torch.cat(self._pieces)
        if device.type == "cuda":
            buffer = buffer.pin_memory()
        return buffer.to(device, non_blocking=True)


@functools.lru_cache(maxsize=16)
def _normalization(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of `normalize`, made once per device: building them per call copies to the device each time."""
    std_tensor = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    return (1.0 / (255.0 * std_tensor)).to(device), (mean_tensor / std_tensor).to(device)


@functools.lru_cache(maxsize=16)
def _luma_weights(device: torch.device) -> torch.Tensor:
    """LUMA_WEIGHTS as [1, 3, 1, 1] int32, made once per device for the same reason."""
    return torch.tensor(LUMA_WEIGHTS, dtype=torch.int32).view(1, 3, 1, 1).to(device)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 (x / 255 - mean) / std, folded into one multiply-add."""
    scale, offset = _normalization(tuple(mean), tuple(std), images.device)
    return images.float().mul_(scale).sub_(offset)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map indices in [-(size-1), 2(size-1)] into [0, size) like 'reflect' padding (edge not repeated)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


@dataclass(frozen=True)
class WeakPlan:
    """A batch's flips and crop offsets, [3, count] in the buffer: flip (0/1), offset_y, offset_x."""

    pad: int
    params: Slot


def plan_weak(
    generator: torch.Generator, shape: Sequence[int], pad: int, hflip: bool, buffer: ParameterBuffer,
    keep: slice = slice(None),
) -> WeakPlan:
    """Draw the flips and crop offsets of `shape` [N, C, H, W] images into `buffer`.

    `keep`: the rows whose parameters go into the buffer (a data-parallel process's slice); the
    draws are those of all N rows, so a slice gets exactly the parameters the whole batch would.
    """
    count, _, height, width = shape
    if pad < 0 or pad >= min(height, width):
        raise ValueError(f"crop padding {pad} must be in [0, {min(height, width)}) for {height}x{width} images")
    flip = torch.rand(count, generator=generator) < 0.5 if hflip else torch.zeros(count, dtype=torch.bool)
    offset_y = torch.randint(0, 2 * pad + 1, (count,), generator=generator)
    offset_x = torch.randint(0, 2 * pad + 1, (count,), generator=generator)
    return WeakPlan(pad, buffer.add(torch.stack([flip.long(), offset_y, offset_x])[:, keep]))


def apply_weak(images: torch.Tensor, plan: WeakPlan, buffer: torch.Tensor) -> torch.Tensor:
    """Flip, then crop from the reflect-padded image.

    Flip and crop compose into one source-pixel index per output pixel, built on the images'
    device, so the batch is handled by a single gather instead of materialising the padded images.
    """
    count, channels, height, width = images.shape
    flip, offset_y, offset_x = plan.params.read(buffer)
    rows = _reflect(offset_y[:, None] + torch.arange(height, device=images.device) - plan.pad, height)
    cols = _reflect(offset_x[:, None] + torch.arange(width, device=images.device) - plan.pad, width)
    cols = torch.where(flip[:, None] != 0, width - 1 - cols, cols)
    source = (rows[:, :, None] * width + cols[:, None, :]).view(count, 1, height * width)
    source = source.expand(count, channels, height * width)
    return images.reshape(count, channels, height * width).gather(2, source).view(count, channels, height, width)


def weak_augment(images: torch.Tensor, generator: torch.Generator, pad: int, hflip: bool) -> torch.Tensor:
    """Random horizontal flip, then a random crop from the `pad`-px reflect-padded image."""
    buffer = ParameterBuffer()
    plan = plan_weak(generator, images.shape, pad, hflip, buffer)
    return apply_weak(images, plan, buffer.send(images.device))


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's Image.blend: degenerate + factor * (image - degenerate), clipped and truncated."""
    images = images.float()
    mixed = degenerate + factor.view(-1, 1, 1, 1) * (images - degenerate)
    return mixed.clamp_(0, 255).to(torch.uint8)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """Grayscale [N, 1, H, W] as uint8; single-channel images are their own luma."""
    if images.shape[1] == 1:
        return images
    return (((images.int() * _luma_weights(images.device)).sum(1, keepdim=True) + (1 << 15)) >> 16).to(torch.uint8)


def _brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros((), device=images.device), images, factor)


def _color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images
    return _blend(_luma(images).float(), images, factor)


def _contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _luma(images).float().mean(dim=(1, 2, 3), keepdim=True)
    return _blend(torch.floor(mean + 0.5), images, factor)


def _sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (3x3 ones, centre 5, scale 13); border pixels stay as they are.

    Sums of uint8 pixels are exact in float32, and PIL's round(sum / 13) equals
    floor((sum + 6) / 13) because sum / 13 never ends in .5.
    """
    _, _, height, width = images.shape
    pixels = images.float()
    total = 4 * pixels[:, :, 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total += pixels[:, :, dy : height - 2 + dy, dx : width - 2 + dx]
    degenerate = pixels.clone()
    degenerate[:, :, 1:-1, 1:-1] = total.add_(6).div_(13).floor_()
    return _blend(degenerate, images, factor)


def _auto_contrast(images: torch.Tensor) -> torch.Tensor:
    """Stretch each channel's [min, max] to [0, 255]; constant channels are left alone."""
    low = images.amin(dim=(2, 3), keepdim=True).float()
    high = images.amax(dim=(2, 3), keepdim=True).float()
    stretchable = high > low
    scale = torch.where(stretchable, 255.0 / (high - low).clamp_min(1.0), torch.ones_like(low))
    offset = torch.where(stretchable, low, torch.zeros_like(low))
    return ((images.float() - offset) * scale).clamp_(0, 255).to(torch.uint8)


def _equalize(images: torch.Tensor) -> torch.Tensor:
    """Current Pillow's ImageOps.equalize per channel (step = non-top pixels // 255, as torchvision),
    vectorised over the histograms of all channels at once."""
    count, channels, height, width = images.shape
    pixels = images.reshape(count * channels, height * width).long()
    histogram = torch.zeros(count * channels, 256, dtype=torch.long, device=images.device)
    histogram.scatter_add_(1, pixels, torch.ones_like(pixels))
    last_used = 255 - (histogram > 0).flip(1).long().argmax(1, keepdim=True)
    step = torch.floor((height * width - histogram.gather(1, last_used)).double() / 255)
    below = (torch.cumsum(histogram, 1) - histogram).double()
    lut = torch.floor((below + torch.floor(step / 2)) / step.clamp_min(1)).clamp_(0, 255).long()
    identity = torch.arange(256, device=images.device).expand_as(lut)
    lut = torch.where(step > 0, lut, identity)
    return lut.gather(1, pixels).to(torch.uint8).view(count, channels, height, width)


def _posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    mask = ((0xFF << (8 - bits)) & 0xFF).to(torch.uint8).view(-1, 1, 1, 1)
    return images & mask


def _solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Invert pixels at or above the threshold; for uint8, 255 - x == x ^ 255 (cheaper than where)."""
    invert = (images >= threshold.view(-1, 1, 1, 1)).to(torch.uint8).mul_(255)
    return images ^ invert


def _geometric(images: torch.Tensor, pixel_matrices: torch.Tensor) -> torch.Tensor:
    """Per-sample affine maps in PIL's convention, nearest neighbour, fill 128, as one index gather.

    Like PIL's Image.transform, `pixel_matrices` [n, 2, 3] (float64, on the images' device) map
    each output pixel centre (x + 0.5, y + 0.5) to a source point whose floor is the source pixel;
    source points outside the image take the fill value. Gathering uint8 indices reproduces PIL
    exactly and avoids the float round trip of grid_sample. The points are m0 * x + m1 * y + m2 in
    separate elementwise steps, not a matmul, so every device rounds them, and floors them, alike.
    """
    count, channels, height, width = images.shape
    centre_x = torch.arange(width, dtype=torch.float64, device=images.device) + 0.5
    centre_y = (torch.arange(height, dtype=torch.float64, device=images.device) + 0.5)[:, None]
    matrices = pixel_matrices[:, :, :, None, None]
    source = (matrices[:, :, 0] * centre_x + matrices[:, :, 1] * centre_y + matrices[:, :, 2]).floor_().long()
    source_x, source_y = source[:, 0].reshape(count, -1), source[:, 1].reshape(count, -1)  # [n, H*W]
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    flat = source_y.clamp(0, height - 1) * width + source_x.clamp(0, width - 1)
    warped = images.reshape(count, channels, height * width).gather(2, flat[:, None].expand(count, channels, -1))
    outside = (~inside).to(torch.uint8)[:, None]
    warped = warped * (1 - outside) + GEOMETRIC_FILL * outside
    return warped.view(count, channels, height, width)


def _geometric_matrices(
    op_index: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """Per-sample PIL affine matrices for kekmodel's Rotate, ShearX/Y and TranslateX/Y.

    Arithmetic follows kekmodel's order in float64, so the integer truncations
    (degrees, translation pixels) land exactly where its Python floats land.
    """
    count = len(op_index)
    matrices = torch.zeros(count, 2, 3, dtype=torch.float64)
    matrices[:, 0, 0] = 1.0
    matrices[:, 1, 1] = 1.0
    signed = (sign * magnitude).double()
    fraction = signed * 0.3 / MAGNITUDE_LEVELS

    def rows_of(op: str) -> torch.Tensor:
        return op_index == RANDAUGMENT_OPS.index(op)

    matrices[rows_of("shear_x"), 0, 1] = fraction[rows_of("shear_x")]
    matrices[rows_of("shear_y"), 1, 0] = fraction[rows_of("shear_y")]
    matrices[rows_of("translate_x"), 0, 2] = (fraction * width).trunc()[rows_of("translate_x")]
    matrices[rows_of("translate_y"), 1, 2] = (fraction * height).trunc()[rows_of("translate_y")]
    # PIL's Image.rotate(degrees): counter-clockwise about the centre (width / 2, height / 2).
    rotate = rows_of("rotate")
    degrees = sign[rotate] * (magnitude[rotate] * 30 // MAGNITUDE_LEVELS)
    angle = -torch.deg2rad(degrees.double())
    cos, sin = torch.cos(angle), torch.sin(angle)
    centre_x, centre_y = width / 2.0, height / 2.0
    matrices[rotate] = torch.stack(
        [
            torch.stack([cos, sin, centre_x - cos * centre_x - sin * centre_y], 1),
            torch.stack([-sin, cos, centre_y + sin * centre_x - cos * centre_y], 1),
        ],
        1,
    )
    return matrices


def _apply_pixel_op(op: str, images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Colour and histogram ops with kekmodel's magnitude mapping, vectorised over the group."""
    if op == "auto_contrast":
        return _auto_contrast(images)
    if op == "equalize":
        return _equalize(images)
    if op == "posterize":
        return _posterize(images, magnitude * 4 // MAGNITUDE_LEVELS + 4)
    if op == "solarize":
        return _solarize(images, 256 - magnitude * 256 // MAGNITUDE_LEVELS)
    factor = magnitude.double() * 0.9 / MAGNITUDE_LEVELS + 0.05
    enhance = {"brightness": _brightness, "color": _color, "contrast": _contrast, "sharpness": _sharpness}[op]
    return enhance(images, factor.float())


def _cutout_box(generator: torch.Generator, count: int, size: int, height: int, width: int) -> torch.Tensor:
    """Draw kekmodel's CutoutAbs boxes: centre uniform in the image, top-left clipped to 0, `size` px square.

    Returns [4, count]: top, bottom, left, right (bottom and right exclusive).
    """
    centre = torch.rand(count, 2, generator=generator, dtype=torch.float64)
    top = (centre[:, 0] * height - size / 2.0).clamp_min(0).long()
    left = (centre[:, 1] * width - size / 2.0).clamp_min(0).long()
    return torch.stack([top, (top + size).clamp_max(height), left, (left + size).clamp_max(width)])


def _paint_cutout(images: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Paint each image's box gray 127.

    PIL's rectangle includes its far corner, so kekmodel paints size + 1 px; this paints `size`.
    """
    _, _, height, width = images.shape
    top, bottom, left, right = box
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    inside_rows = (rows[None] >= top[:, None]) & (rows[None] < bottom[:, None])
    inside_cols = (cols[None] >= left[:, None]) & (cols[None] < right[:, None])
    cut = (inside_rows[:, :, None] & inside_cols[:, None, :]).to(torch.uint8)[:, None]
    return images * (1 - cut) + CUTOUT_FILL * cut  # arithmetic blend: masked_fill on uint8 is far slower on CPU


def _cutout(images: torch.Tensor, generator: torch.Generator, size: int) -> torch.Tensor:
    """kekmodel's CutoutAbs on a batch, drawn and painted at once."""
    count, _, height, width = images.shape
    return _paint_cutout(images, _cutout_box(generator, count, size, height, width).to(images.device))


@dataclass(frozen=True)
class OpGroup:
    """One op on the rows that drew it in a round: `values` are magnitudes, or [n, 2, 3] matrices for "geometric"."""

    op: str  # a PIXEL_OPS name, or "geometric": the round's geometric ops as one affine warp
    rows: Slot
    values: Slot


@dataclass(frozen=True)
class StrongPlan:
    """Everything `apply_strong` needs, as slots of one buffer."""

    weak: WeakPlan
    groups: tuple[OpGroup, ...]  # in application order, round by round
    cutout: Slot | None  # [4, count] boxes, None without cutout


def plan_strong(
    generator: torch.Generator, shape: Sequence[int], pad: int, hflip: bool, cutout: int, buffer: ParameterBuffer,
    keep: slice = slice(None),
) -> StrongPlan:
    """Draw a strong view of `shape` [N, C, H, W] images: weak, RandAugment over the FixMatch pool, Cutout.

    Per image: OPS_PER_IMAGE ops drawn uniformly with replacement, each applied with
    probability 0.5 at an integer magnitude uniform in [1, 10). Images are grouped by the op
    they drew, so each op runs once per round on its whole group with per-sample magnitudes;
    the group sizes are known here, on the host, so applying needs no data-dependent shapes.
    `keep`: as in `plan_weak` (all rows are drawn; the kept ones are planned, renumbered from 0).
    """
    weak = plan_weak(generator, shape, pad, hflip, buffer, keep)
    count, _, height, width = shape
    op_index = torch.randint(0, len(RANDAUGMENT_OPS), (count, OPS_PER_IMAGE), generator=generator)
    magnitude = torch.randint(1, MAGNITUDE_LEVELS, (count, OPS_PER_IMAGE), generator=generator)
    applied = torch.rand(count, OPS_PER_IMAGE, generator=generator) < OP_PROBABILITY
    sign = torch.where(torch.rand(count, OPS_PER_IMAGE, generator=generator) < 0.5, -1, 1)
    op_index, magnitude, applied, sign = (draw[keep] for draw in (op_index, magnitude, applied, sign))
    groups = []
    for round_index in range(OPS_PER_IMAGE):
        chosen, level, active = op_index[:, round_index], magnitude[:, round_index], applied[:, round_index]
        for op in PIXEL_OPS:
            rows = torch.nonzero(active & (chosen == RANDAUGMENT_OPS.index(op))).flatten()
            if len(rows):
                groups.append(OpGroup(op, buffer.add(rows), buffer.add(level[rows])))
        rows = torch.nonzero(active & _IS_GEOMETRIC[chosen]).flatten()
        if len(rows):
            matrices = _geometric_matrices(chosen[rows], level[rows], sign[rows, round_index], height, width)
            groups.append(OpGroup("geometric", buffer.add(rows), buffer.add(matrices)))
    box = buffer.add(_cutout_box(generator, count, cutout, height, width)[:, keep]) if cutout > 0 else None
    return StrongPlan(weak, tuple(groups), box)


def apply_strong(images: torch.Tensor, plan: StrongPlan, buffer: torch.Tensor) -> torch.Tensor:
    """Apply a planned strong view; each group is one index_select, the op, and one index_copy_."""
    images = apply_weak(images, plan.weak, buffer)
    for group in plan.groups:
        rows, values = group.rows.read(buffer), group.values.read(buffer)
        selected = images.index_select(0, rows)
        if group.op == "geometric":
            changed = _geometric(selected, values)
        else:
            changed = _apply_pixel_op(group.op, selected, values)
        images.index_copy_(0, rows, changed)
    if plan.cutout is not None:
        images = _paint_cutout(images, plan.cutout.read(buffer))
    return images


def strong_augment(
    images: torch.Tensor, generator: torch.Generator, pad: int, hflip: bool, cutout: int
) -> torch.Tensor:
    """Weak augmentation, RandAugment over the FixMatch pool, then Cutout (see `plan_strong`)."""
    buffer = ParameterBuffer()
    plan = plan_strong(generator, images.shape, pad, hflip, cutout, buffer)
    return apply_strong(images, plan, buffer.send(images.device))
