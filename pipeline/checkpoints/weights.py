"""A weights folder (a checkpoint, or what `pipeline export` wrote from one: <network>.safetensors and
config.json): its description, its weights loaded (safetensors only: nothing is unpickled), and the rule
that no output goes into it. pipeline/model.py builds the model from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.checkpoints import checkpoint
from pipeline.errors import mismatch
from shards.command_line import check_output_file
from shards.errors import UserError
from shards.regular_files import check_regular, file_sha256


def read_description(folder: Path) -> dict[str, Any]:
    """config.json of a weights folder, checked whole (pipeline/checkpoints/checkpoint.py `read_weights_config`)."""
    try:
        found = (folder / checkpoint.CONFIG_FILE).is_file()  # not a FIFO either: reading one would wait for ever
    except OSError:  # a name too long, say
        found = False
    if not found:
        raise UserError(f"{folder}: not a weights folder (no {checkpoint.CONFIG_FILE}; give a checkpoint or an export)")
    return checkpoint.read_weights_config(folder)


def load_weights(networks: torch.nn.ModuleDict, folder: Path, plugin: str, suffix: str = ".safetensors") -> None:
    """Each network's <network><suffix> of the folder into it, whole; one line when one cannot be read
    or does not fit."""
    for network_name, network in networks.items():
        path = folder / f"{network_name}{suffix}"
        try:
            check_regular(path)  # a FIFO in its place: refused, never waited on
            state = load_file(str(path))
        except (OSError, SafetensorError) as error:
            raise UserError(f"{path}: cannot read the {plugin} {network_name}'s weights ({error})") from None
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = mismatch(error)
            raise UserError(f"{path}: does not fit the {plugin} {network_name} of config.json ({first})") from None


def load_initial_weights(plugin: Any, networks: dict[str, torch.nn.Module], name: str) -> None:
    """A fresh run's starting weights, where the plugin names a file of them (a diffusers folder to fine-tune:
    pipeline/plugin.py, initial_weights): read as safetensors, split into networks by the plugin, each
    loaded whole; one line when the file cannot be read or does not fit."""
    path = plugin.initial_weights() if hasattr(plugin, "initial_weights") else None
    if path is None:
        return
    try:
        check_regular(path)
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise UserError(f"{path}: cannot read the initial weights ({error}; safetensors only)") from None
    for network_name, state in plugin.initial_state(tensors).items():
        try:
            networks[network_name].load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = mismatch(error)
            raise UserError(f"{path}: does not fit the {name} {network_name} ({first})") from None


def load_auxiliary(plugin: Any, name: str) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """The frozen networks a plugin's loss needs (pipeline/plugin.py, auxiliary_files), built from the
    files it names, and each file's sha256 (recorded in config.json: the run's loss depends on them)."""
    files = plugin.auxiliary_files() if hasattr(plugin, "auxiliary_files") else {}
    tensors, digests = {}, {}
    for key, path in files.items():
        try:
            check_regular(path)
            digests[key] = file_sha256(path)
            tensors[key] = load_file(str(path))
        except (OSError, SafetensorError) as error:
            raise UserError(
                f"{path}: cannot read the {name} plugin's {key} weights ({error}; safetensors only)"
            ) from None
    return (plugin.build_auxiliary(tensors) if files else {}), digests


def check_output_beside(path: Path, weights: Path) -> None:
    """Before any work: `path` can be written, and not into the weights folder (a PNG there could replace
    its config.json or a network's weights)."""
    check_output_file(path)
    try:
        inside = path.resolve().parent == weights.resolve()
    except (OSError, RuntimeError) as error:  # a loop of symbolic links
        raise UserError(f"cannot write {path}: {error}") from None
    if inside:
        raise UserError(f"{path} is inside the weights folder {weights}; write it somewhere else")
