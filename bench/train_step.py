"""The trainer's step against a bare PyTorch loop doing the same plugin update, and the trainer fed by
the shard loader against the same trainer fed from memory, in one process; then a 2-rank ZeRO-2 run
of --memory-steps steps whose per-rank resident memory is sampled from outside.

    python bench/train_step.py [--shards DIR] [--steps 40] [--memory-steps 500]
    python bench/train_step.py --vaegan     # only the VAE-GAN step against bench/vaegan_direct.py
    python bench/train_step.py --ema        # only the VAE-GAN step with ema.decay set against without
    python bench/train_step.py --autoencoder-kl   # autoencoder-kl's step against bench/autoencoder_kl_direct.py

Default data: the demo shards (scripts/demo.sh), 32x32 grayscale Fashion-MNIST; model: the `vae`
plugin (the paper's encoder and decoder). Results: a table, and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml
from report import in_fresh_process, machine, markdown_table, write_section

from shards.read.reader import to_unit_range

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "train_step"
BATCH = 16
MEMORY_COLUMNS = ["rank", "RSS at 20% (MiB)", "peak 20-55%", "peak 55-90%", "peak, whole run", "peak change"]
VAEGAN_BATCHES = (BATCH, 64)  # the demo's micro-batch, and the paper's batch on one device
FIXED_COST_BATCHES = (2, 4)  # where the compute is small: the pipeline's own cost per step shows


def run_config(shards: Path, output_dir: Path, steps: int, **extra) -> dict:
    config = {
        "plugin": "vae",
        "model": {"latent_size": 64, "fc_size": 1024},
        "data": {"shards": str(shards), "batch_size": BATCH, "workers": 1},
        "max_steps": steps,
        "gradient_accumulation_steps": 1,
        "deepspeed": {"zero_stage": 2},
        "optimizer": {"name": "rmsprop"},
        "log_every": 10**6,
        "sample_every": 10**6,
        "grid_size": 4,
        "output_dir": str(output_dir),
        "seed": 0,
    }
    config.update(extra)
    return config


def memory_batches(shards: Path, count: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from shards.read.random_access import SplitDataset
    from shards.read.reader import open_split

    dataset = SplitDataset(open_split(shards), pixels=True)  # uint8, as the training loader hands them over
    batches = []
    for start in range(0, count * batch, batch):
        pairs = [dataset[index] for index in range(start, start + batch)]
        batches.append((torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])))
    return batches


def bare_loop(plugin, batches, warmup: int) -> float:
    batch = len(batches[0][0])
    """The same update written directly: networks, RMSprop with a param group per network, backward."""
    from accelerate.utils import set_seed

    set_seed(0)
    networks = torch.nn.ModuleDict(plugin.build_networks())
    optimizer = torch.optim.RMSprop(
        [{"params": network.parameters(), "lr": 3e-4} for network in networks.values()], alpha=0.9, eps=1e-8
    )
    for index, (images, labels) in enumerate(batches):
        if index == warmup:
            start = time.perf_counter()
        loss = plugin.training_step(networks, to_unit_range(images), labels, index).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (len(batches) - warmup) * batch / (time.perf_counter() - start)


def synchronize() -> None:
    """Wait for the GPU's queued kernels, so that a clock read after it counts them (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pipeline_from_memory(trainer, batches, warmup: int) -> float:
    from pipeline.data.stream import MicroBatch

    for index, (images, labels) in enumerate(batches):
        if index == warmup:
            synchronize()
            start = time.perf_counter()
        trainer.train_step(MicroBatch(images, labels, 0))
    synchronize()
    return (len(batches) - warmup) * len(batches[0][0]) / (time.perf_counter() - start)


def pipeline_from_shards(trainer, steps: int, log_every: int) -> float:
    """The full loop (shard loader, logging) for `steps` more steps; the rate of its steady state,
    from metrics.jsonl: the median log interval, leaving out the first (loader start-up) and the last
    (final grids and checkpoint)."""
    trainer.config.log_every = log_every
    trainer.config.max_steps = trainer.step + steps
    trainer.train()
    rows = [json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(row["images_per_s"] for row in rows[1:-1])
    return rates[len(rates) // 2]


def measure(shards: Path, stage: int, batch: int, steps: int, rounds: int, with_loader: bool) -> dict:
    """In this process: the bare loop and the trainer's step at one ZeRO stage, interleaved."""
    from pipeline.config.sections import RunConfig
    from pipeline.plugin import ImageInfo
    from pipeline.plugins.vae import VAE
    from pipeline.training.resolved_run import resolve_run
    from pipeline.training.trainer import Trainer
    from shards.read.reader import open_split

    split = open_split(shards)
    image = ImageInfo(split.image["size"], split.image["channels"])
    config = RunConfig.model_validate(
        run_config(
            shards,
            OUT / f"speed-{stage}-{batch}",
            10**6,
            deepspeed={"zero_stage": stage},
            data={"shards": str(shards), "batch_size": batch, "workers": 1},
        )
    )
    shutil.rmtree(config.output_dir, ignore_errors=True)  # a fresh run folder each time
    warmup = 5
    batches = memory_batches(shards, steps + warmup, batch)
    trainer = Trainer(resolve_run(config, "bench", check_shards=False, warn=print))
    best = {"bare": 0.0, "memory": 0.0}
    for _ in range(rounds):
        best["bare"] = max(best["bare"], bare_loop(VAE(config.model, image), batches, warmup))
        best["memory"] = max(best["memory"], pipeline_from_memory(trainer, batches, warmup))
    if with_loader:
        best["shards"] = pipeline_from_shards(trainer, steps, log_every=max(1, steps // 8))
    return best


def measure_in_subprocess(shards: Path, stage: int, batch: int, steps: int, rounds: int, with_loader: bool) -> dict:
    return run_measurement([str(shards), stage, batch, steps, rounds, with_loader])


def run_measurement(job: list) -> dict:
    return in_fresh_process(__file__, "--measure", job, "measurement")


def speed(shards: Path, steps: int, rounds: int) -> list[list[str]]:
    rows = []
    for stage, batch in ((0, 16), (2, 16), (2, 64)):
        result = measure_in_subprocess(shards, stage, batch, steps, rounds, with_loader=(stage, batch) == (2, 16))
        rows.append(
            [
                f"ZeRO-{stage}, micro-batch {batch}",
                f"{result['bare']:.1f}",
                f"{result['memory']:.1f}",
                f"{result['memory'] / result['bare']:.2f}",
                ">= 0.90",
            ]
        )
        if "shards" in result:
            loader_row = [
                f"ZeRO-{stage}, micro-batch {batch}: fed by the shard loader vs from memory",
                f"{result['memory']:.1f}",
                f"{result['shards']:.1f}",
                f"{result['shards'] / result['memory']:.2f}",
                ">= 0.95",
            ]
    return [*rows, loader_row]


def vaegan_trainer(shards: Path, batch: int, name: str, stage: int = 2):
    """(trainer, plugin) of the `vaegan` plugin, DeepSpeed ZeRO-`stage` in this process, in a fresh run folder."""
    from pipeline.config.sections import RunConfig
    from pipeline.training.resolved_run import resolve_run
    from pipeline.training.trainer import Trainer

    data = {"shards": str(shards), "batch_size": batch, "workers": 1}
    zero = {"zero_stage": stage}
    tree = run_config(shards, OUT / f"{name}-{stage}-{batch}", 10**6, plugin="vaegan", data=data, deepspeed=zero)
    config = RunConfig.model_validate(tree)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    trainer = Trainer(resolve_run(config, "bench", check_shards=False, warn=print))
    return trainer, trainer.plugin


def measure_autoencoder_kl(shards: Path, steps: int, rounds: int, batch: int) -> dict:
    """In this process: the pipeline's autoencoder-kl step (launch/configs/autoencoder-kl-small.yaml's model,
    the discriminator on from the start), the same update written directly, and latent diffusion's
    alternating update, interleaved; and the FLOPs of one step of each."""
    from autoencoder_kl_direct import Alternating, SingleForward
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config.sections import RunConfig
    from pipeline.training.resolved_run import resolve_run
    from pipeline.training.trainer import Trainer

    preset = yaml.safe_load((REPO / "launch/configs/autoencoder-kl-small.yaml").read_text())
    model = {**preset["model"], "disc_start": 0}
    data = {"shards": str(shards), "batch_size": batch, "workers": 1}
    tree = run_config(shards, OUT / f"autoencoder-kl-{batch}", 10**6, plugin="autoencoder-kl", model=model, data=data)
    config = RunConfig.model_validate({**tree, "optimizer": {"lr": 2e-4}})
    shutil.rmtree(config.output_dir, ignore_errors=True)
    trainer = Trainer(resolve_run(config, "bench", check_shards=False, warn=print))
    plugin = trainer.plugin
    warmup, batches = 3, memory_batches(shards, steps + 3, batch)
    updates = {}
    for name, kind in (("single", SingleForward), ("alternating", Alternating)):
        torch.manual_seed(0)
        updates[name] = kind(plugin, torch.nn.ModuleDict(plugin.build_networks()))
    best = {"single": 0.0, "alternating": 0.0, "memory": 0.0}
    for _ in range(rounds):
        for name, update in updates.items():
            for index, (images, _) in enumerate(batches):
                if index == warmup:
                    start = time.perf_counter()
                update.step(to_unit_range(images))
            best[name] = max(best[name], steps * batch / (time.perf_counter() - start))
        best["memory"] = max(best["memory"], pipeline_from_memory(trainer, batches, warmup))
    images = to_unit_range(batches[0][0])
    for name, update in updates.items():
        with FlopCounterMode(display=False) as counter:
            update.step(images)
        best[f"{name}_gflop"] = counter.get_total_flops() / batch / 1e9
    best["pipeline_gflop"] = best["single_gflop"]  # the same computation (own_losses, one forward)
    return best


def measure_ema(shards: Path, steps: int, rounds: int, batch: int) -> dict:
    """In this process: the pipeline's VAE-GAN step fed from memory with no EMA, and with the EMA of its
    encoder and decoder (decay 0.999) following every step, interleaved on the same trainer."""
    from pipeline.checkpoints.ema import weight_average
    from pipeline.config.sections import EMAConfig

    trainer, plugin = vaegan_trainer(shards, batch, "ema")
    average = weight_average(EMAConfig(decay=0.999), plugin, trainer.networks)
    warmup, batches = 3, memory_batches(shards, steps + 3, batch)
    best = {"off": 0.0, "on": 0.0}
    for _ in range(rounds):
        for key, ema in (("off", None), ("on", average)):
            trainer.ema = ema
            best[key] = max(best[key], pipeline_from_memory(trainer, batches, warmup))
    return best


def seconds_per_step(step, batches, warmup: int) -> float:
    """The mean wall time of step(images, labels) over batches[warmup:], after the device has caught up."""
    for index, (images, labels) in enumerate(batches):
        if index == warmup:
            synchronize()
            start = time.perf_counter()
        step(images, labels)
    synchronize()
    return (time.perf_counter() - start) / (len(batches) - warmup)


def measure_vaegan(shards: Path, steps: int, rounds: int, batch: int, stage: int = 2) -> dict:
    """In this process: the direct VAE-GAN update and the pipeline's step (DeepSpeed ZeRO-2, one
    process), interleaved over `rounds` rounds whose order alternates (a machine that slows down during
    the run slows both); each round's seconds per step of each, and the FLOPs of one step of each."""
    from torch.utils.flop_counter import FlopCounterMode
    from vaegan_direct import DirectVAEGAN

    from pipeline.data.stream import MicroBatch

    trainer, plugin = vaegan_trainer(shards, batch, "vaegan", stage)
    warmup, batches = 3, memory_batches(shards, steps + 3, batch)
    torch.manual_seed(0)
    direct = DirectVAEGAN(torch.nn.ModuleDict(plugin.build_networks()), plugin.options.gamma)
    latent = plugin.options.latent_size
    steps_of = {
        "bare": lambda images, _: direct.step(to_unit_range(images), latent),
        "memory": lambda images, labels: trainer.train_step(MicroBatch(images, labels, 0)),
    }
    seconds: dict[str, list[float]] = {"bare": [], "memory": []}
    for round_index in range(rounds):
        order = ("bare", "memory") if round_index % 2 == 0 else ("memory", "bare")
        for name in order:
            seconds[name].append(seconds_per_step(steps_of[name], batches, warmup))
    result: dict = {"seconds": seconds, "batch": batch}
    networks = torch.nn.ModuleDict(plugin.build_networks())
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = plugin.routed_loss(networks, to_unit_range(batches[0][0]))
        loss.backward()
    result["pipeline_gflop"] = counter.get_total_flops() / batch / 1e9
    with FlopCounterMode(display=False) as counter:
        direct.step(to_unit_range(batches[0][0]), latent)
    result["direct_gflop"] = counter.get_total_flops() / batch / 1e9
    return result


def summarise_rounds(result: dict) -> dict[str, float]:
    """From one measure_vaegan: the median images/s of each, the median and range of the per-round ratio,
    and the fixed cost: the median per-round difference in seconds per step."""
    bare, memory, batch = result["seconds"]["bare"], result["seconds"]["memory"], result["batch"]
    ratios = [b / m for b, m in zip(bare, memory, strict=True)]
    return {
        "bare": batch / statistics.median(bare),
        "memory": batch / statistics.median(memory),
        "ratio": statistics.median(ratios),
        "low": min(ratios),
        "high": max(ratios),
        "extra_ms": 1000 * statistics.median([m - b for b, m in zip(bare, memory, strict=True)]),
    }


def rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rank_pids(launcher: int) -> list[int]:
    """The training processes: descendants of the launcher running pipeline.train."""
    found, pending = [], [launcher]
    while pending:
        pid = pending.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pipeline.train" in command and pid != launcher:
            found.append(pid)  # a rank; its own children are DataLoader workers
            continue
        pending += [int(child) for child in children]
    return sorted(found)


def memory(shards: Path, steps: int) -> tuple[list[list[str]], list[dict]]:
    output_dir = OUT / "memory"
    shutil.rmtree(output_dir, ignore_errors=True)
    config_path = OUT / "memory.yaml"
    config_path.write_text(yaml.safe_dump(run_config(shards, output_dir, steps, log_every=50)))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch" / "accelerate" / "cpu-2proc.yaml"),
        "--main_process_port",
        str(port),
        "-m",
        "pipeline.train",
        "--config",
        str(config_path),
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: dict[int, list[tuple[float, int]]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in rank_pids(process.pid):
                samples.setdefault(pid, []).append((time.perf_counter(), rss_of(pid)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if process.wait() != 0:
        raise SystemExit("the 2-rank memory run failed")
    done.set()
    sampler.join()
    rows = []
    for rank, (_, series) in enumerate(sorted(samples.items())):
        values = [rss for _, rss in series if rss]
        # peaks in two equal windows after warm-up (20% into the run) and before the final grids and
        # checkpoint (90%): a leak shows as a higher peak in the second
        count = len(values)
        first, second = max(values[count // 5 : count * 11 // 20]), max(values[count * 11 // 20 : count * 9 // 10])
        rows.append(
            [
                str(rank),
                f"{values[count // 5] / 2**20:.0f}",
                f"{first / 2**20:.0f}",
                f"{second / 2**20:.0f}",
                f"{max(values) / 2**20:.0f}",
                f"{(second - first) / 2**20:+.1f}",
            ]
        )
    records = [json.loads(p.read_text()) for p in sorted((output_dir / "ranks").glob("rank-*.json"))]
    return rows, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "demo" / "shards-fashion-mnist")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: 5 with --vaegan, else 2)")
    parser.add_argument("--memory-steps", type=int, default=500)
    parser.add_argument("--vaegan", action="store_true", help="only the VAE-GAN step against the direct update")
    parser.add_argument("--ema", action="store_true", help="only the VAE-GAN step with its EMA on against off")
    parser.add_argument(
        "--autoencoder-kl", action="store_true", help="only autoencoder-kl's step against the direct updates"
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, in a fresh process
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 5 if args.vaegan else 2
    if args.measure:
        job = json.loads(args.measure)
        if job[0] in ("vaegan", "ema", "autoencoder-kl"):
            measured = {"vaegan": measure_vaegan, "ema": measure_ema, "autoencoder-kl": measure_autoencoder_kl}[job[0]]
            print(json.dumps(measured(Path(job[1]), *job[2:])))
        else:
            shards, stage, batch, steps, rounds, with_loader = job
            print(json.dumps(measure(Path(shards), stage, batch, steps, rounds, with_loader)))
        return
    if not (args.shards / "manifest.json").exists():
        raise SystemExit(f"no shards at {args.shards}: run scripts/demo.sh first, or pass --shards")
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

    if args.vaegan:
        write_vaegan_section(args)
        return
    if args.ema:
        write_ema_section(args)
        return
    if args.autoencoder_kl:
        write_autoencoder_kl_section(args)
        return
    memory_rows, records = memory(args.shards, args.memory_steps)
    speed_rows = speed(args.shards, args.steps, args.rounds)
    partition_rows = [
        [
            str(r["rank"]),
            f"{r['parameters']:,}",
            f"{r['optimizer_state_elements']:,}",
            f"{r['optimizer_state_elements'] / r['parameters']:.3f}",
        ]
        for r in records
    ]
    body = f"""## Training step (`bench/train_step.py`)

{machine()}. `vae` plugin (the paper's encoder and decoder, latent 64, FC 1024) on the demo shards
(32x32 grayscale), RMSProp, fp32 on CPU, one process. Each row is one process that times the same update
written as a bare PyTorch loop and as the pipeline's `Trainer.train_step` (DeepSpeed on), fed from memory,
{args.steps} steps after 5 warm-up steps, best of {args.rounds} interleaved rounds. The loader row runs the full
training loop (shard loader, 1 worker) and takes its steady-state rate from metrics.jsonl.

{markdown_table(["what", "bare loop images/s", "pipeline images/s", "ratio", "target"], speed_rows)}

Memory: 2 ranks, ZeRO-2, {args.memory_steps} steps, resident memory of each rank sampled every 0.2 s from outside
(the end includes the final grids and checkpoint, which gather every network's full weights):

{markdown_table(MEMORY_COLUMNS, memory_rows)}

ZeRO-2 partitioning in that run (`OUTPUT/ranks/rank-N.json`): optimizer state each rank holds
(RMSProp square averages) against the model's parameters:

{markdown_table(["rank", "parameters", "optimizer state elements", "share"], partition_rows)}
"""
    print(body)
    write_section("train_step", body)


def write_vaegan_section(args: argparse.Namespace) -> None:
    """The VAE-GAN step against the direct update (its own section): at VAEGAN_BATCHES against the target,
    and at the small FIXED_COST_BATCHES, where the compute is small and the difference per step is the
    pipeline's fixed cost."""
    rows = []
    jobs = [(2, batch) for batch in FIXED_COST_BATCHES + VAEGAN_BATCHES] + [(0, batch) for batch in VAEGAN_BATCHES]
    for stage, batch in jobs:
        steps = {2: 20, 4: 15, BATCH: 10, 64: 4}[batch] * max(1, args.steps // 40)
        measured = run_measurement(["vaegan", str(args.shards), steps, args.rounds, batch, stage])
        result = summarise_rounds(measured)
        rows.append(
            [
                f"ZeRO-{stage}, {batch}",
                f"{result['bare']:.1f}",
                f"{result['memory']:.1f}",
                f"{result['ratio']:.2f}",
                f"{result['low']:.2f}-{result['high']:.2f}",
                f"{result['extra_ms']:.0f}",
                f"{measured['direct_gflop']:.2f} / {measured['pipeline_gflop']:.2f}",
                ">= 0.95" if batch in VAEGAN_BATCHES and stage == 2 else "",
            ]
        )
    header = [
        "ZeRO stage, micro-batch",
        "direct images/s",
        "pipeline images/s",
        "ratio (median)",
        "ratio (range)",
        "pipeline - direct (ms/step)",
        "GFLOP/image direct / pipeline",
        "target",
    ]
    small = " and ".join(map(str, FIXED_COST_BATCHES))
    body = f"""## The VAE-GAN step (`bench/train_step.py --vaegan`)

{machine()}. `vaegan` plugin at its defaults (the authors' joint discriminator batches, reconstructions
discriminated, weight decay 1e-5), latent 64, FC 1024, 32x32 grayscale, RMSProp: the pipeline's step (the
plugin's `own_gradients` loss, the trainer's one backward, DeepSpeed's ZeRO-2 update, the gradient norms
and the non-finite check) against the same update written directly in `bench/vaegan_direct.py` (one
forward, `torch.autograd.grad` of each network's own loss, three torch RMSProps), one process, fed from
memory. Each micro-batch is one process running {args.rounds} rounds, the two in alternating order; the images/s
are the medians, the ratio is each round's (pipeline over direct) and its median and range over the rounds,
and the last timing column is the median per-round difference in time per step: at micro-batches {small}
(the smallest a batch-normalised VAE-GAN trains on) the compute is small and it is the pipeline's fixed
cost per step. The ZeRO-0 rows are the same step without ZeRO's partitions (what one device needs): the
difference between the two stages is DeepSpeed's flat fp32 partition, copied to and from every step.
GFLOP per image: one step's forward and backward as
`torch.utils.flop_counter` counts them.

{markdown_table(header, rows)}
"""
    print(body)
    write_section("vaegan_step", body)


def write_autoencoder_kl_section(args: argparse.Namespace) -> None:
    """autoencoder-kl's step against the direct single-forward update and LDM's alternating one."""
    rows = []
    for batch in VAEGAN_BATCHES:
        steps = max(10, args.steps // 2) if batch == BATCH else max(5, args.steps // 8)
        result = run_measurement(["autoencoder-kl", str(args.shards), steps, args.rounds, batch])
        for label, key, flops in (
            ("direct update, one forward (bench/autoencoder_kl_direct.py)", "single", "single_gflop"),
            ("LDM's alternating update, two forwards", "alternating", "alternating_gflop"),
            ("pipeline autoencoder-kl step, DeepSpeed ZeRO-2, fed from memory", "memory", "pipeline_gflop"),
        ):
            rows.append(
                [
                    f"{label}, micro-batch {batch}",
                    f"{result[key]:.1f}",
                    f"{result[key] / result['single']:.2f}",
                    f"{result[flops]:.3f}",
                    f"{result[flops] * result[key]:.1f}",
                    ">= 0.90" if key == "memory" else "",
                ]
            )
    body = f"""## The autoencoder-kl step (`bench/train_step.py --autoencoder-kl`)

{machine()}. `autoencoder-kl` with launch/configs/autoencoder-kl-small.yaml's model (widths 32, 64, 64, the
discriminator's features as the perceptual term) and the discriminator on from the first step, 32x32
grayscale demo shards, Adam (0.5, 0.9), fp32, one process, best of {args.rounds} interleaved rounds: the
pipeline's step (own_gradients, one backward, DeepSpeed ZeRO-2), the same update written directly (one
forward, torch.autograd.grad per network's loss, two Adams), and latent diffusion's update in Lightning
(the autoencoder's step with the discriminator frozen, then the autoencoder's forward again for the
discriminator's step). Ratio: against the direct single-forward update. GFLOP per image: one step, forward
and backward, as `torch.utils.flop_counter` counts them.

{markdown_table(["what", "images/s", "ratio", "GFLOP/image", "GFLOP/s", "target"], rows)}
"""
    print(body)
    write_section("autoencoder_kl_step", body)


def write_ema_section(args: argparse.Namespace) -> None:
    """The step with `ema.decay` set against without (its own section)."""
    result = run_measurement(["ema", str(args.shards), args.steps, args.rounds, BATCH])
    row = [
        f"pipeline vaegan step, micro-batch {BATCH}, fed from memory: EMA on vs off",
        f"{result['off']:.1f}",
        f"{result['on']:.1f}",
        f"{result['on'] / result['off']:.2f}",
        ">= 0.97",
    ]
    body = f"""## The EMA's cost (`bench/train_step.py --ema`)

{machine()}. `vaegan` plugin at its defaults, latent 64, FC 1024, the demo's micro-batch of {BATCH} (32x32
grayscale), DeepSpeed ZeRO-2, one process: `Trainer.train_step` fed from memory, {args.steps} steps after 3 of
warm-up, without an EMA and with `ema.decay: 0.999` over the encoder and decoder (the plugin's `ema_networks`),
on the same trainer, best of {args.rounds} interleaved rounds.

{markdown_table(["what", "EMA off images/s", "EMA on images/s", "ratio", "target"], [row])}
"""
    print(body)
    write_section("ema_step", body)


if __name__ == "__main__":
    main()
