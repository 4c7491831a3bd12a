"""Train a model plugin on shards.

accelerate launch [--config_file launch/accelerate/...] -m pipeline.train --config FILE [key.sub=value ...]
python -m pipeline.train --config FILE [...]        # one process
pipeline train --config FILE [...]                  # the same
pipeline train --config FILE [...] --dry-run        # check everything start-up checks, print the
                                                    # resolved config, train nothing, write nothing
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import signal
import sys
import tempfile
import traceback
from pathlib import Path
from typing import NoReturn

import torch

from pipeline.config.loading import load_config
from pipeline.data.workers import die_with_parent
from pipeline.engine.deepspeed_internals import check_versions
from pipeline.errors import ConfigError
from pipeline.launch import LAUNCHER_PID
from pipeline.training import stop_cause
from pipeline.training.resolved_run import resolve_run
from pipeline.training.rollback import RECORD
from pipeline.training.run_lock import RunLock, wait_for_first_rank
from shards.command_line import ArgumentParser, one_line
from shards.errors import UserError, UserStop, without_credentials


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the run's YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config values")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, plugin options, shards, output folder and DeepSpeed config as a start would, print "
        "the resolved config (every default filled in) and exit 0, or 2 with the one line; writes nothing",
    )


def prepare_output_dir(output_dir: Path, resuming: bool, resume: str, lock: RunLock | None) -> None:
    """lock: the run folder's lock on the first process, which alone creates and changes the folder
    before training starts; None on the others, which only check that they could write there."""
    holds_a_run = (output_dir / "metrics.jsonl").exists() and not resuming
    if holds_a_run and resume == "none":
        raise ConfigError(
            f"output_dir: {output_dir} already holds a run (metrics.jsonl) and resume=none; "
            "choose another output_dir, or resume=auto to continue it"
        )
    try:
        if lock is None:
            folder = next(folder for folder in (output_dir, *output_dir.parents) if folder.exists())
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            return
        lock.take()
        with tempfile.NamedTemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise ConfigError(f"output_dir: cannot write to {output_dir}: {error.strerror or error}") from None
    if holds_a_run:
        warn(f"{output_dir} holds a run without a usable checkpoint: starting it again from step 0")
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
        (output_dir / RECORD).unlink(missing_ok=True)  # its rollbacks were of the run that is gone


def warn(message: str) -> None:
    """Every rank checks the same things; one of them says so."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pipeline train: warning: {one_line(message)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    die_with_launcher()
    output_dir = None
    try:
        # Everything a user can get wrong is checked first, before a process group or engine exists
        # (resolved_run.py); the rest of this function is the process's life around the trainer.
        check_versions()
        config = load_config(args.config, args.overrides)
        output_dir = config.output_dir
        # one process holds the run folder, from before anything reads it to the run's end (run_lock.py)
        rank_zero = int(os.environ.get("RANK", "0")) == 0
        lock = RunLock(config.output_dir, warn) if rank_zero and not args.dry_run else None
        if lock is not None:
            lock.take_if_present()
        resolved = resolve_run(config, args.config, check_shards=rank_zero, warn=warn)
        resuming = resolved.resume is not None
        if args.dry_run:
            prepare_output_dir(config.output_dir, resuming, config.resume, None)  # checks, writes nothing
            print(resolved.report())
            return 0
        # last: a rejected config leaves no folder behind
        prepare_output_dir(config.output_dir, resuming, config.resume, lock)
        if lock is not None:
            stop_cause.clear(config.output_dir)
        else:
            wait_for_first_rank(config.output_dir, config.faults.collective_timeout_minutes * 60)
        from pipeline.training.trainer import Trainer  # heavy (DeepSpeed): only once all that is sound

        Trainer(resolved).train()
    except (UserError, UserStop) as error:
        line = f"pipeline train: error: {one_line(str(error))}"
        if not torch.distributed.is_initialized():
            say_once(line)
            return 2
        stop_cause.leave(output_dir, torch.distributed.get_rank(), line)  # before the peers see this rank gone
        say_once(line)
        return leave_without_finalization(2)
    except Exception as error:
        if not torch.distributed.is_initialized():
            raise
        # The launcher, which saw the same peer die, stops this rank with SIGTERM meanwhile; the trainer's
        # SIGTERM handler is gone by now, and dying of it would lose the line that says why
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rank = torch.distributed.get_rank()
        first_line = without_credentials((str(error).splitlines() or [""])[0])
        cause = stop_cause.find(output_dir) if output_dir is not None else None
        if cause is not None:  # a peer stopped on a user's error: its line first, this rank's fault after
            print(
                f"{cause[1]} (rank {cause[0]} stopped on it; rank {rank} then on {type(error).__name__}: "
                f"{first_line[:200]})",
                file=sys.stderr,
            )
            leave_without_finalization(2)  # the run's cause is the user's: the launcher adds nothing to it
        # a fault (another rank died: "Connection reset by peer") or a bug: the traceback for the latter,
        # then one line, then out at once (waiting for a dead peer in the teardown would hang)
        print(without_credentials(traceback.format_exc()), end="", file=sys.stderr)
        print(
            f"pipeline train: error: rank {rank} stopped on {type(error).__name__}: "
            f"{first_line[:300]} (if another rank died first, its log says why; resume=auto continues from the "
            "last checkpoint)",
            file=sys.stderr,
        )
        leave_without_finalization(1)
    leave_without_finalization(0)


def say_once(line: str) -> None:
    """Every rank checks the same config, so under a launcher each local rank finds the same error: the
    first to say a line says it, the others stay quiet. They agree through a file named after the line,
    created exclusively in the folder torch's launcher makes for this attempt's ranks (each rank's
    TORCHELASTIC_ERROR_FILE is FOLDER/<local rank>/error.json). A different line (a rank-specific fault)
    is still said."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # "" when the launcher keeps no logs
    if error_file:
        said = Path(error_file).parent.parent / f"said-{hashlib.sha256(line.encode()).hexdigest()[:16]}"
        try:
            os.close(os.open(said, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        except OSError:
            pass
    print(line, file=sys.stderr)


def die_with_launcher() -> None:
    """A rank started by a launcher (LOCAL_RANK set) is SIGKILLed when its launcher dies, as its data
    workers are when it dies. torch's launcher starts each rank in a session of its own, so killing the
    launcher's process group (Ctrl-C aside: a `kill -9`, the OOM killer) used to leave the ranks training
    on, and a relaunch then ran beside them in the same folder. SIGKILL rather than SIGTERM: a launcher
    that had a chance to stop its ranks did (it forwards SIGTERM, and SIGINT stops them); one that died
    without could not have, and a rank left to checkpoint alone may wait in a collective for a peer that
    is gone until the collective timeout, holding the run folder. Nothing is lost that a checkpoint
    holds: commits are atomic. A rank run by hand is left alone: its parent is a shell (nohup)."""
    if "LOCAL_RANK" not in os.environ:
        return
    # torch's launcher starts the ranks from its main thread, which lives as long as the launcher:
    # the signal comes when that thread ends. pipeline.launch says who it is, so that a rank started
    # by a launcher that died before the signal was armed knows it too.
    launcher = int(os.environ.get(LAUNCHER_PID) or os.getppid())
    die_with_parent()
    if os.getppid() != launcher:
        os._exit(1)


def leave_without_finalization(status: int) -> NoReturn:
    """Exit at once, skipping the interpreter's teardown. DeepSpeed keeps references to gloo process
    groups after they are destroyed, so their C++ objects die during interpreter finalization; in about
    one 2-rank CPU run in 50 a rank then aborted ("terminate called without an active exception") after a
    successful run, and the launcher reported a failure. After a failure, a teardown may also wait for a
    rank that is gone. Everything is written, fsynced and closed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="pipeline.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
