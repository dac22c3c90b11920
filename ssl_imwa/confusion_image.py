"""The confusion matrix as an image for TensorBoard, drawn with Pillow.

Pillow, not matplotlib: a matplotlib figure cost 0.1 to 0.3 s per evaluation (and half a second to
import), more than evaluating a small model; this draws one in about 15 ms (10 classes).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The ends of matplotlib's "Blues" colour map: a share of 0 is near-white, a share of 1 dark blue.
WHITE_END, BLUE_END = np.array([247, 251, 255]), np.array([8, 48, 107])
LABELLED_CLASSES = 20   # up to this many classes, cells are large enough for names and percentages
MARGIN = 4


def _text_image(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    image = Image.new("RGB", (right - left + 1, bottom - top + 1), "white")
    ImageDraw.Draw(image).text((-left, -top), text, fill="black", font=font)
    return image


def confusion_image(matrix: list[list[int]], class_names: list[str]) -> np.ndarray:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) as an HWC uint8 image.

    Each cell's colour is its share of the true class's images, white to dark blue; with up to 20
    classes the cells carry the share in percent and the axes the class names.
    """
    counts = np.asarray(matrix, dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    classes = len(class_names)
    labelled = classes <= LABELLED_CLASSES
    cell = 24 if labelled else max(3, 480 // classes)
    colours = (WHITE_END + shares[..., None] * (BLUE_END - WHITE_END)).round().astype(np.uint8)
    grid = Image.fromarray(colours.repeat(cell, axis=0).repeat(cell, axis=1))
    font = ImageFont.load_default(10)
    if labelled:
        draw = ImageDraw.Draw(grid)
        for (row, column), share in np.ndenumerate(shares):
            draw.text(((column + 0.5) * cell, (row + 0.5) * cell), f"{round(100 * share)}", anchor="mm", font=font,
                      fill="white" if share > 0.5 else "black")
    names = [_text_image(name, font) for name in class_names] if labelled else []
    true_title = _text_image("true", font).rotate(90, expand=True)
    predicted_title = _text_image("predicted", font)
    left = true_title.width + MARGIN + max((name.width for name in names), default=0) + MARGIN
    bottom = max((name.width for name in names), default=0) + MARGIN + predicted_title.height + MARGIN
    canvas = Image.new("RGB", (left + grid.width + MARGIN, MARGIN + grid.height + bottom), "white")
    canvas.paste(grid, (left, MARGIN))
    for index, name in enumerate(names):
        centre = MARGIN + index * cell + cell // 2
        canvas.paste(name, (left - MARGIN - name.width, centre - name.height // 2))
        rotated = name.rotate(90, expand=True)
        canvas.paste(rotated, (left + index * cell + cell // 2 - rotated.width // 2, MARGIN + grid.height + MARGIN))
    canvas.paste(true_title, (0, MARGIN + grid.height // 2 - true_title.height // 2))
    canvas.paste(predicted_title, (left + grid.width // 2 - predicted_title.width // 2,
                                   canvas.height - MARGIN - predicted_title.height))
    return np.asarray(canvas)
