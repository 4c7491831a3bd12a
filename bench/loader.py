"""One worker of the training loader against a bare loop, on CPU: can one data worker feed a GPU?

    python bench/loader.py [--images 4000] [--batches 40] [--repeats 2]

The loader row is `pipeline.training.data.training_loader` with 1 worker process: random access into the
shards (tar index, seek), decode, the paper's horizontal flip, collate, and the hand-over of each
micro-batch of 64 to the training process. The bare row reads the same shards' members in file order and
decodes them with PIL into the same tensors, in this process, as directly as it can be written. Shards:
the photographs of bench/shards_build.py at 32x32 grayscale PNG, 64x64 RGB PNG and 64x64 RGB JPEG.
Writes its table to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from report import machine, markdown_table, write_section
from shards_build import OUT, make_corpus

from pipeline.training.data import StreamLayout, training_loader
from shards.reader import open_split

BATCH = 64
SHAPES = [("32x32 L png", 32, "L", "png"), ("64x64 RGB png", 64, "RGB", "png"), ("64x64 RGB jpg", 64, "RGB", "jpg")]


def build(source: Path, size: int, mode: str, image_format: str) -> Path:
    out = OUT.parent / "loader" / f"shards-{size}-{mode}-{image_format}"
    if not (out / "manifest.json").exists():
        command = [sys.executable, "-m", "shards", "build", str(source), str(out), "--size", str(size)]
        command += ["--mode", mode, "--format", image_format, "--shard-size", "500"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def loader_rate(shards: Path, batches: int) -> float:
    """images/s of the real loader with one worker, after 3 warm-up micro-batches (the worker's start)."""
    split = open_split(shards)
    counts = tuple(shard["count"] for shard in split.shards)
    layout = StreamLayout(counts, seed=0, shuffle_shards=2, world_size=1, batch_size=BATCH)
    loader = training_loader(split, layout, rank=0, start=0, workers=1, hflip=True)
    images, started = 0, 0.0
    for number, batch in enumerate(loader):
        if number == 3:
            images, started = 0, time.perf_counter()
        images += len(batch.images)
        if number == 3 + batches:
            break
    return images / (time.perf_counter() - started)


def bare_rate(shards: Path, batches: int) -> float:
    """The same number of images read in file order, decoded with PIL, stacked in micro-batches."""
    wanted, images, pending = batches * BATCH, 0, []
    started = time.perf_counter()
    for path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    continue
                pixels = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())))
                tensor = torch.from_numpy(pixels).float().div(127.5).sub(1.0)
                pending.append(tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.unsqueeze(0))
                if len(pending) == BATCH:
                    torch.stack(pending)
                    images, pending = images + BATCH, []
                    if images == wanted:
                        return images / (time.perf_counter() - started)
    raise SystemExit(f"{shards} holds fewer than {wanted} images: use more --images or fewer --batches")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batches", type=int, default=40, help="micro-batches of 64 timed per row")
    parser.add_argument("--repeats", type=int, default=2, help="best of N, interleaved (shared, noisy machines)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a data worker has one core; so does the bare loop
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read only, never written

    source = OUT / "corpus"
    if not source.exists() or len(list(source.iterdir())) != args.images:
        make_corpus(source, args.images)
    rows = []
    for name, size, mode, image_format in SHAPES:
        shards = build(source, size, mode, image_format)
        best = {"bare": 0.0, "loader": 0.0}
        for _ in range(args.repeats):
            best["bare"] = max(best["bare"], bare_rate(shards, args.batches))
            best["loader"] = max(best["loader"], loader_rate(shards, args.batches))
        ratio = best["loader"] / best["bare"]
        rows.append([name, f"{best['bare']:.0f}", f"{best['loader']:.0f}", f"{ratio:.2f}", ">= 0.90"])
    table = markdown_table(["shards", "bare loop images/s", "loader, 1 worker, images/s", "ratio", "target"], rows)
    body = f"""## The training loader, one worker (`bench/loader.py`)

{machine()}. {args.batches} micro-batches of {BATCH} after 3 of warm-up, best of {args.repeats}, interleaved; the
photographs of bench/shards_build.py in shards of 500. Loader: `training_loader` with 1 worker (random
access, decode, flip, collate, hand-over to this process); bare: the same shards' members in file order,
decoded with PIL into the same tensors in this process. One thread each.

{table}
"""
    print(body)
    write_section("loader", body)


if __name__ == "__main__":
    main()
