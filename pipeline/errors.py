"""The errors every part of pipeline/ raises for what a user can fix: each a `UserError`, which the
commands print as one line (exit 2) and the launchers' ranks report first (pipeline/training/stop_cause.py).
An internal error keeps its traceback."""

from __future__ import annotations

from shards.errors import UserError


class ConfigError(UserError):
    """A run config, or an option of it, that cannot run."""


class PluginError(UserError):
    """A plugin that cannot be found, loaded or used as the contract says (pipeline/plugin.py)."""


class TrainingStopped(UserError):
    """The run cannot usefully go on (diverged); the last good checkpoint is left as it was."""


class RecordError(UserError):
    """A run's record of rollbacks (OUTPUT/rollbacks.jsonl) that is not what the run wrote."""


class CheckpointError(UserError):
    """A checkpoint or weights folder that cannot be resumed from or loaded as it is."""


class ModelInputError(UserError, ValueError):
    """A broken rule of the API's arguments (module docstring): a ValueError to Python callers, one line
    from the commands."""


def mismatch(error: RuntimeError) -> str:
    """The first finding of a failed load_state_dict (missing, unexpected or misshapen keys), for one line."""
    text = str(error)
    return text.splitlines()[1].strip() if "\n" in text else text
