"""Training from remote shards, against real servers on 127.0.0.1: nginx (HTTP) and moto (S3).

The remote runs are compared with the same run on the local folder, bit for bit: the data path must not
change a sample, whatever the store does (a SIGKILL, a store gone past the retry budget)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from servers import FaultyProxy, MotoS3, Nginx
from test_checkpoints import assert_bit_identical, assert_ok, latest, one_error_line
from trainer_helpers import (
    build_small_shards,
    environment,
    launch,
    launch_killed,
    metrics,
    run_python,
    write_config,
)

pytestmark = pytest.mark.slow  # every test here starts processes or trains (the fast tier: -m 'not slow')

SHARD_NAMES = [f"train-{index:06d}.tar" for index in range(6)]  # 40 images: 7,7,7,7,7,5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_small_shards(tmp_path_factory.mktemp("remote"))


def run_config(tmp_path: Path, shards: str | Path, name: str, **data) -> Path:
    """2 ranks x 2 micro-batches of 2 under ZeRO-2, a data worker per rank, shards read two at a time
    (so that a run reads them in turn), a checkpoint every 2 steps, input noise from each rank's RNG."""
    settings = {
        "data": {"shards": str(shards), "batch_size": 2, "workers": 1, "shuffle_shards": 2, **data},
        "max_steps": 6,
        "checkpoint": {"every": 2},
        "model": {"hidden": 4, "noise": 0.1},
    }
    return write_config(tmp_path / f"{name}.yaml", Path(shards), tmp_path / name, **settings)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards: Path) -> Path:
    """The run on the local folder that every remote run must equal."""
    folder = tmp_path_factory.mktemp("straight")
    assert_ok(launch(run_config(folder, shards, "run")))
    return folder / "run"


def shard_fetches(server: Nginx, prefix: str = "/shards/") -> dict[str, int]:
    """Body bytes the server sent for each shard, over every request so far."""
    sent: dict[str, int] = {}
    for method, path, _, body in server.requests():
        if method == "GET" and path.startswith(prefix) and path.endswith(".tar"):
            sent[path.removeprefix(prefix)] = sent.get(path.removeprefix(prefix), 0) + body
    return sent


def test_http_training_killed_and_resumed_equals_the_local_run(tmp_path: Path, shards: Path, nginx, straight) -> None:
    """SIGKILL mid-step 3 (checkpoint: step 2), then resume=auto: the weights and optimizer state equal
    the uninterrupted local run's bit for bit, and the node fetched each shard exactly once (the cache
    outlives the run)."""
    config = run_config(tmp_path, f"{nginx.url}/shards", "run", cache_dir=str(tmp_path / "cache"))
    before = shard_fetches(nginx)
    result = launch_killed(config, "micro_step:5")
    assert result.returncode != 0
    assert latest(tmp_path / "run").name == "step-00000002"
    assert_ok(launch(config))
    assert [record["step"] for record in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert_bit_identical(latest(straight), latest(tmp_path / "run"))

    fetched = {name: sent - before.get(name, 0) for name, sent in shard_fetches(nginx).items()}
    sizes = {name: (shards / name).stat().st_size for name in SHARD_NAMES}
    assert fetched == sizes  # every shard, once, whole
    last = metrics(tmp_path / "run")[-1]
    assert last["fetched_shards"] == 0 and last["fetch_retries"] == 0  # the resumed run found all in the cache


def test_s3_training_killed_and_resumed_equals_the_local_run(tmp_path: Path, shards: Path, straight) -> None:
    """Shards in moto's S3, the endpoint given as data.storage_options, the credentials as AWS_* variables:
    SIGKILL mid-step 3, resume=auto, bit-identical to the uninterrupted local run."""
    import s3fs

    with MotoS3() as moto:
        store = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto.url)
        store.mkdir("bucket")
        store.put(str(shards) + "/", "bucket/shards/", recursive=True)
        config = run_config(
            tmp_path,
            "s3://bucket/shards",
            "run",
            cache_dir=str(tmp_path / "cache"),
            storage_options={"endpoint_url": moto.url},
        )
        credentials = {key: value for key, value in moto.environment().items() if key != "AWS_ENDPOINT_URL"}
        assert launch_killed(config, "micro_step:5", **credentials).returncode != 0
        assert latest(tmp_path / "run").name == "step-00000002"
        assert_ok(launch(config, env={**environment(), **credentials}))
    assert_bit_identical(latest(straight), latest(tmp_path / "run"))


def test_a_store_gone_past_the_retry_budget_stops_the_run_and_the_relaunch_resumes_exactly(
    tmp_path: Path, nginx, straight
) -> None:
    """The store answers 503 to every request for a fifth shard (after step 2's checkpoint): the rank that needs it
    retries for data.retry_seconds, then the run stops with one line, its last checkpoint intact. Once the
    store is back, resume=auto finishes the run, equal to the uninterrupted local one."""
    outage = {"on": True}
    fetched: set[str] = set()

    def fault(method: str, path: str, asked: int) -> str | None:
        if method == "GET" and path.endswith(".tar"):
            if outage["on"] and path not in fetched and len(fetched) >= 4:
                return "503"
            fetched.add(path)
        return None

    with FaultyProxy(nginx.port, fault) as proxy:
        config = run_config(
            tmp_path,
            f"{proxy.url}/shards",
            "run",
            cache_dir=str(tmp_path / "cache"),
            retry_seconds=3,
            prefetch_shards=0,
        )
        result = launch(config)
        assert result.returncode != 0
        # the rank that met it says why; a rank that was waiting for it in a collective then stops too, saying
        # the same line first (pipeline/training/stop_cause.py): every line of the run's errors is the cause
        lines = [line for line in result.stderr.splitlines() if line.startswith("pipeline train: error:")]
        assert 1 <= len(lines) <= 2, result.stderr[-4000:]
        for line in lines:
            assert line.startswith(f"pipeline train: error: {proxy.url}/shards/train-"), line
            assert "kept failing for 3 s (HTTP 503" in line
        assert "HTTP 503 Service Unavailable; retry 1 in" in result.stderr  # the retries were logged
        stopped_at = latest(tmp_path / "run")
        assert stopped_at.name == "step-00000002"

        outage["on"] = False
        assert_ok(launch(config))
    assert_bit_identical(latest(straight), latest(tmp_path / "run"))


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("/no-such-folder", "manifest.json: not found: check the URL"),
        ("/forbidden", "manifest.json: access denied: check the credentials"),
    ],
)
def test_a_permanent_store_error_is_one_line_at_start_up(tmp_path: Path, nginx, where: str, expected: str) -> None:
    assert expected in start_up_error(tmp_path, f"{nginx.url}{where}")


def test_a_host_that_does_not_resolve_is_one_line_at_start_up(tmp_path: Path) -> None:
    line = start_up_error(tmp_path, "http://no-such-host.invalid/shards")
    assert "no-such-host.invalid/shards/manifest.json: the host does not resolve" in line


def test_a_shard_missing_from_the_store_is_one_line_at_start_up(tmp_path: Path, shards: Path, nginx) -> None:
    partial = shards.parent / "partial"
    shutil.copytree(shards, partial)
    (partial / "train-000003.tar").unlink()
    line = start_up_error(tmp_path, f"{nginx.url}/partial")
    assert "1 shard(s) of the manifest are missing or not their size, first train-000003.tar (not found)" in line


def start_up_error(tmp_path: Path, url: str) -> str:
    """The one line `pipeline train` ends with on shards at `url`; it writes no run folder."""
    config = run_config(tmp_path, url, "run", cache_dir=str(tmp_path / "cache"))
    line = one_error_line(run_python("-m", "pipeline.train", "--config", str(config)))
    assert not (tmp_path / "run").exists()
    return line


def test_a_password_in_the_url_reaches_no_file_and_no_terminal(tmp_path: Path, nginx) -> None:
    """data.shards=http://alice:PASSWORD@host/...: the run trains (the URL is used as given), and the password
    is in no file it writes (config.yaml, checkpoints' trainer_state.json, metrics, the trackers' files, the
    cache) and in nothing it prints, nor in --dry-run's output, nor in the line of an error that names the
    URL: each shows user-info as ***."""
    secret = "S3cr3tPW"
    with_password = nginx.url.replace("http://", f"http://alice:{secret}@")
    config = run_config(tmp_path, f"{with_password}/shards", "run", cache_dir=str(tmp_path / "cache"))
    dry_run = run_python("-m", "pipeline.train", "--config", str(config), "--dry-run")
    assert_ok(dry_run)
    result = launch(config)
    assert_ok(result)
    assert "http://***@127.0.0.1" in (tmp_path / "run" / "config.yaml").read_text()
    written = [path for folder in ("run", "cache") for path in (tmp_path / folder).rglob("*") if path.is_file()]
    assert len(written) > 10  # checkpoints, metrics, the tracker's event files, cached shards
    holding = [str(path) for path in written if secret.encode() in path.read_bytes() or secret in str(path)]
    assert not holding, holding
    for output in (dry_run, result):
        assert secret not in output.stdout + output.stderr
    missing = run_config(tmp_path, f"{with_password}/no-such-folder", "missing", retry_seconds=1)
    failed = run_python("-m", "pipeline.train", "--config", str(missing))
    assert failed.returncode == 2, failed.stderr[-2000:]
    line = one_error_line(failed)
    assert "http://***@127.0.0.1" in line and secret not in failed.stdout + failed.stderr


def test_a_shard_gone_mid_run_is_reported_at_its_first_answer_without_retrying(tmp_path: Path, nginx) -> None:
    """A permanent answer, 404 for a shard's GET after the start-up checks saw it (HEAD): the run stops with
    one line naming the shard at once, not after data.retry_seconds (600 s here: a retry would run into
    the launch's timeout) of retries, and no retry is logged."""
    gone = "/shards/train-000004.tar"

    def fault(method: str, path: str, asked: int) -> str | None:
        return "404" if method == "GET" and path == gone else None

    with FaultyProxy(nginx.port, fault) as proxy:
        config = run_config(
            tmp_path, f"{proxy.url}/shards", "run", cache_dir=str(tmp_path / "cache"), retry_seconds=600
        )
        result = launch(config, timeout=240)
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if "error:" in line and "train-000004.tar" in line]
        assert lines and "not found" in lines[0], result.stderr[-4000:]
        assert "retry" not in result.stderr, result.stderr[-4000:]
        assert proxy.seen[("GET", gone)] >= 1
