"""DeepSpeed's optimizer state, saved partitioned as trained, as safetensors (never a pickle).

Under ZeRO-1/2 (and DeepSpeed's bf16 optimizer) each rank holds, for a slice of every parameter's
flattened elements, the fp32 master copy and the optimizer's state (RMSProp's square_avg, Adam's
exp_avg and exp_avg_sq, ...). DeepSpeed links each parameter to its slice (`param._hp_mapping`: where
the slice starts in the parameter, how many elements). Each rank writes its own slices to
`optimizer/rank-NNNNN.safetensors`:

    "master/<network>.<parameter>"    the fp32 master slice
    "<state>/<network>.<parameter>"   each per-element optimizer state slice
    metadata: {"partition": JSON of {"slices": {"<network>.<parameter>": [start, numel]}, "steps": [...],
               "world_size": N}}  (one key: safetensors writes several in a random order, and
               identical runs must give identical files)

A rank that resumes reads, for each of its own slices, the overlapping pieces of every saved rank's
file (lazily: safetensors reads only those bytes), so a checkpoint resumes on any number of ranks.
Without ZeRO, in fp32, DeepSpeed's optimizer is the plain torch optimizer: every rank holds whole
parameters and rank 0 writes them as slices of [0, numel).

We do not use DeepSpeed's own checkpoint files: they are pickles (DeepSpeed loads them with
torch.load(weights_only=False)), and ZeRO-1/2's default layout cannot change the number of ranks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field
from safetensors import SafetensorError, safe_open

from pipeline.checkpoints.host_copies import host_copy
from pipeline.engine import deepspeed_internals as internals
from pipeline.errors import CheckpointError
from shards.errors import check_structure, parse_json
from shards.format.manifest import Count, Record
from shards.regular_files import check_regular

MASTER = "master"


@dataclass
class LocalSlice:
    """The part of one parameter this rank updates: its elements [start, start + numel) of the
    flattened parameter, the fp32 master copy of them, and the optimizer state of them."""

    name: str
    start: int
    numel: int
    master: torch.Tensor
    states: dict[str, torch.Tensor]


def partition_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def supported(engine) -> bool:
    """Whether we can read and write this engine's optimizer state: ZeRO-1/2 and DeepSpeed's bf16
    optimizer link every parameter to its slice; without a wrapper the torch optimizer holds whole
    parameters. (DeepSpeed's fp16 optimizer without ZeRO does neither.)"""
    return internals.slices_linked(engine) or not internals.partitioned(engine)


def local_slices(engine, networks: torch.nn.ModuleDict) -> Iterator[LocalSlice]:
    """This rank's slices (with their optimizer state once the optimizer has stepped)."""
    optimizer = internals.torch_optimizer(engine)
    if not internals.partitioned(engine):
        for name, param in networks.named_parameters():
            held = optimizer.state.get(param, {})
            states = {key: value.view(-1) for key, value in held.items() if _per_element(key, value, param)}
            yield LocalSlice(name, 0, param.numel(), param.data.view(-1), states)
        return
    for name, param in networks.named_parameters():
        piece = internals.parameter_slice(param)
        if piece is None:  # none of this parameter's elements live on this rank
            continue
        # The state slices are cut here from the group's flat state, not taken from DeepSpeed's own links
        # (optim_fragment): DeepSpeed makes those after stepping the FIRST param group only, so with
        # several groups (one per network) the other groups' parameters never get theirs.
        flat = optimizer.param_groups[piece.group]["params"][0]
        states = {
            key: value.narrow(0, piece.flat_start, piece.numel)
            for key, value in optimizer.state.get(flat, {}).items()
            if _per_element(key, value, flat)
        }
        yield LocalSlice(name, piece.start, piece.numel, piece.master, states)


def _per_element(key: str, value, param: torch.Tensor) -> bool:
    return key != "step" and torch.is_tensor(value) and value.shape == param.shape


def _group_steps(optimizer: torch.optim.Optimizer) -> list[float | None]:
    """Each param group's step count (torch keeps it per parameter; within a group all are equal)."""
    steps = []
    for group in optimizer.param_groups:
        state = optimizer.state.get(group["params"][0], {})
        step = state.get("step")
        steps.append(None if step is None else float(step))
    return steps


def partition_contents(
    engine, networks: torch.nn.ModuleDict, rank: int, world_size: int, copy: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """This rank's slices as (tensors, metadata) for `partition_file`, on the host (`copy`: copies of their
    own, which training cannot change). Without ZeRO every rank holds everything and only rank 0 writes
    (None elsewhere)."""
    if not internals.partitioned(engine) and rank != 0:
        return None
    tensors, slices = {}, {}
    for piece in local_slices(engine, networks):
        slices[piece.name] = [piece.start, piece.numel]
        tensors[f"{MASTER}/{piece.name}"] = host_copy(piece.master.float(), copy)
        for key, value in piece.states.items():
            tensors[f"{key}/{piece.name}"] = host_copy(value.float(), copy)
    index = {
        "slices": slices,
        "steps": _group_steps(internals.torch_optimizer(engine)),
        "world_size": world_size if internals.partitioned(engine) else 1,
    }
    return tensors, {"partition": json.dumps(index)}


@dataclass
class SavedPartition:
    path: Path
    slices: dict[str, tuple[int, int]]
    steps: list[float | None]
    world_size: int
    state_keys: set[str]
    without_state: set[str]  # slices of networks that had not stepped yet (pipeline/engine/network_skip.py)


class PartitionIndex(Record):
    """The "partition" metadata of a saved partition (module docstring)."""

    slices: dict[
        Annotated[str, Field(min_length=1, max_length=1000)], Annotated[list[Count], Field(min_length=2, max_length=2)]
    ]
    steps: list[Annotated[float, Field(ge=0, allow_inf_nan=False)] | None]
    world_size: Annotated[int, Field(gt=0, lt=2**31)]


def read_partition_index(path: Path) -> SavedPartition:
    """A saved partition's header (no tensor data is read), checked: its index, and for every slice a
    master and each optimizer state of exactly its number of elements."""
    try:
        check_regular(path)
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            shapes = {key: file.get_slice(key).get_shape() for key in file.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{path}: not a readable optimizer partition ({error})") from None
    if not isinstance(metadata.get("partition"), str):
        raise CheckpointError(f"{path}: not a valid checkpoint: no partition index in its metadata")
    where = f"{path} (partition index)"
    index = parse_json(metadata["partition"].encode(), where, "checkpoint", CheckpointError)
    check_structure(PartitionIndex, index, where, "checkpoint", CheckpointError)
    slices = {name: (start, numel) for name, (start, numel) in index["slices"].items()}
    state_keys = {key.split("/", 1)[0] for key in shapes} - {MASTER}
    # a network that has sat out every step so far has no optimizer state yet: its slices hold none
    without_state = {name for name in slices if not any(f"{key}/{name}" in shapes for key in state_keys)}
    for name, (_, numel) in slices.items():
        for key in [MASTER, *sorted(state_keys if name not in without_state else ())]:
            if shapes.get(f"{key}/{name}") != [numel]:
                found = shapes.get(f"{key}/{name}", "missing")
                raise CheckpointError(
                    f"{path}: not a valid checkpoint: {f'{key}/{name}'[:200]!r} is {found}, its slice holds {numel}"
                )
    return SavedPartition(path, slices, index["steps"], index["world_size"], state_keys, without_state)


def read_partitions(folder: Path) -> list[SavedPartition]:
    """Every saved partition's header (`read_partition_index`), checked against each other: one file per
    rank that wrote them, the same optimizer state keys and step counts in each."""
    saved = [read_partition_index(path) for path in sorted(folder.glob("rank-*.safetensors"))]
    if not saved:
        raise CheckpointError(f"{folder}: no optimizer partitions (rank-*.safetensors)")
    first = saved[0]
    if [partition.path.name for partition in saved] != [partition_file(rank) for rank in range(first.world_size)]:
        raise CheckpointError(f"{folder}: holds {len(saved)} optimizer partitions, written by {first.world_size} ranks")
    for partition in saved[1:]:
        if (partition.state_keys, partition.steps, partition.world_size) != (
            first.state_keys,
            first.steps,
            first.world_size,
        ):
            raise CheckpointError(
                f"{partition.path}: not a valid checkpoint: its optimizer state keys or step counts differ from "
                f"{first.path.name}'s"
            )
    return saved


def _tiles(pieces: list[tuple[int, int]], numel: int) -> bool:
    """Whether the (start, count) pieces, empty ones aside, cover [0, numel) with no gap and no overlap."""
    covered = 0
    for start, count in sorted(piece for piece in pieces if piece[1]):
        if start != covered:
            return False
        covered += count
    return covered == numel


def check_coverage(saved: list[SavedPartition], networks: dict[str, torch.nn.Module]) -> None:
    """The saved slices of every parameter of these networks tile it exactly, as `load_partitions` needs
    (checked at start-up, before a process group exists)."""
    for network_name, network in networks.items():
        for key, param in network.named_parameters():
            name = f"{network_name}.{key}"
            if not _tiles([partition.slices[name] for partition in saved if name in partition.slices], param.numel()):
                raise CheckpointError(
                    f"{saved[0].path.parent}: not a valid checkpoint: its optimizer partitions do not hold exactly "
                    f"the {param.numel()} elements of {name}"
                )


def _create_state(engine, saved_partitions: list[SavedPartition]) -> None:
    """A fresh engine has no optimizer state until its first step: create it, with the saved keys and
    step counts, through the optimizer's own load_state_dict (for the networks that had state)."""
    state_keys, steps = saved_partitions[0].state_keys, saved_partitions[0].steps
    stateless = {name for partition in saved_partitions for name in partition.without_state}
    stateful = {name for partition in saved_partitions for name in partition.slices} - stateless
    optimizer = internals.torch_optimizer(engine)
    saved = optimizer.state_dict()
    for group_index, group in enumerate(saved["param_groups"]):
        network = optimizer.param_groups[group_index]["network"]
        if state_keys and not any(name.startswith(f"{network}.") for name in stateful):
            continue  # it never stepped: left without state, as it was saved
        for param_id, param in zip(group["params"], optimizer.param_groups[group_index]["params"], strict=True):
            state = {key: torch.zeros_like(param, dtype=torch.float32) for key in sorted(state_keys)}
            if steps[group_index] is not None:
                state["step"] = torch.tensor(steps[group_index], dtype=torch.float32)
            saved["state"][param_id] = state
    optimizer.load_state_dict(saved)


@torch.no_grad()
def load_partitions(engine, networks: torch.nn.ModuleDict, folder: Path) -> None:
    """Fill this rank's slices (masters and optimizer state) from a checkpoint's partitions, whatever
    the number of ranks that wrote them. The module's own weights are loaded separately."""
    saved = read_partitions(folder)
    steps = saved[0].steps
    groups = len(internals.torch_optimizer(engine).param_groups)
    if len(steps) != groups:
        raise CheckpointError(f"{saved[0].path}: {len(steps)} optimizer param groups, this model has {groups}")
    _create_state(engine, saved)
    handles = {}
    try:
        for piece in local_slices(engine, networks):
            filled = 0
            for partition in saved:
                if piece.name not in partition.slices:
                    continue
                saved_start, saved_numel = partition.slices[piece.name]
                begin, end = max(piece.start, saved_start), min(piece.start + piece.numel, saved_start + saved_numel)
                if begin >= end:
                    continue
                if partition.path not in handles:
                    handles[partition.path] = safe_open(str(partition.path), framework="pt")
                file = handles[partition.path]
                for key, target in [(MASTER, piece.master), *piece.states.items()]:
                    try:
                        source = file.get_slice(f"{key}/{piece.name}")[begin - saved_start : end - saved_start]
                    except SafetensorError as error:
                        raise CheckpointError(f"{partition.path}: {error}") from None
                    target[begin - piece.start : end - piece.start].copy_(source)
                filled += end - begin
            if filled != piece.numel:
                raise CheckpointError(
                    f"{folder}: the optimizer partitions hold {filled} of the {piece.numel} elements of {piece.name} "
                    "that this rank needs (a partition file is missing, or the model's shapes differ)"
                )
    finally:
        handles.clear()
