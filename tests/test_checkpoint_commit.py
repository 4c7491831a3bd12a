"""The checkpoint commit's order, in-process and in seconds. A save (pipeline/checkpoints/writer.py's
`CheckpointWriter` with one rank, on top of an earlier complete checkpoint, in the caller's thread and in
its background thread: checkpoint.async) runs the real `write_tensor_files`, `write_durably`, `commit` and
`prune`, with every operation its durability depends on recorded: writes, fsyncs, renames, the `latest`
symlink, deletions. Then:
- the order: each file fsynced before its folder, the folder before its rename, the rename made durable
  before `latest` names it, `latest` swapped atomically and last, and that swap made durable;
- a crash at each recorded operation in turn (it and everything after it raise OSError, as if the process
  died there): a resuming run finds a complete checkpoint, the previous or the new one; `latest` names a
  complete one or nothing; no step-N folder is incomplete; and the next save of that step succeeds.
tests/test_checkpoints.py kills real runs; this checks every point of the commit that such kills rarely hit.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

from pipeline.checkpoints import checkpoint
from pipeline.checkpoints.optimizer_state import partition_file
from pipeline.checkpoints.writer import CheckpointWriter, TakenSave
from pipeline.engine import rng
from pipeline.errors import CheckpointError

PREVIOUS, STEP = 2, 4
OLD, NEW = checkpoint.folder_name(PREVIOUS), checkpoint.folder_name(STEP)
STAGING = checkpoint.staging_folder(Path(), STEP).name
OPTIMIZER = checkpoint.OPTIMIZER_FOLDER
ROOT = "."
# "new step": step 4 saved after step 2. "re-reached step": a run resumed from step 2 saves step 4 again,
# over the step 4 of the timeline it abandoned (commit's other branch).
SCENARIOS = ["new step", "re-reached step"]


def injected_crash(op: tuple) -> OSError:
    return OSError(errno.EIO, "injected crash", str(op))


class Recorder:
    """Records, as tuples of names relative to the checkpoints root, each durability-relevant operation on
    a path under it. With `crash_at` = k, the process dies at the k-th: it raises OSError (a write leaves
    half its file), and so does every later one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root: Path | None = None
        self.ops: list[tuple] = []
        self.crash_at: int | None = None
        self.lock = threading.Lock()  # write_tensor_files writes and fsyncs in threads
        for module, name in [(os, "fsync"), (os, "replace"), (os, "rename"), (os, "symlink"), (os, "unlink")]:
            monkeypatch.setattr(module, name, getattr(self, name)(getattr(module, name)))
        monkeypatch.setattr(os, "mkdir", self.mkdir(os.mkdir))
        monkeypatch.setattr(shutil, "rmtree", self.rmtree(shutil.rmtree))
        monkeypatch.setattr(checkpoint, "save_file", self.save_file(checkpoint.save_file))
        monkeypatch.setattr(checkpoint, "write_durably", self.write_durably(checkpoint.write_durably))

    def start(self, root: Path, crash_at: int | None = None) -> None:
        self.root, self.ops, self.crash_at = root, [], crash_at

    def stop(self) -> list[tuple]:
        self.root = None
        return self.ops

    def name(self, path) -> str | None:
        if self.root is None:
            return None
        relative = os.path.relpath(os.path.abspath(os.fspath(path)), self.root)
        return None if relative.startswith("..") else relative

    def reach(self, op: tuple) -> bool:
        """Record `op`; True if the process dies at it; raises if it died before."""
        with self.lock:
            index = len(self.ops)
            self.ops.append(op)
        if self.crash_at is None or index < self.crash_at:
            return False
        if index == self.crash_at:
            return True
        raise injected_crash(op)

    def do(self, op: tuple, run, *args, **kwargs):
        """Run `run` unless the process dies at `op` (not recorded when its path is outside the root)."""
        if op[1] is not None and self.reach(op):
            raise injected_crash(op)
        return run(*args, **kwargs)

    def fsync(self, original):
        return lambda fd: self.do(("fsync", self.name(os.readlink(f"/proc/self/fd/{fd}"))), original, fd)

    def replace(self, original):
        def replace(source, target, **kwargs):
            linked = os.readlink(source) if os.path.islink(source) else None
            op = ("rename", self.name(source), self.name(target), linked)
            return self.do(op, original, source, target, **kwargs)

        return replace

    rename = replace  # both atomic on POSIX: recorded alike

    def symlink(self, original):
        def symlink(target, link, *args, **kwargs):
            return self.do(("symlink", self.name(link), os.fspath(target)), original, target, link, *args, **kwargs)

        return symlink

    def unlink(self, original):  # calls with dir_fd are rmtree's, inside its one recorded operation
        def unlink(path, *, dir_fd=None):
            return self.do(("unlink", None if dir_fd is not None else self.name(path)), original, path, dir_fd=dir_fd)

        return unlink

    def mkdir(self, original):
        def mkdir(path, mode=0o777, *, dir_fd=None):
            return self.do(
                ("mkdir", None if dir_fd is not None else self.name(path)), original, path, mode, dir_fd=dir_fd
            )

        return mkdir

    def rmtree(self, original):
        return lambda path, *args, **kwargs: self.do(("rmtree", self.name(path)), original, path, *args, **kwargs)

    def save_file(self, original):
        def save_file(tensors, filename, metadata=None):
            if self.name(filename) is not None and self.reach(("write", self.name(filename))):
                data = save(tensors, metadata)
                Path(filename).write_bytes(data[: len(data) // 2])
                raise injected_crash(("write", filename))
            return original(tensors, filename, metadata=metadata)

        return save_file

    def write_durably(self, original):
        def write_durably(path: Path, text: str) -> None:
            if self.name(path) is not None and self.reach(("write", self.name(path))):
                path.write_text(text[: len(text) // 2])
                raise injected_crash(("write", path))
            original(path, text)

        return write_durably


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    return Recorder(monkeypatch)


def tensor_files(version: int) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "encoder.safetensors": {"weight": torch.full((3, 4), float(version))},
        "decoder.safetensors": {"weight": torch.full((4, 3), -float(version)), "bias": torch.zeros(3)},
        f"{OPTIMIZER}/{partition_file(0)}": {"exp_avg": torch.full((7,), float(version))},
    }


def trainer_state(step: int, version: int) -> dict:
    return {
        "format_version": checkpoint.FORMAT_VERSION,
        "plugin": "vae",
        "step": step,
        "images": 8 * step,
        "data": {
            "micro_step": step,
            "epoch": 0,
            "sample_in_epoch": 0,
            "global_batch": 8,
            "samples": 80,
            "seed": 0,
            "shuffle_shards": 1,
        },
        "engine": dict.fromkeys(("global_steps", "global_samples", "micro_steps", "skipped_steps"), 0),
        "ranks": [{"rng": rng.capture(), "plugin": {}}],  # a state a resume could use (trainer_state.py)
        "version": version,  # which save wrote it
    }


def save_checkpoint(root: Path, step: int, version: int, protected: Path | None, background: bool = False) -> Path:
    """A one-rank CheckpointWriter's save of tiny tensors marked `version` (keep_last 1); `background`: in its
    thread, while this one changes the tensors it was given (training going on), then waits for it."""
    files = {name: (tensors, {"plugin": "vae"}) for name, tensors in tensor_files(version).items()}
    description = json.dumps({"plugin": "vae"}) + "\n"
    taken = TakenSave(step, checkpoint.staging_folder(root, step), files, description, trainer_state(step, version))
    writer = CheckpointWriter(root, 1, protected, rank=0, world_size=1, background=background)
    try:
        if not background:
            return writer.write(taken)
        copies = {
            name: ({key: value.clone() for key, value in tensors.items()}, meta)
            for name, (tensors, meta) in files.items()
        }
        taken.files = copies  # what Checkpointer takes: copies of its own
        assert writer.write(taken) is None  # at once: the write is in flight
        for tensors, _ in files.values():
            for value in tensors.values():
                value.add_(1000)  # the live tensors move on; the checkpoint must hold the copies
        return writer.wait()
    finally:
        writer.close(report=False)


def prepare(output_dir: Path, scenario: str) -> tuple[Path, Path | None, int, set[tuple[str, int]]]:
    """The checkpoints already there; returns the root, the checkpoint the run resumed from, the version
    the save under test writes, and every (folder, version) a resuming run may take."""
    root = checkpoint.checkpoints_root(output_dir)
    save_checkpoint(root, PREVIOUS, 1, None)
    if scenario == "new step":
        return root, None, 2, {(OLD, 1), (NEW, 2)}
    save_checkpoint(root, STEP, 2, root / OLD)  # the abandoned timeline's step 4
    return root, root / OLD, 3, {(OLD, 1), (NEW, 2), (NEW, 3)}


def at(ops: list[tuple], *op) -> int:
    """Where an operation starting with `op` was done last."""
    found = [index for index, done in enumerate(ops) if done[: len(op)] == op]
    assert found, f"never done: {op}; done: {ops}"
    return found[-1]


def first_after(ops: list[tuple], start: int, *op) -> int:
    found = [index for index, done in enumerate(ops) if index > start and done[: len(op)] == op]
    assert found, f"never done after {ops[start]}: {op}; done: {ops}"
    return found[0]


def moves_latest(op: tuple) -> bool:
    return (op[0] == "rename" and op[2] == checkpoint.LATEST) or (op[0] == "symlink" and op[1] == checkpoint.LATEST)


@pytest.mark.parametrize("background", [False, True], ids=["synchronous", "async"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_save_makes_each_step_durable_before_the_next_relies_on_it(
    tmp_path: Path, recorder, scenario, background: bool
) -> None:
    root, protected, version, _ = prepare(tmp_path.resolve() / "run", scenario)
    recorder.start(root)
    save_checkpoint(root, STEP, version, protected, background)
    ops = recorder.stop()
    for name, tensors in tensor_files(version).items():  # what was handed over, not what changed after
        saved = load_file(str(root / NEW / name))
        assert all(torch.equal(saved[key], value) for key, value in tensors.items()), name

    files = list(checkpoint.validate(root / NEW)["files"])
    assert f"{OPTIMIZER}/{partition_file(0)}" in files and "config.json" in files
    folder_synced, optimizer_synced = at(ops, "fsync", STAGING), at(ops, "fsync", f"{STAGING}/{OPTIMIZER}")
    state_written = at(ops, "write", f"{STAGING}/{checkpoint.STATE_FILE}")
    for name in [*files, checkpoint.STATE_FILE]:
        written, synced = at(ops, "write", f"{STAGING}/{name}"), at(ops, "fsync", f"{STAGING}/{name}")
        assert written < synced < folder_synced, f"{name}: written, fsynced, then its folder fsynced: {ops}"
        if name != checkpoint.STATE_FILE:
            assert synced < state_written, f"{name}: fsynced before trainer_state.json is written: {ops}"
        if name.startswith(f"{OPTIMIZER}/"):
            assert synced < optimizer_synced, f"{name}: fsynced before {OPTIMIZER}/ is: {ops}"

    renamed = at(ops, "rename", STAGING, NEW)
    assert folder_synced < renamed and optimizer_synced < renamed, f"folders fsynced before the rename: {ops}"
    root_synced = first_after(ops, renamed, "fsync", ROOT)

    pointing = [index for index, op in enumerate(ops) if moves_latest(op)]
    assert ("unlink", checkpoint.LATEST) not in ops, f"latest is never absent: replaced in one rename: {ops}"
    if scenario == "re-reached step":  # latest named the abandoned step 4: first the resumed-from step 2
        assert [ops[index][0] for index in pointing] == ["rename", "rename"], f"latest set twice: {ops}"
        aside = at(ops, "rename", NEW)
        assert ops[pointing[0]][3] == OLD and pointing[0] < first_after(ops, pointing[0], "fsync", ROOT) < aside, ops
        pointing = pointing[1:]
    assert [ops[index][0] for index in pointing] == ["rename"], f"latest set once, by a rename: {ops}"
    swapped = pointing[0]
    assert ops[swapped][3] == NEW, f"latest replaced by a symlink to {NEW}: {ops[swapped]}"
    assert renamed < root_synced < swapped, f"the rename into {NEW} durable before latest names it: {ops}"
    final_sync = first_after(ops, swapped, "fsync", ROOT)
    after = [op for op in ops[swapped + 1 :] if op != ("fsync", ROOT)]
    touched = [op for op in after if any(str(part).split("/")[0] in (STAGING, NEW) for part in op[1:3])]
    assert not touched, f"the new checkpoint changed after latest named it: {touched}"

    deleting = [index for index, op in enumerate(ops) if OLD in str(op[1])]
    if scenario == "new step":  # keep_last 1: prune deletes step 2, only once the new one is durable
        assert deleting and min(deleting) > final_sync, f"{OLD} deleted only after the final fsync: {ops}"
    else:  # the checkpoint the run resumed from is kept
        assert not deleting, ops


def check_resumable(output_dir: Path, known: set[tuple[str, int]], when: str) -> tuple[str, int]:
    """What a resuming run sees: a complete checkpoint it may take; returns its (folder, version)."""
    root = checkpoint.checkpoints_root(output_dir)
    for folder in sorted(root.glob("step-*")):
        try:
            checkpoint.validate(folder)
        except CheckpointError as error:
            pytest.fail(f"{when}: an incomplete {folder.name}: {error}")
    latest = root / checkpoint.LATEST
    assert latest.is_symlink(), f"{when}: latest is absent"  # at every moment it names a checkpoint
    assert latest.resolve().is_dir(), f"{when}: latest -> {os.readlink(latest)}, which is missing"
    assert checkpoint.step_of(latest.resolve()) is not None, f"{when}: latest -> {os.readlink(latest)}"
    warnings: list[str] = []
    found = checkpoint.find_resume(output_dir, "auto", warnings.append)
    assert found is not None and not warnings, f"{when}: {found} {warnings}"
    folder, state = found
    if latest.is_symlink():
        assert folder.resolve() == latest.resolve(), f"{when}: resumed from {folder.name}, not latest"
    taken = (folder.name, state["version"])
    assert taken in known, f"{when}: resumed from {taken}, not one of {sorted(known)}"
    for name, tensors in tensor_files(state["version"]).items():
        saved = load_file(str(folder / name))
        assert all(torch.equal(saved[key], value) for key, value in tensors.items()), f"{when}: {folder / name}"
    return taken


@pytest.mark.slow
@pytest.mark.parametrize("background", [False, True], ids=["synchronous", "async"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_crash_at_any_point_of_a_save_leaves_a_checkpoint_to_resume(
    tmp_path: Path, recorder, scenario, background: bool
) -> None:
    base = tmp_path.resolve()
    _, resumed, version, known = prepare(base / "before", scenario)

    def copy_of_before(name: str) -> tuple[Path, Path | None]:
        shutil.copytree(base / "before", base / name, symlinks=True)  # latest is a relative link: still valid
        root = checkpoint.checkpoints_root(base / name)
        return root, root / OLD if resumed else None

    root, protected = copy_of_before("clean")
    recorder.start(root)
    save_checkpoint(root, STEP, version, protected, background)
    count = len(recorder.stop())
    assert count >= 10, f"too few operations recorded for a save: is the recorder wrapping them? {recorder.ops}"

    for crash_at in range(count):
        root, protected = copy_of_before(f"crash-{crash_at}")
        recorder.start(root, crash_at)
        # the writer reports the crash as the one line every rank stops with, unless its own clean-up is hit
        with pytest.raises((OSError, CheckpointError), match="injected crash"):
            save_checkpoint(root, STEP, version, protected, background)
        when = f"a crash at {recorder.stop()[crash_at]} (operation {crash_at} of {count})"
        check_resumable(root.parent, known, when)

        save_checkpoint(root, STEP, version, protected, background)  # the next run's save of the same step
        again = f"saving again after {when}"
        assert check_resumable(root.parent, known, again) == (NEW, version), again
        latest = root / checkpoint.LATEST
        assert latest.is_symlink() and os.readlink(latest) == NEW, f"{again}: latest is not a link to {NEW}"
        kept = {checkpoint.LATEST, NEW} | ({OLD} if protected else set())
        assert {path.name for path in root.iterdir()} == kept, f"{again}: left {sorted(root.iterdir())}"
