"""Property tests for the inputs issue 31 found outside the fuzzers' reach, run in process: a plan header,
a part's records, URLs holding credentials, the node cache's files, the run's rollback record. Each reader
either takes a value or refuses it with one UserError line; no other exception, whatever the input."""

from __future__ import annotations

import hashlib
import json
import os
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.training import rollback
from shards.build.options import build_option_defaults, build_option_validators
from shards.build.plan_records import check_plan_header, planned_names, read_records
from shards.errors import UserError, without_credentials
from shards.read.shard_cache import ShardCache

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
SOUND_OPTIONS = {
    "shard_size": 8,
    "shard_bytes": None,
    "val_fraction": 0.2,
    "seed": 3,
    "labels": "folder",
    "size": 16,
    "crop": "center",
    "format": "png",
    "quality": 95,
    "mode": "RGB",
    "max_pixels": 89478485,
}
SOUND_HEADER = {
    "format_version": 1,
    "src": "/data/images",
    "root": "/data/images/",
    "options": SOUND_OPTIONS,
    "source": {"fingerprint": "f" * 16, "images": 20, "labels": ["a", "b"]},
    "rejected": [["x.txt", "not an image"]],
    "counts": {"train": 16, "val": 4},
}


def edited(path: list[str], value: object) -> dict:
    header = json.loads(json.dumps(SOUND_HEADER))
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return header


NULLABLE = {name for name, default in build_option_defaults().items() if default is None}
PATHS = st.sampled_from(
    [["options", key] for key in SOUND_OPTIONS]
    + [["counts", "train"], ["counts", "val"], ["source", "images"], ["source", "labels"], ["rejected"], ["root"]]
)


def test_the_sound_header_is_taken() -> None:
    assert check_plan_header(json.loads(json.dumps(SOUND_HEADER)), "plan.json", build_option_validators(), NULLABLE)


@given(path=PATHS, value=JSON_VALUES)
@example(path=["options", "size"], value=99999)
@example(path=["options", "shard_size"], value=0)
@example(path=["counts", "train"], value=10**12)
def test_an_edited_plan_header_is_taken_or_one_line(path: list[str], value: object) -> None:
    try:
        header = check_plan_header(edited(path, value), "plan.json", build_option_validators(), NULLABLE)
    except UserError as error:
        assert "\n" not in str(error) and str(error).startswith("plan.json: not a valid plan: ")
        return
    options = header["options"]  # taken: within what the command line allows
    assert 1 <= options["size"] <= 8192 and 1 <= options["shard_size"] <= 10**9


PLANNED = planned_names([("train", 0, 8), ("train", 8, 16), ("val", 0, 4)], 8)
SOUND_RECORD = {"split": "train", "next": 8, "skipped": [], "name": "train-000000.tar", "count": 8}
SOUND_RECORD |= {"bytes": 20480, "sha256": "0" * 64}


@given(data=st.binary(max_size=300))
@example(data=json.dumps(SOUND_RECORD).encode()[:40])
@example(data=b"\xff\xfe" + json.dumps(SOUND_RECORD).encode())
def test_any_bytes_as_parts_records_are_taken_or_one_line(data: bytes) -> None:
    try:
        records = read_records(data, "parts/1-of-1.jsonl", PLANNED)
    except UserError as error:
        assert "\n" not in str(error)
        return
    assert all((record["split"], record["next"]) in PLANNED for record in records)


@given(key=st.sampled_from(sorted(SOUND_RECORD)), value=JSON_VALUES)
@example(key="name", value="../../etc/passwd")
def test_an_edited_record_is_taken_or_one_line(key: str, value: object) -> None:
    line = json.dumps({**SOUND_RECORD, key: value}).encode()
    try:
        [record] = read_records(line, "parts/1-of-1.jsonl", PLANNED)
    except UserError as error:
        assert "\n" not in str(error)
        return
    assert record.get("name") in (None, PLANNED[(record["split"], record["next"])])


USER_INFO = st.text(string.ascii_letters + string.digits + "@:%!$&'()*+,;=-._~", min_size=1, max_size=30)


@given(user=USER_INFO, password=USER_INFO, scheme=st.sampled_from(["http", "https", "s3", "gs"]))
def test_no_password_in_a_url_survives(user: str, password: str, scheme: str) -> None:
    secret = f"{password}Zq9"  # something the rest of the text cannot hold
    text = f"error: {scheme}://{user}:{secret}@host.example:8080/path/train-000001.tar: not found"
    shown = without_credentials(text)
    assert secret not in shown and f"{scheme}://***@host.example:8080/path/train-000001.tar" in shown


class LocalStore:
    """What the node cache asks of a remote folder (url_of, download), served from a local shard folder:
    the cache's own checks under test, with any bytes in its files."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def url_of(self, name: str) -> str:
        return f"store://{name}"

    def download(self, name: str, size: int, into) -> str:
        data = (self.folder / name).read_bytes()[:size]
        into.write(data)
        return hashlib.sha256(data).hexdigest() if len(data) == size else ""


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


SHARD = b"".join(bytes([n % 251]) * 512 for n in range(8))  # 4 KiB, the stand-in for a shard


@given(
    cached=st.one_of(st.binary(max_size=5000), st.integers(0, len(SHARD) - 1).map(lambda at: flip(SHARD, at))),
    identity=st.one_of(st.none(), st.binary(max_size=300), JSON_VALUES.map(lambda value: json.dumps(value).encode())),
    keep_times=st.booleans(),
)
@example(cached=SHARD[:100], identity=None, keep_times=False)
@example(cached=flip(SHARD, 7), identity=None, keep_times=True)
def test_any_bytes_in_the_cache_are_never_read_as_the_shard(cached: bytes, identity: bytes | None, keep_times) -> None:
    """A cached copy replaced by any bytes (another file, a cut, one byte flipped with its times set back)
    and any identity record beside it: the cache hands out the manifest's shard, never those bytes, and
    never anything but a UserError."""
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        (root / "store").mkdir()
        (root / "store" / "train-000000.tar").write_bytes(SHARD)
        record = {"name": "train-000000.tar", "bytes": len(SHARD), "sha256": hashlib.sha256(SHARD).hexdigest()}
        cache = ShardCache(root / "cache")
        store = LocalStore(root / "store")
        with cache.open(store, record) as file:  # fetched once, its identity recorded
            assert file.read() == SHARD
        path = cache.path_of(record)
        before = path.stat()
        with open(path, "r+b") as file:  # in place: the same inode, as `cp` over it writes
            file.write(cached)
            file.truncate()
        if keep_times:
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if identity is not None:
            cache.identity_path(record).write_bytes(identity)
        with cache.open(store, record) as file:
            assert file.read() == SHARD


@pytest.mark.slow
@given(
    st.one_of(
        st.binary(max_size=400),
        st.lists(JSON_VALUES, max_size=4).map(lambda lines: "\n".join(json.dumps(line) for line in lines).encode()),
    )
)
def test_any_bytes_as_the_rollback_record_are_taken_or_one_line(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as temp:
        (Path(temp) / rollback.RECORD).write_bytes(data)
        try:
            records = rollback.read_records(Path(temp))
        except UserError as error:
            assert "\n" not in str(error)
            return
        for record in records:
            assert sorted(record) == sorted(rollback.FIELDS)
            assert record["from_micro_step"] < record["to_micro_step"]
