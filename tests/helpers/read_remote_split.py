"""Read every sample of a remote split through the node-local cache, as a rank's worker would, and write
their hashes (and this process's fetch counters) to a JSON file: URL CACHE_DIR REPORT."""

import hashlib
import json
import sys
from pathlib import Path

from shards.read.random_access import SplitDataset
from shards.read.reader import open_split
from shards.store.remote import RemoteAccess, take_counters

url, cache_dir, report = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
dataset = SplitDataset(open_split(url, "train", RemoteAccess(cache_dir=cache_dir)), max_open=2)
hashes = [hashlib.sha256(dataset[index][0].numpy().tobytes()).hexdigest() for index in range(len(dataset))]
Path(report).write_text(json.dumps({"hashes": hashes, "counters": take_counters()}))
