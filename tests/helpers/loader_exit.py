"""A process that reads the trainer's data stream with 2 DataLoader workers, then ends as MODE says:

exit             returns normally; with EXIT_HOOK_FIRST=1, multiprocessing's own exit hook (terminate
                 daemonic children, then join them) is moved to run before every other exit hook
wait             waits for the file REPORT.go, then reads 3 more micro-batches and returns
sleep            sleeps until it is killed

It first writes REPORT: {"workers": [pids], "parent": its pid}; then, in `wait` mode, REPORT.after.
"""

import atexit
import json
import multiprocessing
import multiprocessing.util
import os
import sys
import time
from pathlib import Path

from pipeline.data.stream import StreamLayout, training_loader
from shards.read.reader import open_split

shards, report, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
split = open_split(shards)
counts = tuple(shard["count"] for shard in split.shards)
layout = StreamLayout(counts, seed=3, shuffle_shards=2, world_size=1, batch_size=2)
batches = iter(training_loader(split, layout, rank=0, start=0, workers=2))
next(batches), next(batches)
workers = [child.pid for child in multiprocessing.active_children()]
report.write_text(json.dumps({"workers": workers, "parent": os.getpid()}))
if mode == "exit" and os.environ.get("EXIT_HOOK_FIRST") == "1":
    atexit.unregister(multiprocessing.util._exit_function)
    atexit.register(multiprocessing.util._exit_function)  # exit hooks run last-registered first
elif mode == "wait":
    while not Path(f"{report}.go").exists():
        time.sleep(0.05)
    sizes = [len(next(batches).images) for _ in range(3)]
    Path(f"{report}.after").write_text(json.dumps(sizes))
elif mode == "sleep":
    time.sleep(3600)
