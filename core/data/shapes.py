"""A generated image folder for trying own-image training offline: coloured shapes in class folders.

`make_shapes_folder(root, per_class=100, size=32)` writes root/<circle|square|triangle>/NNNNN.png:
one filled shape a picture, random colour, size and position on a random dark background. It is the
ImageFolder convention (one subfolder per class), made without any download, so the tests, the docs'
measured example and a newcomer can all go through `--dataset folder` with the same pictures.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def shape_image(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB picture of `shape`: a bright random colour on a dark random background."""
    background = tuple(int(v) for v in rng.integers(0, 60, 3))
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    image = Image.new("RGB", (size, size), background)
    extent = rng.uniform(0.45, 0.8) * size          # the shape's side: large enough to read at 16 px
    x0 = rng.uniform(0, size - extent)
    y0 = rng.uniform(0, size - extent)
    _draw_shape(ImageDraw.Draw(image), shape, (x0, y0, x0 + extent, y0 + extent), colour)
    return image


def make_shapes_folder(root: str | Path, per_class: int = 100, size: int = 32, seed: int = 0,
                       classes: tuple[str, ...] = SHAPE_CLASSES) -> Path:
    """Write per_class PNGs of each shape under root/<class>/; the same seed writes the same bytes."""
    if per_class < 1 or size < 4:
        raise ValueError(f"per_class = {per_class}, size = {size} is not allowed: give per_class >= 1 and size >= 4")
    root = Path(root)
    rng = np.random.default_rng(seed)
    for shape in classes:
        folder = root / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(shape, size, rng).save(folder / f"{i:05d}.png")
    return root
