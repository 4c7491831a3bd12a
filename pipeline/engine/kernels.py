"""Which kernels a run uses: deterministic ones only (`determinism: true`), and compiled networks
(`compile: true`). Both are process-wide or per-network settings made once, before the first step."""

from __future__ import annotations

import os

import torch
from torch import nn

# cuBLAS reuses workspaces across streams nondeterministically unless told a fixed layout; torch
# refuses deterministic mode on CUDA >= 10.2 without one of these two values
# (https://docs.nvidia.com/cuda/cublas/#results-reproducibility)
CUBLAS_WORKSPACE = ":4096:8"


def use_deterministic_kernels() -> None:
    """Every kernel deterministic, or an error naming the op that has no deterministic version: on GPUs
    cuDNN's autotuner and atomics-based reductions make even two uninterrupted runs differ, so a resumed
    run could not match one never stopped. Must run before the first CUDA kernel (cuBLAS reads its
    variable when it starts)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def compile_networks(networks: nn.ModuleDict) -> None:
    """torch.compile each network in place (nn.Module.compile): parameter names, state dicts and so
    checkpoints stay those of the plain network, so a compiled run resumes uncompiled and back."""
    # the routing (pipeline.plugin.own_gradients) takes several gradients through one graph with
    # retain_graph, which AOT autograd's donated buffers forbid
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    for network in networks.values():
        network.compile()
