"""One worker of the training loader against a bare loop, on CPU: can one data worker feed a GPU?

    python bench/loader.py [--images 4000] [--batches 40] [--repeats 2]

The loader row is `pipeline.data.stream.training_loader` with 1 worker process: random access into the
shards (tar index, seek), decode, the paper's horizontal flip, collate, and the hand-over of each
micro-batch of 64 to the training process. The bare row reads the same shards' members in file order and
decodes them with PIL into the same tensors (uint8 pixels: the trainer scales them on its device), in
this process, as directly as it can be written. Shards: the photographs of bench/shards_build.py at
32x32 grayscale PNG, 64x64 RGB PNG, 64x64 RGB JPEG and 256x256 RGB JPEG (the autoencoder-kl plugin's
size), with the workers a GPU needs at 256 px for a few images/s rates.
Writes its table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import subprocess
import sys
import tarfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from report import machine, markdown_table, write_section
from shards_build import OUT, make_corpus

from pipeline.data.stream import StreamLayout, training_loader
from shards.read.reader import open_split

BATCH = 64
SHAPES = [
    ("32x32 L png", 32, "L", "png"),
    ("64x64 RGB png", 64, "RGB", "png"),
    ("64x64 RGB jpg", 64, "RGB", "jpg"),
    ("256x256 RGB jpg", 256, "RGB", "jpg"),  # what latent diffusion's autoencoders train on
]
LARGE = "256x256 RGB jpg"
GPU_RATES = (500, 2000, 8000)  # images/s a GPU might take at 256 px: the workers each needs


def build(source: Path, size: int, mode: str, image_format: str) -> Path:
    out = OUT.parent / "loader" / f"shards-{size}-{mode}-{image_format}"
    if not (out / "manifest.json").exists():
        command = [sys.executable, "-m", "shards", "build", str(source), str(out), "--size", str(size)]
        command += ["--mode", mode, "--format", image_format, "--shard-size", "500"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def loader_rates(shards: Path, batches: int) -> tuple[float, float]:
    """images/s of the real loader with one worker: over `batches` micro-batches after 3 of warm-up (the
    worker's start), the worker meeting each shard for the first time (it lists the shard's tar headers
    once); then over as many in the second epoch, every shard already listed (the steady state)."""
    split = open_split(shards)
    counts = tuple(shard["count"] for shard in split.shards)
    layout = StreamLayout(counts, seed=0, shuffle_shards=2, world_size=1, batch_size=BATCH)
    loader = training_loader(split, layout, rank=0, start=0, workers=1, hflip=True)
    windows = ((3, 3 + batches), (layout.steps_per_epoch, layout.steps_per_epoch + batches))
    rates, images, started = [], 0, 0.0
    for number, batch in enumerate(loader):
        if number in (start for start, _ in windows):
            images, started = 0, time.perf_counter()
        images += len(batch.images)
        if number in (end for _, end in windows):
            rates.append(images / (time.perf_counter() - started))
            if len(rates) == len(windows):
                return rates[0], rates[1]
    raise AssertionError("the training loader is endless")


def bare_rate(shards: Path, batches: int) -> float:
    """The same number of images read in file order, decoded with PIL, stacked in micro-batches of uint8
    pixels (what the loader hands over)."""
    wanted, images, pending = batches * BATCH, 0, []
    started = time.perf_counter()
    for path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    continue
                pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
                tensor = torch.from_numpy(pixels)  # uint8, as the loader hands them over (the GPU scales them)
                pending.append(tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.unsqueeze(0))
                if len(pending) == BATCH:
                    torch.stack(pending)
                    images, pending = images + BATCH, []
                    if images == wanted:
                        return images / (time.perf_counter() - started)
    raise SystemExit(f"{shards} holds fewer than {wanted} images: use more --images or fewer --batches")


def arguments(description: str, repeats: int) -> argparse.Namespace:
    """The options of this bench and bench/cache_check.py; one thread, as a data worker has."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batches", type=int, default=40, help="micro-batches of 64 timed per row")
    parser.add_argument("--repeats", type=int, default=repeats, help="rounds, interleaved (shared, noisy machines)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a data worker has one core; so does the bare loop
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read only, never written
    return args


def shard_sets(images: int) -> Iterator[tuple[str, Path]]:
    """(name, folder) of each of SHAPES' shards, built once from `images` of bench/shards_build.py's
    photographs."""
    source = OUT / "corpus"
    if not source.exists() or len(list(source.iterdir())) != images:
        make_corpus(source, images)
    for name, size, mode, image_format in SHAPES:
        yield name, build(source, size, mode, image_format)


def cell(rates: list[float], bares: list[float]) -> str:
    """The median rate, and the median and range of the per-round ratio to that round's bare loop."""
    ratios = [rate / bare for rate, bare in zip(rates, bares, strict=True)]
    return f"{statistics.median(rates):.0f} ({statistics.median(ratios):.2f}x, {min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    args = arguments(__doc__, repeats=5)
    rows = []
    for name, shards in shard_sets(args.images):
        rates: dict[str, list[float]] = {"bare": [], "first": [], "steady": []}
        for round_number in range(args.repeats):  # each round: the bare loop and the loader, order alternating
            bare = None
            if round_number % 2 == 0:
                bare = bare_rate(shards, args.batches)
            first, steady = loader_rates(shards, args.batches)
            rates["first"].append(first)
            rates["steady"].append(steady)
            rates["bare"].append(bare if bare is not None else bare_rate(shards, args.batches))
        rows.append(
            [
                name,
                f"{statistics.median(rates['bare']):.0f}",
                cell(rates["first"], rates["bare"]),
                cell(rates["steady"], rates["bare"]),
                ">= 0.90x",
            ]
        )
    header = ["shards", "bare loop images/s", "loader, first epoch", "loader, second epoch", "target"]
    table = markdown_table(header, rows)
    per_worker = float(next(row for row in rows if row[0] == LARGE)[3].split()[0])
    needed = ", ".join(f"{rate:,} images/s: {math.ceil(rate / per_worker)} workers" for rate in GPU_RATES)
    body = f"""## The training loader, one worker (`bench/loader.py`)

{machine()}. {args.batches} micro-batches of {BATCH}, {args.repeats} rounds (each the bare loop and the loader, in
alternating order): the median images/s, and the median and range of the rounds' ratios; the photographs of
bench/shards_build.py in shards of 500. Loader: `training_loader` with 1 worker (random access, decode, flip,
collate, hand-over to this process), images/s (and against the bare loop) after 3 micro-batches of warm-up in
its first epoch, where the worker lists each shard's tar headers as it first meets it, and at the start of its
second epoch, every shard listed; bare: the same shards' members in file order, decoded with PIL into the
same tensors (uint8 pixels, which the trainer scales on its device) in this process. One thread each.

{table}

Workers per GPU at 256x256 RGB JPEG, from one worker's second-epoch rate ({per_worker:.0f} images/s on this
CPU; data.workers per rank, each a process with one core): {needed}.
"""
    print(body)
    write_section("loader", body)


if __name__ == "__main__":
    main()
