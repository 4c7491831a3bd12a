"""Does the discriminator buy sharper reconstructions, measured: the `autoencoder-kl` small preset
(launch/configs/autoencoder-kl-small.yaml) trained with its discriminator and without it (disc_weight 0:
no GAN term in the autoencoder's loss), at equal budget, then `pipeline evaluate` on held-out images.

    python bench/autoencoder_kl_quality.py [--shards DIR] [--steps 300] [--seeds 3] [--count 500]

The references' claim (LDM, taming): the discriminator gives lower reconstruction FID at a small PSNR cost.
Every run: one process (`python -m pipeline.train`), the preset's model and optimizer, batch 16 x 2
accumulation, the same seed, data order and steps for both columns; evaluation: split val, --count
images, the shipped FID Inception. Results: a table (mean +- standard deviation over seeds), and
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from report import machine, markdown_table, write_section

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "autoencoder_kl_quality"
COLUMNS = {"with discriminator": {}, "without (disc_weight 0)": {"disc_weight": 0.0}}
METRICS = (
    ("reconstruction FID", "frechet_distance", 1),
    ("PSNR (dB)", "psnr", 2),
    ("SSIM", "ssim", 3),
    ("pixel MSE", "pixel_mse", 4),
)


def run(command: list[str], log: Path) -> None:
    with open(log, "w") as output:
        if subprocess.run(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{' '.join(command[:4])} ... failed; see {log}")


def train_and_evaluate(column: str, seed: int, args: argparse.Namespace) -> dict:
    name = f"{'with' if not COLUMNS[column] else 'without'}-seed{seed}"
    preset = yaml.safe_load((REPO / "launch/configs/autoencoder-kl-small.yaml").read_text())
    config = {
        **preset,
        "model": {**preset["model"], **COLUMNS[column]},
        "data": {**preset["data"], "shards": str(args.shards)},
        "max_steps": args.steps,
        "checkpoint": {"every": args.steps},
        "sample_every": args.steps,
        "log_every": 50,
        "seed": seed,
        "output_dir": str(OUT / name),
        "resume": "none",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    subprocess.run(["rm", "-rf", str(OUT / name)], check=True)
    (OUT / f"{name}.yaml").write_text(yaml.safe_dump(config))
    print(f"{name}: training {args.steps} steps", flush=True)
    run([sys.executable, "-m", "pipeline.train", "--config", str(OUT / f"{name}.yaml")], OUT / f"{name}-train.log")
    result = OUT / f"{name}.json"
    evaluate = [sys.executable, "-m", "pipeline.cli", "evaluate", str(OUT / name / "checkpoints" / "latest")]
    evaluate += ["--shards", str(args.shards), "--split", "val", "--count", str(args.count), "--json", str(result)]
    print(f"{name}: evaluating on {args.count} held-out images", flush=True)
    run(evaluate, OUT / f"{name}-evaluate.log")
    return json.loads(result.read_text())["reconstructions"]


def summary(values: list[float], digits: int) -> str:
    spread = f" +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "demo" / "shards-fashion-mnist")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()
    if not (args.shards / "manifest.json").exists():
        raise SystemExit(f"no shards at {args.shards}: run scripts/demo.sh first, or pass --shards")
    results = {column: [train_and_evaluate(column, seed, args) for seed in range(args.seeds)] for column in COLUMNS}
    rows = [
        [label, *(summary([run[key] for run in results[column]], digits) for column in COLUMNS)]
        for label, key, digits in METRICS
    ]
    body = f"""## The autoencoder-kl's discriminator (`bench/autoencoder_kl_quality.py`)

{machine()}. launch/configs/autoencoder-kl-small.yaml (widths 32, 64, 64; the discriminator's features as the
perceptual term; the discriminator from step 150) on the demo shards (32x32 grayscale), {args.steps} steps of
16 x 2 images, one process, seeds 0..{args.seeds - 1}; with the discriminator, and without it (disc_weight 0: no
GAN term in the autoencoder's loss, all else equal). `pipeline evaluate` on {args.count} held-out (val) images:
their reconstructions' FID against them (the shipped Inception), PSNR, SSIM, pixel MSE; mean +- standard
deviation over the seeds.

{markdown_table(["metric", *COLUMNS], rows)}
"""
    print(body)
    write_section("autoencoder_kl_quality", body)


if __name__ == "__main__":
    main()
