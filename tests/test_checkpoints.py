"""Checkpoints and resume, with real processes really killed (SIGKILL to every process of the run):
bit-identical resume on 2 ranks under ZeRO-2 with accumulation and data workers, a kill in the middle of
a checkpoint write, keep_last, a change of the number of ranks, export, and bad checkpoints."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from trainer_helpers import (
    build_small_shards,
    launch,
    launch_killed,
    metrics,
    rank_records,
    run_python,
    weights,
    write_config,
)

from pipeline.checkpoints.checkpoint import point_latest, prune
from pipeline.data.stream import StreamLayout, epoch_order, resume_micro_step


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("checkpoints"))  # 40 images: 7,7,7,7,7,5


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def checkpoint_steps(output_dir: Path) -> list[str]:
    return sorted(path.name for path in (output_dir / "checkpoints").glob("step-*"))


def latest(output_dir: Path) -> Path:
    return (output_dir / "checkpoints" / "latest").resolve()


def state(folder: Path) -> dict:
    return json.loads((folder / "trainer_state.json").read_text())


def losses(output_dir: Path) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "images_per_s"} for record in metrics(output_dir)]


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = [*folder.glob("*.safetensors"), *folder.glob("optimizer/*.safetensors")]
    return {f"{path.relative_to(folder)}:{key}": value for path in files for key, value in load_file(str(path)).items()}


def assert_bit_identical(a: Path, b: Path) -> None:
    left, right = all_tensors(a), all_tensors(b)
    assert left.keys() == right.keys()
    different = [key for key in left if not torch.equal(left[key], right[key])]
    assert not different, different[:5]


def assert_same_bytes(a: Path, b: Path) -> None:
    """Two checkpoints of the same training, one written synchronously and one by checkpoint.async: every
    file the same bytes; trainer_state.json the same but for the run config each recorded (its output_dir
    and checkpoint.async)."""
    names = sorted(str(path.relative_to(a)) for path in a.rglob("*") if path.is_file())
    assert names == sorted(str(path.relative_to(b)) for path in b.rglob("*") if path.is_file())
    for name in names:
        if name != "trainer_state.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    left, right = state(a), state(b)
    assert left.pop("config")["checkpoint"]["async"] != right.pop("config")["checkpoint"]["async"]
    assert left == right


def vaegan_config(tmp_path: Path, shards: Path, name: str, **overrides) -> Path:
    settings = {
        "plugin": "vaegan",
        # equilibrium: per-rank plugin state; historical averaging: plugin tensors (plugin_state.safetensors);
        # the other options of Salimans et al. for their parameters and their paths
        "model": {
            "latent_size": 8,
            "fc_size": 32,
            "equilibrium": True,
            "historical_averaging": 0.01,
            "label_smoothing": 0.9,
            "minibatch_discrimination": {"kernels": 4, "kernel_dims": 3},
        },
        "data": {"shards": str(shards), "batch_size": 2, "workers": 2},
        "max_steps": 7,
        "checkpoint": {"every": 2},
        "sample_every": 100,
        "ema": {"decay": 0.9},  # the encoder's and decoder's EMA resume bit for bit too (*.ema.safetensors)
    }
    return write_config(tmp_path / f"{name}.yaml", shards, tmp_path / name, **{**settings, **overrides})


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_bit_identical(tmp_path: Path) -> None:
    """2 ranks x 2 micro-batches of 2 under ZeRO-2, 2 data workers per rank: an epoch of 40 images is 10
    micro-batches, 5 steps. Killed after micro-batch 7 (mid-step, mid-epoch; last checkpoint: step 2),
    resumed, and run to step 7 across the epoch boundary: every weight, every optimizer partition, every
    rank's RNG and plugin state, and every logged loss equal those of a run never stopped."""
    shards = build_small_shards(tmp_path / "data", images=40, size=32)
    straight = vaegan_config(tmp_path, shards, "straight")
    assert_ok(launch(straight))

    interrupted = vaegan_config(tmp_path, shards, "interrupted")
    killed = launch_killed(interrupted, "micro_step:7")
    assert killed.returncode != 0
    out = tmp_path / "interrupted"
    assert latest(out).name == "step-00000002"
    assert max(record["step"] for record in metrics(out)) == 3  # logged past the checkpoint, then lost
    assert_ok(launch(interrupted))  # resume: auto

    assert_bit_identical(latest(tmp_path / "straight"), latest(out))
    history = load_file(str(latest(out) / "plugin_state.safetensors"))
    assert (int(history["count"]), int(history["last_step"])) == (7, 6)  # the weights at the start of steps 1-7
    resumed, uninterrupted = state(latest(out)), state(latest(tmp_path / "straight"))
    assert resumed["files"] == uninterrupted["files"]  # the same bytes, file by file
    assert resumed["ranks"] == uninterrupted["ranks"]  # RNG and equilibrium counters of both ranks
    assert (resumed["step"], resumed["images"], resumed["data"]["epoch"]) == (7, 7 * 8, 1)
    assert losses(out) == losses(tmp_path / "straight")
    # keep_last 3: the resumed run never deletes the checkpoint it started from
    assert checkpoint_steps(tmp_path / "straight") == ["step-00000004", "step-00000006", "step-00000007"]
    assert checkpoint_steps(out) == ["step-00000002", "step-00000004", "step-00000006", "step-00000007"]


@pytest.mark.slow
@pytest.mark.parametrize("background", [False, True], ids=["synchronous", "async"])
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path: Path, shards: Path, background) -> None:
    """checkpoint.async: the kill comes from the background write while the ranks train on."""
    checkpoints = {"every": 2, "async": background}
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "run", max_steps=6, checkpoint=checkpoints)
    killed = launch_killed(config, "state_write:2")  # halfway through step 4's trainer_state.json
    assert killed.returncode != 0
    root = tmp_path / "run" / "checkpoints"
    assert latest(tmp_path / "run").name == "step-00000002"
    partial = root / ".step-00000004.partial"
    assert (partial / "trainer_state.json").exists()
    with pytest.raises(json.JSONDecodeError):
        json.loads((partial / "trainer_state.json").read_text())
    assert checkpoint_steps(tmp_path / "run") == ["step-00000002"]

    assert_ok(launch(config))
    straight = write_config(tmp_path / "straight.yaml", shards, tmp_path / "straight", max_steps=6)
    assert_ok(launch(straight))
    assert_bit_identical(latest(tmp_path / "straight"), latest(tmp_path / "run"))
    if background:  # and the files the background wrote are those a synchronous save writes
        assert_same_bytes(latest(tmp_path / "straight"), latest(tmp_path / "run"))
    assert not partial.exists()  # cleaned by the next save


@pytest.mark.slow
@pytest.mark.parametrize("background", [False, True], ids=["synchronous", "async"])
def test_a_rank_failing_to_write_stops_every_rank_with_one_line(tmp_path: Path, shards: Path, background) -> None:
    """Rank 1's disk is full: both ranks stop at once (no rank left waiting in a collective) with the same
    line, shown once, and no checkpoint appears. A user error after the process group exists: under
    `python -m pipeline.launch` that line is all there is, exit 2 (tests/test_launcher_errors.py). With
    checkpoint.async the failure comes from the background writes, and is raised where the run waits for it."""
    output_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", shards, output_dir, max_steps=2, checkpoint={"async": background})
    result = launch_killed(config, "disk_full:1", launcher="pipeline.launch")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "pipeline train: error:" in line]
    assert len(errors) == 1 and "rank 1 cannot write its part" in errors[0], result.stderr[-3000:]
    assert "No space left on device" in errors[0]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
    assert checkpoint_steps(tmp_path / "run") == []


def test_prune_keeps_the_new_and_the_resumed_from_and_leaves_later_steps(tmp_path: Path) -> None:
    """A run resumed from step 500 while steps 1000 and 600 exist (an abandoned timeline, and its own
    first save): keep_last counts checkpoints up to the one just written, which is always kept."""
    root = tmp_path / "checkpoints"
    for step in (400, 500, 1000, 600):
        (root / f"step-{step:08d}").mkdir(parents=True)
    (root / ".step-00000700.partial").mkdir()
    prune(root, 1, root / "step-00000600", protected=root / "step-00000500")
    assert checkpoint_steps(tmp_path) == ["step-00000500", "step-00000600", "step-00001000"]
    prune(root, 1, root / "step-00000600", protected=None)
    assert checkpoint_steps(tmp_path) == ["step-00000600", "step-00001000"]
    assert [path.name for path in root.iterdir() if path.name.startswith(".")] == []


@pytest.mark.slow
def test_a_finished_run_resumes_to_nothing_and_extends_with_max_steps(tmp_path: Path, shards: Path) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "run", max_steps=2)
    assert_ok(run_python("-m", "pipeline.train", "--config", str(config)))
    again = run_python("-m", "pipeline.train", "--config", str(config))
    assert_ok(again)
    assert "already at step 2 of 2" in again.stdout
    assert_ok(run_python("-m", "pipeline.train", "--config", str(config), "max_steps=3"))
    assert [record["step"] for record in metrics(tmp_path / "run")] == [1, 2, 3]
    assert state(latest(tmp_path / "run"))["step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_resume_is_exact_under_the_other_zero_stages(tmp_path: Path, shards: Path, zero_stage: int) -> None:
    """ZeRO-1 keeps sliced masters like ZeRO-2; without ZeRO (fp32) DeepSpeed's optimizer is the torch
    optimizer itself, holding whole parameters. Both resume exactly (one process here), input noise
    included: the plugin draws it from torch's global RNG, which the checkpoint must restore."""
    settings = {
        "deepspeed": {"zero_stage": zero_stage},
        "optimizer": {"name": "rmsprop", "lr": 0.01},
        "model": {"hidden": 4, "noise": 0.1},
    }
    straight = write_config(tmp_path / "straight.yaml", shards, tmp_path / "straight", max_steps=4, **settings)
    assert_ok(run_python("-m", "pipeline.train", "--config", str(straight)))
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "run", max_steps=4, **settings)
    assert_ok(run_python("-m", "pipeline.train", "--config", str(config), "max_steps=2"))
    assert_ok(run_python("-m", "pipeline.train", "--config", str(config)))
    assert_bit_identical(latest(tmp_path / "straight"), latest(tmp_path / "run"))
    assert "square_avg/encoder.weight" in load_file(str(latest(tmp_path / "run") / "optimizer/rank-00000.safetensors"))


@pytest.mark.slow
def test_bf16_on_cpu_trains_the_vaegan_and_resumes_exactly(tmp_path: Path) -> None:
    """bf16 runs on CPU, so that CI covers its path before any GPU does: the VAE-GAN (batch norm in
    float32, networks.Float32Statistics) under ZeRO-2 on 2 ranks with accumulation. The checkpoint holds
    float32 masters, not the engine's bf16 copy; a run stopped at step 2 and resumed for a step equals one
    never stopped, bit for bit (weights, optimizer partitions). Few steps: bf16 convolutions are emulated on
    CPUs without bf16 units, the slowest test of the suite."""
    shards = build_small_shards(tmp_path / "data", images=40, size=32)
    straight = vaegan_config(tmp_path, shards, "straight", precision="bf16", max_steps=3)
    assert_ok(launch(straight))
    run = vaegan_config(tmp_path, shards, "run", precision="bf16", max_steps=3)
    assert_ok(launch(run, "max_steps=2"))
    assert_ok(launch(run))
    assert all(record["precision"] == "bf16" for record in rank_records(tmp_path / "run"))
    assert_bit_identical(latest(tmp_path / "straight"), latest(tmp_path / "run"))
    saved = load_file(str(latest(tmp_path / "run") / "encoder.safetensors"))
    masters = torch.cat([tensor.flatten() for tensor in saved.values() if tensor.is_floating_point()])
    assert masters.dtype == torch.float32
    assert (masters != masters.bfloat16().float()).float().mean() > 0.5  # not rounded to bf16


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_number_of_ranks(tmp_path: Path, shards: Path) -> None:
    """2 ranks x batch 2 and 1 rank x batch 4 read the same global micro-batches: a run continued on the
    other number of ranks (2 -> 1, and 1 -> 2) matches one that never changed, up to float summation
    order (RMSProp state, fp32 masters and the data position all carry over)."""
    common = {"max_steps": 4, "checkpoint": {"every": 2}, "optimizer": {"name": "rmsprop", "lr": 0.01}}
    batch = {1: 4, 2: 2}

    def data(processes: int) -> dict:
        return {"shards": str(shards), "batch_size": batch[processes], "workers": 0}

    straight = write_config(tmp_path / "straight.yaml", shards, tmp_path / "straight", data=data(2), **common)
    assert_ok(launch(straight))
    expected = all_tensors(latest(tmp_path / "straight"))
    for before, after in [(2, 1), (1, 2)]:
        run = tmp_path / f"run-{before}-{after}"
        first = write_config(tmp_path / "run.yaml", shards, run, data=data(before), **common)
        assert_ok(launch(first, "max_steps=2", processes=before))
        second = write_config(tmp_path / "run.yaml", shards, run, data=data(after), **common)
        assert_ok(launch(second, processes=after))

        resumed = state(latest(run))
        assert (resumed["world_size"], resumed["step"]) == (after, 4)
        assert len(list((latest(run) / "optimizer").glob("rank-*"))) == after
        found = all_tensors(latest(run))
        for key in [key for key in expected if not key.startswith("optimizer/")]:
            torch.testing.assert_close(expected[key], found[key], rtol=1e-5, atol=1e-6)
        assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]


@pytest.mark.parametrize(("saved_batch", "new_batch"), [(4, 6), (6, 4), (4, 12), (12, 8)])
def test_another_global_batch_repeats_less_than_one_batch_and_skips_nothing(saved_batch, new_batch) -> None:
    """What the README states: the epoch continues from the saved sample position, rounded down to the
    new global micro-batch."""
    counts = (7, 7, 7, 7, 7, 5)
    saved = StreamLayout(counts, seed=3, shuffle_shards=2, world_size=1, batch_size=saved_batch)
    new = StreamLayout(counts, seed=3, shuffle_shards=2, world_size=1, batch_size=new_batch)
    for micro_step in range(0, 3 * saved.steps_per_epoch):
        epoch, in_epoch = divmod(micro_step, saved.steps_per_epoch)
        consumed = in_epoch * saved_batch
        start = resume_micro_step(_position(saved, micro_step), new)
        new_epoch, new_in_epoch = divmod(start, new.steps_per_epoch)
        resumed_at = new_in_epoch * new_batch if new_epoch == epoch else None
        if resumed_at is None:  # moved on to the next epoch: only the new layout's dropped tail remained
            assert new_epoch == epoch + 1 and consumed >= new.steps_per_epoch * new_batch
        else:
            assert consumed - new_batch < resumed_at <= consumed  # repeats < one batch, skips none
            order = list(epoch_order(new, epoch))
            assert list(epoch_order(saved, epoch))[:consumed] == order[:consumed]  # same epoch order


def _position(layout: StreamLayout, micro_step: int) -> dict:
    from pipeline.data.stream import data_position

    return data_position(layout, micro_step)


@pytest.mark.slow
def test_export_gives_weights_that_need_no_deepspeed(tmp_path: Path, shards: Path) -> None:
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "run", max_steps=2, ema={"decay": 0.5})
    assert_ok(run_python("-m", "pipeline.train", "--config", str(config)))
    exported = tmp_path / "exported"
    assert_ok(run_python("-m", "pipeline.cli", "export", str(tmp_path / "run/checkpoints/latest"), str(exported)))
    assert sorted(path.name for path in exported.iterdir()) == [
        "config.json",
        "decoder.ema.safetensors",
        "decoder.safetensors",
        "encoder.ema.safetensors",
        "encoder.safetensors",
    ]
    for network, tensors in weights(tmp_path / "run").items():
        again = load_file(str(exported / f"{network}.safetensors"))
        assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)
    assert_ok(run_python("-m", "pipeline.cli", "sample", str(exported), str(tmp_path / "grid.png"), "--count", "4"))
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shards: Path) -> Path:
    """A 1-rank run with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("finished")
    config = write_config(folder / "run.yaml", shards, folder / "run", max_steps=4, checkpoint={"every": 2})
    assert_ok(run_python("-m", "pipeline.train", "--config", str(config)))
    return folder / "run"


def copy_run(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def train(tmp_path: Path, shards: Path, *overrides: str, **settings) -> subprocess.CompletedProcess:
    config = write_config(tmp_path / "again.yaml", shards, tmp_path / "run", max_steps=6, **settings)
    return run_python("-m", "pipeline.train", "--config", str(config), *overrides)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.slow
def test_auto_passes_over_a_truncated_checkpoint_with_a_warning(tmp_path: Path, shards: Path, finished: Path) -> None:
    run = copy_run(finished, tmp_path)
    partition = run / "checkpoints/step-00000004/optimizer/rank-00000.safetensors"
    partition.write_bytes(partition.read_bytes()[:-100])
    result = train(tmp_path, shards)
    assert_ok(result)
    assert "skipping checkpoint step-00000004" in result.stderr and "checksum does not match" in result.stderr
    assert [record["step"] for record in metrics(run)] == [1, 2, 3, 4, 5, 6]  # resumed from step 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("tamper", "rank-00000.safetensors: its checksum does not match"),
        ("missing", "encoder.safetensors: missing"),
        ("no state", "trainer_state.json: missing"),
        ("other plugin", "a checkpoint of plugin 'linear', not 'vae'"),
        ("other shapes", "encoder.safetensors: bias is (4,) in the checkpoint, (8,) in this linear encoder"),
    ],
)
def test_a_bad_checkpoint_named_by_path_fails_with_one_line(tmp_path, shards, finished, damage, expected) -> None:
    run = copy_run(finished, tmp_path)
    folder = run / "checkpoints/step-00000004"
    overrides = [f"resume={folder}"]
    settings = {}
    if damage == "tamper":
        partition = folder / "optimizer/rank-00000.safetensors"
        data = bytearray(partition.read_bytes())
        data[-5] ^= 0xFF
        partition.write_bytes(bytes(data))
    elif damage == "missing":
        (folder / "encoder.safetensors").unlink()
    elif damage == "no state":
        (folder / "trainer_state.json").unlink()
    elif damage == "other plugin":
        settings = {"plugin": "vae", "model": {"latent_size": 8, "fc_size": 32}}
    elif damage == "other shapes":
        settings = {"model": {"hidden": 8}}
    line = one_error_line(train(tmp_path, shards, *overrides, **settings))
    assert expected in line, line
    assert str(folder) in line


@pytest.mark.slow
def test_checkpoints_by_the_clock_are_taken_by_every_rank_at_the_same_step(tmp_path: Path, shards: Path) -> None:
    """checkpoint.every_minutes alone (checkpoint.every: null): a checkpoint once that long has passed,
    whichever rank's clock says so first; every rank writes its part of the same step, so each folder is
    complete and valid, and the clock starts again after each."""
    from pipeline.checkpoints.checkpoint import validate

    model = {"hidden": 4, "seconds_per_micro_batch": 0.1}  # a step: 2 micro-batches, at least 0.2 s
    checkpoint = {"every": None, "every_minutes": 0.005, "keep_last": 100}  # every 0.3 s
    config = write_config(
        tmp_path / "run.yaml", shards, tmp_path / "run", max_steps=12, model=model, checkpoint=checkpoint
    )
    assert_ok(launch(config))
    steps = [int(name.removeprefix("step-")) for name in checkpoint_steps(tmp_path / "run")]
    assert steps[-1] == 12 and len(steps) >= 3, steps  # by the clock, then the final one
    assert len(steps) <= 12 and len(set(steps)) == len(steps)
    for step in steps:
        folder = tmp_path / "run" / "checkpoints" / f"step-{step:08d}"
        assert validate(folder)["step"] == step
        assert len(list((folder / "optimizer").glob("*.safetensors"))) >= 2  # both ranks' partitions


@pytest.mark.slow
def test_auto_resumes_from_latest_not_from_a_later_step_of_an_abandoned_timeline(
    tmp_path: Path, shards: Path, finished: Path
) -> None:
    """The case the rule exists for: a run resumed from step 2 by path (its step-4 folder, from the timeline
    it abandoned, left beside it) whose `latest` names step 2 again. resume=auto must take `latest`, the
    run's own newest, not step 4, the newest folder: the run goes on from step 2 and re-reaches step 4 with
    its own weights, which equal those of the original timeline's step 4 (the same data and noise)."""
    run = copy_run(finished, tmp_path)
    root = run / "checkpoints"
    original_step_4 = all_tensors(root / "step-00000004")
    tampered = root / "step-00000004" / "encoder.safetensors"  # the abandoned timeline's weights: not these
    tensors = load_file(tampered)
    save_file({name: tensor + 1 for name, tensor in tensors.items()}, tampered)
    point_latest(root, "step-00000002")
    config = write_config(tmp_path / "again.yaml", shards, run, max_steps=4, checkpoint={"every": 2})
    dry = run_python("-m", "pipeline.train", "--config", str(config), "--dry-run")
    assert_ok(dry)
    assert f"resume from {root / 'step-00000002'} (step 2)" in dry.stdout
    assert_ok(run_python("-m", "pipeline.train", "--config", str(config)))
    assert state(latest(run))["step"] == 4
    again = all_tensors(latest(run))
    assert again.keys() == original_step_4.keys()
    assert all(torch.equal(again[key], original_step_4[key]) for key in again)
