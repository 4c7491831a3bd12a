"""A stand-in for SLURM's `sbatch --wrap` that runs the job at once, on this machine: for testing the
commands and the quoting of launch/shards-array.sbatch (not SLURM itself).

An array job (--array=A-B[%M]) runs its command once per task, last task first (parts run in any order),
with SLURM_ARRAY_TASK_ID and SLURM_CPUS_PER_TASK set; --dependency=afterok:ID runs the job only if job ID
and all its tasks succeeded. Prints the new job's id, as --parsable does; each submission is appended to
the JSON lines file $FAKE_SBATCH_LOG.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--array")
parser.add_argument("--dependency")
parser.add_argument("--wrap", required=True)
parser.add_argument("--cpus-per-task", default="1")
parser.add_argument("--parsable", action="store_true")
options, _ = parser.parse_known_args()

log = Path(os.environ["FAKE_SBATCH_LOG"])
jobs = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
job_id = 1000 + len(jobs)
succeeded = True
if options.dependency:
    kind, needed = options.dependency.split(":")
    assert kind == "afterok", options.dependency
    succeeded = any(job["id"] == int(needed) and job["succeeded"] for job in jobs)
tasks = [None]
if options.array:
    first, last = map(int, re.fullmatch(r"(\d+)-(\d+)(%\d+)?", options.array).groups()[:2])
    tasks = list(range(last, first - 1, -1))
ran = []
if succeeded:
    for task in tasks:
        environment = {**os.environ, "SLURM_JOB_ID": str(job_id), "SLURM_CPUS_PER_TASK": options.cpus_per_task}
        if task is not None:
            environment["SLURM_ARRAY_TASK_ID"] = str(task)
        job = subprocess.run(["bash", "-c", options.wrap], env=environment, stdout=sys.stderr)  # not the job id
        ran.append(job.returncode)
entry = {"id": job_id, "wrap": options.wrap, "array": options.array, "dependency": options.dependency}
entry.update(ran=len(ran), succeeded=succeeded and not any(ran))
with open(log, "a") as file:
    file.write(json.dumps(entry) + "\n")
print(job_id)
sys.exit(0)
