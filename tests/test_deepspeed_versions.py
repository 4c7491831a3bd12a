"""DeepSpeed and accelerate are bounded to the versions CI tests, in pyproject.toml and at start-up: a run
on another version stops before anything starts, with one line naming the supported range."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import train
from pipeline.training import deepspeed_internals

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
        f"and uses its internals (pipeline/training/deepspeed_internals.py): pip install '{package}{supported}'\n"
    )
