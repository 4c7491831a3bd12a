"""The training loop: micro-batches -> the plugin's routed loss -> one DeepSpeed ZeRO update.

for each micro-batch of this rank (train_step):
    loss = plugin.training_step(...)   # every network's own gradient, routed into one loss
    accelerator.backward(loss)         # and, at the accumulation boundary (k micro-batches), the ZeRO step
between two optimizer steps (_loop): log / roll back / draw grids / evaluate / checkpoint, as scheduled

A checkpoint holds everything the loop depends on (weights, DeepSpeed's optimizer partitions, the step
and data position, every rank's RNG and plugin state): a run resumed from it continues bit for bit. The
checkpointer (pipeline/checkpoints/checkpointer.py) writes and reads them; the loop only says when
(_checkpoint_due). Faults (faults.py, rollback.py, docs/faults.md): a non-finite update is skipped on every
rank and counted, too many in a row or a loss spike stop or roll back the run; unreadable samples are left
out and counted; SIGTERM checkpoints and stops.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from accelerate.utils import gather_object, set_seed

from pipeline.checkpoints import checkpoint
from pipeline.checkpoints.checkpointer import Checkpointer, Progress
from pipeline.checkpoints.ema import weight_average
from pipeline.data.prefetch import ShardPrefetcher
from pipeline.data.stream import MicroBatch, StreamLayout, center_crop, training_loader
from pipeline.engine import deepspeed_internals as internals
from pipeline.engine import kernels, trackers
from pipeline.engine.accelerator import TrainingModule, average_batch_norm_statistics, make_accelerator
from pipeline.engine.network_skip import NetworkSkip, plugin_decision
from pipeline.engine.network_stats import NetworkStats
from pipeline.engine.optimizer_plan import build_optimizer
from pipeline.errors import CheckpointError, ConfigError
from pipeline.evaluation.in_training import TrainingEvaluation
from pipeline.training import faults, rollback, run_grids
from pipeline.training.counters import RunCounters
from pipeline.training.lr_schedule import lr_factor
from pipeline.training.resolved_run import ResolvedRun
from pipeline.training.run_log import RunLog, record_rank
from shards.errors import UserError


class Trainer:
    def __init__(self, run: ResolvedRun) -> None:
        """run: everything start-up checked and built (resolved_run.py), taken as it is."""
        config, plugin, split = run.config, run.plugin, run.split
        self.run, self.config, self.plugin, self.split, self.resume = run, config, plugin, split, run.resume
        if config.determinism:
            kernels.use_deterministic_kernels()  # before any CUDA kernel runs
        self.precision = run.precision
        self.accelerator = make_accelerator(config, self.precision, run.deepspeed)
        module = TrainingModule(run.networks, plugin)
        self.ema = weight_average(config.ema, plugin, module.networks)  # copied before DeepSpeed casts them
        if config.compile:
            kernels.compile_networks(module.networks)
        optimizer = build_optimizer(module.networks, run.optimizer)
        self.engine, self.optimizer = self.accelerator.prepare(module, optimizer)
        faults.skip_nonfinite_updates(self.engine)
        internals.skip_single_rank_allreduce(self.engine)
        self.networks = self.accelerator.unwrap_model(self.engine).networks
        if self.ema is not None:
            self.ema.to(self.accelerator.device)
        torch_optimizer = internals.torch_optimizer(self.engine)
        # before NetworkSkip's hook: the norms include the gradients of networks about to sit out a step
        self.network_stats = NetworkStats(torch_optimizer, self.networks, self.accelerator.device)
        self.network_skip = NetworkSkip(torch_optimizer)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # lr_schedule scales these
        self.dtype = next(self.networks.parameters()).dtype
        for module in run.auxiliary.values():  # frozen, never optimised nor checkpointed (pipeline/plugin.py)
            module.to(self.accelerator.device, self.dtype).eval().requires_grad_(False)
        self.layout = StreamLayout.of(split, config.seed, config.data, self.accelerator.num_processes)
        self.images_per_step = self.layout.global_batch * config.gradient_accumulation_steps
        self.step = 0  # optimizer steps done
        self.micro_step = 0  # micro-batches done: with the seed, the exact position in the data stream
        self.images_seen = 0
        self.counters = RunCounters(self.accelerator)
        self.nonfinite = faults.NonFiniteWatch(config.faults.max_skipped_steps_in_a_row, self.accelerator)
        self.spikes = rollback.SpikeWatch(config.faults.spike_factor)
        self.step_loss = 0.0  # this rank's losses of the step so far (only with faults.spike_factor)
        self.rollbacks: list[dict[str, int]] = []  # the run's record (rollback.py), read when the loop starts
        self.skips: dict[int, int] = {}
        self.good_checkpoint: int | None = None  # step of the checkpoint resumed from or last written
        self.stopping = False  # SIGTERM agreed at the step that diverged
        self.output_dir = Path(config.output_dir)
        self.evaluation = TrainingEvaluation(config, self.accelerator, run.held_out) if run.held_out else None
        self.host_group = faults.host_group(self.accelerator, config.faults)  # the per-step agreement's
        self.checkpointer = Checkpointer(
            self.accelerator,
            self.engine,
            self.networks,
            plugin,
            config,
            split,
            self.layout,
            self.precision,
            run.resume[0] if run.resume else None,
            self.ema,
            run.auxiliary_sha256,
        )

    @property
    def total_steps(self) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        remaining = max(self.config.max_images - self.images_seen, 0)
        return self.step + math.ceil(remaining / self.images_per_step)

    def train(self) -> None:
        config, accelerator = self.config, self.accelerator
        resolved = self.run.resolved_config()
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
            grid_inputs = center_crop(run_grids.grid_inputs(self.split, config.grid_size), config.data.random_crop)
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
                prefetcher = ShardPrefetcher.for_run(self.split, self.layout, self.micro_step, config.data)
                loader = training_loader(
                    self.split,
                    self.layout,
                    accelerator.process_index,
                    start=self.micro_step,
                    workers=config.data.workers,
                    hflip=config.data.hflip,
                    crop=config.data.random_crop,
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
            try:  # checkpoint.async: the write in flight finished (SIGTERM's too); its failure unless one is raised
                self.checkpointer.writer.close(report=sys.exc_info()[0] is None)
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
        counts: Counter[str] = Counter()  # micro-batches that gave each metric (one may start late)
        skipped_before = self.engine.skipped_steps
        batches = iter(loader)
        while True:
            with stop.waiting():  # a stalled store must not hold a rank past SIGTERM's grace time
                batch = next(batches, None)
            if batch is None:
                return "done"
            metrics, ended_step = self.train_step(batch)
            if prefetcher is not None:
                prefetcher.advance(self.micro_step)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value
            counts.update(metrics.keys())
            if not ended_step:
                continue
            # an optimizer step has ended: everything below happens between two steps, on every rank
            self.images_seen += self.images_per_step
            log.advance(self.step)
            if self.step == first_step + 1:
                record_rank(self.engine, self.networks, accelerator, self.precision, self.output_dir)
            diverged = self.nonfinite.count(self.step, self.engine.skipped_steps > skipped_before)
            skipped_before = self.engine.skipped_steps
            last = self.step >= self.total_steps
            stopping, clock_due, step_loss = stop.agreed(accelerator, self._take_step_loss(), self.host_group)
            spiked = self.spikes.spiked(step_loss)
            if self.step % config.log_every == 0 or last or stopping or diverged or spiked:
                log.log(self.step, self.images_seen, self._reduce(sums, counts))
                sums, counts = {}, Counter()
            if diverged or spiked:
                self.checkpointer.writer.wait()  # checkpoint.async: the checkpoint a rollback goes back to, complete
                if rollback.possible(
                    config.faults, len(self.rollbacks), self.good_checkpoint, self.step, self.output_dir
                ):
                    self.stopping = stopping
                    return "diverged"
                faults_config, done = config.faults, len(self.rollbacks)
                spike = step_loss if spiked else None
                raise rollback.diverged(self.step, spike, self.nonfinite.in_a_row, faults_config, done, self.output_dir)
            if self.step % config.sample_every == 0 or last:
                average_batch_norm_statistics(self.networks, self.accelerator)
                run_grids.draw_grids(
                    self.plugin,
                    self.networks,
                    grid_inputs,
                    accelerator,
                    config.seed,
                    config.grid_size,
                    self.step,
                    self.output_dir,
                )
            if self.evaluation is not None and self.step % config.eval.every == 0:
                self._evaluate(log)
            if self._checkpoint_due(clock_due, last, stopping):
                self.save_checkpoint()
                self.good_checkpoint = self.step
                stop.clock_started()
            if stopping and not last:
                log.say(f"stopped by SIGTERM after step {self.step}, its checkpoint written: run again to resume")
            if last or stopping:
                return "done"
            if self.micro_step in self.skips:
                return "jump"

    def _checkpoint_due(self, clock_due: bool, last: bool, stopping: bool) -> bool:
        """The one decision to checkpoint: every checkpoint.every steps, every checkpoint.every_minutes
        (clock_due, agreed by all ranks), at the run's last step, and when SIGTERM stops it."""
        every = self.config.checkpoint.every
        return (every is not None and self.step % every == 0) or clock_due or last or stopping

    def _take_step_loss(self) -> torch.Tensor | float:
        """This rank's share of the step's mean loss, for the spike watch; summed by StopRequest.agreed."""
        share = self.step_loss / (self.config.gradient_accumulation_steps * self.accelerator.num_processes)
        self.step_loss = 0.0
        return share

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
        self.nonfinite.in_a_row, self.step_loss = 0, 0.0
        self.counters.forget_since_last_count()  # met in the steps undone
        log.advance(self.step)
        log.say(
            f"step {diverged_at}: diverged; rolled back to {folder.name} (rollback {len(self.rollbacks)} of "
            f"faults.max_rollbacks {self.config.faults.max_rollbacks}), skipping global micro-steps "
            f"{record['from_micro_step']} to {skip_to} of the data"
        )

    def train_step(self, batch: MicroBatch) -> tuple[dict[str, torch.Tensor], bool]:
        """One micro-batch: forward through the plugin, backward; DeepSpeed steps the optimizer at the
        accumulation boundary. Returns the detached metrics (none when every sample of the micro-batch was
        unreadable) and whether this micro-batch ended an optimizer step (then `self.step` has advanced
        and the EMA has followed)."""
        if batch.failure is not None:
            raise UserError(batch.failure)
        self.counters.met(batch.bad_samples, batch.fetch_counts)
        images, labels = batch.on_device(self.run.image, self.accelerator.device, self.dtype)
        factor = lr_factor(self.config.lr_schedule, self.step, self.total_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * factor  # read by the ZeRO step at this step's last micro-batch
        with self.accelerator.accumulate(self.engine):
            ends_step = self.accelerator.sync_gradients  # this micro-batch's backward ends with the optimizer step
            output = self.engine(images, labels, self.step)
            self.counters.add_step_totals(output.step_totals)
            if ends_step:
                self.network_skip.networks = self._networks_to_skip()
            skipped_before = self.engine.skipped_steps
            if self.spikes.factor is not None:  # a tensor: no wait for the device at each micro-batch
                self.step_loss = self.step_loss + output.loss.detach().double()
            self.accelerator.backward(output.loss)
            self.optimizer.step()  # under DeepSpeed these two are no-ops: backward() stepped
            self.optimizer.zero_grad()
        self.micro_step += 1
        if ends_step:
            self.step += 1
            finite = self.engine.skipped_steps == skipped_before  # not skipped for a non-finite gradient
            stepped = set(self.networks) - self.network_skip.networks if finite else set()
            self.network_stats.end_step(stepped)
            if self.ema is not None and stepped:
                self.ema.update(self.step, stepped)
        return {name: value.detach().float() for name, value in output.metrics.items()}, ends_step

    def _networks_to_skip(self) -> set[str]:
        """The plugin's decision, the same on every rank (network_skip.plugin_decision)."""
        if not hasattr(self.plugin, "networks_to_skip"):  # the same plugin on every rank: no collective
            self.counters.step_totals = {}
            return set()
        totals = self.counters.summed_step_totals()  # a collective only for a plugin that keeps totals
        return plugin_decision(self.plugin, self.config.plugin, totals, self.step, set(self.networks))

    def _reduce(self, sums: dict[str, torch.Tensor], counts: Counter[str]) -> dict[str, float]:
        """What a log records, all ranks': the plugin's metrics since the last log, each network's lr and
        statistics, and the fault counters. A collective."""
        metrics = self.counters.mean_metrics(sums, counts)
        for group in self.optimizer.param_groups:
            metrics[f"lr/{group['network']}"] = group["lr"]
        metrics.update(self.network_stats.collect(self.accelerator))
        metrics["bad_samples"] = self.counters.count_bad_samples()
        metrics["skipped_steps"] = self.engine.skipped_steps
        if self.split.remote is not None:
            metrics.update(self.counters.count_fetches())
        return metrics

    def _evaluate(self, log: RunLog) -> None:
        """eval.every (pipeline/evaluation/in_training.py): the networks a checkpoint of this step would give
        `pipeline evaluate`, measured by every rank, logged as a record of its own."""
        started = time.perf_counter()
        average_batch_norm_statistics(self.networks, self.accelerator)
        networks = self.ema.with_averages() if self.ema is not None else self.networks
        networks.eval()
        try:
            metrics = self.evaluation.run(self.plugin, networks)
        finally:
            self.networks.train()
        log.evaluation(self.step, metrics, time.perf_counter() - started)

    def save_checkpoint(self) -> Path | None:
        """OUTPUT/checkpoints/step-NNNNNNNN, by every rank (checkpoints/checkpointer.py); rank 0 gets the folder
        (None with checkpoint.async: its write is then in flight)."""
        average_batch_norm_statistics(self.networks, self.accelerator)  # saved: every rank's data, averaged
        self.counters.count_bad_samples()
        return self.checkpointer.save(self.progress())

    def progress(self) -> Progress:
        window = tuple(self.spikes.losses)
        bad = self.counters.bad_samples
        return Progress(self.step, self.images_seen, self.micro_step, bad, tuple(self.rollbacks), window)

    def load_checkpoint(self, folder: Path, state: dict[str, Any]) -> None:
        """Continue from a checkpoint (pipeline/checkpoints/checkpointer.py): the loop's counters come back with it."""
        progress = self.checkpointer.load(folder, state)
        self.step, self.images_seen, self.micro_step = progress.step, progress.images, progress.micro_step
        self.counters.bad_samples = progress.bad_samples
        self.spikes = rollback.SpikeWatch(self.config.faults.spike_factor, progress.recent_losses)
        if self.accelerator.is_main_process:
            RunLog.drop_records_after(self.output_dir, self.step)
