"""`shards build SRC s3://...` against moto's S3 server on 127.0.0.1: the objects are byte for byte a local
build's files, the manifest is uploaded last (a build killed with SIGKILL leaves shards but no manifest),
and a rerun resumes from the local journal."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from conftest import REPO, folder_bytes, run_process, started, write_images
from servers import MotoS3

OPTIONS = ["--shard-size", "4", "--workers", "1", "--val-fraction", "0.2", "--size", "16"]


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("remote-build")
    write_images(root / "src", 40, size=(40, 30))
    result = run_process([sys.executable, "-m", "shards", "build", root / "src", root / "local", *OPTIONS], 120)
    assert result.returncode == 0, result.stderr
    return root / "src", folder_bytes(root / "local")


def environment(moto: MotoS3, tmp_path: Path) -> dict[str, str]:
    """The store's own variables (credentials, endpoint); the staging folder under this test's TMPDIR."""
    return {**os.environ, **moto.environment(), "TMPDIR": str(tmp_path)}


def bucket_bytes(moto: MotoS3, prefix: str) -> dict[str, bytes]:
    import s3fs

    store = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto.url, skip_instance_cache=True)
    return {path.rsplit("/", 1)[1]: store.cat_file(path) for path in store.find(prefix)}


def make_bucket(moto: MotoS3, name: str) -> None:
    import s3fs

    s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto.url, skip_instance_cache=True).mkdir(name)


def shards(moto: MotoS3, tmp_path: Path, *args):
    """`shards ARGS` as a real process that reaches moto the way a user reaches S3."""
    return run_process([sys.executable, "-m", "shards", *map(str, args)], 120, env=environment(moto, tmp_path))


@pytest.mark.slow
def test_build_to_s3_uploads_a_local_builds_bytes(tmp_path: Path, moto, corpus) -> None:
    source, local = corpus
    make_bucket(moto, "whole")
    result = shards(moto, tmp_path, "build", source, "s3://whole/shards", *OPTIONS)
    assert result.returncode == 0, result.stderr
    assert "wrote s3://whole/shards/manifest.json" in result.stdout
    assert bucket_bytes(moto, "whole/shards") == local
    assert not list(tmp_path.glob("shards-build-staging-*/*"))  # the staging folder is gone

    again = shards(moto, tmp_path, "build", source, "s3://whole/shards", *OPTIONS)
    assert again.returncode == 0 and "rebuilding" not in again.stderr  # already built: nothing to do
    verify = shards(moto, tmp_path, "verify", "s3://whole/shards")
    assert verify.returncode == 0, verify.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_samples", [9, 30])
def test_a_killed_build_to_s3_has_no_manifest_and_resumes(tmp_path: Path, moto, corpus, kill_after_samples) -> None:
    source, local = corpus
    bucket = f"killed-{kill_after_samples}"
    make_bucket(moto, bucket)
    out = f"s3://{bucket}/shards"
    command = [sys.executable, str(REPO / "tests" / "helpers" / "killed_build.py"), "build", str(source), out]
    env = {**environment(moto, tmp_path), "KILL_AFTER_SAMPLES": str(kill_after_samples)}
    with started([*command, *OPTIONS], env=env, start_new_session=True) as process:
        assert process.wait(timeout=120) == -signal.SIGKILL
    uploaded = bucket_bytes(moto, f"{bucket}/shards")
    assert "manifest.json" not in uploaded  # the manifest goes last
    assert all(local[name] == data for name, data in uploaded.items())
    # uploads run behind the build, at most 4 waiting: of the 7 shards finished by sample 30, 3 at least
    # were uploaded and journalled (at sample 9, perhaps none)
    if kill_after_samples == 30:
        assert len(uploaded) >= 3

    rerun = shards(moto, tmp_path, "build", source, out, *OPTIONS)
    assert rerun.returncode == 0, rerun.stderr
    if kill_after_samples == 30:
        assert "resuming" in rerun.stderr
    assert bucket_bytes(moto, f"{bucket}/shards") == local


@pytest.mark.slow
def test_a_build_planned_into_s3_made_in_parts_on_two_machines(tmp_path: Path, moto, corpus) -> None:
    """plan, parts and merge with OUT on S3, each part with a temporary folder of its own (another
    machine): the bucket ends with a local build's bytes, and the plan is gone from it."""
    source, local = corpus
    make_bucket(moto, "planned")
    out = "s3://planned/shards"
    assert shards(moto, tmp_path / "a", "plan", source, out, *OPTIONS[:2], *OPTIONS[4:]).returncode == 0
    assert ".plan/plan.json" in {name.split("shards/", 1)[1] for name in planned_names(moto)}
    for part, machine in (("2/2", "b"), ("1/2", "c")):
        (tmp_path / machine).mkdir()
        result = shards(moto, tmp_path / machine, "build", out, "--part", part, "--workers", "1")
        assert result.returncode == 0, result.stderr
    # a shard overwritten in the store after its part recorded it: merge reads it back and refuses
    import s3fs

    store = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto.url, skip_instance_cache=True)
    kept = store.cat_file("planned/shards/train-000000.tar")
    store.pipe_file("planned/shards/train-000000.tar", store.cat_file("planned/shards/train-000001.tar"))
    refused = shards(moto, tmp_path / "a", "merge", out)
    assert refused.returncode == 2 and "train-000000.tar" in refused.stderr, refused.stderr
    assert "manifest.json" not in {name.rsplit("/", 1)[1] for name in planned_names(moto)}
    store.pipe_file("planned/shards/train-000000.tar", kept)
    merged = shards(moto, tmp_path / "a", "merge", out)
    assert merged.returncode == 0, merged.stderr
    assert bucket_bytes(moto, "planned/shards") == local


def planned_names(moto: MotoS3) -> list[str]:
    import s3fs

    store = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto.url, skip_instance_cache=True)
    return store.find("planned/shards")


@pytest.mark.slow
def test_build_to_http_is_refused_in_one_line(tmp_path: Path, corpus) -> None:
    source, _ = corpus
    result = run_process([sys.executable, "-m", "shards", "build", str(source), "http://127.0.0.1:9/shards"], 60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "shards build: error: http://127.0.0.1:9/shards: shards build writes to a folder, s3:// or gs://; "
        "HTTP has no upload to write to"
    )


def without_fingerprint(files: dict[str, bytes]) -> dict[str, object]:
    """A build's files, its manifest parsed and without SRC's fingerprint (a listing's own, per kind of SRC)."""
    import json

    manifest = json.loads(files["manifest.json"])
    manifest["source"].pop("fingerprint")
    return {**files, "manifest.json": manifest}


@pytest.mark.slow
def test_build_from_an_s3_prefix_and_from_lists_of_urls(tmp_path: Path, moto, corpus) -> None:
    """The same images read from S3 (a prefix; a remote list of relative paths; a local list of s3://
    URLs) make the same shards as the local folder."""
    import s3fs

    source, local = corpus
    store = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=moto.url, skip_instance_cache=True)
    store.mkdir("images")
    store.put(str(source) + "/", "images/src/", recursive=True)
    names = sorted(path.name for path in source.iterdir())
    store.pipe_file("images/src/list.txt", "\n".join(names).encode())
    (tmp_path / "urls.txt").write_text("".join(f"s3://images/src/{name}\n" for name in names))

    for src in ("s3://images/src", "s3://images/src/list.txt"):
        result = shards(moto, tmp_path, "build", src, tmp_path / "from-s3", *OPTIONS, "--overwrite")
        assert result.returncode == 0, result.stderr
        built = folder_bytes(tmp_path / "from-s3")
        if src.endswith(".txt"):
            assert without_fingerprint(built) == without_fingerprint(local)
        else:  # the prefix also holds list.txt: not an image file name, skipped and named
            skipped = without_fingerprint(built)["manifest.json"]["skipped"]
            assert skipped == [{"path": "list.txt", "reason": "not an image file name (.txt)"}]
            assert {name: data for name, data in built.items() if name.endswith(".tar")} == {
                name: data for name, data in local.items() if name.endswith(".tar")
            }

    result = shards(moto, tmp_path, "build", tmp_path / "urls.txt", tmp_path / "from-urls", *OPTIONS)
    assert result.returncode == 0, result.stderr
    manifest = without_fingerprint(folder_bytes(tmp_path / "from-urls"))["manifest.json"]
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == len(names)
    assert sources_in(tmp_path / "from-urls") == {f"s3://images/src/{name}" for name in names}  # as listed


def sources_in(out: Path) -> set[str]:
    """The `source` every sample's .json records."""
    import json
    import tarfile

    found = set()
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    found.add(json.loads(tar.extractfile(member).read())["source"])
    return found
