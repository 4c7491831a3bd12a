"""`pipeline lpips-weights OUT --lpips vgg.pth --vgg vgg16.pth`: the weights file `model.lpips_weights`
reads (safetensors), from the `lpips` package's linear layers (its lpips/weights/v0.1/vgg.pth) and
torchvision's ImageNet VGG16 (vgg16-397923af.pth), wherever a user has them: nothing is downloaded. Both
are read with torch.load(weights_only=True): tensors only, nothing unpickled that could run code."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.errors import mismatch
from pipeline.plugins.lpips import LPIPS, from_sources
from shards.command_line import check_output_file, one_line
from shards.errors import UserError
from shards.regular_files import check_regular


def read_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        check_regular(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise UserError(f"{path}: cannot read {what} ({one_line(str(error))[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"{path}: not {what} (a state dict of tensors)")
    return state


def write_lpips_weights(args: argparse.Namespace) -> int:
    check_output_file(args.out)
    tensors = from_sources(read_state(args.lpips, "the lpips package's vgg.pth"), read_state(args.vgg, "a VGG16"))
    try:
        LPIPS().load_state_dict(tensors, strict=True)  # every tensor there, of its shape
    except RuntimeError as error:
        first = mismatch(error)
        raise UserError(f"{args.lpips} and {args.vgg} are not LPIPS VGG16's weights ({first})") from None
    temporary = args.out.with_name(f".{args.out.name}.tmp")
    save_file(tensors, str(temporary))
    os.replace(temporary, args.out)
    print(f"wrote {one_line(str(args.out))}: LPIPS VGG16 v0.1, {len(tensors)} tensors")
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "lpips-weights",
        help="LPIPS's weights for model.lpips_weights, from the lpips package's vgg.pth and torchvision's VGG16",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="the safetensors file to write")
    parser.add_argument("--lpips", type=Path, required=True, help="the lpips package's weights/v0.1/vgg.pth")
    parser.add_argument("--vgg", type=Path, required=True, help="torchvision's VGG16 state dict (vgg16-397923af.pth)")
    parser.set_defaults(handler=write_lpips_weights)
