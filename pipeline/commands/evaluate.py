"""`pipeline evaluate CHECKPOINT --shards DIR [--split val]`: a trained model's quality in numbers.

On the first --count images of the split (held out from training when it is `val`):
  reconstructions: pixel MSE on [-1, 1] images (the unit of the training logs' `mse`); feature distance,
                   the mean L2 distance between the extractor features of an image and of its
                   reconstruction; Frechet distance and KID between reconstructions and images
  samples:         Frechet distance (FID with the default extractor) and KID between --count decoded
                   prior samples and the images
The features come from pipeline/evaluation/features.py (by default the StyleGAN-family FID Inception, 299 x 299).
A table and the protocol go to stdout; the same as JSON to --json, with sample and reconstruction grids
beside it (NAME-samples.png, NAME-reconstructions.png). Default JSON: RUN/evaluation/step-N-SPLIT.json for
a checkpoint RUN/checkpoints/step-N (or latest), PARENT/evaluation/NAME-SPLIT.json for another weights
folder PARENT/NAME (an export): never inside the weights folder, whose files are checksummed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from functools import partial
from pathlib import Path

import torch
from rich.markup import escape
from rich.table import Table

from pipeline import grids
from pipeline.checkpoints.checkpoint import STATE_FILE, read_state
from pipeline.checkpoints.weights import check_output_beside, read_description
from pipeline.commands.model_commands import add_weights_choice
from pipeline.errors import CheckpointError, PluginError
from pipeline.evaluation.features import INCEPTION_RESOLUTION, PREPROCESSING, FeatureExtractor, load_extractor
from pipeline.evaluation.image_quality import MS_SSIM_MIN_SIDE
from pipeline.evaluation.passes import (
    SAMPLE_GRID,
    SamplePass,
    held_out_images,
    reconstruction_parts,
    reconstruction_pass,
    sample_features,
    sample_parts,
    set_distances,
)
from pipeline.model import load_model
from pipeline.plugin import capabilities, load_plugin_class, options_of_folder
from shards.command_line import SHARD_FOLDER_HELP, bounded, one_line, output, seed, shard_folder
from shards.errors import UserError
from shards.progress import progress_bar

MEASURED = {"samples": "sample", "reconstructions": "reconstruct"}  # each section, and the plugin method it needs


def default_json_path(weights: Path, split: str) -> Path:
    folder = weights.resolve()  # `latest` names its step
    in_a_run = (folder / STATE_FILE).is_file() and folder.parent.name == "checkpoints"
    base = folder.parent.parent if in_a_run else folder.parent
    return base / "evaluation" / f"{folder.name}-{split}.json"


def weights_description(weights: Path) -> dict:
    """What was evaluated: the weights folder, its plugin and options, and its step when it is a checkpoint."""
    folder = weights.resolve()
    description = read_description(folder)
    step = None
    if (folder / STATE_FILE).is_file():
        with contextlib.suppress(CheckpointError):  # the step is only a label here; the weights loaded
            step = read_state(folder)["step"]
    options = options_of_folder(load_plugin_class(description["plugin"]), description)
    return {"weights": str(folder), "plugin": description["plugin"], "model": options, "step": step}


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
        "psnr": "mean over images of each one's PSNR in dB, images mapped to [0, 1], data range 1, torchmetrics",
        "ssim": "mean over images of each one's SSIM: 11x11 Gaussian window, sigma 1.5, k1 0.01, k2 0.03, "
        "images mapped to [0, 1], data range 1, torchmetrics",
        "ms_ssim": "mean over images of each one's MS-SSIM, the same window over 5 scales with Wang et al.'s "
        f"weights, torchmetrics; null for images under {MS_SSIM_MIN_SIDE} px a side",
    }


def evaluate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    json_path = args.json or default_json_path(args.weights, args.split)
    model = load_model(args.weights, args.which_weights)
    plugin, networks = model.plugin, model.networks
    can = capabilities(plugin)
    if not can & {"sample", "reconstruct"}:
        raise PluginError(
            f"the {description_of(args.weights)} plugin can neither sample nor reconstruct: nothing to evaluate"
        )
    made = [section for section, ability in MEASURED.items() if ability in can]
    grid_paths = {name: json_path.with_name(f"{json_path.stem}-{name}.png") for name in made}
    for path in (json_path, *grid_paths.values()):
        check_output_beside(path, args.weights)
    dataset = held_out_images(args.shards, args.split, args.count)
    extractor = load_extractor(args.extractor, args.resolution)
    with progress_bar("images") as progress:
        share = 2 if "reconstruct" in can else 1
        reconstructing = progress.add_task("images" + (" + reconstructions" * (share - 1)), total=share * args.count)
        advance = partial(progress.advance, reconstructing)
        reconstructed = reconstruction_pass(
            *reconstruction_parts(plugin, networks, dataset, extractor, args.count, args.batch_size, advance)
        )
        sampled = None
        if "sample" in can:
            sampling = progress.add_task("samples", total=args.count)
            advance = partial(progress.advance, sampling)
            parts, shown = sample_parts(plugin, networks, extractor, args.count, args.batch_size, args.seed, advance)
            sampled = SamplePass(sample_features(parts), grids.grid(torch.cat(shown)[:SAMPLE_GRID]))
    images = reconstructed.image_features
    sample_distances = reconstruction_distances = None
    if sampled is not None:
        sample_distances, kid = set_distances(
            images, sampled.features, args.kid_subset_size, args.kid_subsets, args.seed
        )
    if reconstructed.reconstruction_features is not None:
        reconstruction_distances, kid = set_distances(
            images, reconstructed.reconstruction_features, args.kid_subset_size, args.kid_subsets, args.seed
        )
        reconstruction_distances = {
            "pixel_mse": reconstructed.pixel_mse,
            "feature_distance": reconstructed.feature_distance,
            **reconstructed.quality,
            **reconstruction_distances,
        }
    result = {
        **weights_description(args.weights),
        "weights_used": model.weights,  # ema or raw
        "shards": args.shards if isinstance(args.shards, str) else str(args.shards.resolve()),
        "split": args.split,
        "samples": sample_distances,  # null: the plugin cannot sample
        "reconstructions": reconstruction_distances,  # null: the plugin cannot reconstruct
        "protocol": protocol(args, extractor, kid.subset_size, kid.subsets),
        "grids": {name: str(path) for name, path in grid_paths.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    try:
        write_json(json_path, result)
        for name, grid in (("samples", sampled and sampled.grid), ("reconstructions", reconstructed.grid)):
            if grid is not None:
                grids.save(grid, grid_paths[name])
    except OSError as error:  # checked before the work; a full disk remains possible
        raise UserError(f"cannot write {error.filename or json_path}: {error.strerror or error}") from None
    print_report(result)
    print(f"wrote {one_line(', '.join([str(json_path), *(path.name for path in grid_paths.values())]))}")
    return 0


def description_of(weights: Path) -> str:
    return read_description(weights.resolve())["plugin"]


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    temporary.replace(path)


def print_report(result: dict) -> None:
    step = f", step {result['step']}" if result["step"] is not None else ""
    title = escape(f"{result['plugin']}{step}: {result['weights']}")  # a path is never markup
    table = Table(title=title, caption="lower is better, but for PSNR, SSIM and MS-SSIM (higher is better)")
    for column, justify in (("metric", "left"), ("compares", "left"), ("value", "right")):
        table.add_column(column, justify=justify)
    samples, reconstructions = result["samples"], result["reconstructions"]
    several_subsets = result["protocol"]["kid_subsets"] > 1  # else the std is 0 by construction

    def kid(distances: dict) -> str:
        return f"{distances['kid']:.4f}" + (f" ± {distances['kid_std']:.4f}" if several_subsets else "")

    rows = []
    if samples is not None:
        rows += [
            ("Frechet distance", "samples vs images", f"{samples['frechet_distance']:.2f}"),
            ("KID", "samples vs images", kid(samples)),
        ]
    if reconstructions is not None:
        rows += [
            ("Frechet distance", "reconstructions vs images", f"{reconstructions['frechet_distance']:.2f}"),
            ("KID", "reconstructions vs images", kid(reconstructions)),
            ("pixel MSE", "each image vs its reconstruction", f"{reconstructions['pixel_mse']:.4f}"),
            ("feature distance", "each image vs its reconstruction", f"{reconstructions['feature_distance']:.3f}"),
            ("PSNR (dB)", "each image vs its reconstruction", f"{reconstructions['psnr']:.2f}"),
            ("SSIM", "each image vs its reconstruction", f"{reconstructions['ssim']:.4f}"),
        ]
        if reconstructions["ms_ssim"] is not None:
            rows.append(("MS-SSIM", "each image vs its reconstruction", f"{reconstructions['ms_ssim']:.4f}"))
    for name, compares, value in rows:
        table.add_row(name, compares, value)
    for section, ability in MEASURED.items():
        if result[section] is None:
            table.add_row(f"({section})", f"the {escape(result['plugin'])} plugin cannot {ability}", "-")
    details = Table(title=escape(f"protocol: {result['shards']}, split {result['split']}"))
    details.add_column("setting")
    details.add_column("value", overflow="fold")
    for key, value in result["protocol"].items():
        details.add_row(key, escape(str(value)))
    output.print(table)  # stdout: the report is the command's result; progress went to stderr
    output.print(details)


def extractor_file(text: str) -> Path:
    """--extractor: torch.jit.load takes only a file name that is UTF-8 (else a TypeError from its C++)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{one_line(text)}: a name that is not UTF-8, which torch cannot open"
        ) from None
    return Path(text)


def add_command(commands: argparse._SubParsersAction) -> None:
    summary = "FID/KID of samples, reconstruction errors: a table and JSON"
    parser = commands.add_parser(
        "evaluate", help=summary, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "weights", type=Path, metavar="CHECKPOINT", help="a checkpoint (OUTPUT/checkpoints/latest) or an export"
    )
    add_weights_choice(parser)
    parser.add_argument("--shards", type=shard_folder, required=True, help=f"the held-out images: {SHARD_FOLDER_HELP}")
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument(
        "--count",
        type=bounded(int, 2, 10**7),
        default=500,
        help="images, reconstructions and samples each (default 500)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="prior samples and KID subsets (default 0)")
    parser.add_argument(
        "--batch-size", type=bounded(int, 1, 4096), default=25, help="images per extractor call (default 25)"
    )
    parser.add_argument(
        "--extractor",
        type=extractor_file,
        metavar="FILE",
        help="a TorchScript feature extractor, N x 3 x R x R in, N x D out (default: the shipped FID Inception)",
    )
    parser.add_argument(
        "--resolution",
        type=bounded(int, 1, 2048),
        default=INCEPTION_RESOLUTION,
        help=f"side the images are resized to for the extractor (default {INCEPTION_RESOLUTION})",
    )
    parser.add_argument("--kid-subsets", type=bounded(int, 1, 10**6), default=100, help="KID subsets (default 100)")
    parser.add_argument(
        "--kid-subset-size",
        type=bounded(int, 2, 10**7),
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
