"""`log_with`: one real run logs to TensorBoard, Weights & Biases (offline) and MLflow (a file store in the
run folder); each tracker's own files are reopened with its own reader and checked against the run's
metrics.jsonl, config.yaml and sample grids."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from trainer_helpers import build_small_shards, environment, launch, metrics, run_python, write_config

TRACKERS = ["tensorboard", "wandb", "mlflow"]
KEYS = ("loss", "grad_norm/encoder", "updated/decoder", "lr/decoder", "images_per_s")
KINDS = ("samples", "reconstructions")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trackers")
    shards = build_small_shards(root / "data", images=24, size=8)
    config = write_config(
        root / "run.yaml", shards, root / "run", max_steps=2, sample_every=2, checkpoint={"every": 2}, log_with=TRACKERS
    )
    env = {key: value for key, value in environment().items() if not key.startswith(("MLFLOW_", "WANDB_"))}
    result = launch(config, processes=1, env={**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def logged(run: Path) -> dict[int, dict]:
    return {record["step"]: record for record in metrics(run)}


def grid(run: Path, kind: str) -> np.ndarray:
    return np.asarray(Image.open(run / "samples" / f"step-00000002-{kind}.png").convert("RGB"))


def resolved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


@pytest.mark.slow
def test_tensorboard_holds_every_metric_the_grids_and_the_config(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    for key in KEYS:
        found = [(event.step, event.value) for event in events.Scalars(key)]
        assert found == [(step, pytest.approx(record[key], rel=1e-6)) for step, record in logged(run).items()]
    for kind in KINDS:
        (image,) = events.Images(f"grids/{kind}")
        assert image.step == 2
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), grid(run, kind))
    (hparams,) = (run / "tensorboard").glob("*/hparams.yml")
    values = yaml.safe_load(hparams.read_text())
    config = resolved(run)
    assert values["optimizer/name"] == config["optimizer"]["name"] == "sgd"
    assert values["optimizer/decoder/lr"] == config["optimizer"]["decoder"]["lr"]
    assert (values["data/batch_size"], values["log_with"]) == (2, json.dumps(TRACKERS))


def wandb_records(run: Path) -> list:
    """The records of the offline run's .wandb file: LevelDB's log format (32 KiB blocks of records with a
    7-byte header, long records split FIRST / MIDDLE / LAST) after W&B's 7-byte file header, each record
    one of W&B's own protobuf messages."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run.glob("wandb/offline-run-*/run-*.wandb")
    raw = path.read_bytes()
    assert raw.startswith(b":W&B")
    block, position, records, pending = 32768, 7, [], b""
    while position + 7 <= len(raw):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        if left < 7 or (kind, length) == (0, 0):  # a block's zero padding
            position += left
            continue
        data, position = raw[position + 7 : position + 7 + length], position + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def values(items) -> dict:
    """W&B's items: a key (or a nested key) and its value as JSON."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@pytest.mark.slow
def test_weights_and_biases_offline_holds_every_metric_the_grids_and_the_config(run: Path) -> None:
    history: dict[int, dict] = {}
    config = {}
    for record in wandb_records(run):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = values(record.history.item)
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "config":
            config.update(values(record.config.update))
    for step, record in logged(run).items():
        assert {key: history[step][key] for key in KEYS} == pytest.approx({key: record[key] for key in KEYS})
    assert (config["optimizer/name"], config["data/batch_size"]) == ("sgd", 2)
    for kind in KINDS:
        (name,) = history[2][f"grids/{kind}/filenames"]
        (files,) = run.glob("wandb/offline-run-*/files")
        assert np.array_equal(np.asarray(Image.open(files / name).convert("RGB")), grid(run, kind))


def test_mlflow_file_store_holds_every_metric_the_grids_and_the_config(run: Path) -> None:
    (folder,) = [path.parent for path in run.glob("mlruns/*/*/meta.yaml") if path.parent.parent.name != ".trash"]
    for key in KEYS:
        lines = (folder / "metrics" / key).read_text().split("\n")
        found = [(int(step), float(value)) for _, value, step in (line.split() for line in lines if line)]
        assert found == [(step, pytest.approx(record[key])) for step, record in logged(run).items()]
    assert (folder / "params" / "optimizer" / "name").read_text() == "sgd"
    assert (folder / "params" / "data" / "batch_size").read_text() == "2"
    for kind in KINDS:
        saved = folder / "artifacts" / "samples" / f"step-00000002-{kind}.png"
        assert saved.read_bytes() == (run / "samples" / saved.name).read_bytes()


@pytest.mark.slow
def test_a_tracker_not_installed_or_unknown_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    shards = build_small_shards(tmp_path / "data", images=24, size=8)
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "run")
    # aim is in none of our extras (its wheel pins its own storage engine)
    for value, message in (("[aim]", "log_with: aim is not installed (pip install aim)"), ("[neptune]", "log_with")):
        result = run_python("-m", "pipeline.train", "--config", str(config), f"log_with={value}", "--dry-run")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
