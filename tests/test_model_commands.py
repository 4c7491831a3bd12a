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

from pipeline.model import load_model
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
        max_steps=3,
        data={"shards": str(shards), "batch_size": 4, "workers": 0},
        ema={"decay": 0.5},  # the commands use the EMA weights when a folder has them
    )
    result = launch(config, processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run" / "checkpoints" / "latest", shards


def pipeline(*args) -> None:
    result = run_python("-m", "pipeline.cli", *map(str, args))
    assert result.returncode == 0, result.stderr[-3000:]


def loaded(weights: Path, kind: str = "ema") -> torch.nn.ModuleDict:
    """The networks, loaded here with nothing but safetensors and the plugin's constructor: the EMA weights
    (the VAE averages both its networks), or the raw ones."""
    networks = torch.nn.ModuleDict(VAE(MODEL, ImageInfo(32, 1)).build_networks())
    for name, network in networks.items():
        network.load_state_dict(load_file(str(weights / f"{name}{'.ema' if kind == 'ema' else ''}.safetensors")))
    return networks.eval()


def tile(sheet: Path, row: int, column: int) -> np.ndarray:
    pixels = np.asarray(Image.open(sheet), dtype=np.float64)
    return pixels[2 + row * 34 : 34 + row * 34, 2 + column * 34 : 34 + column * 34]


def as_pixels(image: torch.Tensor) -> np.ndarray:
    return np.rint((image[0].clamp(-1, 1).numpy().astype(np.float64) + 1) * 127.5)


@pytest.mark.slow
def test_sample_decodes_seeded_prior_noise(tmp_path: Path, trained) -> None:
    weights, _ = trained
    pipeline("sample", weights, tmp_path / "samples.png", "--count", "4", "--seed", "5")
    with torch.no_grad():
        expected = loaded(weights)["decoder"](torch.randn(4, 8, generator=torch.Generator().manual_seed(5)))
    assert Image.open(tmp_path / "samples.png").size == (2 * 34 + 2, 2 * 34 + 2)
    for index in range(4):
        assert np.abs(tile(tmp_path / "samples.png", *divmod(index, 2)) - as_pixels(expected[index])).max() <= 1


@pytest.mark.slow
def test_weights_raw_samples_with_the_raw_weights_and_a_folder_without_ema_says_so(tmp_path: Path, trained) -> None:
    weights, _ = trained
    ema, raw = loaded(weights, "ema"), loaded(weights, "raw")
    assert not torch.equal(ema["decoder"].fc[0].weight, raw["decoder"].fc[0].weight)  # 3 steps at decay 0.5
    pipeline("sample", weights, tmp_path / "raw.png", "--count", "1", "--weights", "raw")
    with torch.no_grad():
        expected = raw["decoder"](torch.randn(1, 8, generator=torch.Generator().manual_seed(0)))
    assert np.abs(tile(tmp_path / "raw.png", 0, 0) - as_pixels(expected[0])).max() <= 1
    plain = tmp_path / "plain"
    plain.mkdir()
    for path in weights.glob("*.*"):
        if not path.name.endswith(".ema.safetensors"):
            (plain / path.name).write_bytes(path.read_bytes())
    result = run_python("-m", "pipeline.cli", "sample", str(plain), str(tmp_path / "x.png"), "--weights", "ema")
    assert result.returncode == 2 and "has no EMA weights" in result.stderr and "Traceback" not in result.stderr
    assert load_model(plain).weights == "raw" and load_model(weights).weights == "ema"


@pytest.mark.slow
def test_the_readmes_python_example_runs_and_takes_images_as_users_hold_them(trained) -> None:
    """The README's example, run as written on a trained checkpoint; its results computed here from the
    safetensors files (EMA weights: the folder has them)."""
    weights, _ = trained
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("```python\nfrom pipeline import load_model\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec("from pipeline import load_model\n" + example.replace("runs/demo/checkpoints/latest", str(weights)), namespace)
    networks = loaded(weights, "ema")
    with torch.no_grad():
        images = networks["decoder"](torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
        codes = networks["encoder"](images)[0]
        torch.testing.assert_close(namespace["images"], images)
        torch.testing.assert_close(namespace["codes"], codes)
        torch.testing.assert_close(namespace["again"], networks["decoder"](codes))
        torch.testing.assert_close(namespace["pairs"], networks["decoder"](codes))
    model = namespace["model"]
    assert (model.weights, model.image.size, model.image.channels) == ("ema", 32, 1)

    from pipeline import to_pil

    pictures = to_pil(images)
    assert [(picture.mode, picture.size) for picture in pictures[:1]] == [("L", (32, 32))]
    pixels = np.stack([np.asarray(picture) for picture in pictures])  # N x H x W uint8
    with torch.no_grad():
        expected = networks["encoder"](torch.from_numpy(pixels).float().div(127.5).sub(1).unsqueeze(1))[0]
    for held in (pictures, pictures[0], pixels[..., None], pixels[0], torch.from_numpy(pixels).unsqueeze(1)):
        found = model.encode(held)
        torch.testing.assert_close(found, expected[: len(found)])
    with pytest.raises(ValueError, match="this model takes N x 1 x 32 x 32"):
        model.encode(Image.new("L", (16, 16)))


@pytest.mark.slow
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
    from shards.read.random_access import SplitDataset
    from shards.read.reader import open_split

    networks = loaded(weights)
    with torch.no_grad():  # row 1 runs from the 3rd image's posterior mean to the 4th's
        images = torch.stack([SplitDataset(open_split(shards, "train"))[i][0] for i in (2, 3)])
        ends = networks["decoder"](networks["encoder"](images)[0])
    assert np.abs(tile(tmp_path / "i.png", 1, 0) - as_pixels(ends[0])).max() <= 1
    assert np.abs(tile(tmp_path / "i.png", 1, 4) - as_pixels(ends[1])).max() <= 1


@pytest.mark.slow
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


@pytest.mark.slow
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
    plugin = load_model(folder).plugin
    expected = (0.5, "joint") if recorded else (6.4e-5, "separate")
    assert (plugin.options.gamma, plugin.options.discriminator_batches) == expected


def test_every_argument_of_the_api_is_checked_with_one_error(tmp_path: Path, trained) -> None:
    """The Python API's rules (pipeline/model.py's docstring), as a hostile caller would break them: each
    a ValueError naming the rule, never a raw torch error, an unbounded allocation or a silent result."""
    from pipeline.model import MAX_DRAW

    weights, _ = trained
    model = load_model(weights)
    for count in (0, -1, 2.5, True, "3", MAX_DRAW + 1):
        with pytest.raises(ValueError, match="count: a whole number"):
            model.sample(count)
    with pytest.raises(ValueError, match="seed: a whole number"):
        model.sample(2, seed=-1)
    images = model.sample(2)
    nan = images.clone()
    nan[0, 0, 0, 0] = float("nan")
    broken = {
        "int32": images.int(),
        "bool": images > 0,
        "in \\[-1, 1\\]": images * 2,
        "finite": nan,
        "N x 1 x 32 x 32, N >= 1": images[:0],
        "uint8 pixels": images.numpy().astype(np.int16),
        "a sequence of PIL images": [images[0]],
    }
    for match, value in broken.items():
        with pytest.raises(ValueError, match=match):
            model.encode(value)
    assert model.code_size == MODEL["latent_size"]
    with pytest.raises(ValueError, match="this model decodes float N x 8"):
        model.decode(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="this model decodes float N x 8"):
        model.decode(torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="not finite"):
        model.decode(torch.full((2, 8), float("inf")))


@pytest.mark.slow
def test_a_16_bit_image_is_encoded_as_shards_build_stores_it(tmp_path: Path, trained) -> None:
    """A 16-bit grayscale PNG given to the API equals, once encoded, the same file built into a shard."""
    from conftest import run_shards

    from shards.read.random_access import SplitDataset
    from shards.read.reader import open_split

    weights, _ = trained
    pixels = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 61 % 65536).astype(np.uint16)
    (tmp_path / "images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "images" / "deep.png")
    opened = Image.open(tmp_path / "images" / "deep.png")
    assert opened.mode.startswith("I")
    built = run_shards("build", tmp_path / "images", tmp_path / "shards", "--size", "32", "--mode", "L")
    assert built.returncode == 0, built.stderr
    stored = SplitDataset(open_split(tmp_path / "shards", "train"))[0][0]
    model = load_model(weights)
    torch.testing.assert_close(model.encode(opened), model.encode(stored))
    assert opened.mode.startswith("I")  # the caller's image is not converted in place


@pytest.mark.slow
def test_a_model_command_given_images_of_another_size_says_so_in_one_line(tmp_path: Path, trained) -> None:
    weights, _ = trained
    small = build_small_shards(tmp_path / "data", images=24, size=8)
    arguments = ["reconstruct", str(weights), str(tmp_path / "r.png"), "--shards", str(small), "--split", "train"]
    result = run_python("-m", "pipeline.cli", *arguments)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "this model takes N x 1 x 32 x 32" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("fifo", ["decoder.safetensors", "decoder.ema.safetensors", "trainer_state.json", "extractor"])
def test_a_fifo_in_place_of_a_file_a_command_reads_is_refused_never_waited_on(tmp_path: Path, trained, fifo) -> None:
    """Opening a FIFO for reading waits for a writer, for ever if none comes: weights, EMA weights, a
    checkpoint's trainer_state.json and an --extractor file that are FIFOs are one line, at once."""
    import os
    import shutil

    weights, shards = trained
    folder = tmp_path / "weights"
    shutil.copytree(weights.resolve(), folder)
    extractor = tmp_path / "extractor.pt"
    if fifo == "extractor":
        os.mkfifo(extractor)
        command = ["evaluate", folder, "--shards", shards, "--split", "train", "--count", "4", "--extractor", extractor]
        command += ["--resolution", "32", "--json", tmp_path / "e.json"]
    else:
        (folder / fifo).unlink()
        os.mkfifo(folder / fifo)
        command = (
            ["export", folder, tmp_path / "out"]
            if fifo == "trainer_state.json"
            else ["sample", folder, tmp_path / "s.png"]
        )
    result = run_python("-m", "pipeline.cli", *map(str, command), timeout=120)  # a wait would end in a timeout
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "not a regular file" in line and fifo.split(".")[0] in line, line
