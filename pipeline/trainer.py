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
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import save_file

from pipeline import grids
from pipeline.config import RunConfig, resolved_yaml
from pipeline.data import StreamLayout, training_loader
from pipeline.engine import TrainingModule, build_optimizer, make_accelerator, resolve_precision
from pipeline.plugin import ModelPlugin
from pipeline.run_log import RunLog
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
        log = None
        try:
            grid_inputs = self._grid_inputs()
            loader = training_loader(
                str(config.data.shards),
                config.data.split,
                self.layout,
                accelerator.process_index,
                start=self.micro_step,
                workers=config.data.workers,
                hflip=config.data.hflip,
                pin_memory=torch.cuda.is_available(),
            )
            log = RunLog(self.output_dir, accelerator, self.total_steps, self.step)  # its clock starts here
            sums: dict[str, torch.Tensor] = {}
            micro_steps_summed = 0
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
            if log is not None:
                log.close()  # stops the progress bar, the trackers, and the process group
            else:
                accelerator.end_training()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One micro-batch: forward through the plugin, backward; DeepSpeed steps the optimizer at the
        accumulation boundary, after which `self.step` has advanced. Returns the detached metrics."""
        accelerator = self.accelerator
        images = images.to(accelerator.device, self.dtype, non_blocking=True)
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
        """Each network's weights as <network>.safetensors: the fp32 master weights DeepSpeed keeps
        (under bf16 the module itself holds rounded copies), and the batch norm statistics averaged
        over ranks. Every rank takes part; rank 0 writes."""
        self._average_batch_norm_statistics()
        tensors = {name: full_precision_state(network) for name, network in self.networks.items()}
        if not self.accelerator.is_main_process:
            return
        folder.mkdir(parents=True, exist_ok=True)
        for name, state in tensors.items():
            save_file(state, str(folder / f"{name}.safetensors"), metadata={"plugin": self.config.plugin})
        description = {"plugin": self.config.plugin, "model": self.config.model, "image": self.split.image}
        (folder / "config.json").write_text(json.dumps(description, indent=2) + "\n")


def full_precision_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's state with fp32 master weights (a collective under ZeRO-1/2: call on every rank)."""
    parameters = dict(network.named_parameters())
    state = {}
    for key, value in network.state_dict().items():
        if key in parameters:
            master = safe_get_full_fp32_param(parameters[key])
            value = master if master is not None else value
        value = value.float() if value.is_floating_point() else value
        state[key] = value.detach().cpu().contiguous()
    return state
