"""`shards build` against a bare PIL loop doing the same decode, crop, resize and encode, on the
same real photographs, in the same run; and peak memory of builds of 1,000 and 10,000 images.
With --distributed: the same build on Ray (a two-node cluster on this machine) and as three parts run
one after another, against `--workers 2` in the same run; and `shards plan` on 100,000 and 1,000,000
empty files (listing rate, plan bytes per input, peak memory).

    python bench/shards_build.py [--images 4000] [--repeats 2] [--distributed]

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


def shards(*args: str | Path, environment: dict | None = None) -> tuple[float, int]:
    """Run the real CLI; returns (seconds of the whole command, peak RSS of its process tree)."""
    command = [sys.executable, "-m", "shards", *map(str, args)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
    rss = PeakRss(process.pid)
    _, errors = process.communicate()
    elapsed = time.perf_counter() - start
    peak = rss.stop()
    if process.returncode:
        raise SystemExit(f"shards {args[0]} failed: {errors.decode()[-2000:]}")
    return elapsed, peak


def shards_build(source: Path, workers: int, count: int) -> tuple[float, int]:
    """Run the real CLI; returns (images/s over the whole command, peak RSS of its process tree)."""
    out = OUT / f"shards-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    elapsed, peak = shards("build", source, out, "--workers", workers, "--size", SIZE)
    return count / elapsed, peak


def ray_build(source: Path, address: str, count: int) -> float:
    out = OUT / "shards-ray"
    shutil.rmtree(out, ignore_errors=True)
    environment = {**os.environ, **RAY_ON_LOOPBACK}
    on_ray = ["--executor", "ray", "--ray-address", address]
    elapsed, _ = shards("build", source, out, "--size", SIZE, *on_ray, environment=environment)
    return count / elapsed


def parts_build(source: Path, parts: int, count: int) -> float:
    """plan, every part one after another (--workers 2 each), merge: images/s over all the commands."""
    out = OUT / "shards-parts"
    shutil.rmtree(out, ignore_errors=True)
    elapsed = shards("plan", source, out, "--size", SIZE)[0]
    for part in range(1, parts + 1):
        elapsed += shards("build", out, "--part", f"{part}/{parts}", "--workers", 2)[0]
    elapsed += shards("merge", out)[0]
    return count / elapsed


# Ray takes 127.0.0.1 as every node's address, not this machine's network address (tests/helpers/ray_cluster.py)
RAY_ON_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def two_node_cluster():
    """A head and a worker node of one CPU each on this machine, as Ray's own tests make them."""
    os.environ.update(RAY_ON_LOOPBACK)
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    return cluster


def planning(count: int) -> list[str]:
    """`shards plan` of `count` empty files (listing is what is measured): a row of the table."""
    corpus = OUT / f"empty-{count}"
    if not corpus.exists() or sum(1 for _ in corpus.rglob("*.jpg")) != count:
        shutil.rmtree(corpus, ignore_errors=True)
        for index in range(count):  # 1,000 folders of at most 1,000 files, as large sets are laid out
            folder = corpus / f"{index // 1000:04d}"
            if index % 1000 == 0:
                folder.mkdir(parents=True)
            (folder / f"{index:07d}.jpg").touch()
    out = OUT / f"plan-{count}"
    shutil.rmtree(out, ignore_errors=True)
    elapsed, peak = shards("plan", corpus, out, "--size", SIZE)
    plan_bytes = sum(path.stat().st_size for path in (out / ".plan").iterdir())
    rate = f"{count / elapsed:,.0f}"
    return [f"{count:,}", f"{elapsed:.1f}", rate, f"{plan_bytes / count:.1f}", f"{peak / 2**20:.0f}"]


def distributed(args: argparse.Namespace, paths: list[Path], source: Path) -> None:
    """Each ratio against --workers 2 measured in the same conditions: parts with no Ray running, Ray
    with the cluster up (its idle processes take a share of the two cores)."""
    best = {"w2": 0.0, "w2-ray": 0.0, "ray": 0.0, "parts": 0.0}
    for _ in range(args.repeats):
        best["w2"] = max(best["w2"], shards_build(source, 2, len(paths))[0])
        best["parts"] = max(best["parts"], parts_build(source, 3, len(paths)))
    cluster = two_node_cluster()
    try:
        for _ in range(args.repeats):
            best["w2-ray"] = max(best["w2-ray"], shards_build(source, 2, len(paths))[0])
            best["ray"] = max(best["ray"], ray_build(source, cluster.address, len(paths)))
    finally:
        cluster.shutdown()
    rows = [
        ["shards build --workers 2", f"{best['w2']:.0f}", "1.00", ""],
        [
            "plan, 3 parts in turn (--workers 2), merge",
            f"{best['parts']:.0f}",
            f"{best['parts'] / best['w2']:.2f}",
            ">= 0.90",
        ],
        ["shards build --workers 2, Ray cluster up", f"{best['w2-ray']:.0f}", "1.00", ""],
        ["--executor ray, 2 nodes x 1 CPU", f"{best['ray']:.0f}", f"{best['ray'] / best['w2-ray']:.2f}", ">= 0.85"],
    ]
    plan_rows = [planning(count) for count in (100_000, 1_000_000)]
    speed = markdown_table(["what", "images/s", "ratio to --workers 2", "target"], rows)
    plan_header = ["inputs", "shards plan (s)", "inputs listed/s", "plan bytes/input", "peak RSS (MiB)"]
    plans = markdown_table(plan_header, plan_rows)
    body = f"""## shards build on Ray and in parts (`bench/shards_build.py --distributed`)

{machine()}. The {args.images} inputs of the table above, to {SIZE}x{SIZE} PNG; whole commands (Ray: the driver's
start and connection included, the cluster already up), best of {args.repeats}, interleaved.

{speed}

Planning: `shards plan` of empty files (1,000 per folder): listing and writing the plan is what is measured.

{plans}
"""
    print(body)
    write_section("shards_distributed", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2, help="best of N, interleaved (shared, noisy machines)")
    parser.add_argument("--distributed", action="store_true", help="only the Ray, parts and planning rows")
    args = parser.parse_args()

    source = OUT / "corpus"
    paths = make_corpus(source, args.images)
    if args.distributed:
        distributed(args, paths, source)
        return
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
