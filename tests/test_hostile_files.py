"""Damaged and hostile files, generated: every reader of a manifest, of a shard's tar headers, of a
checkpoint's trainer_state.json and config.json, and of an optimizer partition's index ends either in one
line (a UserError; through a command, exit 2 and one line on stderr) or in a file it has checked and can
use; never another exception, never an allocation sized by a number in the file, never a file written.

Each example damages a real file: a shard folder built in this process, or a checkpoint of a one-step
run. `pytest --hypothesis-profile fuzz tests/test_hostile_files.py` searches much longer.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import shutil
import sys
import tarfile
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_shards, write_images
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from trainer_helpers import PLUGIN_FIXTURE, run_python, write_config

from pipeline.checkpoints import checkpoint
from pipeline.checkpoints.optimizer_state import check_coverage, read_partition_index
from pipeline.data.stream import RankBatches, StreamLayout, resume_micro_step
from pipeline.engine import rng
from pipeline.errors import CheckpointError
from pipeline.plugin import ImageInfo, load_plugin_class
from shards import cli as shards_cli
from shards.build.builder import build
from shards.build.imageops import ImageSpec
from shards.build.work import BuildOptions
from shards.check.verify import check_shard, verify
from shards.errors import UserError
from shards.format.manifest import SPLITS, ManifestError, read_manifest
from shards.read.random_access import SampleError, SplitDataset
from shards.read.reader import open_split

HOSTILE = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEMORY_LIMIT = 32 * 2**20  # far above what reading these small files takes, far below any header's claim

# JSON values of every kind, with the numbers that break things: negative, huge, not finite
NUMBERS = st.sampled_from([0, -1, 1, 3, 2**31, 2**53 + 1, 2**63, 2**64, -(2**63), 10**30, 0.5, -0.0, 1e308])
LEAVES = (
    st.none()
    | st.booleans()
    | NUMBERS
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "..", "../../etc/passwd", "pipe:touch pwned", "a\nb", "\ud800", "train-000000.tar"])
)
JSON_VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def places(document, at=()):
    """Where a value can be changed: every key and index (of a long list, only its ends)."""
    yield at
    if isinstance(document, dict):
        for key, value in document.items():
            yield from places(value, (*at, key))
    elif isinstance(document, list):
        indices = range(len(document)) if len(document) <= 6 else (0, 1, len(document) - 1)
        for index in indices:
            yield from places(document[index], (*at, index))


@st.composite
def mutated(draw, document):
    """The document with one to three of its values replaced, deleted, duplicated or joined by others."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(list(places(document))))
        if not where:
            document = draw(JSON_VALUES)
            continue
        *path, last = where
        parent = document
        for part in path:
            parent = parent[part]
        operation = draw(st.sampled_from(["replace", "replace", "number", "delete", "extra", "wrap"]))
        if operation == "replace":
            parent[last] = draw(JSON_VALUES)
        elif operation == "number":
            parent[last] = draw(NUMBERS)
        elif operation == "delete":
            del parent[last]
        elif operation == "extra" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        elif operation == "extra":
            parent.append(copy.deepcopy(parent[last]))
        else:  # a dict where a list was, a list where a dict was, one level deeper
            value = parent[last]
            parent[last] = list(value.values()) if isinstance(value, dict) else {"value": value}
    return document


@st.composite
def damaged_json(draw, document) -> bytes:
    """The JSON file of `document`, damaged in its structure (mostly) or in its bytes."""
    kind = draw(st.sampled_from(["structure"] * 6 + ["truncated", "bytes", "garbage", "nested", "digits"]))
    if kind == "structure":
        return json.dumps(draw(mutated(document))).encode()
    text = json.dumps(document).encode()
    if kind == "truncated":
        return text[: draw(st.integers(0, len(text) - 1))]
    if kind == "bytes":  # may leave it JSON, or no longer UTF-8
        data = bytearray(text)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    if kind == "nested":
        return b"[" * draw(st.integers(1000, 200_000))
    return b'{"format_version": ' + b"9" * draw(st.integers(4000, 6000)) + b"}"


def assert_one_line(error: BaseException) -> str:
    message = str(error)
    assert isinstance(error, UserError), f"{type(error).__name__}: {message}"
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)
    return message


def run_cli(main, *args) -> tuple[int, str]:
    """A command line in this process: (exit status, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main([str(arg) for arg in args])
        except SystemExit as exit:
            status = exit.code
    return status, stderr.getvalue()


def assert_one_error_line(status: int, stderr: str, expected: str = "") -> str:
    assert status == 2 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], stderr
    return errors[0]


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@contextlib.contextmanager
def saved_generators():
    """rng.restore() sets the process's generators: put them back afterwards."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


@pytest.fixture(scope="module")
def shard_folder(tmp_path_factory) -> Path:
    """8x8 grayscale, two labels, shards of 3 samples, both splits."""
    base = tmp_path_factory.mktemp("hostile-shards")
    for offset, label in enumerate(("even", "odd")):
        write_images(base / "src" / label, 8, size=(8, 8), prefix=label, start=8 * offset)
    image = ImageSpec(size=8, crop="center", format="png", quality=95, mode="L", max_pixels=10**6)
    options = BuildOptions(image=image, shard_size=3, val_fraction=0.25, seed=0, labels="folder")
    with contextlib.redirect_stderr(io.StringIO()):
        build(base / "src", base / "shards", options, workers=0, overwrite=False)
    manifest = read_manifest(base / "shards")
    assert all(manifest["splits"][split]["count"] >= 2 for split in SPLITS)
    return base / "shards"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, shard_folder: Path) -> Path:
    """A real checkpoint: one step of the test plugin on one process (ZeRO-0)."""
    base = tmp_path_factory.mktemp("hostile-run")
    config = write_config(base / "run.yaml", shard_folder, base / "run", max_steps=1, deepspeed={"zero_stage": 0})
    result = run_python("-m", "pipeline.train", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run"


@pytest.fixture(scope="module")
def linear_networks() -> dict[str, torch.nn.Module]:
    sys.path.insert(0, str(PLUGIN_FIXTURE))  # the test plugin's entry point, as pip would install it
    return load_plugin_class("linear")({"hidden": 4}, ImageInfo(8, 1)).build_networks()


def copy_folder(source: Path, name: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=source.parent))
    shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
    return target


# --- manifest.json --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest_work(shard_folder: Path) -> Path:
    return copy_folder(shard_folder, "manifest")


@pytest.mark.slow
@HOSTILE
@given(data=st.data())
def test_a_damaged_manifest_is_one_line_or_a_manifest_every_reader_can_use(
    shard_folder: Path, manifest_work: Path, data
) -> None:
    document = json.loads((shard_folder / "manifest.json").read_text())
    (manifest_work / "manifest.json").write_bytes(data.draw(damaged_json(document)))
    before = files_of(manifest_work)
    try:
        read_manifest(manifest_work)
    except ManifestError as error:
        event("refused")
        message = assert_one_line(error)
        for command in ("verify", "inspect"):  # every reader says the same, in one line
            status, stderr = run_cli(
                shards_cli.main, command, manifest_work, *(["--workers", "0"] * (command == "verify"))
            )
            assert message in assert_one_error_line(status, stderr)
        with pytest.raises(ManifestError):
            open_split(manifest_work, "val")
        assert files_of(manifest_work) == before
        return
    event("accepted")
    for split in SPLITS:  # a manifest that passed: readers may find the shards disagree, never crash
        try:
            dataset = SplitDataset(open_split(manifest_work, split))
        except UserError as error:  # an empty split, a shard the manifest names that is not there
            assert_one_line(error)
            continue
        for index in range(min(len(dataset), 12)):
            try:
                image, label = dataset[index]
                assert image.shape[0] in (1, 3) and type(label) is int
            except SampleError as error:
                assert_one_line(error)
    try:
        for name, problems in verify(manifest_work, workers=0):
            assert problems and all("\n" not in problem for problem in problems), (name, problems)
    except UserError as error:  # a shard named by the manifest that is not there is a named bad shard
        assert_one_line(error)
    status, stderr = run_cli(shards_cli.main, "inspect", manifest_work)
    assert status == 0, stderr
    assert files_of(manifest_work) == before


@pytest.mark.slow
def test_a_manifest_without_splits_is_one_line_in_every_command(tmp_path: Path, shard_folder: Path) -> None:
    """The hostile tester's example, through real processes: "splits": [] and a split that is null."""
    out = copy_folder(shard_folder, "no-splits")
    manifest = json.loads((out / "manifest.json").read_text())
    for splits, expected in (([], "splits: Input should be a valid dictionary"), ({"train": None}, "splits.train")):
        (out / "manifest.json").write_text(json.dumps({**manifest, "splits": splits}))
        for command in ("verify", "inspect"):
            result = run_shards(command, out)
            line = assert_one_error_line(result.returncode, result.stderr, "not a valid manifest")
            assert expected in line and str(out / "manifest.json") in line


# --- tar headers of a shard ----------------------------------------------------------------------------

HEADER_FIELDS = {"name": (0, 100), "mode": (100, 108), "size": (124, 136), "type": (156, 157), "prefix": (345, 500)}
HUGE_SIZES = [
    b"77777777777\x00",  # 8 GiB, octal
    b"\x80" + b"\xff" * 11,  # base-256: 2^88
    b"\x80\x00\x00\x00\x40" + b"\x00" * 7,  # base-256: 2^62
    b"\xff" * 12,  # base-256: negative
    b"99999999999\x00",
    b" " * 12,
]


def with_checksum(header: bytes) -> bytes:
    """The header with its checksum field made right again, so that what follows it is believed."""
    header = bytearray(header)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


@st.composite
def damaged_shard(draw, original: bytes, headers: list[int]) -> bytes:
    """The shard with bytes of its headers changed (their checksums often made right again), sizes set
    huge, fields overwritten, and sometimes the file cut short."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(headers))
        kind = draw(st.sampled_from(["bytes", "size", "size", "field", "name"]))
        if kind == "bytes":
            for _ in range(draw(st.integers(1, 8))):
                data[at + draw(st.integers(0, 511))] = draw(st.integers(0, 255))
        elif kind == "size":
            sizes = st.sampled_from(HUGE_SIZES) | st.integers(0, 8**11 - 1).map(lambda n: b"%011o\x00" % n)
            data[at + 124 : at + 136] = draw(sizes)
        elif kind == "name":  # any text: line breaks, quotes, non-ASCII
            data[at : at + 100] = draw(st.text(min_size=1, max_size=30)).encode()[:99].ljust(100, b"\x00")
        else:
            start, end = HEADER_FIELDS[draw(st.sampled_from(sorted(HEADER_FIELDS)))]
            data[at + start : at + end] = draw(st.binary(min_size=end - start, max_size=end - start))
        if draw(st.integers(0, 3)):
            data[at : at + 512] = with_checksum(data[at : at + 512])
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module")
def tar_work(shard_folder: Path) -> Path:
    return copy_folder(shard_folder, "tar")


@pytest.mark.slow
@HOSTILE
@given(data=st.data())
def test_a_damaged_tar_header_is_a_damaged_shard_never_a_crash_or_a_huge_allocation(
    shard_folder: Path, tar_work: Path, data
) -> None:
    record = read_manifest(shard_folder)["splits"]["train"]["shards"][0]
    original = (shard_folder / record["name"]).read_bytes()
    with tarfile.open(shard_folder / record["name"]) as tar:  # where the headers are, read independently
        headers = [info.offset for info in tar]
    damaged = data.draw(damaged_shard(original, headers))
    (tar_work / record["name"]).write_bytes(damaged)
    before = files_of(tar_work)

    tracemalloc.start()
    try:
        dataset = SplitDataset(open_split(tar_work, "train"))
        for index in range(record["count"] + 1):  # and one past the shard, into the next
            try:
                dataset[index]
            except SampleError as error:
                assert_one_line(error)
                assert not error.reason.startswith(("MemoryError", "OverflowError")), error.reason
        problems = check_shard(tar_work / record["name"], record, read_manifest(tar_work)["image"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{peak} bytes allocated reading a {len(damaged)}-byte shard"
    event(f"{len(problems)} problems")
    assert bool(problems) == (damaged != original), problems
    assert all("\n" not in problem for problem in problems), problems
    status, stderr = run_cli(shards_cli.main, "verify", tar_work, "--workers", "0")
    assert status == (1 if problems else 0) and "Traceback" not in stderr, stderr
    assert files_of(tar_work) == before


@pytest.mark.slow
def test_verify_names_a_shard_whose_header_claims_2_to_the_62_bytes(shard_folder: Path) -> None:
    """Through a real process: the standard library's tarfile would try to allocate that (MemoryError)."""
    out = copy_folder(shard_folder, "huge-header")
    shard = out / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[124:136] = HUGE_SIZES[2]
    data[0:512] = with_checksum(data[0:512])
    shard.write_bytes(bytes(data))
    result = run_shards("verify", out)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    bad = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("BAD ")]
    assert len(bad) == 1 and bad[0].startswith("BAD train-000000.tar: sha256 does not match"), result.stderr
    assert "unreadable tar after 0 samples (the header at byte 0 has no octal size" in bad[0]


# --- checkpoints: trainer_state.json, config.json, optimizer partitions -----------------------------------


def step_folder(run: Path) -> Path:
    return (run / "checkpoints" / checkpoint.LATEST).resolve()


def write_listed(folder: Path, name: str, data: bytes) -> None:
    """Replace a file of the checkpoint and its checksum in trainer_state.json: a hostile checkpoint
    that is consistent, so that its contents, not its checksum, are what the readers meet."""
    (folder / name).write_bytes(data)
    state = json.loads((folder / checkpoint.STATE_FILE).read_text())
    state["files"][name] = checkpoint.file_digests([folder / name])[0]
    (folder / checkpoint.STATE_FILE).write_text(json.dumps(state))


@pytest.fixture(scope="module")
def state_work(run_folder: Path) -> Path:
    return copy_folder(run_folder, "state")


@pytest.fixture(scope="module")
def config_work(run_folder: Path) -> Path:
    return copy_folder(run_folder, "config")


@pytest.fixture(scope="module")
def partition_work(run_folder: Path) -> Path:
    return copy_folder(run_folder, "partition")


def layout_of(shard_folder: Path) -> StreamLayout:
    counts = tuple(shard["count"] for shard in open_split(shard_folder).shards)
    return StreamLayout(counts, seed=7, shuffle_shards=2, world_size=1, batch_size=2)


@pytest.mark.slow
@HOSTILE
@given(data=st.data())
def test_a_damaged_trainer_state_is_one_line_or_a_state_a_resume_can_use(
    run_folder: Path, state_work: Path, shard_folder: Path, data
) -> None:
    folder = step_folder(state_work)
    document = json.loads((step_folder(run_folder) / checkpoint.STATE_FILE).read_text())
    (folder / checkpoint.STATE_FILE).write_bytes(data.draw(damaged_json(document)))
    before = files_of(state_work)
    warnings: list[str] = []
    found = checkpoint.find_resume(state_work, "auto", warnings.append)
    assert all("\n" not in warning and warning.startswith("skipping checkpoint") for warning in warnings), warnings
    try:
        state = checkpoint.validate(folder)
    except CheckpointError as error:
        event("refused")
        assert_one_line(error)
        assert found is None and len(warnings) == 1
        with pytest.raises(CheckpointError):
            checkpoint.find_resume(state_work, str(folder), warnings.append)
        with pytest.raises(CheckpointError):
            checkpoint.export(folder, state_work.parent / "never-written")
        assert not (state_work.parent / "never-written").exists()
        assert files_of(state_work) == before
        return
    event("accepted")
    assert found is not None and found[0] == folder and not warnings
    try:
        checkpoint.check_plugin(folder, state, "linear")
    except CheckpointError as error:
        assert_one_line(error)
    # what a resume does with it (pipeline/train.py, pipeline/checkpoints/checkpointer.py `Checkpointer.load`), short
    # of DeepSpeed
    layout = layout_of(shard_folder)
    start = resume_micro_step(state["data"], layout)
    assert len(next(iter(RankBatches(layout, 0, start)))) == layout.batch_size
    assert all(type(state["engine"][name]) is int for name in ("global_steps", "micro_steps", "skipped_steps"))
    with saved_generators():
        for rank in state["ranks"]:
            rng.restore(rank["rng"])
            random.random(), np.random.random(), torch.rand(1)
    assert files_of(state_work) == before


@pytest.mark.slow
@HOSTILE
@given(data=st.data())
def test_a_damaged_weights_config_is_one_line_or_a_config_a_model_can_be_built_from(
    run_folder: Path, config_work: Path, data
) -> None:
    folder = step_folder(config_work)
    shutil.copyfile(step_folder(run_folder) / checkpoint.STATE_FILE, folder / checkpoint.STATE_FILE)
    document = json.loads((step_folder(run_folder) / checkpoint.CONFIG_FILE).read_text())
    write_listed(folder, checkpoint.CONFIG_FILE, data.draw(damaged_json(document)))
    out = Path(tempfile.mkdtemp(dir=config_work.parent)) / "exported"
    try:
        config = checkpoint.read_weights_config(folder)
    except CheckpointError as error:
        event("refused")
        assert_one_line(error)
        with pytest.raises(CheckpointError):
            checkpoint.export(folder, out)
        assert not out.exists()
        return
    event("accepted")
    assert type(config["plugin"]) is str and isinstance(config.get("model", {}), dict)
    assert config["image"]["size"] in range(1, 8193) and config["image"]["channels"] in (1, 3)
    try:
        written = checkpoint.export(folder, out)
    except CheckpointError as error:  # another plugin than trainer_state.json's
        assert_one_line(error)
        assert not out.exists()
        return
    assert json.loads((out / checkpoint.CONFIG_FILE).read_text()) == config and len(written) == 3


@st.composite
def damaged_partition(draw, tensors: dict[str, torch.Tensor], index: dict) -> tuple[dict, str]:
    """An optimizer partition with its index damaged, or a tensor dropped or of another length."""
    tensors = dict(tensors)
    if draw(st.booleans()):
        text = draw(damaged_json(index)).decode("utf-8", "replace")
    else:
        text = json.dumps(index)
        name = draw(st.sampled_from(sorted(tensors)))
        if draw(st.booleans()):
            del tensors[name]
        else:
            tensors[name] = torch.zeros(draw(st.integers(0, 300)))
    return tensors, text


@pytest.mark.slow
@HOSTILE
@given(data=st.data())
def test_a_damaged_optimizer_partition_is_one_line_or_covers_every_parameter(
    run_folder: Path, partition_work: Path, linear_networks: dict, data
) -> None:
    original = step_folder(run_folder) / "optimizer" / "rank-00000.safetensors"
    with safe_open(str(original), framework="pt") as file:
        index = json.loads(file.metadata()["partition"])
    tensors, text = data.draw(damaged_partition(load_file(str(original)), index))
    path = step_folder(partition_work) / "optimizer" / "rank-00000.safetensors"
    save_file(tensors, str(path), metadata={"partition": text})
    try:
        saved = read_partition_index(path)
        check_coverage([saved], linear_networks)
    except CheckpointError as error:
        event("refused")
        assert_one_line(error)
        return
    event("accepted")
    # what load_partitions will copy: every parameter's master, whole, from the slices the index names
    with safe_open(str(path), framework="pt") as file:
        for network_name, network in linear_networks.items():
            for key, param in network.named_parameters():
                start, numel = saved.slices[f"{network_name}.{key}"]
                piece = file.get_slice(f"master/{network_name}.{key}")[0:numel]
                assert start == 0 and piece.numel() == param.numel()


# --- the same through real processes ---------------------------------------------------------------------


def one_error_line(result) -> str:
    return assert_one_error_line(result.returncode, result.stderr)


@pytest.mark.slow
def test_pipeline_commands_refuse_damaged_files_with_one_line(
    tmp_path: Path, shard_folder: Path, run_folder: Path
) -> None:
    """`pipeline reconstruct --shards` with a manifest whose splits are [], `pipeline train` resuming a
    checkpoint whose trainer_state.json, or whose optimizer partition index, is damaged, and
    `pipeline export` of one whose config.json is: exit 2, one line, nothing written."""
    shards = copy_folder(shard_folder, "process-shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "splits": []}))
    weights = step_folder(run_folder)
    result = run_python(
        "-m", "pipeline.cli", "reconstruct", str(weights), str(tmp_path / "r.png"), "--shards", str(shards)
    )
    assert "not a valid manifest: splits" in one_error_line(result)
    assert not (tmp_path / "r.png").exists()

    run = copy_folder(run_folder, "process-run")
    folder = step_folder(run)
    state = json.loads((folder / checkpoint.STATE_FILE).read_text())
    config = write_config(
        tmp_path / "resume.yaml", shard_folder, tmp_path / "resumed", max_steps=2, deepspeed={"zero_stage": 0}
    )
    damaged = copy.deepcopy(state)
    damaged["ranks"][0]["rng"]["numpy"][2] = 10**6  # numpy would read its key array at that position
    (folder / checkpoint.STATE_FILE).write_text(json.dumps(damaged))
    result = run_python("-m", "pipeline.train", "--config", str(config), f"resume={folder}")
    line = one_error_line(result)
    assert f"{folder / checkpoint.STATE_FILE}: not a valid checkpoint: ranks.0.rng: numpy: position" in line, line
    assert not (tmp_path / "resumed").exists()
    (folder / checkpoint.STATE_FILE).write_text(json.dumps(state))

    partition = folder / "optimizer" / "rank-00000.safetensors"
    with safe_open(str(partition), framework="pt") as file:
        index = json.loads(file.metadata()["partition"])
    index["slices"]["encoder.weight"] = [0, 10**12]
    save_file(load_file(str(partition)), str(partition), metadata={"partition": json.dumps(index)})
    write_listed(folder, "optimizer/rank-00000.safetensors", partition.read_bytes())
    result = run_python("-m", "pipeline.train", "--config", str(config), f"resume={folder}")
    assert "rank-00000.safetensors: not a valid checkpoint: 'master/encoder.weight'" in one_error_line(result)
    assert not (tmp_path / "resumed").exists()

    description = json.loads((folder / checkpoint.CONFIG_FILE).read_text())
    write_listed(folder, checkpoint.CONFIG_FILE, json.dumps({**description, "image": [8, 1]}).encode())
    result = run_python("-m", "pipeline.cli", "export", str(folder), str(tmp_path / "exported"))
    assert "config.json: not a valid checkpoint: image" in one_error_line(result)
    assert not (tmp_path / "exported").exists()
