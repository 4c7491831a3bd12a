"""Checkpoint folders: how they are laid out, made durable, found again, checked and exported.

    OUTPUT/checkpoints/
        step-00000500/
            <network>.safetensors      full fp32 weights (safetensors.torch.load_file alone reads them)
            config.json                the plugin, its options, the image format
            optimizer/rank-NNNNN.safetensors   DeepSpeed's optimizer state, one file per rank
                                               (pipeline/checkpoints/optimizer_state.py)
            trainer_state.json         step, images, data position, every rank's RNG and plugin state,
                                       and the checksum of every other file: written last
        latest -> step-00000500        updated only once that folder is complete

Every rank writes its own files into `.step-NNNNNNNN.partial/`; rank 0 then writes trainer_state.json,
renames the folder and only then moves `latest`. A run killed at any moment leaves at most a
`.partial` folder (removed by the next save) and `latest` on the last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.checkpoints.optimizer_state import check_coverage, read_partitions
from pipeline.checkpoints.trainer_state import TrainerState, WeightsConfig
from pipeline.errors import CheckpointError
from shards.errors import check_structure, parse_json
from shards.format.shard_writer import sync_folder
from shards.regular_files import check_regular, open_regular, read_regular

FORMAT_VERSION = 1
CHUNK_BYTES = 64 * 2**20
# every file's checksum: sha256 over the concatenated sha256 digests of its 64 MiB chunks
CHECKSUM = {"algorithm": "sha256-of-chunk-sha256s", "chunk_bytes": CHUNK_BYTES}
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
LATEST = "latest"
OPTIMIZER_FOLDER = "optimizer"
PLUGIN_TENSORS_FILE = "plugin_state.safetensors"  # the plugin's state_tensors(): training state, not exported
NAME = re.compile(r"step-(\d{8,})")


def checkpoints_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def staging_folder(root: Path, step: int) -> Path:
    return root / f".{folder_name(step)}.partial"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def write_durably(path: Path, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _chunk_digest(job: tuple[Path, int]) -> bytes:
    path, offset = job
    length = min(CHUNK_BYTES, path.stat().st_size - offset)
    if length <= 0:
        return hashlib.sha256(b"").digest()
    # mapped, not read: no copy of the chunk (reading it doubled the time)
    with open_regular(path) as file, mmap.mmap(file.fileno(), length, offset=offset, access=mmap.ACCESS_READ) as view:
        return hashlib.sha256(view).digest()


def file_digests(paths: list[Path]) -> list[str]:
    """Each file's digest: the sha256 of the sha256s of its 64 MiB chunks, so that the chunks of one
    big file hash in parallel threads (reading and hashing release the GIL)."""
    jobs = [(path, offset) for path in paths for offset in range(0, max(path.stat().st_size, 1), CHUNK_BYTES)]
    trees = {path: hashlib.sha256() for path in paths}
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        for (path, _), digest in zip(jobs, pool.map(_chunk_digest, jobs), strict=True):  # in offset order
            trees[path].update(digest)
    return [trees[path].hexdigest() for path in paths]


def write_tensor_files(folder: Path, files: dict[str, tuple[dict, dict[str, str]]]) -> dict[str, str]:
    """Write {relative name: (tensors, metadata)} as safetensors in parallel threads, fsync each, and
    return {relative name: digest} (`file_digests`)."""

    def write(name: str) -> None:
        tensors, metadata = files[name]
        save_file(tensors, str(folder / name), metadata=metadata)
        fsync_file(folder / name)

    if not files:
        return {}
    with ThreadPoolExecutor(max_workers=min(len(files), os.cpu_count() or 1)) as pool:
        list(pool.map(write, files))
    return dict(zip(files, file_digests([folder / name for name in files]), strict=True))


def commit(staging: Path, state: dict[str, Any], hashed: dict[str, str], resumed_from: Path | None = None) -> Path:
    """Rank 0, once every rank's files are in `staging` (and fsynced): record their hashes in
    trainer_state.json, rename the folder into place, then point `latest` at it. `hashed`: the digests
    of files their writers already hashed (each rank hashes its own partition, in parallel).
    `resumed_from`: the checkpoint the run started from, which `latest` names while a re-reached step's
    older folder is moved aside (so that at every moment it names a complete checkpoint)."""
    root = staging.parent
    # every file a rank reported, whether or not this node's view of a shared file system shows it yet
    files = sorted({str(path.relative_to(staging)) for path in staging.rglob("*") if path.is_file()} | set(hashed))
    for name in files:
        if not (staging / name).is_file():
            raise CheckpointError(
                f"{staging / name}: written by another rank but not visible here (output_dir must "
                "be on a file system every node shares)"
            )
    unhashed = [name for name in files if name not in hashed]
    hashed = {**hashed, **dict(zip(unhashed, file_digests([staging / name for name in unhashed]), strict=True))}
    state["checksum"] = CHECKSUM
    state["files"] = {name: hashed[name] for name in files}
    write_durably(staging / STATE_FILE, json.dumps(state, indent=1) + "\n")
    sync_folder(staging)
    if (staging / OPTIMIZER_FOLDER).is_dir():
        sync_folder(staging / OPTIMIZER_FOLDER)
    final = root / folder_name(state["step"])
    replaced = root / f".{final.name}.replaced"
    if final.exists():  # a run resumed from an older checkpoint re-reaches this step: the new one wins
        if os.path.islink(root / LATEST) and os.readlink(root / LATEST) == final.name:
            # never left naming a folder that is briefly absent, nor absent itself
            if resumed_from is not None and resumed_from.name != final.name and resumed_from.is_dir():
                point_latest(root, resumed_from.name)
                sync_folder(root)
            else:
                (root / LATEST).unlink()
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    sync_folder(root)
    # only once the new folder's name is durable: deleted earlier, a power cut could leave the old name
    # on the old folder's deleted files
    shutil.rmtree(replaced, ignore_errors=True)
    point_latest(root, final.name)
    sync_folder(root)
    return final


def point_latest(root: Path, name: str) -> None:
    """`latest` replaced in one rename by a link to `name`: it is never absent meanwhile."""
    temporary_link = root / f".{LATEST}.tmp"
    temporary_link.unlink(missing_ok=True)
    temporary_link.symlink_to(name)
    os.replace(temporary_link, root / LATEST)


def step_of(folder: Path) -> int | None:
    match = NAME.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: Path) -> list[Path]:
    """step-* folders, newest first (complete or not: `validate` tells)."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and not path.is_symlink() and step_of(path) is not None]
    return sorted(found, key=step_of, reverse=True)


def prune(root: Path, keep_last: int, current: Path, protected: Path | None) -> list[Path]:
    """Keep the `keep_last` newest checkpoints up to `current` (the one just written, always kept), and
    `protected` (the one the run resumed from); delete the older ones, and what killed saves left.
    Checkpoints of later steps (a timeline abandoned by resuming from an older one) are left: the run
    replaces each when it reaches that step."""
    removed = []
    older = [path for path in complete_checkpoints(root) if step_of(path) <= step_of(current)]
    keep = {path.resolve() for path in older[:keep_last]} | {current.resolve()}
    if protected is not None:
        keep.add(protected.resolve())
    doomed = [path for path in older if path.resolve() not in keep]
    for path in doomed:  # renamed first: a kill halfway through deleting leaves no broken step-N folder
        os.replace(path, root / f".{path.name}.deleting")
    if doomed:
        sync_folder(root)  # the renames durable before the deletions
    for pattern in (".step-*.partial", ".step-*.replaced", ".step-*.deleting"):
        for path in root.glob(pattern):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def read_state(folder: Path) -> dict[str, Any]:
    """trainer_state.json, its structure checked (trainer_state.py); not yet the files it lists."""
    state_path = folder / STATE_FILE
    try:
        data = read_regular(state_path)
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: missing (an incomplete checkpoint)") from None
    except OSError as error:
        raise CheckpointError(f"{state_path}: unreadable ({error.strerror or error})") from None
    state = parse_json(data, state_path, "checkpoint", CheckpointError)
    version = state.get("format_version") if isinstance(state, dict) else None
    if type(version) is int and version != FORMAT_VERSION:
        raise CheckpointError(f"{state_path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    check_structure(TrainerState, state, state_path, "checkpoint", CheckpointError)
    if state["checksum"] != CHECKSUM:
        raise CheckpointError(f"{state_path}: unknown checksum {state['checksum']!r} (expected {CHECKSUM})")
    return state


def read_weights_config(folder: Path) -> dict[str, Any]:
    """config.json of a checkpoint or an export (plugin, its options, image size and channels), checked."""
    path = folder / CONFIG_FILE
    try:
        data = read_regular(path)
    except OSError as error:
        raise CheckpointError(f"{path}: unreadable ({error.strerror or error})") from None
    config = parse_json(data, path, "checkpoint", CheckpointError)
    check_structure(WeightsConfig, config, path, "checkpoint", CheckpointError)
    return config


def validate(folder: Path) -> dict[str, Any]:
    """trainer_state.json of a complete, untampered checkpoint; else CheckpointError naming the file."""
    state = read_state(folder)
    listed = set(state["files"])
    for path in sorted((folder / OPTIMIZER_FOLDER).glob("rank-*.safetensors")):  # what a resume loads
        if f"{OPTIMIZER_FOLDER}/{path.name}" not in listed:
            raise CheckpointError(f"{path}: not listed in {STATE_FILE} (not part of this checkpoint)")
    paths = [folder / relative for relative in state["files"]]
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
    try:
        digests = file_digests(paths)
    except OSError as error:
        raise CheckpointError(f"{error.filename or folder}: unreadable ({error.strerror or error})") from None
    for path, digest, expected in zip(paths, digests, state["files"].values(), strict=True):
        if digest != expected:
            raise CheckpointError(f"{path}: its checksum does not match {STATE_FILE} (truncated or modified)")
    return state


def find_resume(output_dir: Path, resume: str, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, validated: resume=auto takes the newest complete one, passing
    (with a warning) over any that fails validation; resume=PATH must itself be valid."""
    if resume == "none":
        return None
    if resume != "auto":
        folder = Path(resume).resolve()
        return folder, validate(folder)
    root = checkpoints_root(output_dir)
    candidates = complete_checkpoints(root)
    if (root / LATEST).is_dir():  # the run's own newest, ahead of later steps of an abandoned timeline
        newest = (root / LATEST).resolve()
        candidates = [newest, *(path for path in candidates if path.resolve() != newest)]
    for folder in candidates:
        try:
            return folder, validate(folder)
        except CheckpointError as error:
            warn(f"skipping checkpoint {folder.name}: {error}")
    return None


def check_plugin(folder: Path, state: dict, plugin: str) -> None:
    if state.get("plugin") != plugin:
        raise CheckpointError(f"{folder / STATE_FILE}: a checkpoint of plugin {state.get('plugin')!r}, not {plugin!r}")


def check_shapes(folder: Path, plugin: str, networks: dict) -> None:
    """One clear line when the checkpoint's tensors, or its optimizer partitions, do not fit these networks
    (only their headers are read)."""
    for name, network in networks.items():
        path = folder / f"{name}.safetensors"
        expected = {key: tuple(value.shape) for key, value in network.state_dict().items()}
        try:
            check_regular(path)
            with safe_open(str(path), framework="pt") as file:
                saved = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118 (safe_open is no dict)
        except (OSError, SafetensorError) as error:
            raise CheckpointError(f"{path}: unreadable ({error})") from None
        for key in sorted(expected.keys() | saved.keys()):
            if expected.get(key) != saved.get(key):
                raise CheckpointError(
                    f"{path}: {key} is {saved.get(key, 'missing')} in the checkpoint, "
                    f"{expected.get(key, 'absent')} in this {plugin} {name}"
                )
    check_coverage(read_partitions(folder / OPTIMIZER_FOLDER), networks)


def export(checkpoint: Path, out: Path) -> list[Path]:
    """A weights folder (each network's safetensors + config.json), checked against trainer_state.json."""
    state = validate(checkpoint)
    if CONFIG_FILE not in state["files"]:
        raise CheckpointError(f"{checkpoint / STATE_FILE}: not a valid checkpoint: files: {CONFIG_FILE} is not listed")
    config = read_weights_config(checkpoint)
    if config["plugin"] != state["plugin"]:
        raise CheckpointError(
            f"{checkpoint / CONFIG_FILE}: not a valid checkpoint: plugin {config['plugin']!r}, "
            f"{STATE_FILE} says {state['plugin']!r}"
        )
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in [name for name in state["files"] if "/" not in name and name != PLUGIN_TENSORS_FILE]:
            target = out / name
            temporary = out / f".{name}.tmp"
            shutil.copyfile(checkpoint / name, temporary)
            os.replace(temporary, target)
            written.append(target)
    except OSError as error:
        raise CheckpointError(f"cannot write {error.filename or out}: {error.strerror or error}") from None
    return written
