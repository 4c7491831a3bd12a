"""Running the trainer for real in tests: configs, launchers, and reading what a run left behind."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from conftest import REPO, run_process, run_shards, write_images
from safetensors.torch import load_file

PLUGIN_FIXTURE = REPO / "tests" / "plugin_fixture"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment() -> dict[str, str]:
    # the checkout under test first, also for scripts run by path (whose own folder comes first on sys.path)
    paths = [str(REPO), str(PLUGIN_FIXTURE), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "160",
    }


_BUILT: dict[tuple[int, int, int], Path] = {}  # one `shards build` per shape per test session


def build_small_shards(folder: Path, images: int = 40, size: int = 8, shard_size: int = 7) -> Path:
    """FOLDER/images and FOLDER/shards, built by a real `shards build` (once per session for each shape,
    then copied: tests may damage their copy). Uneven on purpose: 40 images in shards of 7 give counts
    7,7,7,7,7,5."""
    key = (images, size, shard_size)
    if key not in _BUILT:
        built = Path(tempfile.mkdtemp(prefix="pipeline-tests-shards-"))
        atexit.register(shutil.rmtree, built, True)
        _build(built, images, size, shard_size)
        _BUILT[key] = built
    shutil.copytree(_BUILT[key], folder, dirs_exist_ok=True)
    return folder / "shards"


def _build(folder: Path, images: int, size: int, shard_size: int) -> None:
    source = folder / "images"
    write_images(source / "even", images // 2, size=(size, size), prefix="e")
    write_images(source / "odd", images - images // 2, size=(size, size), prefix="o", start=images // 2)
    result = run_shards(
        "build",
        source,
        folder / "shards",
        "--size",
        str(size),
        "--mode",
        "L",
        "--labels",
        "folder",
        "--shard-size",
        str(shard_size),
        "--val-fraction",
        "0",
    )
    assert result.returncode == 0, result.stderr


def write_config(path: Path, shards: Path, output_dir: Path, **overrides) -> Path:
    config = {
        "plugin": "linear",
        "model": {"hidden": 4},
        "data": {"shards": str(shards), "batch_size": 2, "workers": 0},
        "max_steps": 3,
        "gradient_accumulation_steps": 2,
        "deepspeed": {"zero_stage": 2},
        "log_every": 1,
        "sample_every": 3,
        "grid_size": 4,
        "output_dir": str(output_dir),
        "seed": 7,
    }
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split("__")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(config))
    return path


def accelerate_launch(processes: int, launcher: str = "accelerate.commands.launch") -> list[str]:
    """`accelerate launch` with launch/accelerate/cpu-{1proc,2proc}.yaml, as the README says (or, with
    launcher="pipeline.launch", our launcher that passes SIGTERM on)."""
    accelerate_config = REPO / "launch" / "accelerate" / ("cpu-2proc.yaml" if processes == 2 else "cpu-1proc.yaml")
    command = [sys.executable, "-m", launcher, "--config_file", str(accelerate_config)]
    if processes == 2:
        command += ["--main_process_port", str(free_port())]
    return command


def launch(
    config: Path, *overrides: str, processes: int = 2, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    command = [*accelerate_launch(processes), "-m", "pipeline.train", "--config", str(config), *overrides]
    return run_process(command, timeout, env=env or environment())


def run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_process([sys.executable, *args], timeout, env=environment())


def run_small_vaegan(tmp_path: Path, model: dict, batch_size: int, **overrides) -> Path:
    """A real `vaegan` run on 40 images of 32 x 32 (2 ranks, run.yaml's other settings: write_config's),
    output in tmp_path/run; returns the shards it trained on."""
    shards = build_small_shards(tmp_path / "data", images=40, size=32)
    data = {"shards": str(shards), "batch_size": batch_size, "workers": 0}
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", shards, run, plugin="vaegan", model=model, data=data, **overrides)
    result = launch(config)
    assert result.returncode == 0, result.stderr[-3000:]
    return shards


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def rank_records(output_dir: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((output_dir / "ranks").glob("rank-*.json"))]


def weights(output_dir: Path) -> dict[str, dict]:
    """Each network's weights in the run's latest checkpoint."""
    latest = output_dir / "checkpoints" / "latest"
    return {path.stem: load_file(str(path)) for path in sorted(latest.glob("*.safetensors"))}


KILLING_TRAINER = REPO / "tests" / "killing_trainer.py"


def launch_killed(
    config: Path,
    kill_at: str,
    *overrides: str,
    processes: int = 2,
    launcher: str = "accelerate.commands.launch",
    **env: str,
) -> subprocess.CompletedProcess:
    """Like `launch`, through tests/killing_trainer.py, which SIGKILLs the whole run at `kill_at`."""
    command = [*accelerate_launch(processes, launcher), str(KILLING_TRAINER), "--config", str(config), *overrides]
    return run_process(command, 300, env={**environment(), "KILL_AT": kill_at, **env})
