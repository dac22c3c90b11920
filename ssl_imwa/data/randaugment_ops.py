"""RandAugment's operations on uint8 image batches [N, C, H, W], as kekmodel/FixMatch-pytorch's
`fixmatch_augment_pool` applies them through PIL: colour and histogram ops and the affine warps,
each uint8 in and uint8 out, bit-exact with PIL. ssl_imwa.data.transforms plans which op each image
gets and with what magnitude; this module only applies them.
"""
import functools

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
MAGNITUDE_LEVELS = 10  # magnitudes are integers in [1, MAGNITUDE_LEVELS)
GEOMETRIC_FILL = 128
# PIL's ITU-R 601-2 luma transform in 16-bit fixed point, as Image.convert("L") computes it.
LUMA_WEIGHTS = (19595, 38470, 7471)


@functools.lru_cache(maxsize=16)
def _luma_weights(device: torch.device) -> torch.Tensor:
    """LUMA_WEIGHTS as [1, 3, 1, 1] int32, made once per device for the same reason."""
    return torch.tensor(LUMA_WEIGHTS, dtype=torch.int32).view(1, 3, 1, 1).to(device)


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


def geometric(images: torch.Tensor, pixel_matrices: torch.Tensor) -> torch.Tensor:
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


def geometric_matrices(
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


def apply_pixel_op(op: str, images: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
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
