"""The one place that builds the DeepSpeed config of a run.

Start from `deepspeed.config` (a JSON file, optional), then set what the run config owns: micro-batch,
accumulation, ZeRO stage, optimizer offload and precision. Everything else in the file (bucket sizes,
overlap, ...) is the user's to tune.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from pipeline.config.sections import RunConfig
from pipeline.errors import ConfigError

NEVER_PRINT = 10**9
DEFAULT_ZERO_STAGE = 2


def deep_merge(base: dict, updates: dict) -> dict:
    merged = dict(base)
    for key, value in updates.items():
        both_sections = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = deep_merge(merged[key], value) if both_sections else value
    return merged


def load_user_config(config: RunConfig) -> dict[str, Any]:
    if config.deepspeed.config is None:
        return {}
    try:
        user = json.loads(config.deepspeed.config.read_text())
    except UnicodeDecodeError as error:
        raise ConfigError(f"deepspeed.config: {config.deepspeed.config} is not UTF-8 (byte {error.start})") from None
    except (OSError, ValueError) as error:  # ValueError: not JSON
        raise ConfigError(f"deepspeed.config: cannot read {config.deepspeed.config}: {error}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed.config: {config.deepspeed.config} must hold a JSON object")
    for owned in ("optimizer", "scheduler"):
        if owned in user:
            raise ConfigError(f"deepspeed.config: remove {owned!r}: the run config and the plugin set it")
    zero = user.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError("deepspeed.config: zero_optimization must be an object")
    for section in ("offload_optimizer", "offload_param"):
        if not isinstance(zero.get(section, {}), dict):
            raise ConfigError(f"deepspeed.config: zero_optimization.{section} must be an object")
    if type(zero.get("stage", DEFAULT_ZERO_STAGE)) is not int:  # not true, "2" or 2.0
        raise ConfigError(f"deepspeed.config: zero_optimization.stage must be 0, 1 or 2 (got {zero['stage']!r})")
    return user


def build_deepspeed_config(config: RunConfig, precision: str, user: dict[str, Any]) -> dict[str, Any]:
    """precision: the resolved one, fp32 | bf16 | fp16; user: load_user_config(config)."""
    zero: dict[str, Any] = {"stage": user.get("zero_optimization", {}).get("stage", DEFAULT_ZERO_STAGE)}
    if config.deepspeed.zero_stage is not None:
        zero["stage"] = config.deepspeed.zero_stage
    if zero["stage"] not in (0, 1, 2):
        raise ConfigError(f"deepspeed.config: ZeRO stage {zero['stage']} is not supported (0, 1 or 2)")
    if zero["stage"] == 0 and precision != "fp32":
        # DeepSpeed's mixed-precision optimizers without ZeRO keep their fp32 masters and state unlinked to
        # the parameters: pipeline/checkpoints/optimizer_state.py cannot read or write them
        raise ConfigError(
            f"precision {precision} with ZeRO stage 0 cannot be checkpointed: set deepspeed.zero_stage to 1 or 2, "
            "or precision fp32"
        )
    if config.deepspeed.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    elif config.deepspeed.offload_optimizer == "none":
        zero["offload_optimizer"] = {"device": "none"}
    ours = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # our optimizers are torch's (RMSProp for the paper); DeepSpeed otherwise insists on its CPU Adam
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": NEVER_PRINT,
    }
    merged = deep_merge(user, ours)
    merged.pop("train_batch_size", None)  # derived by DeepSpeed from the three factors above
    merged.setdefault("gradient_clipping", 0.0)
    zero = merged["zero_optimization"]
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    if zero["stage"] == 2 and not torch.cuda.is_available():
        # contiguous_gradients copies each gradient into a reduction bucket as backward produces it, which
        # keeps GPU memory unfragmented; host memory has no such trouble, and the copy is one more pass
        # over every gradient (bench/train_step.py on CPU: ZeRO-2 from 0.68x to 0.76x of a bare loop)
        zero.setdefault("contiguous_gradients", False)
    if zero["stage"] in (1, 2) and merged["gradient_clipping"] == 0 and not offloaded:
        # Without clipping the global gradient norm is only logged, yet it costs a pass over every
        # gradient each step (bench/train_step.py: ZeRO-2 went from 0.55x to 0.64x of a bare loop).
        zero.setdefault("compute_grad_norm", False)
    return merged
