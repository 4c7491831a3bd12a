"""pipeline sample / reconstruct / interpolate / attribute-vector on a real run's weights folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from trainer_helpers import build_small_shards, launch, run_python, write_config

from pipeline.checkpoints.weights import load_model
from pipeline.plugin import ImageInfo
from pipeline.plugins.vae import VAE
from pipeline.plugins.vaegan import VAEGAN

MODEL = {"latent_size": 8, "fc_size": 32}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("model")
    shards = build_small_shards(root / "data", images=24, size=32)
    config = write_config(
        root / "run.yaml",
        shards,
        root / "run",
        plugin="vae",
        model=MODEL,
        max_steps=2,
        data={"shards": str(shards), "batch_size": 4, "workers": 0},
    )
    result = launch(config, processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run" / "checkpoints" / "latest", shards


def pipeline(*args) -> None:
    result = run_python("-m", "pipeline.cli", *map(str, args))
    assert result.returncode == 0, result.stderr[-3000:]


def loaded(weights: Path) -> torch.nn.ModuleDict:
    """The networks, loaded here with nothing but safetensors and the plugin's constructor."""
    networks = torch.nn.ModuleDict(VAE(MODEL, ImageInfo(32, 1)).build_networks())
    for name, network in networks.items():
        network.load_state_dict(load_file(str(weights / f"{name}.safetensors")))
    return networks.eval()


def tile(sheet: Path, row: int, column: int) -> np.ndarray:
    pixels = np.asarray(Image.open(sheet), dtype=np.float64)
    return pixels[2 + row * 34 : 34 + row * 34, 2 + column * 34 : 34 + column * 34]


def as_pixels(image: torch.Tensor) -> np.ndarray:
    return np.rint((image[0].clamp(-1, 1).numpy().astype(np.float64) + 1) * 127.5)


def test_sample_decodes_seeded_prior_noise(tmp_path: Path, trained) -> None:
    weights, _ = trained
    pipeline("sample", weights, tmp_path / "samples.png", "--count", "4", "--seed", "5")
    with torch.no_grad():
        expected = loaded(weights)["decoder"](torch.randn(4, 8, generator=torch.Generator().manual_seed(5)))
    assert Image.open(tmp_path / "samples.png").size == (2 * 34 + 2, 2 * 34 + 2)
    for index in range(4):
        assert np.abs(tile(tmp_path / "samples.png", *divmod(index, 2)) - as_pixels(expected[index])).max() <= 1


def test_reconstruct_interpolate_and_attribute_vector_write_their_grids(tmp_path: Path, trained) -> None:
    weights, shards = trained
    pipeline("reconstruct", weights, tmp_path / "r.png", "--shards", shards, "--split", "train", "--count", "4")
    pipeline(
        "interpolate",
        weights,
        tmp_path / "i.png",
        "--shards",
        shards,
        "--split",
        "train",
        "--rows",
        "2",
        "--steps",
        "5",
    )
    pipeline(
        "attribute-vector",
        weights,
        tmp_path / "a.png",
        "--shards",
        shards,
        "--split",
        "train",
        "--test-split",
        "train",
        "--label",
        "odd",
        "--count",
        "3",
        "--samples",
        "10",
    )
    assert Image.open(tmp_path / "r.png").size == (4 * 34 + 2, 2 * 34 + 2)  # 2 pairs a row, 2 rows
    assert Image.open(tmp_path / "i.png").size == (5 * 34 + 2, 2 * 34 + 2)
    assert Image.open(tmp_path / "a.png").size == (3 * 34 + 2, 3 * 34 + 2)
    from shards.random_access import SplitDataset
    from shards.reader import open_split

    networks = loaded(weights)
    with torch.no_grad():  # row 1 runs from the 3rd image's posterior mean to the 4th's
        images = torch.stack([SplitDataset(open_split(shards, "train"))[i][0] for i in (2, 3)])
        ends = networks["decoder"](networks["encoder"](images)[0])
    assert np.abs(tile(tmp_path / "i.png", 1, 0) - as_pixels(ends[0])).max() <= 1
    assert np.abs(tile(tmp_path / "i.png", 1, 4) - as_pixels(ends[1])).max() <= 1


def test_bad_weights_and_labels_are_one_line(tmp_path: Path, trained) -> None:
    weights, shards = trained
    for args, message in (
        (("sample", tmp_path / "nowhere", tmp_path / "x.png"), "not a weights folder"),
        (
            (
                "attribute-vector",
                weights,
                tmp_path / "x.png",
                "--shards",
                shards,
                "--split",
                "train",
                "--label",
                "nope",
            ),
            "label 'nope'",
        ),
    ):
        result = run_python("-m", "pipeline.cli", *map(str, args))
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in weights.glob("*.*"):
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "decoder.safetensors").write_bytes((weights / "decoder.safetensors").read_bytes()[:1000])
    result = run_python("-m", "pipeline.cli", "sample", str(broken), str(tmp_path / "x.png"))
    assert result.returncode == 2 and "decoder.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_records_every_option_with_its_defaults(trained) -> None:
    description = json.loads((trained[0] / "config.json").read_text())
    assert description["options_recorded"] is True
    assert description["model"] == {**MODEL, "pixel_sigma": 0.1}  # the VAE's default, written out


@pytest.mark.parametrize("recorded", [False, True])
def test_a_folder_loads_with_the_defaults_it_was_trained_with(tmp_path: Path, recorded: bool) -> None:
    """Weights folders written before options were recorded whole name only the options their run set:
    they were trained with the VAE-GAN's defaults of that time (gamma 6.4e-5, separate batches)."""
    folder = tmp_path / "weights"
    folder.mkdir()
    networks = VAEGAN(MODEL, ImageInfo(32, 1)).build_networks()
    for name, network in networks.items():
        save_file(network.state_dict(), str(folder / f"{name}.safetensors"))
    description = {
        "plugin": "vaegan",
        "model": MODEL,
        "image": {"size": 32, "format": "png", "mode": "L", "channels": 1},
    }
    if recorded:
        description.update(model={**MODEL, "gamma": 0.5, "discriminator_batches": "joint"}, options_recorded=True)
    (folder / "config.json").write_text(json.dumps(description))
    plugin, _ = load_model(folder)
    expected = (0.5, "joint") if recorded else (6.4e-5, "separate")
    assert (plugin.options.gamma, plugin.options.discriminator_batches) == expected
