"""Hostile and unlucky inputs found in review: each must end as a skip with its reason, or as one line."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, read_manifest, run_process, run_shards, started, synthetic_pixels, write_images
from PIL import Image

from shards.format.manifest import ManifestError
from shards.read.reader import open_split


def skipped(out: Path) -> dict[str, str]:
    return {item["path"]: item["reason"] for item in read_manifest(out)["skipped"]}


@pytest.mark.slow
def test_a_second_build_into_the_same_out_is_refused(tmp_path: Path, image_folder: Path) -> None:
    work = tmp_path / "out" / ".build"
    work.mkdir(parents=True)
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what a running build holds
        result = run_shards("build", image_folder, tmp_path / "out")
    assert result.returncode == 2 and "being built by another process" in result.stderr
    assert run_shards("build", image_folder, tmp_path / "out").returncode == 0  # lock released: fine


@pytest.mark.slow
def test_manifest_shard_names_cannot_reach_outside_out_or_a_pipe(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "out"
    assert run_shards("build", image_folder, out, "--val-fraction", "0").returncode == 0
    manifest = read_manifest(out)
    for evil in ("pipe:touch pwned", "../../etc/passwd", "/etc/passwd"):
        manifest["splits"]["train"]["shards"][0]["name"] = evil
        (out / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match="is not a shard name"):
            open_split(out)
        result = run_shards("verify", out)
        assert result.returncode == 2 and "is not a shard name" in result.stderr
    assert not (REPO / "pwned").exists()


@pytest.mark.slow
def test_odd_files_are_skipped_not_fatal(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_images(source, 3)
    bad_folder = os.path.join(os.fsencode(source), b"bad\xff")
    os.mkdir(bad_folder)
    Image.fromarray(synthetic_pixels(9, 16, 16)).save(
        os.path.join(bad_folder, b"x.png").decode("utf-8", "surrogateescape")
    )
    os.mkfifo(source / "fifo.png")
    Image.fromarray(synthetic_pixels(1, 16, 16)).save(source / "tiff.png", "TIFF")
    (source / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    Image.fromarray(synthetic_pixels(2, 16, 16)).save(source / ".hidden.png")
    (source / ".git").mkdir()
    os.symlink(source / ".git", source / "linked")
    result = run_shards("build", source, tmp_path / "out", "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    reasons = skipped(tmp_path / "out")
    assert reasons["bad\\xff/x.png"] == "file name is not valid UTF-8"
    assert reasons["fifo.png"] == "not a regular file"
    assert reasons["tiff.png"] == reasons["eps.png"] == "not an image"
    assert reasons[".hidden.png"] == "hidden file"
    assert reasons[".git"] == "hidden folder (not read)"
    assert reasons["linked"] == "symbolic link to a folder (not followed)"
    assert read_manifest(tmp_path / "out")["splits"]["train"]["count"] == 3


@pytest.mark.slow
def test_a_rerun_rebuilds_when_src_changed_or_a_shard_is_gone(tmp_path: Path, image_folder: Path) -> None:
    out = tmp_path / "out"
    assert run_shards("build", image_folder, out, "--val-fraction", "0", "--shard-size", "10").returncode == 0
    write_images(image_folder, 2, start=100)
    rerun = run_shards("build", image_folder, out, "--val-fraction", "0", "--shard-size", "10")
    assert rerun.returncode == 0 and "rebuilding" in rerun.stderr
    assert read_manifest(out)["splits"]["train"]["count"] == 42
    (out / "train-000000.tar").unlink()
    rerun = run_shards("build", image_folder, out, "--val-fraction", "0", "--shard-size", "10")
    assert rerun.returncode == 0 and "rebuilding" in rerun.stderr
    assert (out / "train-000000.tar").exists()
    assert run_shards("verify", out).returncode == 0


@pytest.mark.slow
def test_out_inside_src_is_never_read_as_input(tmp_path: Path, image_folder: Path) -> None:
    for _ in range(2):  # the second run would see the first run's shards
        result = run_shards("build", image_folder, image_folder / "out", "--overwrite")
        assert result.returncode == 0, result.stderr
        assert not [path for path in skipped(image_folder / "out") if path.startswith("out")]


@pytest.mark.slow
def test_list_files_with_a_bom_header_tab_labels_and_a_nul_byte(tmp_path: Path) -> None:
    write_images(tmp_path, 3)
    (tmp_path / "list.csv").write_text("\ufeffimage,label\nimg0000.png,cat\nimg0001.png,dog\n", encoding="utf-8")
    assert run_shards("build", tmp_path / "list.csv", tmp_path / "csv-out", "--val-fraction", "0").returncode == 0
    assert read_manifest(tmp_path / "csv-out")["labels"] == ["cat", "dog"]
    (tmp_path / "list.txt").write_text("img0000.png\tcat\nimg0001.png\nimg\x002.png\n")
    result = run_shards("build", tmp_path / "list.txt", tmp_path / "txt-out", "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / "txt-out")["labels"] == ["cat"]
    assert list(skipped(tmp_path / "txt-out").values()) == ["path contains a NUL byte"]


@pytest.mark.slow
def test_running_out_of_space_is_one_line(tmp_path: Path, image_folder: Path) -> None:
    def small_files() -> None:  # a file-size limit stands in for a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    result = run_process(
        [
            sys.executable,
            "-m",
            "shards",
            "build",
            str(image_folder),
            str(tmp_path / "out"),
            "--shard-size",
            "20",
            "--workers",
            "0",
        ],
        120,
        preexec_fn=small_files,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "cannot write to" in result.stderr.strip().splitlines()[-1]


def children_of(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
def test_workers_die_with_a_killed_build(tmp_path: Path) -> None:
    source = tmp_path / "src"
    write_images(source, 400, size=(300, 300))
    command = [sys.executable, "-m", "shards", "build", str(source), str(tmp_path / "out"), "--workers", "2"]
    with started(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as process:
        deadline = time.monotonic() + 60
        while len(children_of(process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = children_of(process.pid)
        assert workers, "no worker started"
        process.kill()  # the main process only, as the OOM killer would
        process.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
            assert time.monotonic() < deadline, "workers outlived the build"
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    except (OSError, IndexError):
        return "zombie"
