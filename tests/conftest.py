"""Shared fixtures: small synthetic image folders, and ways to run the CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def synthetic_pixels(index: int, width: int, height: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus a little seeded noise: compresses like a photo, differs per index."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width]
    planes = []
    for channel in range(channels):
        phase = rng.uniform(0, 2 * np.pi)
        wave = 127 + 100 * np.sin(x / (3 + channel + index % 7) + phase) * np.cos(y / (5 + index % 5))
        planes.append(wave + rng.normal(0, 6, size=(height, width)))
    pixels = np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8)
    return pixels[:, :, 0] if channels == 1 else pixels


def write_images(folder: Path, count: int, size=(64, 64), suffix=".png", prefix="img", start=0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = folder / f"{prefix}{index:04d}{suffix}"
        Image.fromarray(synthetic_pixels(index, *size)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    write_images(source, 40)
    return source


def run_shards(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`shards` as a real process, the way users run it."""
    return subprocess.run(
        [sys.executable, "-m", "shards", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "COLUMNS": "120"},
    )


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under a folder by relative path: the whole output, for exact comparisons."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
