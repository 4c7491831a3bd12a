"""Saving and loading a VAE-GAN checkpoint against writing and reading the same tensors with bare
safetensors, in the same process.

    python bench/checkpoint.py [--rounds 3] [--size 64]

The model is the paper's VAE-GAN for 64x64 RGB (latent 128, encoder FC 2048), RMSProp, DeepSpeed ZeRO-2
in one process, after one training step (so the optimizer state exists). `save` is
Trainer.save_checkpoint (full fp32 weights gathered, the optimizer partition, RNG, fsync of every file,
sha256 of every file, atomic rename, `latest`); `load` is what a resume does (validation: sha256 of every
file, then weights into the networks and the optimizer partitions into DeepSpeed). The bare rows write
the same tensors with safetensors.torch.save_file (no fsync, no hashes) and read them with load_file into
tensors already allocated. The stall: how long the loop stands still for one checkpoint, synchronous
(the whole save) and with checkpoint.async (taking the save: weights gathered, copies in host memory;
the writing then runs in a background thread), against a bare save_file of the same tensors with fsync.
Best of --rounds, interleaved. Results: a table, and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import machine, markdown_table, write_section
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "checkpoint"


def small_shards(size: int) -> Path:
    """A few real images at the model's size, in RGB: the trainer needs a split to exist."""
    images, out = OUT / "images", OUT / f"shards-{size}"
    if not (out / "manifest.json").exists():
        shards = [sys.executable, "-m", "shards.cli"]
        subprocess.run([*shards, "demo-images", str(images), "--source", "digits", "--limit", "64"], check=True)
        options = ["--size", str(size), "--mode", "RGB", "--labels", "folder", "--val-fraction", "0"]
        subprocess.run([*shards, "build", str(images), str(out), *options], check=True)
    return out


def make_trainer(shards: Path, output_dir: Path, model: dict | None = None):
    from pipeline.config.sections import RunConfig
    from pipeline.data.stream import MicroBatch
    from pipeline.training.resolved_run import resolve_run
    from pipeline.training.trainer import Trainer
    from shards.read.reader import open_split

    split = open_split(shards)
    config = RunConfig.model_validate(
        {
            "plugin": "vaegan",
            "model": model or {},
            "data": {"shards": str(shards), "batch_size": 8, "workers": 0},
            "max_steps": 10**6,
            "deepspeed": {"zero_stage": 2},
            "checkpoint": {"every": 10**6, "keep_last": 1},
            "output_dir": str(output_dir),
        }
    )
    trainer = Trainer(resolve_run(config, "bench", check_shards=False, warn=print))
    shape = (8, split.image["channels"], split.image["size"], split.image["size"])
    images = torch.randint(0, 256, shape, dtype=torch.uint8)  # pixels, as the training loader hands them over
    trainer.train_step(MicroBatch(images, torch.zeros(8, dtype=torch.long), 0))  # the optimizer state now exists
    return trainer


def bare_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's tensors, file by file, in memory."""
    files = [*folder.glob("*.safetensors"), *folder.glob("optimizer/*.safetensors")]
    return {str(path.relative_to(folder)).replace("/", "-"): load_file(str(path)) for path in files}


def timed(action, *args):
    start = time.perf_counter()
    result = action(*args)
    return time.perf_counter() - start, result


def resume_from(trainer, folder: Path) -> None:
    from pipeline.checkpoints import checkpoint

    trainer.load_checkpoint(folder, checkpoint.validate(folder))


def bare_save(tensors: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
    for name, state in tensors.items():
        save_file(state, str(folder / name))


def bare_save_durably(tensors: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
    """bare_save, each file then fsynced: what a save must do at least before it can call itself durable."""
    for name, state in tensors.items():
        save_file(state, str(folder / name))
        with open(folder / name, "rb") as file:
            os.fsync(file.fileno())


def async_stall(trainer) -> tuple[float, float]:
    """checkpoint.async's save: (seconds the loop is stopped, seconds until the background write is
    committed)."""
    start = time.perf_counter()
    trainer.save_checkpoint()
    stalled = time.perf_counter() - start
    trainer.checkpointer.writer.wait()
    return stalled, time.perf_counter() - start


def bare_load(targets: dict[str, dict[str, torch.Tensor]], folder: Path) -> None:
    """Read every tensor into memory that is already allocated (as load_state_dict into a model does):
    load_file alone only maps the file."""
    for name, destination in targets.items():
        for key, value in load_file(str(folder / name)).items():
            destination[key].copy_(value)


def measure(shards: Path, rounds: int, model: dict | None = None) -> dict:
    """Best seconds of each of save, load, bare save and bare load over `rounds` interleaved rounds, the
    checkpoint's MiB and the model's parameters; the trainer is ended before returning."""
    shutil.rmtree(OUT / "run", ignore_errors=True)
    from pipeline.checkpoints.writer import CheckpointWriter

    trainer = make_trainer(shards, OUT / "run", model)
    synchronous = trainer.checkpointer.writer
    background = CheckpointWriter(synchronous.root, 1, None, 0, 1, background=True)  # checkpoint.async's
    bare_folder = OUT / "bare"
    kinds = ("save", "load", "bare save", "bare load", "bare save + fsync", "async stall", "async write")
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_number in range(rounds):
        trainer.step = 2 * round_number + 1  # a new folder each save; keep_last 1 removes the previous
        trainer.checkpointer.writer = synchronous
        seconds, folder = timed(trainer.save_checkpoint)
        times["save"].append(seconds)
        times["load"].append(timed(resume_from, trainer, folder)[0])
        tensors = bare_tensors(folder)  # before the async save's keep_last 1 removes this folder
        total_bytes = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        trainer.step += 1
        trainer.checkpointer.writer = background
        stalled, written = async_stall(trainer)
        times["async stall"].append(stalled)
        times["async write"].append(written)
        shutil.rmtree(bare_folder, ignore_errors=True)
        bare_folder.mkdir(parents=True)
        times["bare save"].append(timed(bare_save, tensors, bare_folder)[0])
        shutil.rmtree(bare_folder)
        bare_folder.mkdir()
        times["bare save + fsync"].append(timed(bare_save_durably, tensors, bare_folder)[0])
        targets = {name: {key: torch.empty_like(v) for key, v in state.items()} for name, state in tensors.items()}
        times["bare load"].append(timed(bare_load, targets, bare_folder)[0])
    parameters = sum(p.numel() for p in trainer.networks.parameters())
    background.close()
    trainer.accelerator.end_training()
    return {
        **{name: min(values) for name, values in times.items()},
        "megabytes": total_bytes / 2**20,
        "parameters": parameters,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, choices=(32, 64, 128))
    args = parser.parse_args()
    best = measure(small_shards(args.size), args.rounds)
    megabytes, parameters = best["megabytes"], best["parameters"]
    rows = []
    for what, ours, bare in (("save", "save", "bare save"), ("load", "load", "bare load")):
        rows.append(
            [
                what,
                f"{best[bare]:.2f} s ({megabytes / best[bare]:.0f} MiB/s)",
                f"{best[ours]:.2f} s ({megabytes / best[ours]:.0f} MiB/s)",
                f"{best[bare] / best[ours]:.2f}",
                ">= 0.50",
            ]
        )
    stall_rows = [
        [
            "synchronous save (`Trainer.save_checkpoint`)",
            f"{best['save']:.2f}",
            "1.00",
            f"{best['save'] / best['bare save + fsync']:.2f}",
        ],
        [
            "checkpoint.async: taking the save (the loop's stall)",
            f"{best['async stall']:.2f}",
            f"{best['async stall'] / best['save']:.2f}",
            f"{best['async stall'] / best['bare save + fsync']:.2f}",
        ],
        [
            "checkpoint.async: until the background write is committed",
            f"{best['async write']:.2f}",
            f"{best['async write'] / best['save']:.2f}",
            f"{best['async write'] / best['bare save + fsync']:.2f}",
        ],
        [
            "bare safetensors save_file, then fsync",
            f"{best['bare save + fsync']:.2f}",
            f"{best['bare save + fsync'] / best['save']:.2f}",
            "1.00",
        ],
    ]
    stall_header = ["", "seconds", "vs the synchronous save", "vs bare save + fsync"]
    body = f"""## Checkpoints (`bench/checkpoint.py`)

{machine()}. The paper's VAE-GAN for {args.size}x{args.size} RGB ({parameters:,} parameters), RMSProp,
DeepSpeed ZeRO-2, one process: a checkpoint of {megabytes:.0f} MiB (fp32 weights, and the optimizer partition:
fp32 masters and square averages). Ours: `Trainer.save_checkpoint` (gather, write, fsync, sha256 of
every file, rename, `latest`) and a resume's load (sha256 of every file, weights, optimizer partitions
into DeepSpeed). Bare: the same tensors with `safetensors.torch.save_file` / `load_file`, no fsync, no
hashes; read with `load_file` into tensors already allocated (as `load_state_dict` does). Best of
{args.rounds} interleaved rounds; the files are in the page cache for both.

{markdown_table(["", "bare safetensors", "pipeline", "ratio (bare time / ours)", "target"], rows)}

The stall (`checkpoint.async`): how long the training loop stands still for one checkpoint. Synchronous:
the whole save. Async: taking it (the weights gathered and copied with the optimizer partition to host
memory, RNG and plugin state gathered); the writing, fsyncs, hashes and commit then run in a background
thread (its own row: until `latest` names the new checkpoint, on a machine where nothing else runs; with
training beside it, it shares the cores). Bare: the same tensors written with `save_file` and fsynced, the
least a durable save can cost.

{markdown_table(stall_header, stall_rows)}
"""
    print(body)
    write_section("checkpoint", body)


if __name__ == "__main__":
    main()
