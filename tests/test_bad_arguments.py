"""Every bad input gets one line (issue 20): run configs through the real loader, and the arguments of
every command of both CLIs (numbers out of range or not numbers, counts of 0 or less, output paths that
cannot be written, input paths that are not what they should be), fuzzed with hypothesis. Each must end
with exit status 2, one line on stderr, no traceback, nothing on stdout and nothing written.

The CLIs run in-process for speed (`main([...])`, SystemExit caught); one real process per CLI checks
the same from the outside, and that results (`pipeline plugins`, `shards inspect`) go to stdout."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import run_shards, write_images
from hypothesis import assume, example, given
from hypothesis import strategies as st
from safetensors.torch import save_file
from trainer_helpers import run_python

from pipeline.cli import main as pipeline_main
from pipeline.config.fields import COUNT_MAX
from pipeline.config.loading import load_config
from pipeline.plugin import ImageInfo
from pipeline.plugins.vae import VAE
from pipeline.training.run_log import RunLog, json_line
from shards.cli import main as shards_main

MODEL = {"latent_size": 8, "fc_size": 32}
# what a command line or a file can hold: no NUL, no lone surrogate (Python decodes a byte of a file name
# or argument that is not UTF-8 as one of U+DC80..U+DCFF; NAMES adds one of those)
CHARACTERS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
SEEDS = (0, 2**31 - 1)


@dataclass(frozen=True)
class World:
    """What the commands are pointed at, all under `root`, so that one snapshot of it shows any write."""

    root: Path
    shards: Path  # 12 labelled 32x32 grayscale images, all in train
    weights: Path  # an untrained `vae` as `pipeline export` writes it
    run: Path  # a run folder with a metrics.jsonl
    a_file: Path
    fifo: Path
    scratch: Path  # where each example makes what it needs, emptied after it


@dataclass(frozen=True)
class Result:
    code: Any
    out: str
    err: str


def call(main, *args) -> Result:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(arg) for arg in args])
        except SystemExit as exit_:
            code = exit_.code
    return Result(code, out.getvalue(), err.getvalue())


def refused(result: Result, *fragments: str) -> str:
    """Exit 2, one line on stderr and nothing else anywhere; the line, for more checks."""
    assert result.code == 2, result
    assert "Traceback" not in result.err, result.err
    assert len(result.err.splitlines()) == 1 and result.err.endswith("\n"), result.err
    assert ": error: " in result.err, result.err
    assert result.out == "", result.out
    for fragment in fragments:
        assert fragment in result.err, (fragment, result.err)
    return result.err


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under root with its kind, and each file's size and modification time."""
    found = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        found[str(path)] = "folder" if path.is_dir() else (info.st_size, info.st_mtime_ns)
    return found


def write_weights(folder: Path) -> None:
    torch.manual_seed(0)
    folder.mkdir()
    for name, network in VAE(MODEL, ImageInfo(32, 1)).build_networks().items():
        save_file(network.state_dict(), str(folder / f"{name}.safetensors"))
    image = {"size": 32, "format": "png", "mode": "L", "channels": 1}
    (folder / "config.json").write_text(json.dumps({"plugin": "vae", "model": MODEL, "image": image}))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-arguments")
    images = root / "images"
    write_images(images / "even", 6, size=(32, 32), prefix="e")
    write_images(images / "odd", 6, size=(32, 32), prefix="o", start=6)
    shards = root / "shards"
    built = call(
        shards_main, "build", images, shards, "--size", "32", "--mode", "L", "--labels", "folder", "--workers", "0"
    )
    assert built.code == 0, built
    write_weights(root / "weights")
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text(json_line({"step": 1, "loss": 1.0}) + "\n")
    (root / "a-file.txt").write_text("x\n")
    os.mkfifo(root / "fifo.png")
    (root / "scratch").mkdir()
    return World(root, shards, root / "weights", root / "run", root / "a-file.txt", root / "fifo.png", root / "scratch")


def empty_scratch(world: World) -> None:
    for path in world.scratch.iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


@contextlib.contextmanager
def nothing_written(world: World):
    """The block writes nothing under world.root; then what the example made in scratch is removed."""
    before = snapshot(world.root)
    try:
        yield
        assert snapshot(world.root) == before
    finally:
        empty_scratch(world)


# ---------------------------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class Range:
    kind: type
    low: float | None
    high: float | None
    open_low: bool = False  # low itself refused (gt rather than ge)
    open_high: bool = False

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or (value < self.high or (not self.open_high and value == self.high))


def argument_accepted(allowed: Range, text: str) -> bool:
    """What the CLIs take: int(text) or float(text), then the range."""
    try:
        value = allowed.kind(text)
    except (ValueError, OverflowError):
        return False
    return allowed.accepts(value)


def numbers_outside(allowed: Range) -> st.SearchStrategy:
    choices = [st.sampled_from([value for value in (allowed.low, allowed.high) if value is not None])]
    if allowed.kind is int:
        if allowed.low is not None:
            choices += [st.integers(max_value=int(allowed.low) - 1), st.just(int(allowed.low) - 1)]
        if allowed.high is not None:
            choices += [st.integers(min_value=int(allowed.high) + 1), st.just(int(allowed.high) + 1)]
        choices.append(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)))
    else:
        if allowed.low is not None:
            choices.append(st.floats(max_value=allowed.low, allow_nan=False, allow_infinity=False))
        if allowed.high is not None:
            choices.append(st.floats(min_value=allowed.high, allow_nan=False, allow_infinity=False))
        choices.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    return st.one_of(choices)


WORDS = ["true", "false", "True", "", " ", "nan", "inf", "-inf", "1e400", "0x10", "one", "--", "1,5", "½", "1/2", "-"]


def bad_arguments(allowed: Range) -> st.SearchStrategy[str]:
    texts = st.one_of(numbers_outside(allowed).map(str), st.sampled_from(WORDS), st.text(CHARACTERS, max_size=12))
    return texts.filter(lambda text: "\x00" not in text and not argument_accepted(allowed, text))


def number_options(world: World) -> dict[str, tuple[Any, list, dict[str, Range]]]:
    """Each command: its CLI, arguments that are otherwise sound, and its numeric options' ranges."""
    data = ["--shards", world.shards, "--split", "train"]
    out = world.scratch / "out.png"
    images, seed = Range(int, 1, 4096), Range(int, *SEEDS)
    return {
        "sample": (pipeline_main, ["sample", world.weights, out], {"--count": images, "--seed": seed}),
        "reconstruct": (pipeline_main, ["reconstruct", world.weights, out, *data], {"--count": images}),
        "interpolate": (
            pipeline_main,
            ["interpolate", world.weights, out, *data],
            {"--rows": Range(int, 1, 256), "--steps": Range(int, 2, 256)},
        ),
        "attribute-vector": (
            pipeline_main,
            ["attribute-vector", world.weights, out, *data, "--test-split", "train", "--label", "odd"],
            {"--samples": Range(int, 1, 10**6), "--count": images, "--scale": Range(float, -1000, 1000)},
        ),
        "evaluate": (
            pipeline_main,
            ["evaluate", world.weights, *data, "--json", world.scratch / "e.json"],
            {
                "--count": Range(int, 2, 10**7),
                "--seed": seed,
                "--batch-size": Range(int, 1, 4096),
                "--resolution": Range(int, 1, 2048),
                "--kid-subsets": Range(int, 1, 10**6),
                "--kid-subset-size": Range(int, 2, 10**7),
            },
        ),
        "build": (
            shards_main,
            ["build", world.root / "images", world.scratch / "built"],
            {
                "--size": Range(int, 1, 8192),
                "--quality": Range(int, 1, 100),
                "--shard-size": Range(int, 1, 10**9),
                "--val-fraction": Range(float, 0, 1),
                "--seed": seed,
                "--workers": Range(int, 0, 4096),
                "--max-pixels": Range(int, 1, 2**40),
            },
        ),
        "inspect": (shards_main, ["inspect", world.shards, "--grid", world.scratch / "g.png"], {"--count": images}),
        "verify": (shards_main, ["verify", world.shards], {"--workers": Range(int, 0, 4096)}),
        "demo-images": (
            shards_main,
            ["demo-images", world.scratch / "demo", "--source", "digits"],
            {"--limit": Range(int, 1, 10**9)},
        ),
    }


COMMANDS = ["sample", "reconstruct", "interpolate", "attribute-vector", "evaluate", "build", "inspect", "verify"]


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("sample", "--count", "0"),  # IndexError before
        ("sample", "--count", "-3"),
        ("interpolate", "--steps", "0"),  # RuntimeError before
        ("reconstruct", "--count", "0"),  # every image before
        ("build", "--shard-bytes", "9" * 400),  # OverflowError before
        ("build", "--val-fraction", "nan"),  # taken before
        ("evaluate", "--seed", "-1"),  # numpy's ValueError after the whole evaluation before
    ],
)
def test_the_numbers_the_issue_names_are_one_line(world: World, command: str, option: str, value: str) -> None:
    main, arguments, _ = number_options(world)[command]
    with nothing_written(world):
        refused(call(main, *arguments, option, value), option)


@pytest.mark.slow
@given(data=st.data())
def test_a_bad_number_is_one_line_and_writes_nothing(world: World, data) -> None:
    command = data.draw(st.sampled_from([*COMMANDS, "demo-images"]), label="command")
    main, arguments, options = number_options(world)[command]
    option = data.draw(st.sampled_from(sorted(options)), label="option")
    value = data.draw(bad_arguments(options[option]), label="value")
    joined = data.draw(st.booleans(), label="--option=value")
    argv = [*arguments, f"{option}={value}"] if joined else [*arguments, option, value]
    with nothing_written(world):
        refused(call(main, *argv), option)


# ------------------------------------------------------------------------------------------------ paths

NAMES = st.text(  # "\udcff": a byte that is not UTF-8, as Python shows it in a file name
    alphabet=st.one_of(CHARACTERS.filter(lambda char: char != "/"), st.sampled_from(" []$\n\t-.é😀\udcff")),
    min_size=1,
    max_size=12,
).filter(lambda name: name not in (".", ".."))


def file_outputs(world: World, path: Path) -> dict[str, tuple[Any, list]]:
    data = ["--shards", world.shards, "--split", "train"]
    return {
        "sample": (pipeline_main, ["sample", world.weights, path]),
        "reconstruct": (pipeline_main, ["reconstruct", world.weights, path, *data]),
        "interpolate": (pipeline_main, ["interpolate", world.weights, path, *data]),
        "attribute-vector": (
            pipeline_main,
            ["attribute-vector", world.weights, path, *data, "--test-split", "train", "--label", "odd"],
        ),
        "evaluate --json": (pipeline_main, ["evaluate", world.weights, *data, "--count", "4", "--json", path]),
        "plot --out": (pipeline_main, ["plot", world.run, "--out", path]),
        "inspect --grid": (shards_main, ["inspect", world.shards, "--grid", path]),
    }


def folder_outputs(world: World, path: Path) -> dict[str, tuple[Any, list]]:
    return {
        "export": (pipeline_main, ["export", world.weights, path]),
        "build": (shards_main, ["build", world.root / "images", path, "--workers", "0"]),
        "demo-images": (shards_main, ["demo-images", path, "--source", "digits", "--limit", "1"]),
    }


PATH_REFUSALS = ("is a folder", "not a folder", "cannot write", "not a regular file", "too long", "weights folder")
PROBLEMS = ["exists as the other kind", "under a file", "unwritable", "name too long", "fifo", "in the weights"]


@pytest.mark.slow
@given(data=st.data())
def test_an_output_path_that_cannot_be_written_is_refused_before_the_work(world: World, data) -> None:
    """A folder where a file goes (or a file where a folder goes), a place under a file, an unwritable
    place, a FIFO, a name too long, a grid into the weights folder it is drawn from (config.json, say):
    refused before anything is read or computed, whatever the name."""
    name = data.draw(NAMES, label="name")
    problem = data.draw(st.sampled_from(PROBLEMS), label="problem")
    folder_wanted = problem != "in the weights" and data.draw(st.booleans(), label="a folder output")
    empty_scratch(world)
    if problem == "exists as the other kind":
        path = world.scratch / (name + ".png")
        if folder_wanted:
            path.write_bytes(b"")
        else:
            path.mkdir()
    elif problem == "under a file":
        path = world.a_file / name / "x.png" if data.draw(st.booleans()) else world.a_file / (name + ".png")
    elif problem == "unwritable":
        path = Path("/proc") / name / "x.png"
    elif problem == "name too long":
        path = world.scratch / ("x" * 250 + name + ".png")
    elif problem == "fifo":
        path = world.fifo
    else:
        path = world.weights / data.draw(st.sampled_from(["config.json", "decoder.safetensors", name + ".png"]))
    with nothing_written(world):
        outputs = folder_outputs(world, path) if folder_wanted else file_outputs(world, path)
        if problem == "in the weights":  # what reads WEIGHTS
            outputs = {command: outputs[command] for command in outputs if "--" not in command or "json" in command}
        command = data.draw(st.sampled_from(sorted(outputs)), label="command")
        main, arguments = outputs[command]
        line = refused(call(main, *arguments))
        assert any(reason in line for reason in PATH_REFUSALS), line


def input_paths(world: World, path: Path) -> dict[str, tuple[Any, list]]:
    data = ["--shards", world.shards, "--split", "train"]
    out = world.scratch / "out.png"
    bad_data = ["--shards", path, "--split", "train"]
    return {
        "sample WEIGHTS": (pipeline_main, ["sample", path, out]),
        "reconstruct WEIGHTS": (pipeline_main, ["reconstruct", path, out, *data]),
        "reconstruct --shards": (pipeline_main, ["reconstruct", world.weights, out, *bad_data]),
        "interpolate --shards": (pipeline_main, ["interpolate", world.weights, out, *bad_data]),
        "attribute-vector --shards": (
            pipeline_main,
            ["attribute-vector", world.weights, out, *bad_data, "--label", "odd"],
        ),
        "evaluate CHECKPOINT": (pipeline_main, ["evaluate", path, *data, "--json", world.scratch / "e.json"]),
        "evaluate --shards": (
            pipeline_main,
            ["evaluate", world.weights, *bad_data, "--json", world.scratch / "e.json"],
        ),
        "evaluate --extractor": (
            pipeline_main,
            ["evaluate", world.weights, *data, "--count", "4", "--extractor", path, "--json", world.scratch / "e.json"],
        ),
        "export CHECKPOINT": (pipeline_main, ["export", path, world.scratch / "exported"]),
        "plot RUN_DIR": (pipeline_main, ["plot", path, "--out", out]),
        "train --config": (pipeline_main, ["train", "--config", path]),
        "build SRC": (shards_main, ["build", path, world.scratch / "built", "--workers", "0"]),
        "inspect OUT": (shards_main, ["inspect", path]),
        "verify OUT": (shards_main, ["verify", path, "--workers", "0"]),
    }


@pytest.mark.slow
@given(data=st.data())
def test_an_input_path_that_is_not_what_it_should_be_is_one_line(world: World, data) -> None:
    """Missing, a plain file where a folder should be, an empty folder: one line, nothing written."""
    name = data.draw(NAMES, label="name")
    kind = data.draw(st.sampled_from(["missing", "a file", "an empty folder"]), label="kind")
    empty_scratch(world)
    path = world.scratch / name
    if kind == "a file":
        path.write_text("x\n")
    elif kind == "an empty folder":
        path.mkdir()
    with nothing_written(world):
        commands = input_paths(world, path)
        command = data.draw(st.sampled_from(sorted(commands)), label="command")
        main, arguments = commands[command]
        refused(call(main, *arguments))


def test_a_missing_output_folder_is_made_and_the_result_goes_to_stdout(world: World) -> None:
    """Boundary values are accepted: one sample, two interpolation steps; missing folders are made."""
    try:
        deep = world.scratch / "new" / "deeper" / "one.png"
        result = call(pipeline_main, "sample", world.weights, deep, "--count", "1", "--seed", str(SEEDS[1]))
        assert (result.code, result.out, result.err) == (0, f"wrote {deep}\n", "")
        assert deep.is_file()
        two = world.scratch / "two.png"
        data = ["--shards", world.shards, "--split", "train"]
        result = call(pipeline_main, "interpolate", world.weights, two, *data, "--rows", "1", "--steps", "2")
        assert (result.code, result.out, result.err) == (0, f"wrote {two}\n", "")
    finally:
        shutil.rmtree(world.scratch / "new", ignore_errors=True)
        (world.scratch / "two.png").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- configs

COUNT = Range(int, 1, COUNT_MAX)
CONFIG_NUMBERS = {
    "data.batch_size": Range(int, 1, 2**16),
    "data.workers": Range(int, 0, 256),
    "data.shuffle_shards": Range(int, 1, 2**20),
    "optimizer.lr": Range(float, 0, None, open_low=True),
    "optimizer.weight_decay": Range(float, 0, None),
    "optimizer.alpha": Range(float, 0, 1, open_low=True, open_high=True),
    "optimizer.eps": Range(float, 0, None, open_low=True),
    "optimizer.encoder.lr": Range(float, 0, None, open_low=True),
    "optimizer.betas.1": Range(float, 0, 1, open_high=True),
    "lr_schedule.power": Range(float, 0, None, open_low=True),
    "lr_schedule.final_fraction": Range(float, 0, 1),
    "lr_schedule.steps": COUNT,
    "lr_schedule.every": COUNT,
    "max_steps": COUNT,
    "gradient_accumulation_steps": Range(int, 1, 2**16),
    "log_every": COUNT,
    "sample_every": COUNT,
    "grid_size": Range(int, 1, 4096),
    "checkpoint.every": COUNT,
    "checkpoint.every_minutes": Range(float, 0, 7 * 24 * 60, open_low=True),
    "checkpoint.keep_last": COUNT,
    "faults.max_skipped_steps_in_a_row": COUNT,
    "faults.collective_timeout_minutes": Range(float, 0, 7 * 24 * 60, open_low=True),
    "seed": Range(int, *SEEDS),
    "deepspeed.zero_stage": Range(int, 0, 2),
}
OPTIONAL = {"optimizer.lr", "optimizer.weight_decay", "optimizer.alpha", "optimizer.eps", "optimizer.encoder.lr"}
OPTIONAL |= {
    "lr_schedule.steps",
    "deepspeed.zero_stage",
    "data.workers",
    "checkpoint.every",
    "checkpoint.every_minutes",
}
IN_A_LIST = {"optimizer.betas.1"}  # no key=value override reaches into a list
REQUIRED = ["plugin", "data", "data.shards", "output_dir", "max_steps"]
SECTIONS = ["", "data", "lr_schedule", "deepspeed", "checkpoint", "faults"]  # optimizer and model take any key


def base_tree(world: World) -> dict:
    """A sound config, but for shards that do not exist: should a bad value ever pass, the run stops at
    the shards (a line without "not a valid config", which fails the test) and never trains."""
    return {
        "plugin": "vae",
        "model": dict(MODEL),
        "data": {"shards": str(world.root / "no-shards"), "batch_size": 2, "workers": 0},
        "optimizer": {"betas": [0.5, 0.9]},
        "max_steps": 2,
        "output_dir": str(world.root / "never-written"),
    }


def put(tree: dict, key: str, value: Any) -> dict:
    *parents, leaf = key.split(".")
    node = tree
    for parent in parents:
        node = node.setdefault(parent, {})
    if isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return tree


def train_with(world: World, content: bytes | str, *overrides: str, fragment: str = "not a valid config") -> str:
    """`pipeline train` on a config file of this content: refused (one line holding `fragment`), and
    nothing written but the config file itself."""
    empty_scratch(world)
    path = world.scratch / "config.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with nothing_written(world):
        return refused(call(pipeline_main, "train", "--config", path, *overrides), fragment)


def test_the_base_config_is_sound_and_stops_at_the_missing_shards(world: World) -> None:
    assert load_config(_write(world, yaml.safe_dump(base_tree(world)))).max_steps == 2
    line = train_with(world, yaml.safe_dump(base_tree(world)), fragment="is not a shard folder")
    assert "not a valid config" not in line


def _write(world: World, text: str) -> Path:
    path = world.root / "sound.yaml"
    path.write_text(text)
    return path


def wrong_values(allowed: Range, optional: bool) -> st.SearchStrategy:
    """Booleans (not numbers), other types, numbers out of range or of the wrong kind."""
    others = st.one_of(
        st.booleans(),
        st.sampled_from(["abc", "", "one", "1.5.2", "true", "0x10", [1], {"a": 1}]),
        st.lists(st.integers(), max_size=2),
        numbers_outside(allowed),
    )
    if allowed.kind is int:
        others = st.one_of(others, st.integers(*(int(bound) for bound in (allowed.low, allowed.high))).map(str))
        others = st.one_of(others, st.integers(0, 3).map(float))  # 2.0 is no whole number here
    if not optional:
        others = st.one_of(others, st.none())
    return others.filter(lambda value: not allowed.accepts(value))


@pytest.mark.parametrize("key", ["data.batch_size", "max_steps"])
def test_true_for_a_number_is_refused_not_read_as_1(world: World, key: str) -> None:
    """The issue's own: these trained as 1 before."""
    line = train_with(world, yaml.safe_dump(put(base_tree(world), key, True)))
    assert f"{key}: a boolean is not a number" in line, line
    line = train_with(world, yaml.safe_dump(base_tree(world)), f"{key}=true")
    assert f"{key}: a boolean is not a number" in line, line


@pytest.mark.slow
@given(data=st.data())
def test_a_config_value_of_the_wrong_type_or_out_of_range_is_one_line(world: World, data) -> None:
    """In the file or as a key=value override: booleans for numbers, text, lists, null for a required
    value, whole numbers as text or floats, numbers past either bound."""
    key = data.draw(st.sampled_from(sorted(CONFIG_NUMBERS)), label="key")
    value = data.draw(wrong_values(CONFIG_NUMBERS[key], key in OPTIONAL), label="value")
    if key not in IN_A_LIST and data.draw(st.booleans(), label="as an override"):
        line = train_with(world, yaml.safe_dump(base_tree(world)), f"{key}={json.dumps(value)}")
    else:
        line = train_with(world, yaml.safe_dump(put(base_tree(world), key, value)))
    assert key in line, line


@pytest.mark.slow
@given(data=st.data())
def test_every_value_in_range_is_taken_from_the_file_and_from_an_override(world: World, data) -> None:
    """The other side of the ranges: boundaries and everything between load, and `key=value` text
    (1e-4, true, 3) still means what YAML says, as before."""
    key = data.draw(st.sampled_from(sorted(CONFIG_NUMBERS)), label="key")
    allowed = CONFIG_NUMBERS[key]
    if allowed.kind is int:
        value = data.draw(st.integers(int(allowed.low), int(allowed.high)), label="value")
    else:
        high = allowed.high if allowed.high is not None else 1e300
        value = data.draw(st.floats(allowed.low, high, exclude_min=allowed.open_low, exclude_max=allowed.open_high))
    if key == "max_steps":
        value = int(value)
    configs = [load_config(_write(world, yaml.safe_dump(put(base_tree(world), key, value))))]
    if key not in IN_A_LIST:
        configs.append(load_config(_write(world, yaml.safe_dump(base_tree(world))), [f"{key}={value!r}"]))
    for config in configs:
        node: Any = config.model_dump()
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list | tuple) else node[part]
        assert node == value and type(node) is allowed.kind, (key, value, node)


def test_overrides_read_as_yaml_as_before(world: World) -> None:
    config = load_config(
        _write(world, yaml.safe_dump(base_tree(world))),
        ["optimizer.lr=1e-4", "data.hflip=true", "max_steps=5", "lr_schedule.final_fraction=1", "seed=0x10"],
    )
    assert (config.optimizer.lr, config.data.hflip, config.max_steps) == (1e-4, True, 5)
    assert (config.lr_schedule.final_fraction, config.seed) == (1.0, 16)


@pytest.mark.slow
@given(data=st.data())
def test_an_unknown_or_missing_key_is_one_line(world: World, data) -> None:
    tree = base_tree(world)
    if data.draw(st.booleans(), label="unknown"):
        section = data.draw(st.sampled_from(SECTIONS), label="section")
        known = set(load_config_fields(section))
        key = data.draw(st.text(CHARACTERS, max_size=10).filter(lambda key: key not in known), label="key")
        (tree.setdefault(section, {}) if section else tree)[key] = data.draw(
            st.integers() | st.text(CHARACTERS), label="value"
        )
        line = train_with(world, yaml.safe_dump(tree))
        assert "unknown key" in line, line
    else:
        key = data.draw(st.sampled_from(REQUIRED), label="key")
        *parents, leaf = key.split(".")
        del (tree[parents[0]] if parents else tree)[leaf]
        line = train_with(world, yaml.safe_dump(tree))
        assert "required" in line or "give exactly one of max_steps and max_images" in line, line


def load_config_fields(section: str) -> list[str]:
    from pipeline.config.sections import RunConfig

    model = RunConfig if not section else RunConfig.model_fields[section].annotation
    return list(model.model_fields)


@pytest.mark.slow
@pytest.mark.parametrize(
    "content",
    [b"plugin: vae\xff\n", b"- 1\n- 2\n", b"just text", b"3", b"[" * 10000, b"a: &x [*x]\nb: *x\n", b"a: b: c"],
)
def test_the_config_files_the_issue_names_are_one_line(world: World, content: bytes) -> None:
    """Not UTF-8 (a UnicodeDecodeError traceback before), not a mapping, nested past the parser, an
    alias that holds itself, not YAML."""
    line = train_with(world, content)
    if content.startswith(b"plugin: vae"):
        assert "byte 0xff at offset 11 is not UTF-8" in line, line


@pytest.mark.slow
@given(data=st.data())
def test_a_config_file_that_is_not_utf8_yaml_of_a_mapping_is_one_line(world: World, data) -> None:
    """Bytes that are not UTF-8 anywhere in a sound file, YAML that is not a mapping, arbitrary bytes
    and text: "not a valid config", never a traceback."""
    sound = yaml.safe_dump(base_tree(world)).encode()
    kind = data.draw(st.sampled_from(["not UTF-8", "not a mapping", "bytes", "text"]), label="kind")
    if kind == "not UTF-8":
        junk = data.draw(st.binary(min_size=1, max_size=4).filter(not_utf8), label="junk")
        at = data.draw(st.integers(0, len(sound)), label="at")
        line = train_with(world, sound[:at] + junk + sound[at:])
        assert "is not UTF-8" in line, line
    elif kind == "not a mapping":
        value = data.draw(
            st.one_of(st.lists(st.integers()), st.integers(), st.text(CHARACTERS, min_size=1), st.floats()), label="v"
        )
        assume(yaml.safe_load(yaml.safe_dump(value)) not in (None, ""))
        train_with(world, yaml.safe_dump(value))
    else:
        content = data.draw(
            st.binary(max_size=300) if kind == "bytes" else st.text(CHARACTERS, max_size=300), label="content"
        )
        train_with(world, content)


def not_utf8(junk: bytes) -> bool:
    try:
        junk.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.slow
@given(content=st.one_of(st.binary(max_size=100), st.text(CHARACTERS, max_size=100)))
@example(content=b'{"optimizer": {"type": "Adam"}}')
@example(content=b'{"zero_optimization": []}')
@example(content=b"{\xff}")
def test_a_bad_deepspeed_json_is_one_line_at_start_up(world: World, content) -> None:
    """deepspeed.config is read at start-up, like the YAML: a file that does not do is one line, before
    any process group; one that does (`{}`) lets the run go on to the missing shards."""
    deepspeed = world.root / "deepspeed.json"
    deepspeed.write_bytes(content.encode() if isinstance(content, str) else content)
    try:
        tree = put(base_tree(world), "deepspeed.config", str(deepspeed))
        line = train_with(world, yaml.safe_dump(tree), fragment="")
        assert "not a valid config" in line or "is not a shard folder" in line, line
    finally:
        deepspeed.unlink()


# --------------------------------------------------------------------------------- weights config.json


def weights_configs() -> st.SearchStrategy[dict]:
    """config.json of a weights folder with one thing wrong with it."""
    image = {"size": 32, "format": "png", "mode": "L", "channels": 1}
    sound = {"plugin": "vae", "model": MODEL, "image": image}
    wrong = {
        "plugin": st.sampled_from([None, 1, True, "", "nope", ["vae"]]),
        "model": st.sampled_from([None, 5, "x", [1], {"latent_size": True}, {"latent_size": 9}, {"nope": 1}]),
        "image.size": st.sampled_from([True, 0, -1, 33, 64, "32", 32.0, 10**6, None]),
        "image.channels": st.sampled_from([True, 0, 2, 3, 4, "1", 1.0, None]),
        "image.mode": st.sampled_from(["RGB", "CMYK", 1]),
    }
    return st.sampled_from(sorted(wrong)).flatmap(
        lambda key: wrong[key].map(lambda value: put(json.loads(json.dumps(sound)), key, value))
    )


@pytest.mark.slow
@given(content=st.one_of(weights_configs().map(json.dumps), st.binary(max_size=200)))
@example(content=b"\xff\xfe")
@example(content="[" * 10000)
def test_a_bad_weights_config_json_is_one_line(world: World, content) -> None:
    folder = world.root / "bad-weights"
    folder.mkdir(exist_ok=True)
    for path in world.weights.glob("*.safetensors"):
        if not (folder / path.name).exists():
            (folder / path.name).symlink_to(path)
    (folder / "config.json").write_bytes(content.encode() if isinstance(content, str) else content)
    with nothing_written(world):
        refused(call(pipeline_main, "sample", folder, world.scratch / "out.png", "--count", "1"))


# ---------------------------------------------------------------------------------- metrics, stdout


class Accelerator:
    is_main_process = True

    def log(self, values: dict, step: int) -> None:
        pass


def strict_json(line: str) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_the_first_rate_after_a_resume_counts_only_the_images_since(tmp_path: Path, monkeypatch) -> None:
    """A run resumed at 640 images that reaches 704 four seconds later went at 16 images/s, not 176."""
    from pipeline.training import run_log

    clock = iter([100.0, 104.0])
    monkeypatch.setattr(run_log.time, "perf_counter", lambda: next(clock))
    log = RunLog(tmp_path, Accelerator(), total_steps=20, first_step=10, images_seen=640)
    try:
        log.log(11, 704, {"loss": 1.0})
    finally:
        log.stop()
    [record] = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["images_per_s"] == 16.0


def test_metrics_jsonl_is_strict_json_with_null_for_non_finite_values(tmp_path: Path) -> None:
    log = RunLog(tmp_path, Accelerator(), total_steps=2, first_step=0, images_seen=0)
    try:
        log.log(1, 8, {"loss": math.nan, "kl": math.inf, "nll": -math.inf, "mse": 0.5, "skipped_steps": 1})
    finally:
        log.stop()
    [record] = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (record["loss"], record["kl"], record["nll"], record["mse"], record["skipped_steps"]) == (
        None,
        None,
        None,
        0.5,
        1,
    )
    call(pipeline_main, "plot", tmp_path, "--out", tmp_path / "curves.png")  # a null is a gap in a curve
    assert (tmp_path / "curves.png").is_file()


@given(st.dictionaries(st.text(), st.one_of(st.floats(), st.integers(), st.booleans(), st.none())))
def test_every_metrics_line_is_strict_json(record: dict) -> None:
    parsed = strict_json(json_line(record))
    for key, value in record.items():
        finite = not (isinstance(value, float) and not math.isfinite(value))
        assert parsed[key] == (value if finite else None)


def test_results_go_to_stdout_and_nothing_to_stderr(world: World) -> None:
    listed = call(pipeline_main, "plugins")
    assert listed.code == 0 and "pipeline.plugins.vae:VAE" in listed.out and listed.err == ""
    inspected = call(shards_main, "inspect", world.shards)
    assert inspected.code == 0 and "train" in inspected.out and "12" in inspected.out and inspected.err == ""


# -------------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_real_processes_pipe_results_and_give_one_line_errors(world: World) -> None:
    """The same from the outside: what `pipeline plugins | grep vae` and `shards inspect | grep train`
    read, and one line for a config that is not UTF-8 and for counts of 0."""
    listed = run_python("-m", "pipeline.cli", "plugins")
    assert listed.returncode == 0 and "vae" in listed.stdout and listed.stderr == "", listed.stderr
    inspected = run_shards("inspect", world.shards)
    assert inspected.returncode == 0 and "train" in inspected.stdout and inspected.stderr == "", inspected.stderr
    config = world.root / "not-utf8.yaml"
    config.write_bytes(b"plugin: vae\xff\n")
    try:
        for result, fragment in (
            (run_python("-m", "pipeline.cli", "train", "--config", str(config)), "not a valid config"),
            (
                run_python(
                    "-m", "pipeline.cli", "sample", str(world.weights), str(world.scratch / "x.png"), "--count", "0"
                ),
                "argument --count",
            ),
            (run_shards("inspect", world.shards, "--count", "0"), "argument --count"),
        ):
            assert result.returncode == 2 and result.stdout == "", result
            assert len(result.stderr.splitlines()) == 1 and fragment in result.stderr, result.stderr
    finally:
        config.unlink()


# --------------------------------- found by these tests: the deepspeed JSON, plugin options, pipeline.train


def test_a_deepspeed_json_section_of_the_wrong_type_is_one_line(world: World) -> None:
    deepspeed = world.scratch / "deepspeed.json"
    deepspeed.write_text('{"zero_optimization": {"offload_optimizer": 5}}')
    tree = put(base_tree(world), "deepspeed.config", str(deepspeed))
    (world.scratch / "config.yaml").write_text(yaml.safe_dump(tree))
    try:
        refused(call(pipeline_main, "train", "--config", world.scratch / "config.yaml"), "not a valid config")
    finally:
        empty_scratch(world)


def test_a_boolean_for_a_plugin_number_is_refused() -> None:
    from pipeline.errors import PluginError

    with pytest.raises(PluginError, match="latent_size"):
        VAE({"latent_size": True}, ImageInfo(32, 1))


def test_python_m_pipeline_train_usage_mistakes_are_one_line() -> None:
    from pipeline.train import main as train_main

    refused(call(train_main, "--config"))
