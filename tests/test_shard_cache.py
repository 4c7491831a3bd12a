"""The node-local cache of remote shards and the faults of a remote store, against a real nginx on
127.0.0.1 (and a proxy in front of it that fails chosen requests). Every sample read remotely is compared
with the same sample read from the local folder."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, run_process
from servers import FaultyProxy, Nginx
from trainer_helpers import build_small_shards, environment, write_config

from shards.read.random_access import SampleError, SplitDataset
from shards.read.reader import open_split
from shards.read.shard_cache import ShardCache
from shards.store import remote
from shards.store.remote import RemoteAccess

SHARDS = 6  # 40 images: 7,7,7,7,7,5
ENV = {"env": environment()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("cache"))


def sample_hashes(dataset: SplitDataset) -> list[str]:
    return [hashlib.sha256(dataset[index][0].numpy().tobytes()).hexdigest() for index in range(len(dataset))]


@pytest.fixture(scope="module")
def local_hashes(shards: Path) -> list[str]:
    return sample_hashes(SplitDataset(open_split(shards)))


def remote_dataset(url: str, cache: Path, **access) -> SplitDataset:
    return SplitDataset(open_split(url, "train", RemoteAccess(cache_dir=cache, **access)), max_open=2)


def gets(server: Nginx, folder: str) -> dict[str, list[int]]:
    """The body bytes of every GET of each shard of /folder/ so far."""
    found: dict[str, list[int]] = {}
    for method, path, _, sent in server.requests():
        if method == "GET" and path.startswith(f"/{folder}/") and path.endswith(".tar"):
            found.setdefault(path.rsplit("/", 1)[1], []).append(sent)
    return found


def served_copy(shards: Path, name: str) -> Path:
    """A copy of the shard folder under nginx's root, as /name/."""
    copy = shards.parent / name
    shutil.copytree(shards, copy)
    return copy


@pytest.mark.slow
def test_concurrent_processes_fetch_each_shard_once_per_node(tmp_path, shards, nginx, local_hashes) -> None:
    """Four processes read the whole split at once through one cache folder, as the ranks and workers of a
    node do: nginx sends each shard once, and every process reads the right samples."""
    served_copy(shards, "once")
    cache = tmp_path / "cache"
    reader = str(REPO / "tests" / "helpers" / "read_remote_split.py")
    command = [sys.executable, reader, f"{nginx.url}/once", str(cache)]
    processes = [
        threading.Thread(
            target=lambda n=n: run_process([*command, str(tmp_path / f"{n}.json")], 120, env=environment())
        )
        for n in range(4)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    reports = [json.loads((tmp_path / f"{n}.json").read_text()) for n in range(4)]
    assert all(report["hashes"] == local_hashes for report in reports)
    sizes = {path.name: [path.stat().st_size] for path in shards.glob("*.tar")}
    assert gets(nginx, "once") == sizes
    assert sum(report["counters"].get("fetched_shards", 0) for report in reports) == SHARDS


def test_eviction_takes_the_least_recently_used_shard_never_one_in_use(tmp_path, shards, nginx) -> None:
    split = open_split(f"{nginx.url}/shards", "train", RemoteAccess(cache_dir=tmp_path / "cache"))
    size = split.shards[0]["bytes"]
    cache = split.cache
    cache.limit = int(2.5 * size)  # room for two of these shards
    held = cache.open(split.remote, split.shards[0])  # in use from here on
    for index in (1, 2, 3):
        cache.fetch(split.remote, split.shards[index])
        time.sleep(0.01)  # distinct modification times
    cached = {path.name for path in cache.folder.glob("*.tar")}
    # 0 is the least recently used but in use; 1 and 2 made room in turn; 3 is the newest
    assert cached == {cache.path_of(split.shards[0]).name, cache.path_of(split.shards[3]).name}
    held.close()
    cache.fetch(split.remote, split.shards[4])  # now 0 may go
    assert {path.name for path in cache.folder.glob("*.tar")} == {
        cache.path_of(split.shards[3]).name,
        cache.path_of(split.shards[4]).name,
    }


@pytest.mark.slow
def test_transient_errors_are_retried_and_cost_no_sample(tmp_path, shards, nginx, local_hashes) -> None:
    """Per shard: a 503, then a 429, then a connection cut halfway through the body, then a body with a
    byte changed (its sha256 fails: fetched again); the manifest: one 503. Every sample is the right one."""
    served_copy(shards, "flaky")
    plan = {0: "503", 1: "429", 2: "cut", 3: "corrupt"}

    def fault(method: str, path: str, asked: int) -> str | None:
        if path.endswith("manifest.json"):
            return "503" if asked == 0 else None
        return plan.get(asked) if method == "GET" else None

    remote.take_counters()
    with FaultyProxy(nginx.port, fault) as proxy:
        dataset = remote_dataset(f"{proxy.url}/flaky", tmp_path / "cache", retry_seconds=60)
        assert sample_hashes(dataset) == local_hashes
    kinds = [kind for kind, path in proxy.faults if path.endswith(".tar")]
    assert sorted(set(kinds)) == ["429", "503", "corrupt", "cut"] and len(kinds) == 4 * SHARDS
    counters = remote.take_counters()
    assert counters["fetch_retries"] == 1 + 3 * SHARDS  # the corrupt body is a second fetch, not a retry
    assert counters["fetched_shards"] == SHARDS


@pytest.mark.slow
def test_a_server_restarted_mid_read_costs_retries_only(tmp_path, shards, local_hashes) -> None:
    """nginx stops after half the shards were read and comes back 2 s later, while a fetch is retrying."""
    with Nginx(shards.parent, tmp_path / "nginx") as server:
        dataset = remote_dataset(f"{server.url}/shards", tmp_path / "cache", retry_seconds=60)
        half = sum(dataset.counts[:3])
        first = sample_hashes_between(dataset, 0, half)
        server.stop()
        restart = threading.Timer(2.0, server.start)
        restart.start()
        remote.take_counters()
        try:
            rest = sample_hashes_between(dataset, half, len(dataset))
        finally:
            restart.join()  # so that the block's end stops the restarted server
        assert first + rest == local_hashes
        assert remote.take_counters()["fetch_retries"] >= 1


def sample_hashes_between(dataset: SplitDataset, start: int, end: int) -> list[str]:
    return [hashlib.sha256(dataset[index][0].numpy().tobytes()).hexdigest() for index in range(start, end)]


def test_a_shard_that_never_matches_its_manifest_is_a_damaged_shard(tmp_path, shards, nginx, local_hashes) -> None:
    """Shard 2's bytes changed on the store (its size kept): fetched twice, then each of its samples fails
    as a damaged shard's do (the trainer leaves them out, counted); the other shards read as they should."""
    damaged = served_copy(shards, "damaged")
    with open(damaged / "train-000002.tar", "r+b") as file:
        file.seek(600)
        byte = file.read(1)
        file.seek(600)
        file.write(bytes([byte[0] ^ 0xFF]))
    dataset = remote_dataset(f"{nginx.url}/damaged", tmp_path / "cache")
    start, end = sum(dataset.counts[:2]), sum(dataset.counts[:3])
    for index in range(len(dataset)):
        if start <= index < end:
            with pytest.raises(SampleError, match="fetched twice, its bytes do not match the manifest's sha256"):
                dataset[index]
        else:
            assert hashlib.sha256(dataset[index][0].numpy().tobytes()).hexdigest() == local_hashes[index]
    assert len(gets(nginx, "damaged")["train-000002.tar"]) == 2  # twice in this process, then known damaged
    assert not list((tmp_path / "cache").glob("*.part"))


@pytest.mark.slow
def test_a_full_cache_disk_is_one_line_not_a_crash(tmp_path, shards, nginx) -> None:
    """The trainer's process may write files no larger than half a shard (RLIMIT_FSIZE: the kernel's
    "file too large", as a full disk fails a write): the run ends with one line naming the cache."""
    served_copy(shards, "full")
    half_a_shard = (shards / "train-000000.tar").stat().st_size // 2
    config = write_config(
        tmp_path / "run.yaml",
        Path(f"{nginx.url}/full"),
        tmp_path / "run",
        data={"shards": f"{nginx.url}/full", "batch_size": 2, "workers": 1, "cache_dir": str(tmp_path / "cache")},
    )

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (half_a_shard, half_a_shard))

    command = [sys.executable, "-m", "pipeline.train", "--config", str(config)]
    result = run_process(command, 120, env=environment(), preexec_fn=limited)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "the shard cache's disk is full" in errors[0], result.stderr[-3000:]
    assert str(tmp_path / "cache") in errors[0]
    assert not list((tmp_path / "cache").glob("*.part"))


def test_cache_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception, match=r"data.cache_dir .*file/cache: cannot create it"):
        ShardCache(tmp_path / "file" / "cache")


def read_shard(split, index: int) -> bytes:
    with split.cache.open(split.remote, split.shards[index]) as file:
        return file.read()


@pytest.mark.parametrize("keep_times", [False, True], ids=["copied-over", "copied-over-times-restored"])
def test_a_cached_copy_changed_on_disk_is_fetched_again(tmp_path, shards, nginx, capfd, keep_times) -> None:
    """Another shard's bytes copied over a cached shard (the same inode, as `cp` does; with its times then
    set back, as `cp -p` or a restore would): the next open finds the copy is not the manifest's shard (its
    identity changed, then its sha256), removes it and fetches it again: the right bytes, one warning,
    a second GET."""
    served_copy(shards, f"tamper-{keep_times}")
    url = f"{nginx.url}/tamper-{keep_times}"
    split = open_split(url, "train", RemoteAccess(cache_dir=tmp_path / "cache"))
    assert read_shard(split, 0) == (shards / split.shards[0]["name"]).read_bytes()
    target = split.cache.path_of(split.shards[0])
    before = target.stat()
    other = (shards / split.shards[5]["name"]).read_bytes()  # 5 samples: another size too
    with open(target, "r+b") as file:
        file.write(other)
        file.truncate()
    if keep_times:
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    capfd.readouterr()
    assert read_shard(split, 0) == (shards / split.shards[0]["name"]).read_bytes()
    assert "not the shard the manifest names" in capfd.readouterr().err
    assert len(gets(nginx, f"tamper-{keep_times}")[split.shards[0]["name"]]) == 2


def test_a_same_size_copy_with_other_bytes_is_caught_by_its_identity(tmp_path, shards, nginx, capfd) -> None:
    """The hardest case for a cheap check: one byte changed in place, the size and mtime set back. The
    ctime moved, so the copy is hashed, found wrong, and fetched again."""
    served_copy(shards, "flipped")
    split = open_split(f"{nginx.url}/flipped", "train", RemoteAccess(cache_dir=tmp_path / "cache"))
    good = read_shard(split, 1)
    target = split.cache.path_of(split.shards[1])
    before = target.stat()
    with open(target, "r+b") as file:
        file.seek(700)
        byte = file.read(1)
        file.seek(700)
        file.write(bytes([byte[0] ^ 0xFF]))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size
    assert read_shard(split, 1) == good
    assert len(gets(nginx, "flipped")[split.shards[1]["name"]]) == 2
    # and an untouched copy is opened without a hash: its recorded identity is its own
    assert split.cache.recorded_identity(split.shards[1]) is not None
    capfd.readouterr()
    assert read_shard(split, 1) == good and "warning" not in capfd.readouterr().err


def test_a_truncated_cached_copy_is_fetched_again(tmp_path, shards, nginx) -> None:
    served_copy(shards, "cut-cache")
    split = open_split(f"{nginx.url}/cut-cache", "train", RemoteAccess(cache_dir=tmp_path / "cache"))
    good = read_shard(split, 2)
    target = split.cache.path_of(split.shards[2])
    os.truncate(target, len(good) // 2)
    assert split.cache.fetch(split.remote, split.shards[2]).read_bytes() == good  # the size check alone
    assert len(gets(nginx, "cut-cache")[split.shards[2]["name"]]) == 2


def test_parts_of_dead_fetches_are_removed_and_live_ones_kept(tmp_path, shards, nginx) -> None:
    """A SIGKILLed fetch leaves its `.part`: the next cache opened over the folder removes it (its
    shard's lock is free), but not the `.part` of a fetch still holding its lock; fetches in flight count
    against cache_limit."""
    cache_dir = tmp_path / "cache"
    split = open_split(f"{nginx.url}/shards", "train", RemoteAccess(cache_dir=cache_dir))
    dead, live = split.shards[0]["sha256"], split.shards[1]["sha256"]
    (cache_dir / f".{dead}.tar.4242.part").write_bytes(bytes(10**6))
    (cache_dir / f".{live}.tar.4343.part").write_bytes(bytes(10**6))
    with open(cache_dir / ".locks" / f"{live}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another open file: as another process holds it
        cache = ShardCache(cache_dir, limit=10**6 + int(2.5 * split.shards[2]["bytes"]))
        assert sorted(path.name for path in cache_dir.glob(".*.part")) == [f".{live}.tar.4343.part"]
        for index in (2, 3, 4):  # room for two shards beside the live part: the first is evicted
            cache.fetch(split.remote, split.shards[index])
            time.sleep(0.01)
        assert not cache.path_of(split.shards[2]).exists()
        assert cache.path_of(split.shards[3]).exists() and cache.path_of(split.shards[4]).exists()


def test_a_cache_limit_below_one_shard_is_said_at_start_up(tmp_path, shards, nginx, capfd) -> None:
    capfd.readouterr()
    open_split(f"{nginx.url}/shards", "train", RemoteAccess(cache_dir=tmp_path / "cache", cache_limit=1000))
    err = capfd.readouterr().err
    assert "warning: data.cache_limit (1000 bytes) is smaller than a shard" in err
    open_split(f"{nginx.url}/shards", "train", RemoteAccess(cache_dir=tmp_path / "cache", cache_limit=10**9))
    assert "cache_limit" not in capfd.readouterr().err
