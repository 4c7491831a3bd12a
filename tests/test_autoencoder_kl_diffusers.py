"""`autoencoder-kl` and diffusers, each way: `pipeline export --format diffusers` writes a folder that
diffusers' own AutoencoderKL.from_pretrained loads with no key missing, unexpected or mismatched, and that
encodes (posterior mean) and decodes as the pipeline's load_model does; `model.init_from` starts a run from
a folder diffusers' save_pretrained wrote. diffusers is the project's `diffusers` extra."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers  # the `diffusers` extra, which scripts/setup.sh installs
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_checkpoints import assert_ok, latest
from trainer_helpers import build_small_shards, launch, run_python, write_config

from pipeline import load_model
from pipeline.config.sections import RunConfig
from pipeline.training.resolved_run import resolve_run
from shards.read.random_access import SplitDataset, first_images
from shards.read.reader import open_split

pytestmark = pytest.mark.slow

MODEL = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "disc_start": 0, "disc_layers": 2}


def trained(tmp_path: Path, **model) -> tuple[Path, Path]:
    shards = build_small_shards(tmp_path / "data", images=40, size=16)
    config = write_config(
        tmp_path / "run.yaml",
        shards,
        tmp_path / "run",
        plugin="autoencoder-kl",
        model={**MODEL, **model},
        max_steps=2,
        ema={"decay": 0.5},
        sample_every=100,
    )
    assert_ok(launch(config, processes=1))
    return latest(tmp_path / "run"), shards


def loaded_by_diffusers(folder: Path):
    model, info = diffusers.AutoencoderKL.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def test_an_export_loads_in_diffusers_and_encodes_and_decodes_as_the_pipeline(tmp_path: Path) -> None:
    checkpoint, shards = trained(tmp_path, learn_logvar=True)
    out = tmp_path / "vae"
    result = run_python(
        "-m", "pipeline.cli", "export", str(checkpoint), str(out), "--format", "diffusers", "--shards", str(shards),
        "--count", "16",
    )  # fmt: skip
    assert_ok(result)
    vae = loaded_by_diffusers(out)
    ours = load_model(checkpoint)  # the EMA weights, as the export's default
    assert ours.weights == "ema"
    dataset = SplitDataset(open_split(shards))
    images = torch.stack([image for image, _ in first_images(dataset, 16)])
    dataset.close()
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        torch.testing.assert_close(ours.encode(images), mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(mean), vae.decode(mean).sample, rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(1 / mean.flatten().std().item(), rel=1e-5)
    assert (config["in_channels"], config["sample_size"], config["block_out_channels"]) == (1, 16, [8, 16])
    assert "logvar" not in load_file(str(out / "diffusion_pytorch_model.safetensors"))  # the loss's, not the VAE's


def test_a_run_starts_from_a_folder_diffusers_saved(tmp_path: Path) -> None:
    """The run trains from it; the networks the run starts with are the saved AutoencoderKL's weights exactly."""
    torch.manual_seed(3)
    saved = diffusers.AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, latent_channels=4, sample_size=16,
    )  # fmt: skip
    saved.save_pretrained(tmp_path / "pretrained")
    checkpoint, _ = trained(tmp_path, init_from=str(tmp_path / "pretrained"))
    assert checkpoint.name == "step-00000002"  # it trains from there
    tree = {**yaml.safe_load((tmp_path / "run.yaml").read_text()), "output_dir": str(tmp_path / "fresh")}
    run = resolve_run(RunConfig.model_validate(tree), "run.yaml", check_shards=True, warn=print)
    ours = {**run.networks["encoder"].state_dict(), **run.networks["decoder"].state_dict()}
    expected = saved.state_dict()
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[key], expected[key]) for key in ours)


def test_a_bad_init_from_is_one_line(tmp_path: Path) -> None:
    shards = build_small_shards(tmp_path / "data", images=40, size=16)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    for folder, expected in [
        (tmp_path / "missing", "cannot read the initial weights"),
        (tmp_path / "other", "safetensors only"),
    ]:
        config = write_config(
            tmp_path / "bad.yaml",
            shards,
            tmp_path / "bad",
            plugin="autoencoder-kl",
            model={**MODEL, "init_from": str(folder)},
        )
        result = run_python("-m", "pipeline.train", "--config", str(config))
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
