"""What a checkpoint's JSON files hold, checked whole before anything reads them.

trainer_state.json (pipeline/checkpoints/checkpointer.py `_trainer_state`, completed by checkpoint.commit) and the
config.json of a checkpoint or an export (the plugin, its options, the image) are validated here, so that
a damaged or hostile file is one line, "FILE: not a valid checkpoint: what is wrong", and never a
KeyError in the middle of a resume, nor a value that breaks a random generator. Fields that nothing
reads are let through.
"""

from __future__ import annotations

import base64
import binascii
import random
from typing import Annotated, Any

import torch
from pydantic import Field, model_validator

from shards.format.manifest import Count, ImageRecord, Record

Positive = Annotated[int, Field(gt=0, lt=2**63)]
Name = Annotated[str, Field(min_length=1, max_length=200)]
# a file of the checkpoint, relative to its folder: a plain name, or an optimizer partition
FileName = Annotated[str, Field(pattern=r"^(optimizer/rank-\d{5,}\.safetensors|[^./\\\x00][^/\\\x00]{0,199})$")]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]
MT19937_WORDS = 624

SPIKE_WINDOW = 100  # steps whose losses make the median a loss spike is measured against (training/rollback.py)


class DataPosition(Record):
    """pipeline/data/stream.py `data_position`: where the data stream stands."""

    micro_step: Count
    epoch: Count
    sample_in_epoch: Count
    global_batch: Positive
    samples: Count
    seed: Count
    shuffle_shards: Positive


class EngineCounters(Record):
    """DeepSpeed's progress counters (pipeline/engine/deepspeed_internals.py ENGINE_COUNTERS)."""

    global_steps: Count
    global_samples: Count
    micro_steps: Count
    skipped_steps: Count


def _random_words(words: Any, count: int) -> bool:
    return (
        isinstance(words, list)
        and len(words) == count
        and all(type(word) is int and 0 <= word < 2**32 for word in words)
    )


class RngState(Record):
    """pipeline/engine/rng.py `capture`: python, numpy, torch (and CUDA) generator states."""

    python: list[Any]
    numpy: list[Any]
    torch: str
    cuda: str | None = None

    @model_validator(mode="after")
    def _restorable(self) -> RngState:
        """Each state restored into a throwaway generator: what pipeline/engine/rng.py `restore` does, tried."""
        if len(self.python) != 3 or not (self.python[2] is None or type(self.python[2]) is float):
            raise ValueError("python: not [version, internal state, gauss]")
        if not _random_words(self.python[1], MT19937_WORDS + 1):
            raise ValueError(f"python: the internal state is not {MT19937_WORDS + 1} 32-bit words")
        try:
            random.Random().setstate((self.python[0], tuple(self.python[1]), self.python[2]))
        except (TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"python: not a generator state ({error})") from None
        name, keys, position, has_gauss, cached = self.numpy if len(self.numpy) == 5 else (None,) * 5
        if name != "MT19937" or not _random_words(keys, MT19937_WORDS):
            raise ValueError(f"numpy: not ['MT19937', {MT19937_WORDS} 32-bit words, position, has_gauss, cached]")
        # numpy does not check the position, and reads its key array at it (numpy 2.4: a segmentation fault)
        if type(position) is not int or not 0 <= position <= MT19937_WORDS or has_gauss not in (0, 1):
            raise ValueError(f"numpy: position {repr(position)[:30]} or has_gauss {repr(has_gauss)[:30]} out of range")
        if type(cached) is not float or type(has_gauss) is not int:
            raise ValueError("numpy: has_gauss is not an integer or cached is not a float")
        try:
            torch.Generator().set_state(torch.frombuffer(bytearray(_base64(self.torch)), dtype=torch.uint8))
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"torch: not a generator state ({error})") from None
        if self.cuda is not None:
            _base64(self.cuda)  # not tried: that would start CUDA in a process that has not chosen its device
        return self


def _base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as error:
        raise ValueError(f"not base64 ({error})") from None


class RankState(Record):
    rng: RngState
    plugin: dict[str, Any]  # the plugin's own state_dict(), for its load_state_dict()


class TrainerState(Record):
    format_version: int  # checkpoint.read_state refuses any other version first
    plugin: Name
    step: Count
    images: Count
    data: DataPosition
    engine: EngineCounters
    ranks: Annotated[list[RankState], Field(min_length=1)]
    checksum: dict[str, Any]
    files: dict[FileName, Digest]
    world_size: Positive | None = None
    bad_samples: Count = 0
    precision: Name | None = None
    loss_scaler: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,99}$")], bool | int | Finite] | None = None
    config: dict[str, Any] | None = None
    rollbacks: list[dict[Name, Count]] = Field(default_factory=list, max_length=10**6)  # informative
    recent_losses: list[Finite] = Field(default_factory=list, max_length=SPIKE_WINDOW)  # the spike watch's window

    @model_validator(mode="after")
    def _one_state_per_rank(self) -> TrainerState:
        if self.world_size is not None and len(self.ranks) != self.world_size:
            raise ValueError(f"ranks holds {len(self.ranks)} states for world_size {self.world_size}")
        return self


class WeightsConfig(Record):
    """config.json of a checkpoint or an export: what `pipeline sample` and friends build."""

    plugin: Name
    model: dict[str, Any] = Field(default_factory=dict)
    options_recorded: bool = False  # model holds every option, defaults included (pipeline/plugin.py)
    image: ImageRecord
    auxiliary: dict[str, str] = Field(default_factory=dict)  # the sha256 of each file a plugin's loss read
