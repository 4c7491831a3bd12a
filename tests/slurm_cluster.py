"""A one-machine SLURM from Debian's packages (munge, slurmctld, slurmd), for the tests that run
launch/slurm.sbatch for real: its own munge key and socket, state and spool folders under a test's folder,
free ports, every daemon bound to 127.0.0.1 (CommunicationParameters=NoInAddrAny), all of them in the
foreground under conftest.started, so that they and every job process end with the test."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import TAG, kill_tagged, started
from servers import free_port, wait_for_port

SBIN = ("/usr/sbin", "/usr/bin")
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


def program(name: str) -> str:
    found = shutil.which(name) or next(
        (f"{folder}/{name}" for folder in SBIN if os.path.exists(f"{folder}/{name}")), None
    )
    if found is None:
        raise RuntimeError(
            f"{name} is not installed: scripts/test.sh installs slurmctld, slurmd, slurm-client and munge"
        )
    return found


@dataclass
class Slurm:
    conf: Path
    tag: str  # every job runs with it, so that conftest.kill_tagged ends what a job leaves behind

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "SLURM_CONF": str(self.conf), TAG: self.tag}

    def command(self, *arguments: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            list(arguments), env=self.environment(env or dict(os.environ)), capture_output=True, text=True, timeout=60
        )
        if result.returncode:
            raise RuntimeError(f"{' '.join(arguments)}: {result.stderr.strip()}")
        return result.stdout

    def submit(self, *arguments: str, env: dict[str, str]) -> int:
        output = self.command(program("sbatch"), "--parsable", *arguments, env=env)
        return int(output.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """scontrol's fields of the job (JobState, ExitCode, ...)."""
        text = self.command(program("scontrol"), "show", "job", str(job_id), "--oneliner")
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: int, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields["JobState"] in FINISHED:
                return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {fields['JobState']} after {timeout} s")


@contextlib.contextmanager
def one_machine_slurm(work: Path, cpus: int) -> Iterator[Slurm]:
    work.mkdir(parents=True)
    for folder in ("state", "spool", "munge"):
        (work / folder).mkdir()
    os.chmod(work / "munge", 0o700)
    key = work / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    host = socket.gethostname().split(".")[0]
    munge_socket = work / "munge" / "socket"
    ctld_port, slurmd_port = free_port(), free_port()
    conf = work / "slurm.conf"
    conf.write_text(
        f"""ClusterName=tests
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation={work}/state
SlurmdSpoolDir={work}/spool
SlurmctldPidFile={work}/slurmctld.pid
SlurmdPidFile={work}/slurmd.pid
SlurmctldLogFile={work}/slurmctld.log
SlurmdLogFile={work}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=tests Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    tag = uuid.uuid4().hex
    environment = {**os.environ, "SLURM_CONF": str(conf), TAG: tag}
    munged = [program("munged"), "--foreground", "--force", f"--socket={munge_socket}", f"--key-file={key}"]
    munged += [f"--pid-file={work}/munge/pid", f"--log-file={work}/munge/log", f"--seed-file={work}/munge/seed"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": environment}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(started(munged, **quiet))
            deadline = time.monotonic() + 30
            while not munge_socket.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            controller = stack.enter_context(started([program("slurmctld"), "-D", "-f", str(conf)], **quiet))
            wait_for_port(ctld_port, controller, "slurmctld")
            node = stack.enter_context(started([program("slurmd"), "-D", "-f", str(conf)], **quiet))
            wait_for_port(slurmd_port, node, "slurmd")
            slurm = Slurm(conf, tag)
            deadline = time.monotonic() + 60
            while "idle" not in slurm.command(program("sinfo"), "--noheader", "--format=%t"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the node never became idle; see {work}/slurmctld.log")
                time.sleep(0.2)
            yield slurm
    finally:
        kill_tagged(tag)  # job steps and whatever they started
