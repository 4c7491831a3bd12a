"""Run under torchrun: each rank reads the split through DataLoader workers and writes what it saw."""

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from shards.read.reader import open_split, webdataset

out, split, workers, report = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo")
loader = torch.utils.data.DataLoader(webdataset(open_split(out, split)), batch_size=None, num_workers=workers)
seen = [(hashlib.sha256(image.numpy().tobytes()).hexdigest(), label) for image, label in loader]
with open(f"{report}.{dist.get_rank()}", "w") as file:
    json.dump(seen, file)
dist.destroy_process_group()
