"""The commands that read shards take a remote folder as they take a local one: `shards verify` and
`inspect`, and `pipeline train --dry-run` (which also shows that a run never writes a credential)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_process
from trainer_helpers import build_small_shards, environment, write_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("commands"))


def run(tmp_path: Path, *args: str | Path):
    """A command as a user runs it; its default shard cache under this test's folder (TMPDIR)."""
    return run_process([sys.executable, *map(str, args)], 120, env={**environment(), "TMPDIR": str(tmp_path)})


@pytest.mark.slow
def test_verify_a_remote_folder(tmp_path: Path, shards: Path, nginx) -> None:
    result = run(tmp_path, "-m", "shards", "verify", f"{nginx.url}/shards", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert f"all shards in {nginx.url}/shards match the manifest and decode" in result.stdout
    assert not (tmp_path / f"vaegan-shard-cache-{os.getuid()}").exists()  # the store read, not the node cache

    damaged = shards.parent / "verify-damaged"
    shutil.copytree(shards, damaged)
    with open(damaged / "train-000004.tar", "r+b") as file:
        file.seek(700)
        file.write(b"\xff")
    (damaged / "train-000001.tar").unlink()
    result = run(tmp_path, "-m", "shards", "verify", f"{nginx.url}/verify-damaged")
    assert result.returncode == 1
    assert result.stdout.splitlines()[:2] == [
        "BAD train-000001.tar: missing",
        "BAD train-000004.tar: sha256 does not match the manifest (fetched twice)",
    ]


@pytest.mark.slow
def test_inspect_a_remote_folder_draws_the_local_folders_contact_sheet(tmp_path: Path, shards: Path, nginx) -> None:
    local = run(tmp_path, "-m", "shards", "inspect", shards, "--grid", tmp_path / "local.png", "--count", "10")
    remote = run(
        tmp_path, "-m", "shards", "inspect", f"{nginx.url}/shards", "--grid", tmp_path / "remote.png", "--count", "10"
    )
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert (tmp_path / "remote.png").read_bytes() == (tmp_path / "local.png").read_bytes()
    assert remote.stdout.split("wrote")[0] == local.stdout.split("wrote")[0]  # the same summary table


@pytest.mark.slow
def test_a_missing_remote_folder_is_one_line(tmp_path: Path, nginx) -> None:
    result = run(tmp_path, "-m", "shards", "verify", f"{nginx.url}/nowhere")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        == f"shards verify: error: {nginx.url}/nowhere/manifest.json: not found: check the URL "
        + ("(is the folder built and uploaded?)")
    )


@pytest.mark.slow
def test_storage_options_that_look_like_credentials_are_never_written(tmp_path: Path, nginx) -> None:
    config = write_config(
        tmp_path / "run.yaml",
        Path("unused"),
        tmp_path / "run",
        data={
            "shards": f"{nginx.url}/shards",
            "batch_size": 2,
            "storage_options": {"headers": {"Authorization": "Bearer s3cr3t-value"}},
        },
    )
    result = run(tmp_path, "-m", "pipeline.train", "--config", config, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "Authorization: <redacted>" in result.stdout
    assert "s3cr3t" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://alice:S3cr3tPW@host:80/a/b", "http://***@host:80/a/b"),
        ("see s3://key:secret@bucket/x and https://user@h/", "see s3://***@bucket/x and https://***@h/"),
        ("http://alice:p@ss@host/x?mail=a@b", "http://***@host/x?mail=a@b"),  # a raw @ in the password
        ("/local/folder@2x and a@b.c", "/local/folder@2x and a@b.c"),  # no URL: unchanged
        ("http://host/path@1", "http://host/path@1"),  # an @ in the path is no user-info
    ],
)
def test_without_credentials_hides_every_urls_user_info_and_nothing_else(text: str, shown: str) -> None:
    from shards.errors import without_credentials

    assert without_credentials(text) == shown
