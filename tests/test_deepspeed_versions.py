"""DeepSpeed and accelerate are bounded to the versions CI tests, in pyproject.toml and at start-up: a run
on another version stops before anything starts, with one line naming the supported range."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import build_small_shards, run_python, write_config

from pipeline import train
from pipeline.engine import deepspeed_internals

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_admits_exactly_the_supported_ranges() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project runs on 3.10)
    for package, supported in deepspeed_internals.SUPPORTED.items():
        requirements = [line.strip() for line in pyproject.splitlines() if line.strip().startswith(f'"{package}')]
        assert requirements == [f'"{package}{supported}",']


def test_the_installed_versions_are_supported() -> None:
    deepspeed_internals.check_versions()


@pytest.mark.parametrize(("package", "installed"), [("deepspeed", "0.20.1"), ("accelerate", "1.0.0")])
def test_another_version_stops_a_run_with_one_line(tmp_path: Path, monkeypatch, capsys, package, installed) -> None:
    real = deepspeed_internals.version
    monkeypatch.setattr(deepspeed_internals, "version", lambda name: installed if name == package else real(name))
    (tmp_path / "run.yaml").write_text("plugin: vae\n")  # never read: the versions are checked first
    assert train.main(["--config", str(tmp_path / "run.yaml"), "--dry-run"]) == 2
    error = capsys.readouterr().err
    supported = deepspeed_internals.SUPPORTED[package]
    assert error == (
        f"pipeline train: error: {package} {installed} is installed; this pipeline is tested with {package}{supported} "
        f"and uses its internals (pipeline/engine/deepspeed_internals.py): pip install '{package}{supported}'\n"
    )


def test_a_run_leaves_out_the_imports_deepspeed_makes_for_what_it_never_uses(tmp_path: Path) -> None:
    """DeepSpeed's autotuner imports mlflow when it is installed, and its ZeRO optimizers import its Muon
    optimizer, whose kernels torch.compile at import and so load torch's inductor: 5-7 s of CPU at every
    rank's start, for nothing. A real one-process run (the linear plugin, ZeRO-2, its steps through
    DeepSpeed's ZeRO optimizer) imports neither mlflow nor the inductor, DeepSpeed took mlflow as absent,
    and mlflow imports afterwards (the MLflow tracker)."""
    shards = build_small_shards(tmp_path / "data")
    config = write_config(tmp_path / "run.yaml", shards, tmp_path / "run", log_with=["tensorboard"])
    code = f"""
import os, sys
from pipeline import train

def report(status):  # the trainer's exit skips the interpreter's teardown: look before it
    from deepspeed.autotuning import autotuner
    print("status", status, "mlflow imported:", "mlflow" in sys.modules, "autotuner has_mlflow:", autotuner.has_mlflow)
    print("inductor imported:", "torch._inductor.compile_fx" in sys.modules)
    import mlflow
    print("mlflow then:", mlflow.__version__, flush=True)
    os._exit(status)

train.leave_without_finalization = report
train.main(["--config", {str(config)!r}])
"""
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "status 0 mlflow imported: False autotuner has_mlflow: False" in result.stdout
    assert "mlflow then: " in result.stdout
    assert "inductor imported: False\n" in result.stdout
