"""`shards demo-images`: write a labelled folder of real images that ships inside an installable
package, so the demo runs with nothing downloaded at run time.

- fashion-mnist: 70,000 product photos, 28x28 grayscale, 10 classes (Debian package
  `dataset-fashion-mnist`, read from its IDX files).
- digits: 1,797 handwritten digits, 8x8 grayscale, 10 classes (inside scikit-learn's wheel).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from shards.errors import UserError
from shards.progress import progress_bar

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
SOURCES = ("fashion-mnist", "digits")
DONE_MARKER = ".complete"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): big-endian magic with the number of dimensions, sizes, uint8 data."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    _, _, dtype_code, dimensions = struct.unpack(">BBBB", data[:4])
    if dtype_code != 0x08:
        raise UserError(f"{path}: only uint8 IDX files are supported")
    shape = struct.unpack(f">{dimensions}I", data[4 : 4 + 4 * dimensions])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions).reshape(shape)


def fashion_mnist(folder: Path) -> tuple[np.ndarray, list[str]]:
    if not folder.is_dir():
        raise UserError(
            f"Fashion-MNIST not found in {folder}: `apt-get install dataset-fashion-mnist`, or use --source digits"
        )
    images, labels = [], []
    for part in ("train", "t10k"):
        images.append(read_idx(folder / f"{part}-images-idx3-ubyte.gz"))
        labels.append(read_idx(folder / f"{part}-labels-idx1-ubyte.gz"))
    return np.concatenate(images), [FASHION_MNIST_CLASSES[label] for label in np.concatenate(labels)]


def digits() -> tuple[np.ndarray, list[str]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("scikit-learn is not installed: pip install 'vaegan-pipeline[demo]'") from None
    data = load_digits()
    # values are 0..16 ink counts; stretch to the full 8-bit range
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    return images, [str(label) for label in data.target]


def write_demo_images(dest: Path, source: str, limit: int | None = None, fashion_dir: Path = FASHION_MNIST_DIR) -> int:
    """Write DEST/<label>/<source>-NNNNN.png; returns the number of images. Reruns are no-ops."""
    marker = dest / DONE_MARKER
    if marker.exists() and marker.read_text() == f"{source} {limit}":
        return sum(1 for _ in dest.glob("*/*.png"))
    images, labels = fashion_mnist(fashion_dir) if source == "fashion-mnist" else digits()
    count = len(images) if limit is None else min(limit, len(images))
    with progress_bar() as progress:
        task = progress.add_task(f"writing {source}", total=count)
        for index in range(count):
            folder = dest / labels[index]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index], mode="L").save(folder / f"{source}-{index:05d}.png")
            progress.advance(task)
    marker.write_text(f"{source} {limit}")
    return count
