"""Every use of DeepSpeed (and accelerate) beyond their documented API, in one place, for the versions
that CI tests (SUPPORTED, the same ranges as pyproject.toml). A version outside them stops a run at
start-up with one line: these attributes change between releases without notice.

What we reach into, and why:
- the torch optimizer DeepSpeed drives (`engine.basic_optimizer`): the network skip's step pre-hook and
  the optimizer state we save (pipeline/engine/network_skip.py, pipeline/checkpoints/optimizer_state.py);
- each parameter's link to its ZeRO slice (`param._hp_mapping`): where this rank's fp32 master and
  optimizer state of that parameter live, to save and load them without DeepSpeed's pickles;
- ZeRO's own inf/NaN check (`check_grad_overflow`) and the engine's reading of `optimizer.overflow`, to
  skip a non-finite update in fp32 too (pipeline/training/faults.py);
- the engine's progress counters and fp16 loss scaler, saved in checkpoints for an exact resume;
- accelerate's hand-over of the DeepSpeed config to transformers (`set_deepspeed_weakref`), skipped
  when transformers is absent;
- two costs turned off: the CPU shared-memory allreduce op DeepSpeed JIT-builds, and the gradients'
  all-reduce on a single data-parallel rank (ZeRO-0's in the engine, ZeRO-1/2's in their optimizer); and
  the imports DeepSpeed makes for features a run never uses (`import_deepspeed`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import Any

import torch
from accelerate.utils import DeepSpeedPlugin, is_transformers_available
from packaging.specifiers import SpecifierSet

from shards.errors import UserError

MUON = "deepspeed.runtime.zero.muon.muon_optimizer"


def import_deepspeed() -> ModuleType:
    """DeepSpeed, without two imports it makes for features a run never uses, each costing seconds of CPU
    at every rank's start (more than DeepSpeed's own import):
    - its autotuner imports mlflow when it is installed (the `trackers` extra; about 2.5 s): hidden during
      the import, so the autotuner takes it as absent; mlflow imports normally afterwards (the MLflow
      tracker);
    - its ZeRO optimizers import its Muon optimizer (on their first step, unconditionally), whose module
      torch.compiles its kernels at import and so loads torch's inductor (about 3 s): imported here with
      DeepSpeed's own fallback for a torch without compile, its kernels eager. Muon is not an optimizer
      a run can choose.
    Called before anything else imports DeepSpeed (make_accelerator: the Accelerator does); the commands
    that need no engine never import it. Either part is skipped where its module is imported already."""
    if "deepspeed" not in sys.modules:
        with _hidden("mlflow"):
            importlib.import_module("deepspeed")
    if MUON not in sys.modules:
        compiler = importlib.import_module("deepspeed.runtime.compiler")
        compile_decorator = compiler.compile
        compiler.compile = lambda: compiler.dummy_decorator
        try:
            importlib.import_module(MUON)
        finally:
            compiler.compile = compile_decorator
    return sys.modules["deepspeed"]


@contextmanager
def _hidden(module: str) -> Iterator[None]:
    """Inside, `import module` raises ImportError, unless something imported it already."""
    hide = module not in sys.modules
    if hide:
        sys.modules[module] = None
    try:
        yield
    finally:
        if hide and sys.modules.get(module, ...) is None:
            del sys.modules[module]


SUPPORTED = {"deepspeed": ">=0.19.8,<0.20", "accelerate": ">=1.15.0,<1.16"}

# DeepSpeed's own progress counters (they drive its schedulers and its fp16 loss scaling)
ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def check_versions() -> None:
    """One line naming the supported range when an installed version is outside it."""
    for package, supported in SUPPORTED.items():
        try:
            installed = version(package)
        except PackageNotFoundError:
            raise UserError(f"{package} is not installed: pip install '{package}{supported}'") from None
        if installed not in SpecifierSet(supported):
            raise UserError(
                f"{package} {installed} is installed; this pipeline is tested with {package}{supported} and uses its "
                f"internals (pipeline/engine/deepspeed_internals.py): pip install '{package}{supported}'"
            )


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer the engine was given, which DeepSpeed steps (under ZeRO-1/2 and bf16, on the
    flat fp32 partition of each param group)."""
    return engine.basic_optimizer


def partitioned(engine) -> bool:
    """Whether DeepSpeed wraps the torch optimizer (ZeRO-1/2, or its bf16 optimizer): fp32 masters in slices."""
    return engine.optimizer is not engine.basic_optimizer


def slices_linked(engine) -> bool:
    """Whether each parameter is linked to its slice (`parameter_slice`): ZeRO-1/2 and the bf16 optimizer."""
    return hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state")


@dataclass(frozen=True)
class ParameterSlice:
    """The part of one parameter this rank updates: elements [start, start + numel) of the flattened
    parameter, its fp32 master copy, and where those lie in the param group's flat partition."""

    start: int
    numel: int
    master: torch.Tensor
    group: int
    flat_start: int


def parameter_slice(parameter: torch.Tensor) -> ParameterSlice | None:
    """None when none of the parameter's elements live on this rank."""
    mapping = getattr(parameter, "_hp_mapping", None)
    if mapping is None:
        return None
    address, flat = mapping.lp_fragment_address, mapping.hp_fragment_address
    return ParameterSlice(address.start, address.numel, mapping.hp_fragment, mapping.param_group_index, flat.start)


def turn_on_zero_overflow_check(engine) -> bool:
    """ZeRO-1/2 check the reduced gradients for inf/NaN only under fp16 and bf16: on in fp32 too. False when
    the engine has no ZeRO optimizer."""
    if hasattr(engine.optimizer, "check_grad_overflow"):
        engine.optimizer.check_grad_overflow = True
        return True
    return False


def plain_optimizer(engine) -> torch.optim.Optimizer | None:
    """The torch optimizer, when DeepSpeed steps it directly (ZeRO-0 in fp32); else None."""
    return None if hasattr(engine.optimizer, "overflow") else engine.optimizer


def report_overflow(optimizer: torch.optim.Optimizer, overflow: bool) -> None:
    """After step(), the engine reads `optimizer.overflow` and counts a skipped step when it is set."""
    optimizer.overflow = overflow


def counters(engine) -> dict[str, int]:
    return {name: getattr(engine, name) for name in ENGINE_COUNTERS}


def restore_counters(engine, saved: dict[str, int]) -> None:
    for name in ENGINE_COUNTERS:
        setattr(engine, name, saved[name])


def loss_scaler_state(engine) -> dict[str, Any] | None:
    """fp16's dynamic loss scale and its counters (scale, iterations since the last overflow, hysteresis)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None:
        return None
    return {name: value for name, value in vars(scaler).items() if type(value) in (int, float, bool)}


def restore_loss_scaler(engine, saved: dict[str, Any] | None) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:
        for name, value in (saved or {}).items():
            setattr(scaler, name, value)


def optimizer_state_elements(engine) -> int:
    """Elements of optimizer state this rank holds (its ZeRO share)."""
    inner = torch_optimizer(engine)
    return sum(value.numel() for state in inner.state.values() for value in state.values() if torch.is_tensor(value))


def skip_shared_memory_allreduce() -> None:
    """DeepSpeed JIT-builds a shared-memory allreduce op for CPU ranks (about 30 s on a fresh machine).
    With it, one 2-rank CPU run in about 12 aborted at exit (SIGABRT, 'terminate called without an
    active exception') after finishing; without it, none did. CPU ranks use plain gloo instead; GPU
    runs (NCCL) never use this op."""
    if torch.cuda.is_available():
        return
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def full_fp32_weight(parameter: torch.Tensor) -> torch.Tensor:
    """The whole fp32 master of a parameter, whichever rank's slice holds it (a collective under ZeRO-1/2)."""
    return import_deepspeed().utils.safe_get_full_fp32_param(parameter)


def skip_single_rank_allreduce(engine) -> None:
    """On one data-parallel rank an all-reduce of the gradients reduces nothing, yet costs a flatten of
    every gradient, a division by 1 and a copy back (on CPU, about a tenth of a small step;
    bench/train_step.py). Under ZeRO-0 the engine does it after each backward: DeepSpeed skips it the same
    way when it has no process group. ZeRO-1/2 do it inside their optimizer (`allreduce_and_copy`, whose
    bucketing and partition bookkeeping stay): there only the round trip of the values is skipped, and only
    where it is exactly the identity (no reduction to a narrower dtype and back, no partition buffer to
    add into)."""
    if engine.dp_world_size != 1:
        return
    if engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
        return
    zero = engine.optimizer
    if zero.overlap_comm:  # its reduction stream's bookkeeping lives in allreduce_and_copy: left whole
        return
    reduce_and_copy = zero.allreduce_and_copy

    def skip_identity(small_bucket, communication_data_type, *args, output_bucket=None, **kwargs):
        identity = all(tensor.dtype == communication_data_type for tensor in small_bucket) and (
            output_bucket is None or all(output is None for output in output_bucket)
        )
        if not identity:
            reduce_and_copy(small_bucket, communication_data_type, *args, output_bucket=output_bucket, **kwargs)

    zero.allreduce_and_copy = skip_identity


class DeepSpeedPluginForPlainModels(DeepSpeedPlugin):
    """accelerate hands the DeepSpeed config to transformers (for its from_pretrained under ZeRO-3)
    and so imports transformers unconditionally. We load no transformers model: skip that when
    transformers is not installed, instead of depending on it."""

    def set_deepspeed_weakref(self) -> None:
        if is_transformers_available():
            super().set_deepspeed_weakref()
