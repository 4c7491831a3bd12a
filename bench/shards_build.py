"""`shards build` against a bare PIL loop doing the same decode, crop, resize and encode, on the
same real photographs, in the same run; and peak memory of builds of 1,000 and 10,000 images.

    python bench/shards_build.py [--images 4000] [--repeats 2]

Corpus: the real photographs that ship inside scikit-image and scikit-learn (JPEG and PNG,
300-800 px), hard-linked to --images input files. Output: a table, and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image
from report import machine, markdown_table, write_section

OUT = Path(__file__).resolve().parent / "out" / "shards_build"
SIZE = 64


def photographs() -> list[Path]:
    import skimage.data
    import sklearn.datasets

    skimage_dir = Path(skimage.data.__file__).parent
    names = [
        "astronaut.png",
        "chelsea.png",
        "coffee.png",
        "rocket.jpg",
        "retina.jpg",
        "hubble_deep_field.jpg",
        "motorcycle_left.png",
        "motorcycle_right.png",
        "immunohistochemistry.png",
        "ihc.png",
        "camera.png",
        "coins.png",
        "moon.png",
        "page.png",
        "horse.png",
        "brick.png",
        "grass.png",
        "gravel.png",
    ]
    found = [skimage_dir / name for name in names if (skimage_dir / name).exists()]
    found += sorted((Path(sklearn.datasets.__file__).parent / "images").glob("*.jpg"))
    return found


def make_corpus(folder: Path, count: int) -> list[Path]:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    sources = photographs()
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        path = folder / f"{index:05d}{source.suffix}"
        os.link(source, path)
        paths.append(path)
    return paths


def bare_loop(paths: list[Path]) -> float:
    """The same work written as directly as possible; returns images/s."""
    start = time.perf_counter()
    total = 0
    for path in paths:
        image = Image.open(path)
        if image.format == "JPEG":
            scale = 2 * SIZE / min(image.size)
            if scale < 1:
                image.draft(image.mode, (math.ceil(image.width * scale), math.ceil(image.height * scale)))
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        box = (left, top, left + side, top + side)
        image = image.resize((SIZE, SIZE), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        total += len(buffer.getvalue())
    assert total > 0
    return len(paths) / (time.perf_counter() - start)


def bare_loop_two_processes(paths: list[Path]) -> float:
    """The bare loop on two halves at once: what two processes can do on this machine at best."""
    halves = [paths[0::2], paths[1::2]]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(len, [[], []])  # start both before timing
        start = time.perf_counter()
        pool.map(bare_loop, halves)
        return len(paths) / (time.perf_counter() - start)


class PeakRss:
    """Peak resident memory of a process and its children, summed, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        pids, index = [self.pid], 0
        while index < len(pids):
            try:
                children = Path(f"/proc/{pids[index]}/task/{pids[index]}/children").read_text().split()
            except OSError:
                children = []
            pids += [int(child) for child in children]
            index += 1
        return pids

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self._tree():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) * 1024
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def shards_build(source: Path, workers: int, count: int) -> tuple[float, int]:
    """Run the real CLI; returns (images/s over the whole command, peak RSS of its process tree)."""
    out = OUT / f"shards-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "shards",
        "build",
        str(source),
        str(out),
        "--workers",
        str(workers),
        "--size",
        str(SIZE),
    ]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rss = PeakRss(process.pid)
    _, errors = process.communicate()
    elapsed = time.perf_counter() - start
    peak = rss.stop()
    if process.returncode:
        raise SystemExit(f"shards build failed: {errors.decode()[-2000:]}")
    return count / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2, help="best of N, interleaved (shared, noisy machines)")
    args = parser.parse_args()

    source = OUT / "corpus"
    paths = make_corpus(source, args.images)
    best = {"bare": 0.0, "bare2": 0.0, "w1": 0.0, "w2": 0.0}
    for _ in range(args.repeats):
        best["bare"] = max(best["bare"], bare_loop(paths))
        best["bare2"] = max(best["bare2"], bare_loop_two_processes(paths))
        best["w1"] = max(best["w1"], shards_build(source, 1, len(paths))[0])
        best["w2"] = max(best["w2"], shards_build(source, 2, len(paths))[0])
    speed_rows = [
        ["bare PIL loop, 1 process", f"{best['bare']:.0f}", "1.00", ""],
        ["shards build --workers 1", f"{best['w1']:.0f}", f"{best['w1'] / best['bare']:.2f}", ">= 0.90"],
        ["shards build --workers 2", f"{best['w2']:.0f}", f"{best['w2'] / best['bare']:.2f}", ">= 1.80"],
        [
            "(reference) bare PIL loop, 2 processes on halves",
            f"{best['bare2']:.0f}",
            f"{best['bare2'] / best['bare']:.2f}",
            "the machine's ceiling for 2",
        ],
    ]

    memory_rows = []
    for count in (1000, 10000):
        corpus = OUT / f"corpus-{count}"
        make_corpus(corpus, count)
        rate, peak = shards_build(corpus, 2, count)
        memory_rows.append([f"{count:,}", f"{peak / 2**20:.0f}", f"{rate:.0f}"])
        shutil.rmtree(corpus)

    sources = photographs()
    speed = markdown_table(["what", "images/s", "ratio to bare loop", "target"], speed_rows)
    memory = markdown_table(["images", "peak RSS, all processes (MiB)", "images/s"], memory_rows)
    body = f"""## shards build (`bench/shards_build.py`)

{machine()}. {args.images} inputs hard-linked to {len(sources)} real photographs shipped by scikit-image and
scikit-learn (JPEG and PNG, 300-800 px), to {SIZE}x{SIZE} PNG with a centre crop. Rates are whole commands
(process start-up, listing, shards, manifest and fsyncs included), best of {args.repeats}, interleaved.

{speed}

Memory: peak resident memory of `shards build --workers 2` (main process plus its workers, summed):

{memory}
"""
    print(body)
    write_section("shards_build", body)


if __name__ == "__main__":
    main()
