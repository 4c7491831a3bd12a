"""A store that misbehaves on purpose (tests/servers.py's FaultyProxy in front of nginx or moto's S3): one that
answers and then trickles, a gzip bomb, an answer longer than the range asked, a redirect to another
origin, a manifest heavier than any manifest. Every wait is bounded by data.read_timeout and the retry
budget, nothing grows past what the manifest says, and each ends in one line."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import started
from servers import FaultyProxy, MotoS3, moto_available
from trainer_helpers import build_small_shards, environment, write_config

from shards.format.manifest import MANIFEST_NAME, ManifestError
from shards.read.folder import ShardFolder
from shards.store import remote
from shards.store.failures import StoreMisbehaved, StoreUnavailable
from shards.store.remote import RemoteAccess


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("hostile-store"))


def shard_faults(kind: str):
    """`kind` for every GET of a shard; the manifest and HEAD requests forwarded as they are."""
    return lambda method, path, asked: kind if method == "GET" and path.endswith(".tar") else None


def first_shard(folder: ShardFolder) -> dict:
    return folder.manifest()["splits"]["train"]["shards"][0]


@pytest.mark.slow
def test_a_store_that_trickles_times_out_within_read_timeout(tmp_path, shards, nginx) -> None:
    """The right headers, then a byte every 0.2 s: without a bound the fetch of a shard of a few KB would
    take many minutes (aiohttp's own limit is 300 s, s3fs has none). With read_timeout 1 s and a retry
    budget of 2 s it ends within seconds, one line naming the URL and the key that bounds it."""
    with FaultyProxy(nginx.port, shard_faults("trickle")) as proxy:
        folder = ShardFolder.at(
            f"{proxy.url}/shards", RemoteAccess(cache_dir=tmp_path / "cache", retry_seconds=2, read_timeout=1)
        )
        record = first_shard(folder)
        assert record["bytes"] * 0.2 > 300  # what the trickle would take
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"no answer within data\.read_timeout") as refused:
            folder.local_path(record)
        assert time.monotonic() - began < 20
    assert record["name"] in str(refused.value) and "\n" not in str(refused.value)
    assert not list((tmp_path / "cache").glob("*.part"))


@pytest.mark.slow
@pytest.mark.skipif(not moto_available(), reason="needs moto[server] (the dev extra)")
def test_an_s3_store_that_trickles_times_out_too(tmp_path, shards) -> None:
    """The same trickle over S3 (moto behind the proxy, as the endpoint): s3fs's reads have no time bound
    of their own; ours holds."""
    import s3fs

    with MotoS3() as moto:
        store = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto.url)
        store.mkdir("bucket")
        store.put(str(shards) + "/", "bucket/shards/", recursive=True)
        with FaultyProxy(moto.port, shard_faults("trickle")) as proxy:
            access = RemoteAccess(
                storage_options={"endpoint_url": proxy.url, "key": "testing", "secret": "testing"},
                cache_dir=tmp_path / "cache",
                retry_seconds=2,
                read_timeout=1,
            )
            folder = ShardFolder.at("s3://bucket/shards", access)
            record = first_shard(folder)
            began = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"no answer within data\.read_timeout"):
                folder.local_path(record)
            assert time.monotonic() - began < 20
            assert any(kind == "trickle" for kind, _ in proxy.faults)


def test_a_gzip_bomb_is_never_inflated(tmp_path, shards, nginx) -> None:
    """16 KB on the wire that inflate to 16 MB, for every range asked: the bytes are taken as stored (never
    decompressed), so no more than the shard's size is read: the first answer is short of it, and the
    second, longer than the rest asked, is refused as a store that lies."""
    remote.take_counters()
    with FaultyProxy(nginx.port, shard_faults("gzip-bomb")) as proxy:
        folder = ShardFolder.at(f"{proxy.url}/shards", RemoteAccess(cache_dir=tmp_path / "cache", retry_seconds=2))
        record = first_shard(folder)
        with pytest.raises(StoreMisbehaved, match="answered more bytes than the range"):
            folder.local_path(record)
    assert 0 < remote.take_counters()["fetched_bytes"] < record["bytes"]
    assert not list((tmp_path / "cache").glob("*.tar")) and not list((tmp_path / "cache").glob("*.part"))


def test_a_manifest_served_as_a_gzip_bomb_is_one_line(tmp_path, shards, nginx) -> None:
    bomb = lambda method, path, asked: "gzip-bomb" if path.endswith(MANIFEST_NAME) else None  # noqa: E731
    with FaultyProxy(nginx.port, bomb) as proxy:
        folder = ShardFolder.at(f"{proxy.url}/shards", RemoteAccess(cache_dir=tmp_path / "cache", retry_seconds=2))
        with pytest.raises(StoreMisbehaved, match="answered more bytes than the range") as refused:
            folder.manifest()
    assert "\n" not in str(refused.value)


def test_an_answer_longer_than_the_range_is_refused_at_once(tmp_path, shards, nginx) -> None:
    """206 with the whole file and 1 MB more, whatever the range: read no further than asked, refused
    as a store that lies (no retry: it would lie again)."""
    remote.take_counters()
    with FaultyProxy(nginx.port, shard_faults("oversize")) as proxy:
        folder = ShardFolder.at(f"{proxy.url}/shards", RemoteAccess(cache_dir=tmp_path / "cache", retry_seconds=30))
        with pytest.raises(StoreMisbehaved, match="answered more bytes than the range"):
            folder.local_path(first_shard(folder))
    assert len([kind for kind, _ in proxy.faults]) == 1
    assert remote.take_counters().get("fetch_retries", 0) == 0


@pytest.mark.slow
def test_a_redirect_to_another_origin_is_refused_unless_allowed(tmp_path, shards, nginx) -> None:
    """The proxy redirects every request to nginx on another port: refused (one line naming the key that
    allows it), not one byte read from the other origin; data.redirects "any" follows it to the same
    bytes. A redirect within the proxy's own origin is followed."""
    elsewhere = lambda method, path, asked: f"redirect:{nginx.url}"  # noqa: E731
    before = len(nginx.requests())
    with FaultyProxy(nginx.port, elsewhere) as proxy:
        folder = ShardFolder.at(f"{proxy.url}/shards", RemoteAccess(cache_dir=tmp_path / "refused"))
        with pytest.raises(StoreMisbehaved, match=r"redirected to another origin.*data\.redirects: any"):
            folder.manifest()
        assert len(nginx.requests()) == before
        followed = ShardFolder.at(f"{proxy.url}/shards", RemoteAccess(cache_dir=tmp_path / "any", redirects="any"))
        record = first_shard(followed)
        assert followed.local_path(record).read_bytes() == (shards / record["name"]).read_bytes()

    moved = shards.parent / "moved"  # under nginx's root: /moved/shards/
    shutil.copytree(shards, moved / "shards", dirs_exist_ok=True)

    def same_origin(method: str, path: str, asked: int) -> str | None:
        return None if path.startswith("/moved/") else f"redirect:{proxy.url}/moved"

    with FaultyProxy(nginx.port, same_origin) as proxy:
        folder = ShardFolder.at(f"{proxy.url}/shards", RemoteAccess(cache_dir=tmp_path / "same"))
        record = first_shard(folder)
        assert folder.local_path(record).read_bytes() == (shards / record["name"]).read_bytes()
        assert {kind for kind, _ in proxy.faults} == {f"redirect:{proxy.url}/moved"}


def test_a_manifest_heavier_than_any_is_refused_before_it_is_read(tmp_path, shards, nginx, monkeypatch) -> None:
    """The cap (MAX_RECORD_FILE_BYTES, 256 MiB) lowered to 1 KB here: the size the store gives is refused
    before a byte is read; a local manifest too."""
    monkeypatch.setattr(remote, "MAX_RECORD_FILE_BYTES", 1024)
    heavy = tmp_path / "heavy"
    shutil.copytree(shards, heavy)
    assert (heavy / MANIFEST_NAME).stat().st_size > 1024
    folder = ShardFolder.at(f"{nginx.url}/shards", RemoteAccess(cache_dir=tmp_path / "cache"))
    before = nginx.requests()
    with pytest.raises(StoreMisbehaved, match="more than the 1024 bytes such a file may weigh"):
        folder.manifest()
    assert [request for request in nginx.requests()[len(before) :] if request[0] == "GET"] == []
    with pytest.raises(ManifestError, match="more than the 1024 bytes"):
        ShardFolder.at(heavy).manifest()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_stops_a_run_waiting_on_a_trickling_store(tmp_path, shards, nginx, workers) -> None:
    """`pipeline train` whose every shard trickles, with bounds far off (read_timeout and retry_seconds 600):
    SIGTERM while it waits for its first batch (in the rank itself with workers 0, in a data worker with
    1) stops it faults.stop_grace_seconds later with one line, not after the fetch's own bounds."""
    with FaultyProxy(nginx.port, shard_faults("trickle")) as proxy:
        url = f"{proxy.url}/shards"
        data = {"shards": url, "workers": workers, "cache_dir": str(tmp_path / "cache"), "batch_size": 2}
        config = write_config(
            tmp_path / "run.yaml",
            url,
            tmp_path / "run",
            data={**data, "read_timeout": 600, "retry_seconds": 600, "prefetch_shards": 0},
            faults={"stop_grace_seconds": 2},
        )
        command = [sys.executable, "-m", "pipeline.train", "--config", str(config)]
        with started(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment()) as run:
            deadline = time.monotonic() + 120
            while not proxy.faults and time.monotonic() < deadline and run.poll() is None:
                time.sleep(0.2)
            assert proxy.faults, "the run never asked for a shard"
            time.sleep(1)
            run.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            _, stderr = run.communicate(timeout=60)
            took = time.monotonic() - signalled
    assert run.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "stopped by SIGTERM while waiting for data" in errors[0], stderr[-3000:]
    assert "Traceback" not in stderr
    assert took < 30
