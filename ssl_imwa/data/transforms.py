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

from ssl_imwa.data.randaugment_ops import (
    GEOMETRIC_OPS,
    MAGNITUDE_LEVELS,
    PIXEL_OPS,
    RANDAUGMENT_OPS,
    apply_pixel_op,
    geometric,
    geometric_matrices,
)

_IS_GEOMETRIC = torch.tensor([op in GEOMETRIC_OPS for op in RANDAUGMENT_OPS])
OPS_PER_IMAGE = 2
OP_PROBABILITY = 0.5
CUTOUT_FILL = 127


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
            matrices = geometric_matrices(chosen[rows], level[rows], sign[rows, round_index], height, width)
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
            changed = geometric(selected, values)
        else:
            changed = apply_pixel_op(group.op, selected, values)
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
