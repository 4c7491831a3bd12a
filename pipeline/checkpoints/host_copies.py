"""The tensors a checkpoint takes, on the host: one place that says when they must be copies."""

from __future__ import annotations

import torch


def host_copy(value: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """`value` on the host, contiguous; with `copy`, a copy of its own (one copy from a GPU, a clone on the
    host) that training cannot change while a background write (checkpoint.async) reads it."""
    return value.detach().to("cpu", copy=copy).contiguous()
