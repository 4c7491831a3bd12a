"""`pipeline train --dry-run`: every start-up check, the resolved config printed, nothing written; and the
authors' CelebA preset, resolved, holds celeba_aegan.py's settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from trainer_helpers import PLUGIN_FIXTURE, build_small_shards

from pipeline import train
from pipeline.config.sections import LRScheduleConfig
from pipeline.training.lr_schedule import lr_factor

REPO = Path(__file__).resolve().parents[1]
W = 1e-6  # celeba_aegan.py's recon_vs_gan_weight


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("data"), images=40, size=32)


@pytest.fixture(autouse=True)
def fixture_plugin(monkeypatch) -> None:
    """The tests' own plugin, found through its entry point as in a subprocess (trainer_helpers)."""
    monkeypatch.syspath_prepend(str(PLUGIN_FIXTURE))


def dry_run(capsys, config: Path, *overrides: str) -> tuple[int, str, str]:
    status = train.main(["--config", str(config), "--dry-run", *overrides])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def small_vaegan(shards: Path, output_dir: Path) -> dict:
    return {
        "plugin": "vaegan",
        "model": {"latent_size": 8, "fc_size": 32},
        "data": {"shards": str(shards), "batch_size": 4},
        "max_steps": 2,
        "output_dir": str(output_dir),
    }


def test_prints_every_setting_resolved_and_writes_nothing(tmp_path: Path, shards: Path, capsys) -> None:
    output_dir = tmp_path / "run"
    status, out, err = dry_run(capsys, write(tmp_path / "run.yaml", small_vaegan(shards, output_dir)))
    assert status == 0, err
    assert out.startswith("# pipeline train --dry-run: every check passed; the run would start at step 0")
    resolved = yaml.safe_load(out)
    model = resolved["model"]
    assert model["gamma"] == pytest.approx(W / ((1 - W) * 2), rel=1e-12)  # reconstructions discriminated
    assert (model["discriminator_batches"], model["equilibrium"], model["fc_size"]) == ("joint", False, 32)
    assert resolved["optimizer"]["name"] == "rmsprop"
    for network in ("encoder", "decoder", "discriminator"):
        assert resolved["optimizer"][network] == {"lr": 3e-4, "weight_decay": 1e-5}
    assert resolved["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert resolved["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 4
    assert not output_dir.exists()
    # the printed config is a config: run as one, it resolves to itself
    resolved.pop("deepspeed_config")
    again, out_again, err_again = dry_run(capsys, write(tmp_path / "resolved.yaml", resolved))
    assert again == 0, err_again
    assert out_again == out


@pytest.mark.parametrize(
    ("cores", "local_ranks", "workers"),
    [(16, None, 8), (16, "1", 8), (16, "4", 3), (16, "8", 1), (2, "2", 1), (2, None, 1), (1, None, 1), (48, "4", 8)],
)
def test_default_workers_follow_the_cores_each_rank_has(
    tmp_path: Path, shards: Path, capsys, monkeypatch, cores: int, local_ranks: str | None, workers: int
) -> None:
    """data.workers unset: the cores this process may use (its affinity), shared by the node's ranks, less
    the rank's own core; at least 1, at most 8. The resolved config (config.yaml, --dry-run) says how many."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    status, out, err = dry_run(capsys, write(tmp_path / "run.yaml", small_vaegan(shards, tmp_path / "run")))
    assert status == 0, err
    assert yaml.safe_load(out)["data"]["workers"] == workers
    status, out, err = dry_run(capsys, tmp_path / "run.yaml", "data.workers=0")  # a value given is kept
    assert yaml.safe_load(out)["data"]["workers"] == 0


def test_the_authors_preset_resolves_to_celeba_aegan_settings(shards: Path, capsys) -> None:
    preset = REPO / "launch" / "configs" / "vaegan-celeba-authors.yaml"
    status, out, err = dry_run(capsys, preset, f"data.shards={shards}", "data.batch_size=4", "output_dir=/nonexistent")
    assert status == 0, err
    resolved = yaml.safe_load(out)
    model, optimizer, schedule = resolved["model"], resolved["optimizer"], resolved["lr_schedule"]
    assert (model["latent_size"], model["fc_size"]) == (128, 1024)
    assert model["gamma"] == pytest.approx(W / (1 - W), rel=1e-12)  # one generated set
    assert (model["discriminate_reconstructions"], model["discriminator_batches"]) == (False, "joint")
    assert (model["generator_loss"], model["log_eps"]) == ("saturating", 1e-3)
    assert (model["equilibrium"], model["equilibrium_target"], model["equilibrium_margin"]) == (True, 0.68, 0.35)
    assert (optimizer["name"], optimizer["alpha"], optimizer["eps"]) == ("rmsprop", 0.9, 1e-8)
    for network in ("encoder", "decoder", "discriminator"):
        assert optimizer[network] == {"lr": pytest.approx(0.025 / 64), "weight_decay": 1e-5}
    assert resolved["data"]["hflip"] is True
    epochs, epoch_size = 250, 250
    assert resolved["max_steps"] == epochs * epoch_size
    # deeppy's GammaAnnealer(0.025, 1e-5, 250, gamma=0.75), applied per epoch and divided by the batch size
    config = LRScheduleConfig(**schedule)
    for epoch in (0, 1, 100, 249):
        annealed = 0.025 - (epoch / epochs) ** 0.75 * (0.025 - 1e-5)
        factor = lr_factor(config, epoch * epoch_size + 17, resolved["max_steps"])
        assert optimizer["encoder"]["lr"] * factor == pytest.approx(annealed / 64, rel=1e-9)


LINEAR_DEFAULTS_ERRORS = {
    "typo": (
        {"name": "adam", "lr": 0.1, "beta": [0.5, 0.9]},
        "plugin linear: optimizer_defaults(): 'beta' is neither a setting",
    ),
    "misspelt_network": (
        {"lr": 0.1, "decodr": {"lr": 0.2}},
        "plugin linear: optimizer_defaults(): 'decodr' is neither a setting (name, lr, weight_decay, alpha, betas, "
        "eps) nor a network (encoder, decoder)",
    ),
    "per_network_betas": (
        {"name": "adam", "lr": 0.1, "encoder": {"betas": [0.5, 0.9]}},
        "plugin linear: optimizer_defaults(): encoder.betas: a network's own settings are only lr and weight_decay",
    ),
}


@pytest.mark.parametrize("case", sorted(LINEAR_DEFAULTS_ERRORS))
def test_a_plugins_optimizer_defaults_are_checked(tmp_path: Path, shards: Path, capsys, case: str) -> None:
    defaults, expected = LINEAR_DEFAULTS_ERRORS[case]
    config = {**small_vaegan(shards, tmp_path / "run"), "plugin": "linear", "model": {"optimizer_defaults": defaults}}
    status, out, err = dry_run(capsys, write(tmp_path / "run.yaml", config))
    assert (status, out) == (2, "")
    assert len(err.splitlines()) == 1 and expected in err, err


def test_the_optimizer_each_network_gets_is_resolved(tmp_path: Path, shards: Path, capsys) -> None:
    defaults = {"name": "adam", "lr": 0.1, "betas": [0.5, 0.9], "decoder": {"lr": 0.2, "weight_decay": 0.01}}
    config = {**small_vaegan(shards, tmp_path / "run"), "plugin": "linear", "model": {"optimizer_defaults": defaults}}
    config["optimizer"] = {"encoder": {"weight_decay": 0.5}, "eps": 1e-6}
    status, out, err = dry_run(capsys, write(tmp_path / "run.yaml", config))
    assert status == 0, err
    assert yaml.safe_load(out)["optimizer"] == {
        "name": "adam",
        "betas": [0.5, 0.9],
        "eps": 1e-6,
        "encoder": {"lr": 0.1, "weight_decay": 0.5},
        "decoder": {"lr": 0.2, "weight_decay": 0.01},
    }


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("option", "pipeline train: error: vaegan: model.gamma: Input should be greater than 0 (got -1)"),
        ("alpha_for_adam", "optimizer.alpha: adam takes no alpha (it takes: lr, weight_decay, betas, eps)"),
        ("held_run", "already holds a run (metrics.jsonl) and resume=none"),
        ("deepspeed", "deepspeed.config: remove 'optimizer': the run config and the plugin set it"),
    ],
)
def test_a_problem_is_one_line_and_exit_2(tmp_path: Path, shards: Path, capsys, damage: str, expected: str) -> None:
    config = small_vaegan(shards, tmp_path / "run")
    if damage == "option":
        config["model"]["gamma"] = -1
    elif damage == "alpha_for_adam":
        config["optimizer"] = {"name": "adam", "alpha": 0.9}
    elif damage == "held_run":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.jsonl").write_text("")
        config["resume"] = "none"
    else:  # only building the DeepSpeed config finds this one
        (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "Adam"}}))
        config["deepspeed"] = {"config": str(tmp_path / "ds.json")}
    status, out, err = dry_run(capsys, write(tmp_path / "run.yaml", config))
    assert (status, out) == (2, "")
    assert len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize("dry", [True, False], ids=["dry_run", "run"])
def test_mixed_precision_without_zero_is_refused_before_any_folder(tmp_path: Path, shards: Path, capsys, dry) -> None:
    """bf16 (or fp16) at ZeRO stage 0 cannot be checkpointed (DeepSpeed's mixed-precision optimizer keeps
    its state unlinked to the parameters): one line naming the precision asked for, from --dry-run and from
    a run alike, before the run folder or its lock exist."""
    output_dir = tmp_path / "run"
    config = write(tmp_path / "run.yaml", small_vaegan(shards, output_dir))
    arguments = ["--config", str(config), "precision=bf16", "deepspeed.zero_stage=0", *(["--dry-run"] if dry else [])]
    status = train.main(arguments)
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip() == (
        "pipeline train: error: precision bf16 with ZeRO stage 0 cannot be checkpointed: set "
        "deepspeed.zero_stage to 1 or 2, or precision fp32"
    )
    assert not output_dir.exists()
