"""The trainer, launched for real: accelerate with 2 CPU ranks (gloo) under ZeRO-1 and ZeRO-2, the
two-node script, accumulation equivalence against plain PyTorch, plugins, and config errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from conftest import REPO, run_process
from trainer_helpers import (
    PLUGIN_FIXTURE,
    build_small_shards,
    environment,
    free_port,
    launch,
    metrics,
    rank_records,
    run_python,
    weights,
    write_config,
)

from pipeline.data.stream import StreamLayout, epoch_order
from pipeline.plugin import ImageInfo
from shards.read.random_access import SplitDataset
from shards.read.reader import open_split

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("trainer"))


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_two_ranks_train_under_zero(tmp_path: Path, shards: Path, zero_stage) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", shards, out, deepspeed__zero_stage=zero_stage)
    assert_ok(launch(config))
    records = rank_records(out)
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 for r in records)
    assert all(r["zero_stage"] == zero_stage for r in records)
    assert records[0]["parameters"] == 64 * 4 + 4 + 4 * 64 + 64
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert all(m["images"] == m["step"] * 2 * 2 * 2 for m in logged)  # ranks x batch x accumulation
    assert all(m["loss"] > 0 for m in logged)
    assert (out / "samples" / "step-00000003-samples.png").exists()
    assert (out / "samples" / "step-00000003-reconstructions.png").exists()
    assert (out / "config.yaml").read_text().count("zero_stage") == 1


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_partitions_rmsprop_state_across_ranks(tmp_path: Path, shards: Path, zero_stage) -> None:
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"run-{processes}"
        config = write_config(
            tmp_path / f"run-{processes}.yaml",
            shards,
            out,
            deepspeed__zero_stage=zero_stage,
            optimizer={"name": "rmsprop"},
            max_steps=1,
            gradient_accumulation_steps=1,
        )
        assert_ok(launch(config, processes=processes))
        results[processes] = [r["optimizer_state_elements"] for r in rank_records(out)]
    (whole,), halves = results[1], results[2]
    assert whole >= 580  # one square_avg element per parameter (+ step counters, alignment padding)
    for half in halves:
        assert abs(half - whole / 2) <= 0.05 * whole, (halves, whole)


def plain_pytorch_weights(
    shards: Path, steps: int, batch: int, seed: int, lr_factors: list[float] | None = None
) -> dict[str, dict[str, torch.Tensor]]:
    """The same SGD updates, computed independently: one process, one batch per step, no DeepSpeed
    (each step's rates times lr_factors[step] when given)."""
    sys.path.insert(0, str(PLUGIN_FIXTURE))
    from linear_plugin import LinearAutoencoder

    split = open_split(shards)
    plugin = LinearAutoencoder({"hidden": 4}, ImageInfo(split.image["size"], split.image["channels"]))
    set_seed(seed)
    networks = torch.nn.ModuleDict(plugin.build_networks())
    rates = {"encoder": 0.05, "decoder": 0.02}
    layout = StreamLayout(tuple(s["count"] for s in split.shards), seed, 8, world_size=1, batch_size=batch)
    order = list(epoch_order(layout, epoch=0))
    dataset = SplitDataset(split)
    for step in range(steps):
        images = torch.stack([dataset[i][0] for i in order[step * batch : (step + 1) * batch]])
        loss = plugin.loss(networks, images)
        networks.zero_grad()
        loss.backward()
        factor = lr_factors[step] if lr_factors else 1.0
        with torch.no_grad():
            for name, network in networks.items():
                for parameter in network.parameters():
                    parameter -= rates[name] * factor * parameter.grad
    return {
        name: {key: value.detach() for key, value in network.state_dict().items()} for name, network in networks.items()
    }


def test_accumulation_on_two_ranks_equals_one_big_batch(tmp_path: Path, shards: Path) -> None:
    """k=2 micro-batches of b=2 on N=2 ranks under ZeRO-2 == one step on a batch of 8 == plain PyTorch ==
    k=4 micro-batches of 2 on one rank under ZeRO-0 (whose engine skips the gradient all-reduce there)."""
    split_out = tmp_path / "split"
    config = write_config(tmp_path / "split.yaml", shards, split_out, max_steps=3)
    assert_ok(launch(config))
    whole_out = tmp_path / "whole"
    config = write_config(
        tmp_path / "whole.yaml",
        shards,
        whole_out,
        max_steps=3,
        gradient_accumulation_steps=1,
        data={"shards": str(shards), "batch_size": 8, "workers": 0},
    )
    assert_ok(launch(config, processes=1))
    one_rank_out = tmp_path / "one-rank"
    config = write_config(
        tmp_path / "one-rank.yaml",
        shards,
        one_rank_out,
        max_steps=3,
        gradient_accumulation_steps=4,
        deepspeed={"zero_stage": 0},
    )
    assert_ok(launch(config, processes=1))
    expected = plain_pytorch_weights(shards, steps=3, batch=8, seed=7)
    for produced in (weights(split_out), weights(whole_out), weights(one_rank_out)):
        for network, tensors in expected.items():
            for key, value in tensors.items():
                torch.testing.assert_close(produced[network][key], value, rtol=1e-5, atol=1e-6)
    initial = plain_pytorch_weights(shards, steps=0, batch=8, seed=7)
    assert not torch.allclose(initial["encoder"]["weight"], expected["encoder"]["weight"])


def test_power_decay_applies_the_authors_annealed_rate_at_every_step(tmp_path: Path, shards: Path) -> None:
    """lr_schedule power_decay against the authors' annealer (deeppy's GammaAnnealer, written out here):
    the rate DeepSpeed applies at each step, seen in the weights, and the rate logged."""
    schedule = {"name": "power_decay", "power": 0.75, "final_fraction": 0.1, "every": 2, "steps": 4}
    out = tmp_path / "run"
    one_epoch = {
        "max_steps": 5,
        "gradient_accumulation_steps": 1,
        "data": {"shards": str(shards), "batch_size": 8, "workers": 0},
    }
    assert_ok(launch(write_config(tmp_path / "run.yaml", shards, out, lr_schedule=schedule, **one_epoch), processes=1))

    def annealer(start: float, stop: float, t: float, t_max: float, gamma: float) -> float:
        return start - (t / t_max) ** gamma * (start - stop)

    # "epochs" of 2 steps, 2 of them over the decay's 4 steps; the 5th step lies past its end
    factors = [annealer(1.0, 0.1, min(step // 2, 2), 2, 0.75) for step in range(5)]
    assert factors[0] == factors[1] == 1.0 and factors[2] == factors[3] < 1.0 and factors[4] == pytest.approx(0.1)
    assert [record["lr/encoder"] for record in metrics(out)] == pytest.approx([0.05 * f for f in factors])
    assert [record["lr/decoder"] for record in metrics(out)] == pytest.approx([0.02 * f for f in factors])
    expected = plain_pytorch_weights(shards, steps=5, batch=8, seed=7, lr_factors=factors)
    constant, produced = plain_pytorch_weights(shards, steps=5, batch=8, seed=7), weights(out)
    for network, tensors in expected.items():
        for key, value in tensors.items():
            torch.testing.assert_close(produced[network][key], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(constant["encoder"]["weight"], expected["encoder"]["weight"], rtol=1e-4, atol=1e-6)


def test_two_nodes_on_one_machine(tmp_path: Path, shards: Path) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", shards, out, max_steps=2)
    result = run_process(
        ["bash", str(REPO / "launch" / "local-2node.sh"), "--config", str(config)],
        300,
        env={
            **environment(),
            "MASTER_PORT": str(free_port()),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        },
    )
    assert_ok(result)
    assert "wait:" not in result.stderr  # the script waits for each "node" once
    assert [(r["rank"], r["world_size"]) for r in rank_records(out)] == [(0, 2), (1, 2)]
    assert [m["step"] for m in metrics(out)] == [1, 2]


def slurm_stand_ins(folder: Path) -> dict[str, str]:
    """`srun` and `scontrol` for running launch/slurm.sbatch as SLURM would run it in a one-node job:
    srun runs its command once, as node 0, and writes its arguments to srun.args (with FAKE_SRUN_DRY
    set, it only writes them). Not SLURM itself: what this checks is the script's own arithmetic."""
    folder.mkdir()
    (folder / "srun").write_text(
        '#!/bin/bash\nprintf "%s\\n" "$@" > "$(dirname "$0")/srun.args"\n'
        '[ -n "${FAKE_SRUN_DRY:-}" ] && exit 0\nshift\nSLURM_NODEID=0 exec "$@"\n'
    )
    (folder / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    for name in ("srun", "scontrol"):
        (folder / name).chmod(0o755)
    path = f"{folder}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**environment(), "PATH": path, "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1"}


def test_slurm_script_runs_one_process_and_counts_ranks_from_the_allocation(tmp_path: Path, shards: Path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", shards, out, max_steps=2)
    script = ["bash", str(REPO / "launch" / "slurm.sbatch")]
    base = {**slurm_stand_ins(tmp_path / "bin"), "CONFIG": str(config), "MASTER_PORT": str(free_port())}
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "GPUS_PER_NODE", "PROCS_PER_NODE"):
        base.pop(name, None)
    result = run_process(script, 300, env=base)  # one node, no GPU asked for: one CPU rank
    assert_ok(result)
    assert [(r["rank"], r["world_size"]) for r in rank_records(out)] == [(0, 1)]
    assert [m["step"] for m in metrics(out)] == [1, 2]
    launched = (tmp_path / "bin" / "srun.args").read_text()
    assert "--num_processes 1" in launched and "--multi_gpu" not in launched

    for allocation, ranks in [
        ({"SLURM_GPUS_ON_NODE": "4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "a100:2"}, 2),
        ({"SLURM_GPUS_ON_NODE": "4", "PROCS_PER_NODE": "3"}, 3),
        ({"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}, 16),
    ]:
        dry = run_process(script, 60, env={**base, **allocation, "FAKE_SRUN_DRY": "1"})
        assert_ok(dry)
        launched = (tmp_path / "bin" / "srun.args").read_text()
        assert f"--multi_gpu --num_machines {allocation.get('SLURM_NNODES', '1')} --num_processes {ranks}" in launched


def test_vaegan_trains_on_two_ranks_under_zero2_with_accumulation(tmp_path: Path) -> None:
    shards = build_small_shards(tmp_path / "data", images=24, size=32)
    out = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml",
        shards,
        out,
        plugin="vaegan",
        model={"latent_size": 8, "fc_size": 32},
        max_steps=2,
        sample_every=2,
    )
    assert_ok(launch(config))
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2]
    assert all({"prior", "llike", "gen", "dis", "real_cost", "fake_cost", "mse"} <= m.keys() for m in logged)
    assert set(weights(out)) == {"encoder", "decoder", "discriminator"}
    assert [r["world_size"] for r in rank_records(out)] == [2, 2]


def test_bf16_runs_save_the_fp32_master_weights(tmp_path: Path, shards: Path) -> None:
    out = tmp_path / "run"
    config = write_config(
        tmp_path / "run.yaml", shards, out, precision="bf16", max_steps=2, gradient_accumulation_steps=1
    )
    assert_ok(launch(config, processes=1))
    assert (out / "ranks" / "rank-0.json").read_text().count('"bf16"') == 1
    saved = torch.cat([tensor.flatten() for tensor in weights(out)["encoder"].values()])
    assert saved.dtype == torch.float32
    rounded = saved.bfloat16().float()
    assert (saved != rounded).float().mean() > 0.5  # not the engine's bf16 copy


def test_python_m_and_pipeline_train_are_the_same_trainer(tmp_path: Path, shards: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    config = write_config(tmp_path / "run.yaml", shards, first, max_steps=2)
    assert_ok(run_python("-m", "pipeline.train", "--config", str(config)))
    assert_ok(run_python("-m", "pipeline.cli", "train", "--config", str(config), f"output_dir={second}"))
    for network, tensors in weights(first).items():
        for key, value in tensors.items():
            assert torch.equal(value, weights(second)[network][key])


def test_plugins_are_found_through_entry_points() -> None:
    listed = run_python("-m", "pipeline.cli", "plugins")
    assert_ok(listed)
    assert "linear_plugin:LinearAutoencoder" in listed.stdout + listed.stderr
    assert "pipeline.plugins.vae:VAE" in listed.stdout + listed.stderr
    bare = run_process([sys.executable, "-m", "pipeline.cli", "plugins"], 120, env={**os.environ, "COLUMNS": "160"})
    assert "linear_plugin" not in bare.stdout + bare.stderr


BAD_CONFIGS = {
    "data__batchsize": ("data.batchsize: unknown key (did you mean data.batch_size?)", 8),
    "max_steps": ("max_steps: Input should be greater than 0", -1),
    "plugin": ("no plugin named 'nope' is installed", "nope"),
    "data__shards": ("is not a shard folder", "/nonexistent/shards"),
    "deepspeed__zero_stage": ("deepspeed.zero_stage: Input should be 0, 1 or 2", 5),
    "optimizer": (
        "optimizer.discriminator: no such network (this plugin has: encoder, decoder)",
        {"discriminator": {"lr": 0.1}},
    ),
    "seed": ("seed: Input should be greater than or equal to 0", -1),
    "precision": ("precision: fp16 needs a GPU", "fp16"),
    "data__batch_size": ("data.batch_size: 40 samples", 100),
}


def test_a_used_output_dir_and_a_bad_deepspeed_json_fail_at_once(tmp_path: Path, shards: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")
    config = write_config(tmp_path / "a.yaml", shards, used, resume="none")
    result = run_python("-m", "pipeline.train", "--config", str(config))
    assert result.returncode == 2 and "already holds a run" in result.stderr.strip().splitlines()[-1]
    assert (used / "metrics.jsonl").read_text() == "{}\n"  # refused: nothing touched
    for content, message in (
        ('{"optimizer": {"type": "Adam"}}', "remove 'optimizer'"),
        ('{"zero_optimization": {"stage": 3}}', "ZeRO stage 3 is not supported"),
    ):
        (tmp_path / "ds.json").write_text(content)
        config = write_config(
            tmp_path / "b.yaml", shards, tmp_path / "fresh", deepspeed={"config": str(tmp_path / "ds.json")}
        )
        result = run_python("-m", "pipeline.train", "--config", str(config))
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr


@pytest.mark.parametrize("key", sorted(BAD_CONFIGS))
def test_a_bad_config_fails_at_once_with_one_line(tmp_path: Path, shards: Path, key: str) -> None:
    message, value = BAD_CONFIGS[key]
    config = write_config(tmp_path / "bad.yaml", shards, tmp_path / "out", **{key: value})
    start = time.monotonic()
    result = run_python("-m", "pipeline.train", "--config", str(config))
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "DeepSpeed" not in result.stderr
    assert elapsed < 20  # generous: it must fail before any engine or process group exists
    assert not (tmp_path / "out").exists()
