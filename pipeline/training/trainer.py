"""The training loop: micro-batches -> the plugin's routed loss -> one DeepSpeed ZeRO update.

for each micro-batch of this rank:
    loss = plugin.training_step(...)        # every network's own gradient, routed into one loss
    accelerator.backward(loss)              # DeepSpeed: backward, and the ZeRO step at the
                                            # accumulation boundary (k micro-batches)
    at a boundary: step += 1; log / draw grids / checkpoint as scheduled

A checkpoint holds everything the loop depends on: weights, DeepSpeed's optimizer partitions, the step
and data position, and every rank's RNG and plugin state; a run resumed from it continues bit for bit
as if it had never stopped (on the same number of ranks). The checkpointer (pipeline/checkpoints/checkpointer.py)
writes and reads them; the loop only says when.

Faults (pipeline/training/faults.py, README "Faults"): an update with a non-finite gradient is skipped on every
rank and counted, too many in a row stop the run; unreadable samples are left out and counted; SIGTERM
checkpoints and stops; a failed checkpoint write removes its staging folder and stops every rank.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
import yaml
from accelerate.utils import gather_object, set_seed

from pipeline import grids
from pipeline.checkpoints import checkpoint, optimizer_state
from pipeline.checkpoints.checkpointer import Checkpointer, Progress
from pipeline.checkpoints.optimizer_state import CheckpointError
from pipeline.config import ConfigError, RunConfig
from pipeline.evaluation.in_training import TrainingEvaluation
from pipeline.plugin import ModelPlugin, capabilities
from pipeline.training import deepspeed_internals as internals
from pipeline.training import faults, kernels, rollback, trackers
from pipeline.training.data import MicroBatch, StreamLayout, training_loader
from pipeline.training.ema import weight_average
from pipeline.training.engine import (
    TrainingModule,
    build_optimizer,
    make_accelerator,
    resolve_precision,
    resolved_config,
)
from pipeline.training.faults import TrainingStopped
from pipeline.training.lr_schedule import lr_factor
from pipeline.training.network_skip import NetworkSkip
from pipeline.training.network_stats import NetworkStats
from pipeline.training.prefetch import ShardPrefetcher
from pipeline.training.run_log import RunLog
from shards.errors import UserError
from shards.random_access import SplitDataset, first_images
from shards.reader import ShardSplit, to_unit_range
from shards.remote import FETCH_COUNTS, take_counters


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        plugin: ModelPlugin,
        split: ShardSplit,
        networks: dict,
        resume: tuple[Path, dict[str, Any]] | None = None,
    ) -> None:
        """networks: plugin.build_networks(), built from the same seed on every rank. resume: a
        validated checkpoint (folder, trainer_state) to continue from (pipeline.checkpoints.checkpoint.find_resume)."""
        self.config, self.plugin, self.split, self.resume = config, plugin, split, resume
        if config.determinism:
            kernels.use_deterministic_kernels()  # before any CUDA kernel runs
        self.precision = resolve_precision(config.precision)
        self.accelerator = make_accelerator(config, self.precision)
        module = TrainingModule(networks, plugin)
        self.ema = weight_average(config.ema, plugin, module.networks)  # copied before DeepSpeed casts them
        if config.compile:
            kernels.compile_networks(module.networks)
        optimizer = build_optimizer(config, module.networks, plugin.optimizer_defaults())
        self.engine, self.optimizer = self.accelerator.prepare(module, optimizer)
        if not optimizer_state.supported(self.engine):
            # build_deepspeed_config refuses what leads here before any folder exists: this is a guard
            raise ConfigError(
                f"precision {self.precision} without ZeRO cannot be checkpointed: set deepspeed.zero_stage to 1 or 2"
            )
        faults.skip_nonfinite_updates(self.engine)
        internals.skip_single_rank_allreduce(self.engine)
        self.networks = self.accelerator.unwrap_model(self.engine).networks
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        torch_optimizer = internals.torch_optimizer(self.engine)
        # before NetworkSkip's hook: the norms include the gradients of networks about to sit out a step
        self.network_stats = NetworkStats(torch_optimizer, self.networks, self.accelerator.device)
        self.network_skip = NetworkSkip(torch_optimizer)
        self.step_totals: dict[str, torch.Tensor] = {}  # the plugin's step_totals, this rank, this step
        self.step_total_names: list[str] | None = None
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # lr_schedule scales these
        self.dtype = next(self.networks.parameters()).dtype
        self.layout = StreamLayout(
            counts=tuple(shard["count"] for shard in split.shards),
            seed=config.seed,
            shuffle_shards=config.data.shuffle_shards,
            world_size=self.accelerator.num_processes,
            batch_size=config.data.batch_size,
        )
        self.images_per_step = self.layout.global_batch * config.gradient_accumulation_steps
        self.metric_names: list[str] | None = None
        self.step = 0  # optimizer steps done
        self.micro_step = 0  # micro-batches done: with the seed, the exact position in the data stream
        self.images_seen = 0
        self.bad_samples = 0  # unreadable samples left out so far, all ranks (counted at each log and checkpoint)
        self.bad_samples_here = 0  # ... met by this rank since the last count
        self.fetch_counts: dict[str, int] = {}  # a remote split's fetches so far, all ranks (shards.remote.counters)
        self.fetch_counts_here: Counter[str] = Counter()  # ... by this rank and its workers since the last count
        self.skipped_in_a_row = 0  # updates skipped for a non-finite gradient, up to the last step
        self.spikes = rollback.SpikeWatch(config.faults.spike_factor)
        self.step_loss = 0.0  # this rank's losses of the step so far (only with faults.spike_factor)
        self.rollbacks: list[dict[str, int]] = []  # the run's record (rollback.py), read when the loop starts
        self.skips: dict[int, int] = {}
        self.good_checkpoint: int | None = None  # step of the checkpoint resumed from or last written
        self.stopping = False  # SIGTERM agreed at the step that diverged
        self.output_dir = Path(config.output_dir)
        self.evaluation = TrainingEvaluation(config, self.accelerator) if config.eval.every else None
        self.checkpointer = Checkpointer(
            self.accelerator,
            self.engine,
            self.networks,
            plugin,
            config,
            split,
            self.layout,
            self.precision,
            resume[0] if resume else None,
            self.ema,
        )

    @property
    def total_steps(self) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        remaining = max(self.config.max_images - self.images_seen, 0)
        return self.step + math.ceil(remaining / self.images_per_step)

    def train(self) -> None:
        config, accelerator = self.config, self.accelerator
        resolved = resolved_config(config, self.plugin, list(self.networks))
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        accelerator.init_trackers(trackers.PROJECT, config=trackers.hyperparameters(resolved))
        set_seed(config.seed, device_specific=True)  # the plugin's noise: seed + rank, from here on
        stop = faults.StopRequest(config.checkpoint.every_minutes, config.faults.stop_grace_seconds)
        try:
            self._resume_and_loop(stop)
        finally:
            stop.restore()
        # only after success: after a failure a peer may be gone, and tearing the process group down would
        # wait for it (pipeline.train then exits without teardown)
        accelerator.end_training()

    def _resume_and_loop(self, stop: faults.StopRequest) -> None:
        config, accelerator = self.config, self.accelerator
        # each rank chose alone (before the process group existed): a rank that saw other files must not
        # start from another step than the rest
        choices = set(gather_object([str(self.resume[0]) if self.resume else "none"]))
        if len(choices) > 1:
            raise CheckpointError(f"the ranks chose different checkpoints to resume from: {sorted(choices)}")
        if self.resume is not None:
            self.load_checkpoint(*self.resume)
            self.good_checkpoint = self.step
        if self.step >= self.total_steps:
            if accelerator.is_main_process:
                print(f"pipeline train: {self.output_dir} is already at step {self.step} of {self.total_steps}")
            accelerator.wait_for_everyone()
            return
        with stop.waiting():  # reads the grid's samples: the first fetch of a remote split
            grid_inputs = self._grid_inputs()
        self.rollbacks = rollback.read_records(self.output_dir)
        self.skips = rollback.skip_table(config.faults.skip_micro_steps, self.rollbacks)
        saved_batch = self.resume[1]["data"]["global_batch"] if self.resume is not None else self.layout.global_batch
        if self.skips and saved_batch != self.layout.global_batch:
            raise ConfigError(
                f"faults.skip_micro_steps and {rollback.RECORD} count global micro-batches of {saved_batch} samples, "
                f"this run's are {self.layout.global_batch}: resume on the same number of ranks and data.batch_size"
            )
        log = RunLog(self.output_dir, accelerator, self.total_steps, self.step, self.images_seen)  # clock starts
        try:
            while True:  # once, unless the data jumps over a skip or the run rolls back
                self.micro_step = rollback.jump(self.micro_step, self.skips)
                prefetcher = self._start_prefetcher()
                loader = training_loader(
                    self.split,
                    self.layout,
                    accelerator.process_index,
                    start=self.micro_step,
                    workers=config.data.workers,
                    hflip=config.data.hflip,
                    pin_memory=torch.cuda.is_available(),
                )
                try:
                    outcome = self._loop(loader, log, grid_inputs, stop, prefetcher)
                finally:
                    if prefetcher is not None:
                        prefetcher.stop()
                if outcome == "diverged":
                    self._roll_back(log)
                    if self.stopping:  # SIGTERM came with the divergence: the record is enough to resume
                        log.say(f"stopped by SIGTERM at a rollback to step {self.step}: run again to resume")
                        break
                elif outcome == "done":
                    break
        finally:
            log.stop()
        # Every rank must be done before end_training() destroys the process group: without this
        # barrier a rank sometimes aborted at exit ("terminate called without an active exception").
        accelerator.wait_for_everyone()

    def _loop(
        self,
        loader,
        log: RunLog,
        grid_inputs: torch.Tensor,
        stop: faults.StopRequest,
        prefetcher: ShardPrefetcher | None,
    ) -> Literal["done", "diverged", "jump"]:
        """Train until the run ends ("done"), diverges with a rollback to make, or its data position reaches
        a skip ("jump": the caller makes a loader from the skip's end)."""
        config, accelerator = self.config, self.accelerator
        first_step = self.step
        sums: dict[str, torch.Tensor] = {}
        micro_steps_summed = 0
        skipped_before = self.engine.skipped_steps
        batches = iter(loader)
        while True:
            with stop.waiting():  # a stalled store must not hold a rank past SIGTERM's grace time
                batch = next(batches, None)
            if batch is None:
                return "done"
            metrics = self.train_step(batch)
            if prefetcher is not None:
                prefetcher.advance(self.micro_step)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
            micro_steps_summed += bool(metrics)
            if not accelerator.sync_gradients:
                continue
            self.images_seen += self.images_per_step
            log.advance(self.step)
            if self.step == first_step + 1:
                self._record_rank()
            diverged = self._count_skipped_update(self.engine.skipped_steps > skipped_before)
            skipped_before = self.engine.skipped_steps
            last = self.step >= self.total_steps
            stopping, clock_due, step_loss = stop.agreed(accelerator, self._take_step_loss())
            spiked = self.spikes.spiked(step_loss)
            if self.step % config.log_every == 0 or last or stopping or diverged or spiked:
                log.log(self.step, self.images_seen, self._reduce(sums, micro_steps_summed))
                sums, micro_steps_summed = {}, 0
            if diverged or spiked:
                if self._may_roll_back():
                    self.stopping = stopping
                    return "diverged"
                self._stop_diverged(spiked, step_loss)
            if self.step % config.sample_every == 0 or last:
                self._draw_grids(grid_inputs)
            if self.evaluation is not None and self.step % config.eval.every == 0:
                self._evaluate(log)
            every = config.checkpoint.every
            if (every is not None and self.step % every == 0) or clock_due or last or stopping:
                self.save_checkpoint()
                self.good_checkpoint = self.step
                stop.clock_started()
            if stopping and not last:
                log.say(f"stopped by SIGTERM after step {self.step}, its checkpoint written: run again to resume")
            if last or stopping:
                return "done"
            if self.micro_step in self.skips:
                return "jump"

    def _take_step_loss(self) -> torch.Tensor | float:
        """This rank's share of the step's mean loss (its micro-batches' losses / all micro-batches of the
        step), for the spike watch; summed over ranks by StopRequest.agreed."""
        share = self.step_loss / (self.config.gradient_accumulation_steps * self.accelerator.num_processes)
        self.step_loss = 0.0
        return share

    def _may_roll_back(self) -> bool:
        """Only to a checkpoint of this run's own timeline (the one it resumed from or last wrote, never a
        later step an abandoned timeline left, which `latest` may still name), before the divergence."""
        allowed = self.config.faults
        if allowed.on_diverge != "rollback" or len(self.rollbacks) >= allowed.max_rollbacks:
            return False
        good = self.good_checkpoint
        root = checkpoint.checkpoints_root(self.output_dir)
        return good is not None and good < self.step and (root / checkpoint.folder_name(good)).is_dir()

    def _roll_back(self, log: RunLog) -> None:
        """Every rank: back to the last checkpoint, the data from the divergence (plus
        faults.rollback_skip_steps) on; recorded before training goes on (rollback.py)."""
        folder = checkpoint.checkpoints_root(self.output_dir) / checkpoint.folder_name(self.good_checkpoint)
        diverged_at, divergence = self.step, self.micro_step
        self.load_checkpoint(folder, checkpoint.validate(folder))
        skip_to = divergence + self.config.faults.rollback_skip_steps * self.config.gradient_accumulation_steps
        record = dict(zip(rollback.FIELDS, (diverged_at, self.step, self.micro_step, skip_to), strict=True))
        self.rollbacks.append(record)
        self.skips[self.micro_step] = skip_to
        if self.accelerator.is_main_process:
            rollback.append_record(self.output_dir, self.rollbacks)
            log.event(self.step, {"event": "rollback", **record})
        self.accelerator.wait_for_everyone()  # recorded before any rank trains on
        self.skipped_in_a_row, self.step_loss = 0, 0.0
        self.bad_samples_here, self.fetch_counts_here = 0, Counter()  # met in the steps undone
        log.advance(self.step)
        log.say(
            f"step {diverged_at}: diverged; rolled back to {folder.name} (rollback {len(self.rollbacks)} of "
            f"faults.max_rollbacks {self.config.faults.max_rollbacks}), skipping global micro-steps "
            f"{record['from_micro_step']} to {skip_to} of the data"
        )

    def train_step(self, batch: MicroBatch) -> dict[str, torch.Tensor]:
        """One micro-batch: forward through the plugin, backward; DeepSpeed steps the optimizer at the
        accumulation boundary, after which `self.step` has advanced and the EMA has followed. Returns the
        detached metrics (none when every sample of the micro-batch was unreadable)."""
        accelerator = self.accelerator
        if batch.failure is not None:
            raise UserError(batch.failure)
        self.bad_samples_here += batch.bad_samples
        self.fetch_counts_here.update(batch.fetch_counts)
        if batch.images is None:
            size, channels = self.split.image["size"], self.split.image["channels"]
            images = torch.empty(0, channels, size, size, dtype=torch.uint8)
            labels = torch.empty(0, dtype=torch.int64)
        else:
            images, labels = batch.images, batch.labels
        # scaled where the model runs: a quarter of the bytes cross to the GPU; the same float32 values
        images = to_unit_range(images.to(accelerator.device, non_blocking=True)).to(self.dtype)
        labels = labels.to(accelerator.device, non_blocking=True)
        factor = lr_factor(self.config.lr_schedule, self.step, self.total_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor  # read by the ZeRO step at this step's last micro-batch
        with accelerator.accumulate(self.engine):
            output = self.engine(images, labels, self.step)
            for name, value in output.step_totals.items():
                self.step_totals[name] = self.step_totals.get(name, 0.0) + value.detach().double()
            if accelerator.sync_gradients:  # this micro-batch's backward ends with the optimizer step
                self.network_skip.networks = self._networks_to_skip()
            skipped_before = self.engine.skipped_steps
            if self.spikes.factor is not None:  # a tensor: no wait for the device at each micro-batch
                self.step_loss = self.step_loss + output.loss.detach().double()
            accelerator.backward(output.loss)
            self.optimizer.step()  # under DeepSpeed these two are no-ops: backward() stepped
            self.optimizer.zero_grad()
        self.micro_step += 1
        if accelerator.sync_gradients:
            self.step += 1
            finite = self.engine.skipped_steps == skipped_before  # not skipped for a non-finite gradient
            stepped = set(self.networks) - self.network_skip.networks if finite else set()
            self.network_stats.end_step(stepped)
            if self.ema is not None and stepped:
                self.ema.update(self.step, stepped)
        return {name: value.detach().float() for name, value in output.metrics.items()}

    def _networks_to_skip(self) -> set[str]:
        """The plugin's decision from its step_totals summed over the whole global batch of this step:
        the same on every rank. A collective when the plugin keeps totals."""
        here, self.step_totals = self.step_totals, {}
        if not hasattr(self.plugin, "networks_to_skip"):  # the same plugin on every rank: no collective
            return set()
        if self.step_total_names is None:  # once: a rank whose micro-batches were all unreadable has none
            self.step_total_names = sorted(set().union(*gather_object([sorted(here)])))
        if not self.step_total_names:
            return set()
        device = self.accelerator.device
        sums = torch.stack(
            [torch.as_tensor(here.get(name, 0.0), dtype=torch.float64, device=device) for name in self.step_total_names]
        )
        totals = dict(zip(self.step_total_names, self.accelerator.reduce(sums, reduction="sum").tolist(), strict=True))
        skip = set(self.plugin.networks_to_skip(totals))
        if not skip <= set(self.networks):
            raise UserError(f"plugin {self.config.plugin}: networks_to_skip named {sorted(skip)}: not all are networks")
        return skip

    def _count_skipped_update(self, skipped: bool) -> bool:
        """DeepSpeed skipped the update on every rank alike (a non-finite gradient): warn. Returns whether
        faults.max_skipped_steps_in_a_row have now been skipped in a row."""
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        limit = self.config.faults.max_skipped_steps_in_a_row
        if skipped and self.skipped_in_a_row < limit and self.accelerator.is_main_process:
            print(
                f"pipeline train: warning: step {self.step}: non-finite loss or gradient, the update was skipped on "
                f"every rank ({self.skipped_in_a_row} in a row; the run stops at {limit})",
                file=sys.stderr,
            )
        return self.skipped_in_a_row >= limit

    def _stop_diverged(self, spiked: bool, loss: float) -> NoReturn:
        """Stop without a checkpoint of this state: the last one written stays the newest."""
        latest = checkpoint.checkpoints_root(self.output_dir) / checkpoint.LATEST
        last_good = latest.resolve().name if latest.exists() else "none yet"
        if spiked:
            what = f"loss {loss:.4g}, above faults.spike_factor x the median of the last {rollback.SPIKE_WINDOW} steps"
        else:
            what = (
                f"non-finite loss or gradients for {self.skipped_in_a_row} steps in a row (their updates were "
                "skipped; faults.max_skipped_steps_in_a_row)"
            )
        if self.config.faults.on_diverge == "rollback":
            reached = len(self.rollbacks) >= self.config.faults.max_rollbacks
            why = "faults.max_rollbacks reached" if reached else "no checkpoint of this run before the divergence"
            advice = f"rolling back is not possible ({why})"
        else:
            advice = "faults.on_diverge: rollback would go back to it and skip the data that led here"
        raise TrainingStopped(
            f"step {self.step}: {what}; the last good checkpoint is {last_good}: lower the learning rate and resume "
            f"from it ({advice})"
        )

    def _record_rank(self) -> None:
        """ranks/rank-N.json: what this rank holds, to see ZeRO's partitioning (written after the first
        step, when the optimizer state exists)."""
        state_elements = internals.optimizer_state_elements(self.engine)
        record = {
            "rank": self.accelerator.process_index,
            "world_size": self.accelerator.num_processes,
            "zero_stage": self.engine.zero_optimization_stage(),
            "parameters": sum(p.numel() for p in self.networks.parameters()),
            "optimizer_state_elements": state_elements,
            "precision": self.precision,
            "device": str(self.accelerator.device),
        }
        folder = self.output_dir / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{record['rank']}.json").write_text(json.dumps(record, indent=2) + "\n")

    def _reduce(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """The plugin's metrics averaged over the micro-batches of every rank since the last log, and the
        fault counters. A collective."""
        if self.metric_names is None:  # once: a rank whose micro-batches were all unreadable has no names
            self.metric_names = sorted(set().union(*gather_object([sorted(sums)])))
        names = self.metric_names
        zero = torch.zeros((), device=self.accelerator.device)
        totals = torch.stack([*(sums.get(name, zero).to(zero.device) for name in names), zero + count])
        *totals, count = self.accelerator.reduce(totals, reduction="sum").tolist()
        metrics = {name: total / max(count, 1.0) for name, total in zip(names, totals, strict=True)}
        for group in self.optimizer.param_groups:
            metrics[f"lr/{group['network']}"] = group["lr"]
        metrics.update(self.network_stats.collect(self.accelerator))
        metrics["bad_samples"] = self._count_bad_samples()
        metrics["skipped_steps"] = self.engine.skipped_steps
        if self.split.remote is not None:
            metrics.update(self._count_fetches())
        return metrics

    def _count_fetches(self) -> dict[str, int]:
        """All ranks' remote-shard fetches so far: bytes, shards, retries, evictions. A collective."""
        self.fetch_counts_here.update(take_counters())  # the prefetcher's, in this process
        here = torch.tensor([float(self.fetch_counts_here[name]) for name in FETCH_COUNTS], dtype=torch.float64)
        totals = self.accelerator.reduce(here.to(self.accelerator.device), reduction="sum").tolist()
        self.fetch_counts_here.clear()
        for name, total in zip(FETCH_COUNTS, totals, strict=True):
            self.fetch_counts[name] = self.fetch_counts.get(name, 0) + int(total)
        return dict(self.fetch_counts)

    def _start_prefetcher(self) -> ShardPrefetcher | None:
        data = self.config.data
        depth = 2 * data.shuffle_shards if data.prefetch_shards is None else data.prefetch_shards
        if self.split.remote is None or depth == 0:
            return None
        return ShardPrefetcher(self.split, self.layout, self.micro_step, depth)

    def _count_bad_samples(self) -> int:
        """All ranks' unreadable samples so far. A collective."""
        here = torch.tensor([float(self.bad_samples_here)], device=self.accelerator.device)
        self.bad_samples += int(self.accelerator.reduce(here, reduction="sum").item())
        self.bad_samples_here = 0
        return self.bad_samples

    def _grid_inputs(self) -> torch.Tensor:
        """The same images for every reconstruction grid of a run: the split's first readable samples
        (unreadable ones are reported by the training stream)."""
        dataset = SplitDataset(self.split)
        images = [image for image, _ in first_images(dataset, self.config.grid_size, skip_unreadable=True)]
        dataset.close()  # a remote shard held open here could never leave the cache
        if not images:
            raise UserError(f"{self.split.location}: no sample of split {self.split.split!r} is readable")
        return torch.stack(images)

    @torch.no_grad()
    def _average_batch_norm_statistics(self) -> None:
        """Each rank's running statistics come from its own share of the data, and DeepSpeed never
        synchronises buffers: average them (training itself uses batch statistics, so it is unaffected)."""
        for name, buffer in self.networks.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.copy_(self.accelerator.reduce(buffer.float(), reduction="mean").to(buffer.dtype))

    @torch.no_grad()
    def _draw_grids(self, inputs: torch.Tensor) -> None:
        # every rank takes part (statistics are averaged collectively); rank 0 writes
        self._average_batch_norm_statistics()
        can, drawn = capabilities(self.plugin), {}
        self.networks.eval()
        try:
            if "sample" in can:
                generator = torch.Generator().manual_seed(self.config.seed)
                samples = self.plugin.sample(self.networks, self.config.grid_size, generator).float().cpu()
                drawn["samples"] = grids.grid(samples)
            if "reconstruct" in can:
                device_inputs = inputs.to(self.accelerator.device, self.dtype)
                reconstructions = self.plugin.reconstruct(self.networks, device_inputs).float().cpu()
                drawn["reconstructions"] = grids.pairs_grid(inputs, reconstructions)
        finally:
            self.networks.train()
        if self.accelerator.is_main_process:
            for kind, image in drawn.items():
                path = self.output_dir / "samples" / f"step-{self.step:08d}-{kind}.png"
                grids.save(image, path)
                trackers.log_grid(self.accelerator, kind, image, path, self.step)

    def _evaluate(self, log: RunLog) -> None:
        """eval.every (pipeline/evaluation/in_training.py): the networks a checkpoint of this step would give
        `pipeline evaluate`, measured by every rank, logged as a record of its own."""
        started = time.perf_counter()
        self._average_batch_norm_statistics()
        networks = self.ema.with_averages() if self.ema is not None else self.networks
        networks.eval()
        try:
            metrics = self.evaluation.run(self.plugin, networks)
        finally:
            self.networks.train()
        log.evaluation(self.step, metrics, time.perf_counter() - started)

    def save_checkpoint(self) -> Path | None:
        """OUTPUT/checkpoints/step-NNNNNNNN, by every rank (checkpoints/checkpointer.py); rank 0 gets the folder."""
        self._average_batch_norm_statistics()  # the statistics saved: every rank's data, averaged
        self._count_bad_samples()
        return self.checkpointer.save(self.progress())

    def progress(self) -> Progress:
        window = tuple(self.spikes.losses)
        return Progress(self.step, self.images_seen, self.micro_step, self.bad_samples, tuple(self.rollbacks), window)

    def load_checkpoint(self, folder: Path, state: dict[str, Any]) -> None:
        """Continue from a checkpoint (pipeline/checkpoints/checkpointer.py): the loop's counters come back with it."""
        progress = self.checkpointer.load(folder, state)
        self.step, self.images_seen, self.micro_step = progress.step, progress.images, progress.micro_step
        self.bad_samples = progress.bad_samples
        self.spikes = rollback.SpikeWatch(self.config.faults.spike_factor, progress.recent_losses)
        if self.accelerator.is_main_process:
            RunLog.drop_records_after(self.output_dir, self.step)
