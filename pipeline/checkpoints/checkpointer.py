"""The checkpointer: writes a run's checkpoints and restores them, with every rank taking part.

The trainer hands it what holds state (the DeepSpeed engine and its networks, the plugin, the data
layout) once, then calls `save(progress)` at a checkpoint and `load(folder, state)` on resume; the
format itself (folders, hashes, the atomic commit, pruning) is pipeline/checkpoints/checkpoint.py's, the optimizer
partitions pipeline/checkpoints/optimizer_state.py's. New state that must survive a restart (an EMA of the weights,
a data cache's position) plugs in here, not into the training loop.

A save has two halves. Taking it (here), with training stopped: each network's fp32 weights gathered
(collectively: DeepSpeed's masters, not the module's rounded copies under bf16), this rank's optimizer
partition, every rank's RNG and plugin state gathered, rank 0's trainer_state.json and config.json made.
Writing it (pipeline/checkpoints/writer.py): the files, fsyncs, hashes and rank 0's atomic commit, at
once or, with checkpoint.async, in a background thread while training goes on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.checkpoints import checkpoint, optimizer_state
from pipeline.checkpoints.ema import WeightAverage, ema_file
from pipeline.checkpoints.host_copies import host_copy
from pipeline.checkpoints.weights import load_weights
from pipeline.checkpoints.writer import CheckpointWriter, TakenSave, agree
from pipeline.config.sections import RunConfig
from pipeline.data.stream import StreamLayout, data_position, model_image, resume_micro_step
from pipeline.engine import deepspeed_internals as internals
from pipeline.engine import rng
from pipeline.errors import CheckpointError, ConfigError, TrainingStopped
from pipeline.plugin import ModelPlugin, resolved_options
from shards.errors import UserError
from shards.read.reader import ShardSplit


@dataclass(frozen=True)
class Progress:
    """Where the loop is: what a checkpoint records of it, and what a resume gives back."""

    step: int  # optimizer steps done
    images: int
    micro_step: int  # micro-batches done: with the seed, the exact position in the data stream
    bad_samples: int  # unreadable samples left out so far, all ranks
    rollbacks: tuple[dict[str, int], ...] = ()  # the run's rollbacks so far (pipeline/training/rollback.py)
    recent_losses: tuple[float, ...] = ()  # the spike watch's window (faults.spike_factor)


class Checkpointer:
    def __init__(
        self,
        accelerator: Accelerator,
        engine,
        networks: torch.nn.ModuleDict,
        plugin: ModelPlugin,
        config: RunConfig,
        split: ShardSplit,
        layout: StreamLayout,
        precision: str,
        resumed_from: Path | None,
        ema: WeightAverage | None = None,
        auxiliary: dict[str, str] | None = None,
    ) -> None:
        """resumed_from: the checkpoint this run continued from, never pruned by it. ema: the run's EMA
        weights, saved beside the raw weights as <network>.ema.safetensors."""
        self.accelerator, self.engine, self.networks, self.plugin = accelerator, engine, networks, plugin
        self.config, self.split, self.layout, self.precision = config, split, layout, precision
        self.resumed_from, self.ema, self.auxiliary = resumed_from, ema, auxiliary or {}
        self.root = checkpoint.checkpoints_root(Path(config.output_dir))
        self.writer = CheckpointWriter(
            self.root,
            config.checkpoint.keep_last,
            resumed_from,
            accelerator.process_index,
            accelerator.num_processes,
            background=config.checkpoint.async_,
        )
        if not optimizer_state.supported(engine):
            # build_deepspeed_config refuses what leads here before any folder exists: this is a guard
            raise ConfigError(
                f"precision {precision} without ZeRO cannot be checkpointed: set deepspeed.zero_stage to 1 or 2"
            )

    def save(self, progress: Progress) -> Path | None:
        """OUTPUT/checkpoints/step-NNNNNNNN, by every rank: the folder on rank 0, None elsewhere; with
        checkpoint.async None everywhere, the write then in flight (`wait`)."""
        self.writer.wait()
        copies = self.writer.background  # training changes the live tensors while the copies are written
        # every rank holds the same full weights: all reach the same verdict without a collective
        tensors = {name: full_precision_state(network, copies) for name, network in self.networks.items()}
        diverged = [name for name, state in tensors.items() if not all(t.isfinite().all() for t in state.values())]
        if diverged:
            raise TrainingStopped(
                f"step {progress.step}: the {diverged[0]}'s weights are no longer finite; not saving them (the last "
                "good checkpoint is left as it was): lower the learning rate and resume from it"
            )
        return self.writer.write(self._take(tensors, progress, copies))

    def _take(self, tensors: dict[str, dict[str, torch.Tensor]], progress: Progress, copies: bool) -> TakenSave:
        """What the save writes, taken now (collectives on the default group): `copies`, host copies that
        training cannot change."""
        accelerator, config = self.accelerator, self.config
        rank = accelerator.process_index
        files = {}  # every rank: its optimizer partition; rank 0 also each network's weights
        partition = optimizer_state.partition_contents(
            self.engine, self.networks, rank, accelerator.num_processes, copies
        )
        if partition is not None:
            files[f"{checkpoint.OPTIMIZER_FOLDER}/{optimizer_state.partition_file(rank)}"] = partition
        ranks = gather_object([{"rng": rng.capture(), "plugin": self.plugin.state_dict()}])
        description = state = None
        if accelerator.is_main_process:
            files.update({f"{name}.safetensors": (state, {"plugin": config.plugin}) for name, state in tensors.items()})
            plugin_tensors = self.plugin.state_tensors() if hasattr(self.plugin, "state_tensors") else {}
            if plugin_tensors:  # the same on every rank (pipeline/plugin.py)
                plugin_tensors = {key: host_copy(value, copies) for key, value in plugin_tensors.items()}
                files[checkpoint.PLUGIN_TENSORS_FILE] = (plugin_tensors, {"plugin": config.plugin})
            if self.ema is not None:  # the same on every rank
                # one metadata key: safetensors writes several in a random order (not the same bytes twice)
                ema = self.ema.state(copies).items()
                files.update({ema_file(name): (state, {"plugin": config.plugin}) for name, state in ema})
            record = {
                "plugin": config.plugin,
                "model": resolved_options(self.plugin, config.model),
                "options_recorded": True,  # every option, defaults included (pipeline/plugin.py)
                "image": model_image(self.split, config.data),
                **({"auxiliary": self.auxiliary} if self.auxiliary else {}),  # files the loss read: sha256
            }
            description = json.dumps(record, indent=2) + "\n"
            state = self._trainer_state(ranks, progress)
        staging = checkpoint.staging_folder(self.root, progress.step)
        return TakenSave(progress.step, staging, files, description, state)

    def _trainer_state(self, ranks: list[dict[str, Any]], progress: Progress) -> dict[str, Any]:
        engine = self.engine
        return {
            "format_version": checkpoint.FORMAT_VERSION,
            "plugin": self.config.plugin,
            "step": progress.step,
            "images": progress.images,
            "micro_step": progress.micro_step,
            "data": data_position(self.layout, progress.micro_step),
            "world_size": self.accelerator.num_processes,
            "gradient_accumulation_steps": self.config.gradient_accumulation_steps,
            "zero_stage": engine.zero_optimization_stage(),
            "precision": self.precision,
            "bad_samples": progress.bad_samples,
            "rollbacks": list(progress.rollbacks),
            "recent_losses": list(progress.recent_losses),
            "engine": internals.counters(engine),
            "loss_scaler": internals.loss_scaler_state(engine),
            "ranks": ranks,
            "config": self.config.model_dump(mode="json"),
        }

    def load(self, folder: Path, state: dict[str, Any]) -> Progress:
        """Weights, optimizer partitions (any number of ranks wrote them), DeepSpeed's counters, and this
        rank's RNG and plugin state; the loop's progress, its data position mapped onto this run's layout."""
        failure = None
        try:
            load_weights(self.networks, folder, self.config.plugin)
            ema_found = self.ema is None or self.ema.load(folder, self.config.plugin)
            if not ema_found and self.accelerator.is_main_process:
                print(
                    f"pipeline train: warning: {folder} holds no EMA weights: the average starts from its weights",
                    file=sys.stderr,
                )
            optimizer_state.load_partitions(self.engine, self.networks, folder / checkpoint.OPTIMIZER_FOLDER)
            self._restore_rank_state(folder, state)
        except UserError as error:  # each rank reads its own slices: a failure may be one rank's alone
            failure = str(error)
        except (OSError, SafetensorError, RuntimeError) as error:
            failure = f"{folder}: cannot load it on rank {self.accelerator.process_index} ({error})"
        agree(failure, self.accelerator.num_processes)
        internals.restore_counters(self.engine, state["engine"])
        if state.get("precision") == self.precision:
            internals.restore_loss_scaler(self.engine, state.get("loss_scaler"))
        micro_step = resume_micro_step(state["data"], self.layout)
        losses = tuple(float(loss) for loss in state.get("recent_losses", ()))
        return Progress(state["step"], state["images"], micro_step, state.get("bad_samples", 0), (), losses)

    def _restore_rank_state(self, folder: Path, state: dict[str, Any]) -> None:
        """This rank's RNG and plugin state; ranks the saved run did not have start their own streams."""
        rank = self.accelerator.process_index
        if rank >= len(state["ranks"]):
            return
        rng.restore(state["ranks"][rank]["rng"])  # its structure was checked when the checkpoint was read
        try:
            self.plugin.load_state_dict(state["ranks"][rank]["plugin"])
            if hasattr(self.plugin, "load_state_tensors"):
                path = folder / checkpoint.PLUGIN_TENSORS_FILE
                self.plugin.load_state_tensors(load_file(str(path)) if path.is_file() else {}, self.networks)
        except (KeyError, TypeError, ValueError) as error:  # the plugin's own format, unknown to the trainer
            raise CheckpointError(
                f"{folder / checkpoint.STATE_FILE}: not a valid checkpoint: rank {rank}'s plugin state does not "
                f"fit the {self.config.plugin} plugin ({type(error).__name__}: {error})"
            ) from None


def full_precision_state(network: torch.nn.Module, copy: bool = False) -> dict[str, torch.Tensor]:
    """The network's state with fp32 master weights (a collective under ZeRO-1/2: call on every rank);
    `copy`: host_copy's."""
    parameters = dict(network.named_parameters())
    state = {}
    for key, value in network.state_dict().items():
        if key in parameters:
            master = internals.full_fp32_weight(parameters[key])
            value = master if master is not None else value
        value = value.float() if value.is_floating_point() else value
        state[key] = host_copy(value, copy)
    return state
