"""PNG grids of images in [-1, 1]: samples, and reconstructions beside their inputs."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from shards.read.reader import tensor_to_image

PADDING = 2
PAD_VALUE = 128


def grid(images: torch.Tensor, columns: int | None = None) -> Image.Image:
    count, _, height, width = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / columns)
    tiles = [tensor_to_image(image) for image in images]
    sheet = Image.new(
        tiles[0].mode, (columns * (width + PADDING) + PADDING, rows * (height + PADDING) + PADDING), PAD_VALUE
    )
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        sheet.paste(tile, (PADDING + column * (width + PADDING), PADDING + row * (height + PADDING)))
    return sheet


def pairs_grid(inputs: torch.Tensor, outputs: torch.Tensor) -> Image.Image:
    """Each input followed by its reconstruction, pairs laid out row by row."""
    interleaved = torch.stack([inputs, outputs], dim=1).flatten(0, 1)
    pairs_per_row = max(1, math.ceil(math.sqrt(len(inputs) / 2)))
    return grid(interleaved, columns=2 * pairs_per_row)


def save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp.png")
    image.save(temp)
    temp.replace(path)
