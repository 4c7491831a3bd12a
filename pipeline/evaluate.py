"""`pipeline evaluate CHECKPOINT --shards DIR [--split val]`: a trained model's quality in numbers.

On the first --count images of the split (held out from training when it is `val`):
  reconstructions: pixel MSE on [-1, 1] images (the unit of the training logs' `mse`); feature distance,
                   the mean L2 distance between the extractor features of an image and of its
                   reconstruction; Frechet distance and KID between reconstructions and images
  samples:         Frechet distance (FID with the default extractor) and KID between --count decoded
                   prior samples and the images
The features come from pipeline/features.py (by default the StyleGAN-family FID Inception, 299 x 299).
A table and the protocol go to stdout; the same as JSON to --json, with sample and reconstruction grids
beside it (NAME-samples.png, NAME-reconstructions.png). Default JSON: RUN/evaluation/step-N-SPLIT.json for
a checkpoint RUN/checkpoints/step-N (or latest), PARENT/evaluation/NAME-SPLIT.json for another weights
folder PARENT/NAME (an export): never inside the weights folder, whose files are checksummed.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from pipeline import grids
from pipeline.checkpoint import STATE_FILE
from pipeline.feature_distances import KernelDistance, frechet_distance, kernel_distance
from pipeline.features import INCEPTION_RESOLUTION, PREPROCESSING, FeatureExtractor, load_extractor
from pipeline.model_commands import load_model
from pipeline.plugin import ModelPlugin
from shards.errors import UserError
from shards.progress import console as progress_console
from shards.progress import progress_bar
from shards.random_access import SplitDataset
from shards.reader import open_split

SAMPLE_GRID = 64  # images in the samples grid
RECONSTRUCTION_GRID = 32  # input/reconstruction pairs in the reconstructions grid


@dataclass(frozen=True)
class ReconstructionPass:
    image_features: np.ndarray
    reconstruction_features: np.ndarray
    pixel_mse: float
    feature_distance: float
    grid: Image.Image  # the first RECONSTRUCTION_GRID inputs, each beside its reconstruction


@dataclass(frozen=True)
class SamplePass:
    features: np.ndarray
    grid: Image.Image  # the first SAMPLE_GRID samples


def default_json_path(weights: Path, split: str) -> Path:
    folder = weights.resolve()  # `latest` names its step
    in_a_run = (folder / STATE_FILE).is_file() and folder.parent.name == "checkpoints"
    base = folder.parent.parent if in_a_run else folder.parent
    return base / "evaluation" / f"{folder.name}-{split}.json"


def held_out_images(shards: Path, split: str, count: int) -> SplitDataset:
    dataset = SplitDataset(open_split(shards, split))
    if count > len(dataset):
        raise UserError(f"--count {count} is more than the {len(dataset)} images of {shards} ({split}); lower --count")
    return dataset


def batches(total: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]


@torch.no_grad()
def measure_reconstructions(
    plugin: ModelPlugin,
    networks: torch.nn.ModuleDict,
    dataset: SplitDataset,
    extractor: FeatureExtractor,
    count: int,
    batch_size: int,
    advance: Callable[[int], None],
) -> ReconstructionPass:
    image_features, reconstruction_features, squared_errors, distances, shown = [], [], [], [], []
    for indices in batches(count, batch_size):
        images = torch.stack([dataset[index][0] for index in indices])
        reconstructions = plugin.reconstruct(networks, images).float()
        batch_image_features, batch_reconstruction_features = extractor.embed(images), extractor.embed(reconstructions)
        image_features.append(batch_image_features)
        reconstruction_features.append(batch_reconstruction_features)
        squared_errors.append((reconstructions - images).pow(2).flatten(1).mean(1))
        distances.append((batch_image_features - batch_reconstruction_features).norm(dim=1))
        if sum(len(pair[0]) for pair in shown) < RECONSTRUCTION_GRID:
            shown.append((images, reconstructions))
        advance(2 * len(indices))
    inputs, outputs = (torch.cat(side)[:RECONSTRUCTION_GRID] for side in zip(*shown, strict=True))
    return ReconstructionPass(
        torch.cat(image_features).numpy(),
        torch.cat(reconstruction_features).numpy(),
        torch.cat(squared_errors).double().mean().item(),
        torch.cat(distances).mean().item(),
        grids.pairs_grid(inputs, outputs),
    )


@torch.no_grad()
def measure_samples(
    plugin: ModelPlugin,
    networks: torch.nn.ModuleDict,
    extractor: FeatureExtractor,
    count: int,
    batch_size: int,
    seed: int,
    advance: Callable[[int], None],
) -> SamplePass:
    generator = torch.Generator().manual_seed(seed)
    features, shown = [], []
    for indices in batches(count, batch_size):
        samples = plugin.sample(networks, len(indices), generator).float()
        features.append(extractor.embed(samples))
        if sum(len(images) for images in shown) < SAMPLE_GRID:
            shown.append(samples)
        advance(len(indices))
    return SamplePass(torch.cat(features).numpy(), grids.grid(torch.cat(shown)[:SAMPLE_GRID]))


def set_distances(
    images: np.ndarray, generated: np.ndarray, args: argparse.Namespace
) -> tuple[dict[str, float], KernelDistance]:
    kid = kernel_distance(images, generated, args.kid_subset_size, args.kid_subsets, args.seed)
    return {"frechet_distance": frechet_distance(images, generated), "kid": kid.mean, "kid_std": kid.std}, kid


def weights_description(weights: Path) -> dict:
    """What was evaluated: the weights folder, its plugin and options, and its step when it is a checkpoint."""
    folder = weights.resolve()
    config = json.loads((folder / "config.json").read_text())  # load_model has read it already
    step = None
    if (folder / STATE_FILE).is_file():
        try:
            step = json.loads((folder / STATE_FILE).read_text()).get("step")
        except (OSError, ValueError, AttributeError):
            step = None  # the step is only a label here; the weights themselves loaded
    return {"weights": str(folder), "plugin": config["plugin"], "model": config.get("model", {}), "step": step}


def protocol(args: argparse.Namespace, extractor: FeatureExtractor, kid_subset_size: int, kid_subsets: int) -> dict:
    return {
        "extractor": extractor.description,
        "extractor_file": str(extractor.path),
        "extractor_sha256": extractor.sha256,
        "feature_size": extractor.feature_size,
        "resolution": extractor.resolution,
        "preprocessing": PREPROCESSING,
        "images": f"the first {args.count} images of split {args.split}, in shard order",
        "image_count": args.count,
        "reconstruction_count": args.count,
        "sample_count": args.count,
        "samples": f"decoded prior draws from one torch.Generator seeded {args.seed}, batches of {args.batch_size}",
        "seed": args.seed,
        "kid": "unbiased MMD^2, kernel (x.y/d + 1)^3, mean and std over random subsets of both sets",
        "kid_subset_size": kid_subset_size,
        "kid_subsets": kid_subsets,
        "pixel_mse": "mean squared error per pixel, images in [-1, 1]",
        "feature_distance": "mean L2 distance between the features of an image and of its reconstruction",
    }


def evaluate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    plugin, networks = load_model(args.weights)
    dataset = held_out_images(args.shards, args.split, args.count)
    extractor = load_extractor(args.extractor, args.resolution)
    json_path = args.json or default_json_path(args.weights, args.split)
    with progress_bar("images") as progress:
        reconstructing = progress.add_task("images + reconstructions", total=2 * args.count)
        sampling = progress.add_task("samples", total=args.count)
        reconstructed = measure_reconstructions(
            plugin, networks, dataset, extractor, args.count, args.batch_size, partial(progress.advance, reconstructing)
        )
        sampled = measure_samples(
            plugin, networks, extractor, args.count, args.batch_size, args.seed, partial(progress.advance, sampling)
        )
    images = reconstructed.image_features
    sample_distances, kid = set_distances(images, sampled.features, args)
    reconstruction_distances, _ = set_distances(images, reconstructed.reconstruction_features, args)
    grid_paths = {name: json_path.with_name(f"{json_path.stem}-{name}.png") for name in ("samples", "reconstructions")}
    result = {
        **weights_description(args.weights),
        "shards": str(args.shards.resolve()),
        "split": args.split,
        "samples": sample_distances,
        "reconstructions": {
            "pixel_mse": reconstructed.pixel_mse,
            "feature_distance": reconstructed.feature_distance,
            **reconstruction_distances,
        },
        "protocol": protocol(args, extractor, kid.subset_size, kid.subsets),
        "grids": {name: str(path) for name, path in grid_paths.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(json_path, result)
    grids.save(sampled.grid, grid_paths["samples"])
    grids.save(reconstructed.grid, grid_paths["reconstructions"])
    print_report(result)
    progress_console.print(f"wrote {json_path}, {grid_paths['samples'].name}, {grid_paths['reconstructions'].name}")
    return 0


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(path)


def print_report(result: dict) -> None:
    step = f", step {result['step']}" if result["step"] is not None else ""
    table = Table(title=f"{result['plugin']}{step}: {result['weights']}", caption="lower is better in every row")
    for column, justify in (("metric", "left"), ("compares", "left"), ("value", "right")):
        table.add_column(column, justify=justify)
    samples, reconstructions = result["samples"], result["reconstructions"]
    several_subsets = result["protocol"]["kid_subsets"] > 1  # else the std is 0 by construction

    def kid(distances: dict) -> str:
        return f"{distances['kid']:.4f}" + (f" ± {distances['kid_std']:.4f}" if several_subsets else "")

    for name, compares, value in (
        ("Frechet distance", "samples vs images", f"{samples['frechet_distance']:.2f}"),
        ("KID", "samples vs images", kid(samples)),
        ("Frechet distance", "reconstructions vs images", f"{reconstructions['frechet_distance']:.2f}"),
        ("KID", "reconstructions vs images", kid(reconstructions)),
        ("pixel MSE", "each image vs its reconstruction", f"{reconstructions['pixel_mse']:.4f}"),
        ("feature distance", "each image vs its reconstruction", f"{reconstructions['feature_distance']:.3f}"),
    ):
        table.add_row(name, compares, value)
    details = Table(title=f"protocol: {result['shards']}, split {result['split']}")
    details.add_column("setting")
    details.add_column("value", overflow="fold")
    for key, value in result["protocol"].items():
        details.add_row(key, str(value))
    output = Console()  # stdout: the report is the command's output; progress went to stderr
    output.print(table)
    output.print(details)


def at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def add_command(commands: argparse._SubParsersAction) -> None:
    summary = "FID/KID of samples, reconstruction errors: a table and JSON"
    parser = commands.add_parser(
        "evaluate", help=summary, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "weights", type=Path, metavar="CHECKPOINT", help="a checkpoint (OUTPUT/checkpoints/latest) or an export"
    )
    parser.add_argument("--shards", type=Path, required=True, help="a shards folder holding the held-out images")
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument(
        "--count", type=at_least(2), default=500, help="images, reconstructions and samples each (default 500)"
    )
    parser.add_argument("--seed", type=int, default=0, help="prior samples and KID subsets (default 0)")
    parser.add_argument("--batch-size", type=at_least(1), default=25, help="images per extractor call (default 25)")
    parser.add_argument(
        "--extractor",
        type=Path,
        metavar="FILE",
        help="a TorchScript feature extractor, N x 3 x R x R in, N x D out (default: the shipped FID Inception)",
    )
    parser.add_argument(
        "--resolution",
        type=at_least(1),
        default=INCEPTION_RESOLUTION,
        help=f"side the images are resized to for the extractor (default {INCEPTION_RESOLUTION})",
    )
    parser.add_argument("--kid-subsets", type=at_least(1), default=100, help="KID subsets (default 100)")
    parser.add_argument(
        "--kid-subset-size",
        type=at_least(2),
        default=1000,
        help="features per KID subset, at most --count (default 1000)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="where the results go (default RUN/evaluation/step-N-SPLIT.json; see above)",
    )
    parser.set_defaults(handler=evaluate)
