"""`shards ARGS...`, SIGKILLed with its workers (its whole process group: run it as a group leader) once
its writers have taken KILL_AFTER_SAMPLES samples, or once it has journalled KILL_AFTER_RECORDS shards
(a build on Ray, whose samples are taken in the tasks): a kill at an exact moment, wherever that falls
(mid-shard, or just after a shard was journaled), however fast the machine builds."""

import os
import signal
import sys

from shards.build import journal
from shards.build import work as build
from shards.cli import main

counted = 0


def dying_after(method, limit: int):
    def counting(self, *args) -> None:
        global counted
        method(self, *args)
        counted += 1
        if counted == limit:
            os.killpg(0, signal.SIGKILL)

    return counting


if __name__ == "__main__":  # not in the build's worker processes, which import this module anew
    if "KILL_AFTER_SAMPLES" in os.environ:
        build.SplitWriter.consume = dying_after(build.SplitWriter.consume, int(os.environ["KILL_AFTER_SAMPLES"]))
    else:
        journal.Journal.append = dying_after(journal.Journal.append, int(os.environ["KILL_AFTER_RECORDS"]))
    sys.exit(main(sys.argv[1:]))
