"""Does the VAE-GAN beat the VAE, measured: the models of COLUMNS trained on the same shards with the
same budget, then `pipeline evaluate` on the same held-out images.

    python bench/quality.py [--shards DIR] [--steps 250] [--batch-size 64] [--count 500] [--seeds 1]

Columns: the VAE; the VAE-GAN at its defaults (the authors' gamma, joint discriminator batches, weight decay
1e-5); and the VAE-GAN as the plugin trained before those were corrected (gamma 6.4e-5, separate batches), to
show what the correction did; and kept runs alone (KEPT_ONLY) of code that is gone: the defaults before the
joint batches' two gradient terms were the authors'. Default data: the demo shards (scripts/demo.sh), 32x32
grayscale Fashion-MNIST. Every run: one process (`python -m pipeline.train`, DeepSpeed ZeRO-2), the demo's
model size (latent 32, encoder FC 1024), RMSProp at the plugins' settings, the same seed, data order, steps
and batch; the VAE-GANs with the demo's non-saturating decoder loss. Evaluation: split val, --count images,
reconstructions and samples each, the shipped FID Inception. Results: a side-by-side table, and
docs/benchmarks.md with each column's sample and reconstruction grids and loss curves
(docs/quality-<column>-*.png).

A finished run's figures are kept in docs/quality-runs.json (committed: a run costs up to an hour here,
and nine do not fit in one sitting) and reused while its config is the same, so seeds can be added over
several sessions; `--report` writes the table from the kept runs alone, each column over the seeds it has.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from report import machine, markdown_table, write_section

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "quality"
DOCS = REPO / "docs"
KEPT_RUNS = DOCS / "quality-runs.json"
MODEL = {"latent_size": 32, "fc_size": 1024}  # launch/configs/demo.yaml
DEMO_VAEGAN = {"generator_loss": "non_saturating"}
# column: (plugin, model options, optimizer settings)
COLUMNS = {
    "vae": ("vae", {}, {}),
    "vaegan": ("vaegan", DEMO_VAEGAN, {}),
    "vaegan-before": (
        "vaegan",
        {**DEMO_VAEGAN, "gamma": 6.4e-5, "discriminator_batches": "separate"},
        {"weight_decay": 0.0},
    ),
    # the training-stability options of Salimans et al. (2016), each alone over the default VAE-GAN
    "vaegan-label-smoothing": ("vaegan", {**DEMO_VAEGAN, "label_smoothing": 0.9}, {}),
    "vaegan-feature-matching": ("vaegan", {**DEMO_VAEGAN, "generator_loss": "feature_matching"}, {}),
}
# Columns of kept runs alone: the code that trained them is gone, so they are never retrained; each
# was run with the config of the column named beside it.
KEPT_ONLY = {"vaegan-uncorrected-joint": "vaegan"}  # before issue 30's two joint-batch gradient terms
PLUGINS = (*COLUMNS, *KEPT_ONLY)
# (label, section of the evaluation JSON, key, digits)
METRICS = (
    ("FID, samples vs held-out images", "samples", "frechet_distance", 2),
    ("KID, samples vs held-out images", "samples", "kid", 4),
    ("FID, reconstructions vs held-out images", "reconstructions", "frechet_distance", 2),
    ("KID, reconstructions vs held-out images", "reconstructions", "kid", 4),
    ("pixel MSE, image vs reconstruction ([-1, 1])", "reconstructions", "pixel_mse", 4),
    ("Inception feature distance, image vs reconstruction", "reconstructions", "feature_distance", 2),
    ("PSNR (dB), image vs reconstruction (higher is better)", "reconstructions", "psnr", 2),
    ("SSIM, image vs reconstruction (higher is better)", "reconstructions", "ssim", 4),
)
HIGHER_IS_BETTER = {"psnr", "ssim"}
OSCILLATION = "dis"  # the discriminator's loss: its spread over the second half of training


def run_config(column: str, shards: Path, steps: int, batch_size: int, seed: int) -> dict:
    plugin, options, optimizer = COLUMNS[KEPT_ONLY.get(column, column)]
    return {
        "plugin": plugin,
        "model": {**MODEL, **options},
        "optimizer": optimizer,
        "data": {"shards": str(shards), "batch_size": batch_size, "workers": 1},
        "max_steps": steps,
        "deepspeed": {"zero_stage": 2},
        "log_every": 10,
        "sample_every": steps,
        "checkpoint": {"every": steps, "keep_last": 1},
        "output_dir": str(OUT / f"{column}-seed{seed}"),
        "seed": seed,
    }


def run(command: list[str], log: Path) -> float:
    """Seconds the command took; its output goes to `log`, and a failure ends the bench naming it."""
    start = time.perf_counter()
    with open(log, "w") as output:
        result = subprocess.run(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT)
    if result.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed; see {log}")
    return time.perf_counter() - start


def kept_config(config: dict) -> dict:
    """What identifies a run across checkouts: its config without the folders, which vary by machine."""
    data = {**config["data"], "shards": Path(config["data"]["shards"]).name}
    return {**{key: value for key, value in config.items() if key != "output_dir"}, "data": data}


def load_kept_runs() -> dict:
    return json.loads(KEPT_RUNS.read_text()) if KEPT_RUNS.exists() else {}


def keep_run(name: str, config: dict, result: dict) -> None:
    """Records a finished run's figures (what the tables show, not its weights) in KEPT_RUNS."""
    runs = load_kept_runs()
    runs[name] = {"config": kept_config(config), "result": result}
    temporary = KEPT_RUNS.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    temporary.replace(KEPT_RUNS)


def figures(evaluation: dict) -> dict:
    """The evaluation's figures that the tables read, and its protocol."""
    kept: dict = {"protocol": evaluation["protocol"]}
    for _, section, key, _ in METRICS:
        kept.setdefault(section, {})[key] = evaluation[section].get(key)  # None: an evaluation without it
    return kept


def train_and_evaluate(column: str, seed: int, args: argparse.Namespace) -> dict:
    """One training run and its evaluation (or its kept figures, when the config is the same); seed 0's
    grids and loss curves go to docs/."""
    name = f"{column}-seed{seed}"
    config = run_config(column, args.shards, args.steps, args.batch_size, seed)
    kept = load_kept_runs().get(name)
    if kept and kept["config"] == kept_config(config):
        print(f"{name}: kept from an earlier run ({KEPT_RUNS.name})", flush=True)
        return kept["result"]
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(OUT / name, ignore_errors=True)
    config_file = OUT / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    print(f"{name}: training {args.steps} steps of {args.batch_size}", flush=True)
    train = [sys.executable, "-m", "pipeline.train", "--config", str(config_file)]
    train_seconds = run(train, OUT / f"{name}-train.log")
    print(f"{name}: evaluating on {args.count} held-out images", flush=True)
    evaluation_json = OUT / f"{name}-evaluation.json"
    pipeline = [sys.executable, "-m", "pipeline.cli"]
    evaluate = [*pipeline, "evaluate", str(OUT / name / "checkpoints" / "latest"), "--shards", str(args.shards)]
    evaluate += ["--split", "val", "--count", str(args.count), "--json", str(evaluation_json)]
    evaluate_seconds = run(evaluate, OUT / f"{name}-evaluate.log")
    evaluation = json.loads(evaluation_json.read_text())
    if seed == 0:
        plot = [*pipeline, "plot", str(OUT / name), "--out", str(DOCS / f"quality-{column}-loss-curves.png")]
        run(plot, OUT / f"{name}-plot.log")
        for kind, path in evaluation["grids"].items():
            shutil.copyfile(path, DOCS / f"quality-{column}-{kind}.png")
    logged = [json.loads(line) for line in (OUT / name / "metrics.jsonl").read_text().splitlines()]
    logged = [record for record in logged if OSCILLATION in record]
    last_logged = logged[-1]
    second_half = [record[OSCILLATION] for record in logged[len(logged) // 2 :]]
    result = {
        **figures(evaluation),
        "train_seconds": train_seconds,
        "evaluate_seconds": evaluate_seconds,
        "last_logged": {key: last_logged[key] for key in ("mse", "images_per_s")},
        "oscillation": statistics.stdev(second_half) if len(second_half) > 1 else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    keep_run(name, config, result)
    return result


def kept_results(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Per column with kept runs, those of seeds 0..N-1 whose config is this bench's, in seed order."""
    kept, results = load_kept_runs(), {}
    for column in PLUGINS:
        runs = []
        for seed in range(args.seeds):
            run_ = kept.get(f"{column}-seed{seed}")
            config = kept_config(run_config(column, args.shards, args.steps, args.batch_size, seed))
            if not run_ or run_["config"] != config:
                break  # seeds run in order: the table's "seeds 0 to N" has no gaps
            runs.append(run_["result"])
        if runs:
            results[column] = runs
    if not results:
        raise SystemExit(f"no kept run in {KEPT_RUNS} for these settings: run without --report")
    return results


def summary(values: list[float | None], digits: int) -> str:
    """One seed: the value; several: mean ± std (sample std), then every seed's value; "n/a" for runs
    kept before the figure was measured."""
    values = [value for value in values if value is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    each = ", ".join(f"{value:.{digits}f}" for value in values)
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f} ({each})"


def quality_rows(results: dict[str, list[dict]]) -> list[list[str]]:
    """Per metric: each column over its seeds, and the best mean (lower, or higher for PSNR and SSIM)."""
    rows = []
    for label, section, key, digits in METRICS:
        values = {column: [run[section].get(key) for run in runs] for column, runs in results.items()}
        means = {
            column: statistics.mean(measured)
            for column, found in values.items()
            if (measured := [value for value in found if value is not None])
        }
        best = (max if key in HIGHER_IS_BETTER else min)(means, key=means.get) if means else "n/a"
        rows.append([label, *(summary(values[column], digits) for column in results), best])
    return rows


def training_rows(results: dict[str, list[dict]]) -> list[list[str]]:
    def over_seeds(value, digits: int) -> list[str]:
        return [summary([value(run) for run in runs], digits) for runs in results.values()]

    return [
        ["pixel MSE on its training batch, last logged step", *over_seeds(lambda run: run["last_logged"]["mse"], 4)],
        [
            f"oscillation: std of `{OSCILLATION}` over the second half of the logged steps",
            *over_seeds(lambda run: run.get("oscillation"), 4),
        ],
        ["training images/s, last logged interval", *over_seeds(lambda run: run["last_logged"]["images_per_s"], 1)],
        ["training time (s, process start to end)", *over_seeds(lambda run: run["train_seconds"], 0)],
        ["evaluation time (s)", *over_seeds(lambda run: run["evaluate_seconds"], 0)],
    ]


def grid_table(columns: list[str]) -> str:
    cells = [
        [kind, *(f"![{column} {kind}](quality-{column}-{kind}.png)" for column in columns)]
        for kind in ("samples", "reconstructions", "loss-curves")
    ]
    return markdown_table(["", *columns], cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "demo" / "shards-fashion-mnist")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--count", type=int, default=500, help="held-out images, reconstructions and samples each")
    parser.add_argument("--seeds", type=int, default=1, help="training runs per column, seeds 0..N-1 (default 1)")
    parser.add_argument("--report", action="store_true", help="train nothing: the table from the kept runs alone")
    args = parser.parse_args()
    if not args.report:
        if not (args.shards / "manifest.json").exists():
            raise SystemExit(f"no shards at {args.shards}: run scripts/demo.sh first, or pass --shards")
        # seed by seed, so that an interrupted bench has kept whole rows of results
        for seed in range(args.seeds):
            for column in COLUMNS:
                train_and_evaluate(column, seed, args)
    results = kept_results(args)
    newest = max((run for runs in results.values() for run in runs), key=lambda run: run["date"])
    protocol = newest["protocol"]
    counts = {len(runs) for runs in results.values()}
    seeds_text = (
        "seed 0"
        if counts == {1}
        else ", ".join(f"{column} seeds 0 to {len(runs) - 1}" for column, runs in results.items())
        + ": one training run each"
    )
    images = args.steps * args.batch_size
    body = f"""## VAE against VAE-GAN (`bench/quality.py`)

{machine()}. The models of each column trained on the demo shards ({args.shards.name}: 32x32 grayscale Fashion-MNIST)
with the same budget: {args.steps} steps of {args.batch_size} images ({images:,} images, one process, DeepSpeed
ZeRO-2, {seeds_text}, the same data order for a seed), the demo's model size (latent 32, encoder FC 1024), RMSProp at
the plugins' settings, the VAE-GANs with the non-saturating decoder loss, like the demo. `vae`: the VAE.
`vaegan`: the VAE-GAN at its defaults, the authors' (gamma = w / ((1 - w) x 2) with w = 1e-6, joint
discriminator batches, weight decay 1e-5), its joint-batch gradients the authors' to the last term.
`vaegan-before`: the VAE-GAN as the plugin trained before those were corrected (gamma 6.4e-5, separate
batches, no weight decay). `vaegan-uncorrected-joint`: kept runs of 2026-12-02, the `vaegan` column's
config as trained before two joint-batch gradient terms were made the authors' (L_llike's target
differentiated; the decoder's GAN term without the real images' rows): the code that trained them is gone.
`vaegan-label-smoothing`, `vaegan-feature-matching`: `vaegan` with one option of Salimans et al. (2016) each,
one-sided label smoothing (0.9) or feature matching as the decoder's GAN term. A column appears once a run
of it is kept; "n/a": runs kept before PSNR, SSIM or the loss's oscillation were recorded.
Then `pipeline evaluate CHECKPOINT --shards ... --split val --count {args.count}` on each final checkpoint.

Protocol: {protocol["extractor"]} (sha256 `{protocol["extractor_sha256"][:16]}...`), {protocol["resolution"]} x
{protocol["resolution"]}, {protocol["feature_size"]}-d pool features; images {protocol["preprocessing"]}.
Real images: {protocol["images"]}; {protocol["sample_count"]} samples (seed {protocol["seed"]}) and
{protocol["reconstruction_count"]} reconstructions. KID: {protocol["kid"]}, subset size
{protocol["kid_subset_size"]}, {protocol["kid_subsets"]} subset(s). FID and KID from {args.count} images are
biased upwards against the usual 10k-50k: compare rows of this table with each other, not with published FIDs.
With several seeds a cell is the mean ± the standard deviation over seeds, then each seed's value; the grids
and loss curves are seed 0's.

{markdown_table(["metric (lower is better unless said)", *results, "best"], quality_rows(results))}

{markdown_table(["training", *results], training_rows(results))}

{grid_table(list(results))}
"""
    print(body)
    write_section("quality", body)


if __name__ == "__main__":
    main()
