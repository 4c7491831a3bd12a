"""Shared fixtures: small synthetic image folders, and ways to run the CLIs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Property-based (fuzz) tests: a bounded, seeded budget by default, so that CI is reproducible and short;
# `pytest --hypothesis-profile fuzz` for a long search with fresh random examples.
settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("fuzz", max_examples=5000, deadline=None, print_blob=True)
settings.load_profile("ci")


# module fixtures that train a model or start a server: a test that takes one is in the slow tier
SLOW_FIXTURES = frozenset({"trained", "generator_run", "run", "finished", "straight", "moto", "ray_cluster", "nginx"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _processes_only_in_slow_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast tier (`pytest -m "not slow"`) stays fast: a test not marked slow that starts a process
    fails at once, naming the mark it needs. (Processes a module's fixtures started before it are theirs.)"""
    if request.node.get_closest_marker("slow") is not None:
        return
    started = subprocess.Popen.__init__

    def refuse(self, args, *more, **options) -> None:
        if not request.node.get_closest_marker("slow"):
            raise AssertionError(f"{request.node.nodeid} starts a process ({args!r:.120}): mark it @pytest.mark.slow")
        started(self, args, *more, **options)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def synthetic_pixels(index: int, width: int, height: int, channels: int = 3) -> np.ndarray:
    """Smooth gradients plus a little seeded noise: compresses like a photo, differs per index."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width]
    planes = []
    for channel in range(channels):
        phase = rng.uniform(0, 2 * np.pi)
        wave = 127 + 100 * np.sin(x / (3 + channel + index % 7) + phase) * np.cos(y / (5 + index % 5))
        planes.append(wave + rng.normal(0, 6, size=(height, width)))
    pixels = np.clip(np.stack(planes, axis=-1), 0, 255).astype(np.uint8)
    return pixels[:, :, 0] if channels == 1 else pixels


def write_images(folder: Path, count: int, size=(64, 64), suffix=".png", prefix="img", start=0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = folder / f"{prefix}{index:04d}{suffix}"
        Image.fromarray(synthetic_pixels(index, *size)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    write_images(source, 40)
    return source


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, shards: Path):
    """nginx on 127.0.0.1 serving the folder that holds the module's `shards` fixture (its shards at
    /shards/), for the module's tests; stopped after them (tests/servers.py)."""
    from servers import Nginx

    with Nginx(shards.parent, tmp_path_factory.mktemp("nginx")) as server:
        yield server


TAG = "PIPELINE_TESTS_PROCESS_TAG"


def tagged_processes(tag: str) -> list[int]:
    """Every live process started under `tag`, found by its environment: torch's launcher starts each
    rank in a session of its own, and an orphaned data worker is re-parented to init, but every process
    inherits the environment it was started with."""
    wanted = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            pass
    return found


def kill_tagged(tag: str) -> None:
    for _ in range(100):  # a process may fork while they are being killed
        pids = tagged_processes(tag)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@contextlib.contextmanager
def started(command: list[str], **options) -> Iterator[subprocess.Popen]:
    """subprocess.Popen for the tests: when the block ends, normally or not, every process the command
    started (ranks, data workers, whatever escaped its process group) is killed, so that nothing
    outlives the test."""
    tag = uuid.uuid4().hex
    environment = {**options.pop("env", os.environ), TAG: tag}
    process = subprocess.Popen(command, env=environment, **{"stdin": subprocess.DEVNULL, "cwd": REPO, **options})
    process.tag = tag
    try:
        yield process
    finally:
        kill_tagged(tag)
        if process.poll() is None:
            process.kill()
        process.communicate()


def run_process(command: list[str], timeout: float, **options) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True) that kills everything the command started when it
    ends or times out: a hang fails one test and leaves no process behind."""
    with started(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tagged(process.tag)
            stdout, stderr = process.communicate()
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_shards(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`shards` as a real process, the way users run it."""
    return run_process([sys.executable, "-m", "shards", *map(str, args)], timeout, env={**os.environ, "COLUMNS": "120"})


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under a folder by relative path: the whole output, for exact comparisons."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
