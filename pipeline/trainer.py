"""The training loop: micro-batches -> the plugin's routed loss -> one DeepSpeed ZeRO update.

for each micro-batch of this rank:
    loss = plugin.training_step(...)        # every network's own gradient, routed into one loss
    accelerator.backward(loss)              # DeepSpeed: backward, and the ZeRO step at the
                                            # accumulation boundary (k micro-batches)
    at a boundary: step += 1; log / draw grids / save as scheduled
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from accelerate.utils import set_seed
from safetensors.torch import save_file

from pipeline import grids
from pipeline.config import RunConfig, resolved_yaml
from pipeline.data import StreamLayout, training_loader
from pipeline.engine import TrainingModule, build_optimizer, make_accelerator, resolve_precision
from pipeline.plugin import ModelPlugin
from pipeline.run_log import RunLog
from shards.errors import UserError
from shards.random_access import SplitDataset
from shards.reader import ShardSplit


class Trainer:
    def __init__(self, config: RunConfig, plugin: ModelPlugin, split: ShardSplit, networks: dict) -> None:
        """networks: plugin.build_networks(), built from the same seed on every rank."""
        self.config, self.plugin, self.split = config, plugin, split
        self.precision = resolve_precision(config.precision)
        self.accelerator = make_accelerator(config, self.precision)
        module = TrainingModule(networks, plugin)
        optimizer = build_optimizer(config, module.networks, plugin.optimizer_defaults())
        self.engine, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.networks = self.accelerator.unwrap_model(self.engine).networks
        self.dtype = next(self.networks.parameters()).dtype
        self.layout = StreamLayout(
            counts=tuple(shard["count"] for shard in split.shards),
            seed=config.seed,
            shuffle_shards=config.data.shuffle_shards,
            world_size=self.accelerator.num_processes,
            batch_size=config.data.batch_size,
        )
        if self.layout.steps_per_epoch == 0:
            raise UserError(
                f"{split.count} samples in {split.root} ({split.split}) is less than one global micro-batch of "
                f"{self.layout.world_size} ranks x data.batch_size {config.data.batch_size}"
            )
        images_per_step = self.layout.global_batch * config.gradient_accumulation_steps
        self.total_steps = config.max_steps or math.ceil(config.max_images / images_per_step)
        self.images_per_step = images_per_step
        self.step = 0  # optimizer steps done
        self.micro_step = 0  # micro-batches done: with the seed, the exact position in the data stream
        self.output_dir = Path(config.output_dir)

    def train(self) -> None:
        config, accelerator = self.config, self.accelerator
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(resolved_yaml(config))
        accelerator.init_trackers("tensorboard", config={"plugin": config.plugin, "seed": config.seed})
        set_seed(config.seed, device_specific=True)  # the plugin's noise: seed + rank, from here on
        log = RunLog(self.output_dir, accelerator, self.total_steps, self.step)
        grid_inputs = self._grid_inputs()
        loader = training_loader(
            str(config.data.shards),
            config.data.split,
            self.layout,
            accelerator.process_index,
            start=self.micro_step,
            workers=config.data.workers,
            pin_memory=torch.cuda.is_available(),
        )
        sums: dict[str, torch.Tensor] = {}
        micro_steps_summed = 0
        try:
            for images, labels in loader:
                metrics = self.train_step(images, labels)
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + value
                micro_steps_summed += 1
                if not accelerator.sync_gradients:
                    continue
                log.advance(self.step)
                if self.step == 1:
                    self._record_rank()
                last = self.step >= self.total_steps
                if self.step % config.log_every == 0 or last:
                    log.log(self.step, self.step * self.images_per_step, self._reduce(sums, micro_steps_summed))
                    sums, micro_steps_summed = {}, 0
                if self.step % config.sample_every == 0 or last:
                    self._draw_grids(grid_inputs)
                if last:
                    break
            self._save_weights(self.output_dir / "weights")
            # Every rank must be done before end_training() destroys the process group: without this
            # barrier a rank sometimes aborted at exit ("terminate called without an active exception").
            accelerator.wait_for_everyone()
        finally:
            log.close()  # stops the progress bar, the trackers, and the process group

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One micro-batch: forward through the plugin, backward; DeepSpeed steps the optimizer at the
        accumulation boundary, after which `self.step` has advanced. Returns the detached metrics."""
        accelerator = self.accelerator
        images = self._augment(images.to(accelerator.device, self.dtype, non_blocking=True))
        labels = labels.to(accelerator.device, non_blocking=True)
        with accelerator.accumulate(self.engine):
            output = self.engine(images, labels, self.step)
            accelerator.backward(output.loss)
            self.optimizer.step()  # under DeepSpeed these two are no-ops: backward() stepped
            self.optimizer.zero_grad()
        self.micro_step += 1
        if accelerator.sync_gradients:
            self.step += 1
        return {name: value.detach().float() for name, value in output.metrics.items()}

    def _record_rank(self) -> None:
        """ranks/rank-N.json: what this rank holds, to see ZeRO's partitioning (written after the first
        step, when the optimizer state exists)."""
        zero_optimizer = self.engine.optimizer
        inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
        state_elements = sum(
            value.numel() for state in inner.state.values() for value in state.values() if torch.is_tensor(value)
        )
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

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        if not self.config.data.hflip:
            return images
        # drawn from (seed, micro-step, rank) so that a resumed run flips the same images
        generator = torch.Generator().manual_seed(
            hash((self.config.seed, self.micro_step, self.accelerator.process_index)) % 2**63
        )
        flip = torch.rand(len(images), generator=generator) < 0.5
        images[flip.to(images.device)] = images[flip.to(images.device)].flip(-1)
        return images

    def _reduce(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        names = sorted(sums)
        means = torch.stack([sums[name] / count for name in names]).to(self.accelerator.device)
        means = self.accelerator.reduce(means, reduction="mean")
        metrics = {name: float(value) for name, value in zip(names, means.tolist(), strict=True)}
        for group in self.optimizer.param_groups:
            metrics[f"lr/{group['network']}"] = group["lr"]
        return metrics

    def _grid_inputs(self) -> torch.Tensor:
        """The same images for every reconstruction grid of a run: the split's first samples."""
        dataset = SplitDataset(self.split)
        count = min(self.config.grid_size, len(dataset))
        return torch.stack([dataset[index][0] for index in range(count)])

    @torch.no_grad()
    def _draw_grids(self, inputs: torch.Tensor) -> None:
        # every rank runs the networks (ZeRO-3 gathers parameters collectively); rank 0 writes
        self.networks.eval()
        try:
            generator = torch.Generator().manual_seed(self.config.seed)
            samples = self.plugin.sample(self.networks, self.config.grid_size, generator).float().cpu()
            device_inputs = inputs.to(self.accelerator.device, self.dtype)
            reconstructions = self.plugin.reconstruct(self.networks, device_inputs).float().cpu()
        finally:
            self.networks.train()
        if self.accelerator.is_main_process:
            folder = self.output_dir / "samples"
            grids.save(grids.grid(samples), folder / f"step-{self.step:08d}-samples.png")
            grids.save(grids.pairs_grid(inputs, reconstructions), folder / f"step-{self.step:08d}-reconstructions.png")

    def _save_weights(self, folder: Path) -> None:
        """Each network's weights as <network>.safetensors (complete on every rank under ZeRO-1/2)."""
        if not self.accelerator.is_main_process:
            return
        folder.mkdir(parents=True, exist_ok=True)
        for name, network in self.networks.items():
            tensors = {
                key: (value.float() if value.is_floating_point() else value).detach().cpu().contiguous()
                for key, value in network.state_dict().items()
            }
            save_file(tensors, str(folder / f"{name}.safetensors"), metadata={"plugin": self.config.plugin})
