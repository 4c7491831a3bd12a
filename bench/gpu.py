"""The pipeline measured on one GPU, in one command of at most 8 minutes: a table for docs/benchmarks.md.

    python bench/gpu.py [--section-out FILE]     # on a GPU machine: writes the "gpu" section
    python bench/gpu.py --dry-run [--out DIR]    # every part at toy sizes on CPU, in a minute or two;
                                                 # writes DIR/dry-run.md (default bench/out/gpu), never the docs

Parts, each in a process of its own (a fresh DeepSpeed engine, and a failure that names its part):
- step: the VAE-GAN at 64x64 RGB (the paper's networks, latent 128, encoder FC 2048), bf16: images/s of
  the pipeline's step (DeepSpeed ZeRO-2, fed from memory) and of the direct update
  (bench/vaegan_direct.py under torch.autocast) at micro-batches 4, 64 and 256, their ratio, and MFU: FLOPs
  of one step (torch.utils.flop_counter) x images/s against the device's dense bf16 peak (PEAK_TFLOPS);
  and the pipeline's fixed cost per step: its time per step less the direct update's (at micro-batch 4,
  where the compute is small, that is what the pipeline adds);
- compile: the same trainer's networks then compiled as `compile: true` compiles them
  (pipeline.engine.kernels.compile_networks), against its eager step;
- loader: the full training loop fed by the shard loader (data.workers 2, 4, 8) against the same
  trainer fed from memory, at micro-batch 256: does the loader keep up;
- checkpoint: save and load of bench/checkpoint.py in GB/s against bare safetensors, and the stall a
  checkpoint costs the loop: a synchronous save, checkpoint.async's (taking the save: gather and copy
  to host memory), and a bare safetensors save with fsync;
- autoencoder-kl: Stable Diffusion's kl-f8 autoencoder (83.7 M parameters) with LDM's loss and the patch
  discriminator at 256x256 RGB, bf16, micro-batch 8: images/s of the pipeline's step fed from memory and MFU;
- resume: `determinism: true`; a run of 6 steps against one resumed from its step-3 checkpoint into
  another folder: weights, optimizer partitions and the fp16 loss scaler's state bit-identical, in bf16
  and in fp16 (fp16 needs a GPU: on CPU the row says so).
Parts run in that order until the time limit (--minutes); a part not reached says so in its row.
The header names the device and the versions of torch, CUDA, DeepSpeed and accelerate.

On a lent GPU machine without internet: carry the wheels of the pipeline's dependencies that the
machine lacks (scripts/gpu-wheels.sh makes them) and install them first, as scripts/gpu-wheels.sh says.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import in_fresh_process, machine, markdown_table, write_section

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("GPU_BENCH_OUT") or REPO / "bench" / "out" / "gpu")  # --out, in the parts' processes
# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; the first name found in the
# device's name wins, so the longer names come first
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)
# steps timed per round after `warmup`, best of `rounds`; the dry run's networks are the paper's at 32x32
# (its sizes start there) with a small latent and FC: about 7 GFLOP an image, hence its tiny batches
FULL = {"size": 64, "batches": (4, 64, 256), "warmup": 3, "steps": 20, "rounds": 2, "loader_batch": 256}
FULL |= {"workers": (2, 4, 8), "images": 8192, "resume_batch": 64}
TOY = {"size": 32, "batches": (2,), "warmup": 1, "steps": 1, "rounds": 1, "loader_batch": 2}
TOY |= {"workers": (1,), "images": 64, "resume_batch": 2}
TOY_MODEL = {"latent_size": 8, "fc_size": 32}
# autoencoder-kl: Stable Diffusion's kl-f8 (the plugin's defaults) at 256x256, the discriminator on; a tiny
# one at 32x32 in a dry run
KL_F8 = {"size": 256, "batch": 8, "model": {"disc_start": 0}}
KL_TOY = {
    "size": 32,
    "batch": 2,
    "model": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "disc_start": 0},
}


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"


def peak_tflops() -> float | None:
    name = device_name()
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def versions() -> str:
    import accelerate
    import deepspeed

    cuda = torch.version.cuda or "none"
    return f"torch {torch.__version__}, CUDA {cuda}, DeepSpeed {deepspeed.__version__}, accelerate " + (
        accelerate.__version__
    )


def make_shards(sizes: dict) -> Path:
    """64x64 RGB shards of bench/shards_build.py's photographs (32x32 in a dry run), built once."""
    from shards_build import make_corpus

    out = OUT / f"shards-{sizes['size']}-{sizes['images']}"
    if not (out / "manifest.json").exists():
        corpus = OUT / "corpus"
        make_corpus(corpus, sizes["images"])
        command = [sys.executable, "-m", "shards", "build", str(corpus), str(out), "--size", str(sizes["size"])]
        command += ["--mode", "RGB", "--val-fraction", "0", "--shard-size", "1000"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    return out


def precision_of(dry_run: bool) -> str:
    """bf16 on the GPU; fp32 in a dry run (CPUs without bf16 units emulate it, 50x slower; CI's tests
    cover the bf16 path on CPU)."""
    return "fp32" if dry_run else "bf16"


def run_config(shards: Path, output_dir: Path, batch: int, dry_run: bool, **extra) -> dict:
    config = {
        "plugin": "vaegan",
        "model": TOY_MODEL if dry_run else {},
        "data": {"shards": str(shards), "batch_size": batch, "workers": 1},
        "max_steps": 10**6,
        "precision": precision_of(dry_run),
        "deepspeed": {"zero_stage": 2},
        "log_every": 10**6,
        "sample_every": 10**6,
        "checkpoint": {"every": 10**6, "keep_last": 1},
        "grid_size": 4,
        "output_dir": str(output_dir),
    }
    return {**config, **extra}


def make_trainer(config_tree: dict):
    from pipeline.config.sections import RunConfig
    from pipeline.training.resolved_run import resolve_run
    from pipeline.training.trainer import Trainer

    config = RunConfig.model_validate(config_tree)
    shutil.rmtree(config.output_dir, ignore_errors=True)
    trainer = Trainer(resolve_run(config, "bench", check_shards=False, warn=print))
    return trainer, trainer.plugin


def step_part(shards: Path, batch: int, sizes: dict, dry_run: bool) -> dict:
    """The pipeline's step against the direct update, fed from memory, best of interleaved rounds; then the
    same trainer's networks compiled (accelerate allows one DeepSpeed Accelerator a process)."""
    from torch._dynamo.utils import counters
    from torch.utils.flop_counter import FlopCounterMode
    from train_step import memory_batches, pipeline_from_memory, synchronize
    from vaegan_direct import DirectVAEGAN

    from pipeline.engine.kernels import compile_networks
    from shards.read.reader import to_unit_range

    warmup, steps, rounds = sizes["warmup"], sizes["steps"], range(sizes["rounds"])
    batches = memory_batches(shards, steps + warmup, batch)
    trainer, plugin = make_trainer(run_config(shards, OUT / f"step-{batch}", batch, dry_run))
    device = trainer.accelerator.device
    torch.manual_seed(0)
    direct = DirectVAEGAN(torch.nn.ModuleDict(plugin.build_networks()).to(device), plugin.options.gamma)
    latent = plugin.options.latent_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision_of(dry_run) == "bf16")

    def direct_rate() -> float:
        for index, (images, _) in enumerate(batches):
            if index == warmup:
                synchronize()
                start = time.perf_counter()
            with autocast:
                direct.step(to_unit_range(images.to(device, non_blocking=True)), latent)
        synchronize()
        return steps * batch / (time.perf_counter() - start)

    result = {"direct": 0.0, "pipeline": 0.0}
    for _ in rounds:
        result["direct"] = max(result["direct"], direct_rate())
        result["pipeline"] = max(result["pipeline"], pipeline_from_memory(trainer, batches, warmup))
    networks = torch.nn.ModuleDict(plugin.build_networks()).to(device)
    images = to_unit_range(batches[0][0].to(device))
    with FlopCounterMode(display=False) as counter, autocast:
        loss, _, _ = plugin.routed_loss(networks, images)
        loss.backward()
    result["gflop_per_image"] = counter.get_total_flops() / batch / 1e9
    compile_networks(trainer.networks)
    result["compiled"] = max(pipeline_from_memory(trainer, batches, warmup) for _ in rounds)  # warm-up compiles
    result["graphs"] = counters["stats"]["unique_graphs"]
    return result


def autoencoder_kl_part(sizes: dict, dry_run: bool) -> dict:
    """The pipeline's autoencoder-kl step fed from memory, and the FLOPs of one step."""
    from torch.utils.flop_counter import FlopCounterMode
    from train_step import memory_batches, pipeline_from_memory

    from shards.read.reader import to_unit_range

    kind = KL_TOY if dry_run else KL_F8
    shards = make_shards({**sizes, "size": kind["size"]})
    batch, warmup, steps = kind["batch"], sizes["warmup"], sizes["steps"]
    config = run_config(shards, OUT / "autoencoder-kl", batch, dry_run, plugin="autoencoder-kl", model=kind["model"])
    trainer, plugin = make_trainer({**config, "optimizer": {"lr": 1e-4}})
    batches = memory_batches(shards, steps + warmup, batch)
    result = {"pipeline": max(pipeline_from_memory(trainer, batches, warmup) for _ in range(sizes["rounds"]))}
    device = trainer.accelerator.device
    networks = torch.nn.ModuleDict(plugin.build_networks()).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision_of(dry_run) == "bf16")
    images = to_unit_range(batches[0][0].to(device))
    with FlopCounterMode(display=False) as counter, autocast:
        plugin.training_step(networks, images, torch.zeros(batch, dtype=torch.long), 1).loss.backward()
    result["gflop_per_image"] = counter.get_total_flops() / batch / 1e9
    result["size"], result["batch"] = kind["size"], batch
    return result


def loader_part(shards: Path, workers: int, sizes: dict, dry_run: bool) -> dict:
    """The same trainer fed from memory, then by the shard loader with `workers` (bench/train_step.py)."""
    from train_step import memory_batches, pipeline_from_memory, pipeline_from_shards

    batch, steps, warmup = sizes["loader_batch"], sizes["steps"], sizes["warmup"]
    data = {"shards": str(shards), "batch_size": batch, "workers": workers}
    trainer, _ = make_trainer(run_config(shards, OUT / f"loader-{workers}", batch, dry_run, data=data))
    memory = pipeline_from_memory(trainer, memory_batches(shards, steps + warmup, batch), warmup)
    loop_steps = max(steps, 3)  # the median of the logged intervals leaves out the first and the last
    return {"memory": memory, "shards": pipeline_from_shards(trainer, loop_steps, log_every=max(1, loop_steps // 8))}


def checkpoint_part(shards: Path, sizes: dict, dry_run: bool) -> dict:
    import checkpoint

    checkpoint.OUT = OUT / "checkpoint"
    return checkpoint.measure(shards, rounds=sizes["rounds"], model=TOY_MODEL if dry_run else {})


def resume_part(shards: Path, precision: str, sizes: dict, dry_run: bool) -> dict:
    """Six steps in one run, and three resumed from that run's step-3 checkpoint into another folder:
    their final weights, optimizer partitions and loss-scaler state compared exactly."""
    from safetensors.torch import load_file

    folders = {name: OUT / f"resume-{precision}-{name}" for name in ("whole", "resumed")}
    data = {"shards": str(shards), "batch_size": sizes["resume_batch"], "workers": 2}
    common = {"precision": precision, "determinism": True, "data": data, "max_steps": 6}
    common["checkpoint"] = {"every": 3, "keep_last": 5}
    for name, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        extra = {"resume": str(folders["whole"] / "run" / "checkpoints" / "step-00000003")} if name == "resumed" else {}
        config = run_config(shards, folder / "run", 4, dry_run, **common, **extra)
        (folder / "config.yaml").write_text(json.dumps(config))
        command = [sys.executable, "-m", "pipeline.train", "--config", str(folder / "config.yaml")]
        with open(folder / "train.log", "w") as log:
            if subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"resume ({precision}, {name}) failed: see {folder / 'train.log'}")
    final = {name: folder / "run" / "checkpoints" / "step-00000006" for name, folder in folders.items()}
    files = sorted(str(path.relative_to(final["whole"])) for path in final["whole"].rglob("*.safetensors"))
    differing = [
        file
        for file in files
        if not all(
            torch.equal(tensor, other)
            for tensor, other in zip(
                load_file(final["whole"] / file).values(), load_file(final["resumed"] / file).values(), strict=True
            )
        )
    ]
    scalers = [json.loads((final[name] / "trainer_state.json").read_text()).get("loss_scaler") for name in final]
    return {
        "files": len(files),
        "differing": differing,
        "loss_scaler": scalers[0],
        "scaler_equal": scalers[0] == scalers[1],
    }


def run_part(job: list) -> dict:
    return in_fresh_process(__file__, "--part", job, f"bench/gpu.py part {job[0]}")


def do_part(job: list) -> dict:
    name, shards, dry_run, *rest = job
    sizes, shards = (TOY if dry_run else FULL), Path(shards)
    if name == "step":
        return step_part(shards, rest[0], sizes, dry_run)
    if name == "loader":
        return loader_part(shards, rest[0], sizes, dry_run)
    if name == "checkpoint":
        return checkpoint_part(shards, sizes, dry_run)
    if name == "autoencoder-kl":
        return autoencoder_kl_part(sizes, dry_run)
    return resume_part(shards, rest[0], sizes, dry_run)


def rate(images_per_s: float) -> str:
    """Three significant digits: thousands on a GPU, fractions in a dry run."""
    return f"{images_per_s:.3g}"


def rows_of(job: list, result: dict | None) -> list[list[str]]:
    """Table rows of one part's result (None: not reached within the time limit)."""
    name = job[0]
    what = f"{name} {' '.join(map(str, job[3:]))}".strip()
    if result is None:
        return [[what, "not run: the time limit was reached", "", "", ""]]
    if name == "step":
        peak, gflop = peak_tflops(), result["gflop_per_image"]
        mfu = lambda rate: f"{gflop * rate / (peak * 1e3):.1%}" if peak else "no peak known"  # noqa: E731
        return [
            [
                f"direct update, micro-batch {job[3]}",
                rate(result["direct"]),
                "1.00",
                f"{gflop:.2f}",
                mfu(result["direct"]),
            ],
            [
                f"pipeline step, micro-batch {job[3]}",
                rate(result["pipeline"]),
                f"{result['pipeline'] / result['direct']:.2f} (target >= 0.95)",
                f"{gflop:.2f}",
                mfu(result["pipeline"]),
            ],
            [
                f"pipeline's fixed cost per step, micro-batch {job[3]}",
                f"{1000 * job[3] * (1 / result['pipeline'] - 1 / result['direct']):.2f} ms",
                "pipeline's time per step less the direct update's",
                "",
                "",
            ],
            [
                f"pipeline step, compile: true, micro-batch {job[3]}",
                rate(result["compiled"]),
                f"{result['compiled'] / result['pipeline']:.2f} of eager",
                f"{result['graphs']} graphs compiled",
                mfu(result["compiled"]),
            ],
        ]
    if name == "loader":
        ratio = result["shards"] / result["memory"]
        return [
            [
                f"loop fed by shards, {job[3]} workers",
                rate(result["shards"]),
                f"{ratio:.2f} of from memory ({rate(result['memory'])})",
                "",
                "",
            ]
        ]
    if name == "autoencoder-kl":
        peak, gflop = peak_tflops(), result["gflop_per_image"]
        mfu = f"{gflop * result['pipeline'] / (peak * 1e3):.1%}" if peak else "no peak known"
        model = "kl-f8" if result["size"] == 256 else "tiny"
        what = f"autoencoder-kl {model} {result['size']}px, micro-batch {result['batch']}"
        return [[what, rate(result["pipeline"]), "", f"{gflop:.2f}", mfu]]
    if name == "checkpoint":
        gigabytes = result["megabytes"] / 1024
        return [
            [
                f"checkpoint {kind} ({result['megabytes']:.0f} MiB)",
                f"{gigabytes / result[kind]:.2f} GB/s",
                f"{result['bare ' + kind] / result[kind]:.2f} of bare ({gigabytes / result['bare ' + kind]:.2f} GB/s)",
                "",
                "",
            ]
            for kind in ("save", "load")
        ] + [
            [
                f"checkpoint stall, {what}",
                f"{result[key]:.3f} s",
                f"{result[key] / result['save']:.2f} of the synchronous save",
                "",
                "",
            ]
            for what, key in (
                ("checkpoint.async (taking the save)", "async stall"),
                ("checkpoint.async, until committed in the background", "async write"),
                ("bare save_file + fsync", "bare save + fsync"),
            )
        ]
    if "skipped" in result:
        return [[f"exact resume, {job[3]}, determinism: true", f"not run: {result['skipped']}", "", "", ""]]
    same = not result["differing"] and result["scaler_equal"]
    verdict = "bit-identical" if same else f"DIFFERENT: {', '.join(result['differing']) or 'loss scaler'}"
    scaler = result["loss_scaler"]
    detail = f"loss scale {scaler.get('cur_scale')}" if scaler else "no loss scaler"
    return [[f"exact resume, {job[3]}, determinism: true", verdict, f"{result['files']} tensor files", detail, ""]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU; writes bench/out/gpu/dry-run.md only")
    parser.add_argument("--minutes", type=float, default=7.0, help="parts not started by then are skipped (default 7)")
    parser.add_argument("--out", type=Path, help="working folder (default bench/out/gpu)")
    parser.add_argument("--section-out", type=Path, help="also write the section to FILE (to carry it back)")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: one part, in a fresh process
    args = parser.parse_args()
    if args.part:
        print(json.dumps(do_part(json.loads(args.part))))
        return
    started = time.monotonic()
    if args.out:
        global OUT
        OUT = args.out.resolve()
        os.environ["GPU_BENCH_OUT"] = str(OUT)
    OUT.mkdir(parents=True, exist_ok=True)
    sizes = TOY if args.dry_run else FULL
    shards = str(make_shards(sizes))
    jobs = [["step", shards, args.dry_run, batch] for batch in sizes["batches"]]
    jobs += [["loader", shards, args.dry_run, workers] for workers in sizes["workers"]]
    jobs += [
        ["checkpoint", shards, args.dry_run],
        ["autoencoder-kl", shards, args.dry_run],
        *(["resume", shards, args.dry_run, p] for p in (precision_of(args.dry_run), "fp16")),
    ]
    rows = []
    for job in jobs:
        in_time = time.monotonic() - started < args.minutes * 60
        part_started = time.monotonic()
        if job[0] == "resume" and job[3] == "fp16" and not torch.cuda.is_available():
            result = {"skipped": "fp16 needs a GPU"}  # said here: a process of its own to say it costs seconds
        else:
            result = run_part(job) if in_time else None
        print(f"{' '.join(map(str, [job[0], *job[3:]]))}: {time.monotonic() - part_started:.0f} s {result}", flush=True)
        rows += rows_of(job, result)
    table = markdown_table(["what", "images/s or result", "ratio", "GFLOP/image", "MFU"], rows)
    body = f"""## On a GPU (`bench/gpu.py`{" --dry-run" if args.dry_run else ""})

{device_name()}; {versions()}; {machine()}; {time.monotonic() - started:.0f} s in all.
The VAE-GAN at {sizes["size"]}x{sizes["size"]} RGB{" (small latent and FC)" if args.dry_run else ""},
{precision_of(args.dry_run)}, DeepSpeed ZeRO-2, one process; rates are best of {sizes["rounds"]} interleaved round(s)
of {sizes["steps"]} step(s) after warm-up, fed from host memory unless the row says shards; MFU against
{peak_tflops() or "no known"} TFLOP/s dense bf16.

{table}
"""
    print(body)
    if args.dry_run:
        (OUT / "dry-run.md").write_text(body)
        return
    write_section("gpu", body)
    if args.section_out:
        args.section_out.write_text(body)


if __name__ == "__main__":
    main()
