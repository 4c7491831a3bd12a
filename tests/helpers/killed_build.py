"""`shards build ARGS...`, SIGKILLed with its workers (its whole process group: run it as a group leader)
once its writers have taken KILL_AFTER_SAMPLES samples: a kill at an exact moment, wherever that falls
(mid-shard, or just after a shard was journaled), however fast the machine builds."""

import os
import signal
import sys

from shards import build
from shards.cli import main

kill_after = int(os.environ["KILL_AFTER_SAMPLES"])
consume, taken = build.SplitWriter.consume, 0


def consume_then_die(self, result: tuple) -> None:
    global taken
    consume(self, result)
    taken += 1
    if taken == kill_after:
        os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":  # not in the build's worker processes, which import this module anew
    build.SplitWriter.consume = consume_then_die
    sys.exit(main(sys.argv[1:]))
