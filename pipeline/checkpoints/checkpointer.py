"""The checkpointer: writes a run's checkpoints and restores them, with every rank taking part.

The trainer hands it what holds state (the DeepSpeed engine and its networks, the plugin, the data
layout) once, then calls `save(progress)` at a checkpoint and `load(folder, state)` on resume; the
format itself (folders, hashes, the atomic commit, pruning) is pipeline/checkpoints/checkpoint.py's, the optimizer
partitions pipeline/checkpoints/optimizer_state.py's. New state that must survive a restart (an EMA of the weights,
a data cache's position) plugs in here, not into the training loop.

A save: rank 0 makes the staging folder; every rank writes its optimizer partition, rank 0 also each
network's fp32 weights (gathered collectively: DeepSpeed's masters, not the module's rounded copies under
bf16); every rank's RNG and plugin state are gathered; rank 0 writes config.json and commits. After each
phase the ranks learn whether any of them failed (`_all_ranks_succeed`), so that no rank is left waiting
in a collective, and all stop with the first failure's line.
"""

from __future__ import annotations

import json
import shutil
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
from pipeline.checkpoints.weights import load_weights
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
        if not optimizer_state.supported(engine):
            # build_deepspeed_config refuses what leads here before any folder exists: this is a guard
            raise ConfigError(
                f"precision {precision} without ZeRO cannot be checkpointed: set deepspeed.zero_stage to 1 or 2"
            )

    def save(self, progress: Progress) -> Path | None:
        """OUTPUT/checkpoints/step-NNNNNNNN; the folder on rank 0, None elsewhere."""
        # every rank holds the same full weights: all reach the same verdict without a collective
        tensors = {name: full_precision_state(network) for name, network in self.networks.items()}
        diverged = [name for name, state in tensors.items() if not all(t.isfinite().all() for t in state.values())]
        if diverged:
            raise TrainingStopped(
                f"step {progress.step}: the {diverged[0]}'s weights are no longer finite; not saving them (the last "
                "good checkpoint is left as it was): lower the learning rate and resume from it"
            )
        staging = checkpoint.staging_folder(self.root, progress.step)
        try:
            return self._write(tensors, staging, progress)
        except CheckpointError as error:
            if self.accelerator.is_main_process:  # a full disk: give back what the failed save took
                shutil.rmtree(staging, ignore_errors=True)
            previous = self.root / checkpoint.LATEST
            kept = f"; {previous.resolve().name} is intact" if previous.exists() else ""
            raise CheckpointError(f"{error}{kept}") from None

    def _write(self, tensors: dict[str, dict[str, torch.Tensor]], staging: Path, progress: Progress) -> Path | None:
        accelerator, config, step = self.accelerator, self.config, progress.step
        failure = None
        if accelerator.is_main_process:
            try:
                shutil.rmtree(staging, ignore_errors=True)  # left by a save that was killed
                (staging / checkpoint.OPTIMIZER_FOLDER).mkdir(parents=True)
            except OSError as error:
                failure = f"cannot write the checkpoint of step {step}: {error}"
        self._all_ranks_succeed(failure)
        rank = accelerator.process_index
        files = {}  # every rank: its optimizer partition; rank 0 also each network's weights
        partition = optimizer_state.partition_contents(self.engine, self.networks, rank, accelerator.num_processes)
        if partition is not None:
            files[f"{checkpoint.OPTIMIZER_FOLDER}/{optimizer_state.partition_file(rank)}"] = partition
        if accelerator.is_main_process:
            files.update({f"{name}.safetensors": (state, {"plugin": config.plugin}) for name, state in tensors.items()})
            plugin_tensors = self.plugin.state_tensors() if hasattr(self.plugin, "state_tensors") else {}
            if plugin_tensors:  # the same on every rank (pipeline/plugin.py)
                files[checkpoint.PLUGIN_TENSORS_FILE] = (plugin_tensors, {"plugin": config.plugin})
            if self.ema is not None:  # the same on every rank
                # one metadata key: safetensors writes several in a random order (not the same bytes twice)
                ema = self.ema.state().items()
                files.update({ema_file(name): (state, {"plugin": config.plugin}) for name, state in ema})
        hashed, failure = {}, None
        try:
            hashed = checkpoint.write_tensor_files(staging, files)
        except (OSError, SafetensorError) as error:  # a full disk, say: every rank must hear of it
            failure = f"rank {rank} cannot write its part of the checkpoint of step {step}: {error}"
        self._all_ranks_succeed(failure)
        ranks = gather_object([{"rng": rng.capture(), "plugin": self.plugin.state_dict(), "hashed": hashed}])
        final, failure = None, None
        if accelerator.is_main_process:
            try:
                description = {
                    "plugin": config.plugin,
                    "model": resolved_options(self.plugin, config.model),
                    "options_recorded": True,  # every option, defaults included (pipeline/plugin.py)
                    "image": model_image(self.split, config.data),
                    **({"auxiliary": self.auxiliary} if self.auxiliary else {}),  # files the loss read: sha256
                }
                checkpoint.write_durably(staging / "config.json", json.dumps(description, indent=2) + "\n")
                hashed = {name: digest for record in ranks for name, digest in record.pop("hashed").items()}
                final = checkpoint.commit(staging, self._trainer_state(ranks, progress), hashed, self.resumed_from)
                checkpoint.prune(self.root, config.checkpoint.keep_last, final, self.resumed_from)
            except (OSError, UserError) as error:
                failure = f"cannot complete the checkpoint of step {step}: {error}"
        self._all_ranks_succeed(failure)  # nobody runs ahead (or exits) before the checkpoint exists
        return final

    def _all_ranks_succeed(self, failure: str | None) -> None:
        """A barrier that also tells every rank whether any rank failed (a rank failing alone would leave
        the others waiting in their next collective): then all stop with the first failure's line."""
        failures = [message for message in gather_object([failure]) if message]
        if failures:
            raise CheckpointError(failures[0])

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
        self._all_ranks_succeed(failure)
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


def full_precision_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The network's state with fp32 master weights (a collective under ZeRO-1/2: call on every rank)."""
    parameters = dict(network.named_parameters())
    state = {}
    for key, value in network.state_dict().items():
        if key in parameters:
            master = internals.full_fp32_weight(parameters[key])
            value = master if master is not None else value
        value = value.float() if value.is_floating_point() else value
        state[key] = value.detach().cpu().contiguous()
    return state
