"""Does the VAE-GAN beat the VAE, measured: both plugins trained on the same shards with the same
budget, then `pipeline evaluate` on the same held-out images.

    python bench/quality.py [--shards DIR] [--steps 250] [--batch-size 64] [--count 500]

Default data: the demo shards (scripts/demo.sh), 32x32 grayscale Fashion-MNIST. Both runs: one process
(`python -m pipeline.train`, DeepSpeed ZeRO-2), the demo's model size (latent 32, encoder FC 1024),
RMSProp at the plugins' (the authors') settings, the same seed, data order, steps and batch; the VAE-GAN
with the demo's non-saturating decoder loss. Evaluation: split val, --count images, reconstructions and
samples each, the shipped FID Inception. Results: a side-by-side table, and docs/benchmarks.md with each
model's sample and reconstruction grids and loss curves (docs/quality-<plugin>-*.png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from report import machine, markdown_table, write_section

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "quality"
DOCS = REPO / "docs"
PLUGINS = ("vae", "vaegan")
MODEL = {"latent_size": 32, "fc_size": 1024}  # launch/configs/demo.yaml
PLUGIN_OPTIONS = {"vae": {}, "vaegan": {"generator_loss": "non_saturating"}}
# (label, section of the evaluation JSON, key, digits)
METRICS = (
    ("FID, samples vs held-out images", "samples", "frechet_distance", 2),
    ("KID, samples vs held-out images", "samples", "kid", 4),
    ("FID, reconstructions vs held-out images", "reconstructions", "frechet_distance", 2),
    ("KID, reconstructions vs held-out images", "reconstructions", "kid", 4),
    ("pixel MSE, image vs reconstruction ([-1, 1])", "reconstructions", "pixel_mse", 4),
    ("Inception feature distance, image vs reconstruction", "reconstructions", "feature_distance", 2),
)


def run_config(plugin: str, shards: Path, steps: int, batch_size: int) -> dict:
    return {
        "plugin": plugin,
        "model": {**MODEL, **PLUGIN_OPTIONS[plugin]},
        "data": {"shards": str(shards), "batch_size": batch_size, "workers": 1},
        "max_steps": steps,
        "deepspeed": {"zero_stage": 2},
        "log_every": 10,
        "sample_every": steps,
        "checkpoint": {"every": steps, "keep_last": 1},
        "output_dir": str(OUT / plugin),
        "seed": 0,
    }


def run(command: list[str], log: Path) -> float:
    """Seconds the command took; its output goes to `log`, and a failure ends the bench naming it."""
    start = time.perf_counter()
    with open(log, "w") as output:
        result = subprocess.run(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed; see {log}")
    return time.perf_counter() - start


def train_and_evaluate(plugin: str, args: argparse.Namespace) -> dict:
    shutil.rmtree(OUT / plugin, ignore_errors=True)
    config = OUT / f"{plugin}.yaml"
    config.write_text(yaml.safe_dump(run_config(plugin, args.shards, args.steps, args.batch_size)))
    print(f"{plugin}: training {args.steps} steps of {args.batch_size}", flush=True)
    train_seconds = run([sys.executable, "-m", "pipeline.train", "--config", str(config)], OUT / f"{plugin}-train.log")
    print(f"{plugin}: evaluating on {args.count} held-out images", flush=True)
    evaluation_json = OUT / f"{plugin}-evaluation.json"
    pipeline = [sys.executable, "-m", "pipeline.cli"]
    evaluate = [*pipeline, "evaluate", str(OUT / plugin / "checkpoints" / "latest"), "--shards", str(args.shards)]
    evaluate += ["--split", "val", "--count", str(args.count), "--json", str(evaluation_json)]
    evaluate_seconds = run(evaluate, OUT / f"{plugin}-evaluate.log")
    plot = [*pipeline, "plot", str(OUT / plugin), "--out", str(DOCS / f"quality-{plugin}-loss-curves.png")]
    run(plot, OUT / f"{plugin}-plot.log")
    result = json.loads(evaluation_json.read_text())
    for name, path in result["grids"].items():
        shutil.copyfile(path, DOCS / f"quality-{plugin}-{name}.png")
    last_logged = json.loads((OUT / plugin / "metrics.jsonl").read_text().splitlines()[-1])
    return {**result, "train_seconds": train_seconds, "evaluate_seconds": evaluate_seconds, "last_logged": last_logged}


def quality_rows(results: dict[str, dict]) -> list[list[str]]:
    rows = []
    for label, section, key, digits in METRICS:
        values = {plugin: results[plugin][section][key] for plugin in PLUGINS}
        rows.append([label, *(f"{values[plugin]:.{digits}f}" for plugin in PLUGINS), min(values, key=values.get)])
    return rows


def training_rows(results: dict[str, dict]) -> list[list[str]]:
    def logged(key: str, digits: int) -> list[str]:
        return [f"{results[plugin]['last_logged'][key]:.{digits}f}" for plugin in PLUGINS]

    return [
        ["pixel MSE on its training batch, last logged step", *logged("mse", 4)],
        ["training images/s, last logged interval", *logged("images_per_s", 1)],
        ["training time (s, process start to end)", *(f"{results[plugin]['train_seconds']:.0f}" for plugin in PLUGINS)],
        ["evaluation time (s)", *(f"{results[plugin]['evaluate_seconds']:.0f}" for plugin in PLUGINS)],
    ]


def grid_table() -> str:
    cells = [
        [kind, *(f"![{plugin} {kind}](quality-{plugin}-{kind}.png)" for plugin in PLUGINS)]
        for kind in ("samples", "reconstructions", "loss-curves")
    ]
    return markdown_table(["", *PLUGINS], cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "demo" / "shards-fashion-mnist")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--count", type=int, default=500, help="held-out images, reconstructions and samples each")
    args = parser.parse_args()
    if not (args.shards / "manifest.json").exists():
        raise SystemExit(f"no shards at {args.shards}: run scripts/demo.sh first, or pass --shards")
    OUT.mkdir(parents=True, exist_ok=True)
    results = {plugin: train_and_evaluate(plugin, args) for plugin in PLUGINS}
    protocol = results["vaegan"]["protocol"]
    images = args.steps * args.batch_size
    body = f"""## VAE against VAE-GAN (`bench/quality.py`)

{machine()}. Both plugins trained on the demo shards ({args.shards.name}: 32x32 grayscale Fashion-MNIST)
with the same budget: {args.steps} steps of {args.batch_size} images ({images:,} images, one process, DeepSpeed
ZeRO-2, seed 0, the same data order), the demo's model size (latent 32, encoder FC 1024), RMSProp at
the plugins' (the authors') settings; the VAE-GAN with the non-saturating decoder loss, like the demo.
Then `pipeline evaluate CHECKPOINT --shards ... --split val --count {args.count}` on each final checkpoint.

Protocol: {protocol["extractor"]} (sha256 `{protocol["extractor_sha256"][:16]}...`), {protocol["resolution"]} x
{protocol["resolution"]}, {protocol["feature_size"]}-d pool features; images {protocol["preprocessing"]}.
Real images: {protocol["images"]}; {protocol["sample_count"]} samples (seed {protocol["seed"]}) and
{protocol["reconstruction_count"]} reconstructions. KID: {protocol["kid"]}, subset size
{protocol["kid_subset_size"]}, {protocol["kid_subsets"]} subset(s). FID and KID from {args.count} images are
biased upwards against the usual 10k-50k: compare rows of this table with each other, not with published FIDs.

{markdown_table(["metric (lower is better)", *PLUGINS, "lower"], quality_rows(results))}

{markdown_table(["training", *PLUGINS], training_rows(results))}

{grid_table()}
"""
    print(body)
    write_section("quality", body)


if __name__ == "__main__":
    main()
