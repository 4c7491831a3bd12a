"""What checking a cached shard's sha256 each time it is opened costs, against decoding its images.

    python bench/cache_check.py [--images 4000] [--batches 40] [--repeats 3]

The node cache (shards/read/shard_cache.py) opens a cached shard once per data worker and shard group, and reads
its samples from it; a copy replaced or damaged on disk since it was fetched must not be read as the shard
the manifest names. The cheap check (the size) catches truncation only; the full one (sha256 of the whole
file) catches any change. Rows: the shards of bench/loader.py (the photographs of bench/shards_build.py at
32x32 grayscale PNG, 64x64 RGB PNG and 64x64 RGB JPEG, shards of 500); decode: the bare loop of
bench/loader.py (file order, PIL, uint8 tensors), images/s; sha256: every shard's file hashed (warm page
cache, as a just-fetched or recently read shard is), images/s; the last column is the share of a worker's
time the full check adds when every sample of a shard is read once per open (decode / sha256 rate).
Writes its table to docs/benchmarks.md.
"""

from __future__ import annotations

import time

from loader import arguments, bare_rate, shard_sets
from report import machine, markdown_table, write_section

from shards.read.reader import open_split
from shards.regular_files import file_sha256


def hash_rate(shards) -> float:
    """images/s of hashing every shard of the split whole (the second pass: the page cache warm)."""
    split = open_split(shards)
    paths = [shards / shard["name"] for shard in split.shards]
    for path in paths:
        file_sha256(path)
    started = time.perf_counter()
    for path in paths:
        file_sha256(path)
    return split.count / (time.perf_counter() - started)


def main() -> None:
    args = arguments(__doc__, repeats=3)
    rows = []
    for name, shards in shard_sets(args.images):
        decode = hashing = 0.0
        for _ in range(args.repeats):
            decode = max(decode, bare_rate(shards, args.batches))
            hashing = max(hashing, hash_rate(shards))
        rows.append([name, f"{decode:.0f}", f"{hashing:.0f}", f"{100 * decode / hashing:.1f} %"])
    table = markdown_table(["shards", "decode images/s", "sha256 images/s", "full check adds"], rows)
    body = f"""## Checking a cached shard when it is opened (`bench/cache_check.py`)

{machine()}. Best of {args.repeats}, interleaved, one thread. Decode: bench/loader.py's bare loop over
{args.batches} micro-batches of 64; sha256: every shard's whole file hashed from a warm page cache. The last
column is what the full check at each open adds to a data worker's time when it reads every sample of the
shard once per open (the training order does: a worker opens each shard of its group once per epoch).

{table}
"""
    print(body)
    write_section("cache-check", body)


if __name__ == "__main__":
    main()
