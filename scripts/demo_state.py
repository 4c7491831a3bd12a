"""What `scripts/demo.sh` is about to do with its run folder, read from `pipeline train --dry-run` on stdin:
"fresh" (no checkpoint), "resume STEP" (an unfinished run's last checkpoint) or "finished"."""

from __future__ import annotations

import re
import sys

import yaml


def main() -> int:
    report = sys.stdin.read()
    found = re.search(r"the run would resume from .* \(step (\d+)\)", report)
    if found is None:
        print("fresh")
        return 0
    step = int(found.group(1))
    total = yaml.safe_load(report).get("max_steps")  # the run's length in steps, max_images resolved
    print("finished" if total is not None and step >= total else f"resume {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
