"""A plugin does what it defines: one that can sample but not reconstruct (a GAN, to the contract) trains
with sample grids only, `pipeline reconstruct` says in one line that it cannot, and `pipeline evaluate`
measures its samples alone. A plugin without a required method is refused at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_evaluate import TinyExtractor
from trainer_helpers import PLUGIN_FIXTURE, build_small_shards, run_python, write_config

from pipeline.cli import main
from pipeline.errors import PluginError
from pipeline.plugin import check_required


@pytest.fixture(scope="module")
def generator_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("generator")
    shards = build_small_shards(root / "data", images=40, size=32)
    config = write_config(
        root / "run.yaml", shards, root / "run", plugin="linear_generator", max_steps=2, sample_every=1
    )
    result = run_python("-m", "pipeline.train", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", shards


@pytest.mark.slow
def test_a_plugin_that_cannot_reconstruct_trains_with_sample_grids_only(generator_run) -> None:
    run, _ = generator_run
    assert sorted(path.name for path in (run / "samples").iterdir()) == [
        "step-00000001-samples.png",
        "step-00000002-samples.png",
    ]


@pytest.mark.slow
def test_commands_say_in_one_line_what_a_plugin_cannot_do(generator_run, tmp_path: Path, monkeypatch, capsys) -> None:
    run, shards = generator_run
    monkeypatch.syspath_prepend(str(PLUGIN_FIXTURE))
    weights = run / "checkpoints" / "latest"
    for command in (["reconstruct", "--shards", shards], ["interpolate", "--shards", shards]):
        assert main([command[0], str(weights), str(tmp_path / "grid.png"), *map(str, command[1:])]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "Traceback" not in error, error
        ability = "reconstruct" if command[0] == "reconstruct" else "encode"
        assert f"pipeline {command[0]}: error: the LinearGenerator plugin cannot {ability}" in error, error
    assert not (tmp_path / "grid.png").exists()
    assert main(["sample", str(weights), str(tmp_path / "samples.png"), "--count", "4"]) == 0


def test_evaluate_measures_the_samples_of_a_plugin_that_cannot_reconstruct(
    generator_run, tmp_path: Path, monkeypatch
) -> None:
    run, shards = generator_run
    monkeypatch.syspath_prepend(str(PLUGIN_FIXTURE))
    torch.jit.script(TinyExtractor()).save(str(tmp_path / "tiny.pt"))
    options = ["--count", "20", "--resolution", "32", "--kid-subset-size", "10", "--kid-subsets", "2"]
    arguments = ["--shards", str(shards), "--split", "train", "--extractor", str(tmp_path / "tiny.pt"), *options]
    report_path = tmp_path / "e.json"
    assert main(["evaluate", str(run / "checkpoints" / "latest"), *arguments, "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["reconstructions"] is None
    assert report["samples"]["frechet_distance"] > 0 and report["samples"]["kid"] == report["samples"]["kid"]
    assert sorted(report["grids"]) == ["samples"]
    assert Path(report["grids"]["samples"]).is_file()
    assert not report_path.with_name("e-reconstructions.png").exists()


def test_a_plugin_without_a_required_method_is_refused() -> None:
    class NoStep:
        def build_networks(self): ...
        def optimizer_defaults(self): ...
        def state_dict(self): ...
        def load_state_dict(self, state): ...

    with pytest.raises(PluginError, match=r"plugin nostep: NoStep has no training_step\(\)"):
        check_required(NoStep(), "nostep")
