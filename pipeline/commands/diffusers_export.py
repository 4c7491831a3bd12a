"""`pipeline export CHECKPOINT OUT --format diffusers`: an `autoencoder-kl` model as the folder diffusers'
`AutoencoderKL.from_pretrained(OUT)` loads: diffusion_pytorch_model.safetensors (the encoder's and the
decoder's weights, whose names are diffusers' already: pipeline/plugins/kl_autoencoder.py) and a
config.json that names every field (diffusers fills a missing one with its own default, not Stable
Diffusion's: one block of 64 channels).

`scaling_factor`, what latent diffusion multiplies the latents by (LDM's scale_by_std: 1 / the standard
deviation of the training images' latents), is given, or measured on the first images of a shard split
(the posterior means), or else Stable Diffusion's 0.18215, said in a warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.model import Model, load_model
from pipeline.plugins.autoencoder_kl import DIFFUSERS_WEIGHTS
from pipeline.training.run_grids import grid_inputs
from shards.errors import UserError
from shards.progress import console
from shards.read.reader import open_split

WEIGHTS_FILE = DIFFUSERS_WEIGHTS
CONFIG_FILE = "config.json"
SD_SCALING_FACTOR = 0.18215
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers that reads every field written (mid_block_add_attention)


def export_diffusers(
    folder: Path, out: Path, weights: str | None, scaling_factor: float | None, shards: object, split: str, count: int
) -> list[Path]:
    model = load_model(folder, weights)
    if model.plugin.name != "autoencoder-kl":
        raise UserError(f"{folder}: --format diffusers exports autoencoder-kl models, not {model.plugin.name}")
    if scaling_factor is None and shards is not None:
        scaling_factor = measured_scaling_factor(model, shards, split, count)
    elif scaling_factor is None:
        console.print(
            f"warning: scaling_factor {SD_SCALING_FACTOR} (Stable Diffusion's): give --scaling-factor or --shards"
        )
        scaling_factor = SD_SCALING_FACTOR
    tensors = {
        key: value.detach().float().contiguous()
        for network in ("encoder", "decoder")
        for key, value in model.networks[network].state_dict().items()
        if key != "logvar"  # the loss's, learnt with the decoder: not part of the autoencoder
    }
    out.mkdir(parents=True, exist_ok=True)
    written = [out / WEIGHTS_FILE, out / CONFIG_FILE]
    temporary = out / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, written[0])
    temporary = out / f".{CONFIG_FILE}.tmp"
    temporary.write_text(json.dumps(diffusers_config(model, scaling_factor), indent=2) + "\n")
    os.replace(temporary, written[1])
    return written


def diffusers_config(model: Model, scaling_factor: float) -> dict:
    options, image = model.plugin.options, model.image
    blocks = len(options.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": list(options.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "force_upcast": True,
        "in_channels": image.channels,
        "latent_channels": options.latent_channels,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": options.layers_per_block,
        "mid_block_add_attention": options.mid_block_add_attention,
        "norm_num_groups": options.norm_num_groups,
        "out_channels": image.channels,
        "sample_size": image.size,
        "scaling_factor": scaling_factor,
        "shift_factor": None,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "use_post_quant_conv": True,
        "use_quant_conv": True,
    }


@torch.no_grad()
def measured_scaling_factor(model: Model, shards: object, split: str, count: int) -> float:
    """1 / the standard deviation of the posterior means of the split's first `count` readable images."""
    images = grid_inputs(open_split(shards, split), count)  # the first readable ones, as the grids take them
    latents = torch.cat([model.encode(batch) for batch in images.split(64)])
    return float(1.0 / latents.flatten().std())
