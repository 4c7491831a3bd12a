"""The run's experiment trackers (`log_with`): accelerate's, each given the run's resolved config as
hyper-parameters, every metric RunLog logs, and the sample grids as images.

Where each keeps its records: TensorBoard in OUTPUT/tensorboard/; Weights & Biases in OUTPUT/wandb/
(project `WANDB_PROJECT`, else vaegan-pipeline; run name: the run folder's; `WANDB_MODE=offline` keeps it
on disk); MLflow at `MLFLOW_TRACKING_URI`, else in a file store in OUTPUT/mlruns/ (kept by MLflow 3 in
maintenance mode: a server or a database is yours to set up and name there), experiment
`MLFLOW_EXPERIMENT_NAME`, else vaegan-pipeline; Aim in OUTPUT/ (its .aim repository).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator
from accelerate.tracking import AimTracker, GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker
from accelerate.utils import is_aim_available, is_mlflow_available, is_tensorboard_available, is_wandb_available
from PIL import Image

from pipeline.errors import ConfigError

PROJECT = "vaegan-pipeline"
# name -> (is it installed, what to install, the tracker for a run folder)
TRACKERS: dict[str, tuple[Callable[[], bool], str, Callable[[Path], GeneralTracker]]] = {
    "tensorboard": (is_tensorboard_available, "tensorboard", lambda out: TensorBoardTracker("tensorboard", out)),
    "wandb": (
        is_wandb_available,
        "wandb",
        lambda out: WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=out.resolve().name, dir=str(out)),
    ),
    "mlflow": (is_mlflow_available, "mlflow", lambda out: _mlflow_tracker(out)),
    "aim": (is_aim_available, "aim", lambda out: AimTracker(out.resolve().name, str(out))),
}


def _mlflow_tracker(out: Path) -> MLflowTracker:
    if "MLFLOW_TRACKING_URI" not in os.environ:  # a file store in the run folder: nothing to set up
        os.environ["MLFLOW_TRACKING_URI"] = (out / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
    return MLflowTracker(experiment_name=PROJECT, run_name=out.resolve().name)


def chosen(log_with: list[str] | None) -> list[str]:
    """`log_with`, each installed; unset: tensorboard when installed, else none."""
    if log_with is None:
        return ["tensorboard"] if is_tensorboard_available() else []
    for name in log_with:
        if name not in TRACKERS:
            raise ConfigError(f"log_with: {name!r} is not one of {', '.join(TRACKERS)}")
        available, package, _ = TRACKERS[name]
        if not available():
            raise ConfigError(f"log_with: {name} is not installed (pip install {package})")
    return list(dict.fromkeys(log_with))


def make_trackers(names: list[str], output_dir: Path) -> list[GeneralTracker]:
    """Constructed on every rank (they start on rank 0 only, in accelerator.init_trackers)."""
    return [TRACKERS[name][2](Path(output_dir)) for name in names]


def hyperparameters(resolved: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """The resolved config as flat `a/b/c` keys with values every tracker takes (TensorBoard's hparams take
    neither lists, mappings nor None)."""
    flat: dict[str, str | int | float | bool] = {}
    for key, value in resolved.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(hyperparameters(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def log_grid(accelerator: Accelerator, kind: str, image: Image.Image, path: Path, step: int) -> None:
    """A sample or reconstruction grid (already saved at `path`) to every tracker that keeps images."""
    pixels = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(f"grids/{kind}", pixels, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            tracker.log_images({f"grids/{kind}": [pixels]}, step=step)
        elif tracker.name == "aim":
            tracker.log_images({f"grids/{kind}": pixels}, step=step)
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_artifact(str(path), artifact_path="samples")
