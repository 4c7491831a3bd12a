"""Run under torchrun: read the trainer's data stream on this rank and record what it got."""

import hashlib
import json
import sys

import torch.distributed as dist

from pipeline.data.stream import StreamLayout, training_loader
from shards.read.reader import open_split

shards, batch, workers, start, steps, report = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    *map(int, sys.argv[4:6]),
    sys.argv[6],
)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
split = open_split(shards)
counts = tuple(shard["count"] for shard in split.shards)
layout = StreamLayout(counts, seed=3, shuffle_shards=2, world_size=world, batch_size=batch)
loader = training_loader(split, layout, rank, start=start, workers=workers)
seen = []
for _, batch in zip(range(steps), loader, strict=False):
    seen.append([hashlib.sha256(image.numpy().tobytes()).hexdigest()[:16] for image in batch.images])
with open(f"{report}.{rank}", "w") as file:
    json.dump({"steps_per_epoch": layout.steps_per_epoch, "seen": seen}, file)
dist.destroy_process_group()
