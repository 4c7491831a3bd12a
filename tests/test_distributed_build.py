"""`shards build` beyond one process: one process, `--workers`, a plan made in parts (in any order, one
killed and rerun) and Ray on a real two-node cluster (the driver killed, a worker node lost mid-build)
all give the same bytes, shards and manifest, skipped inputs and their reasons included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, folder_bytes, read_manifest, run_process, run_shards, started, write_images
from servers import FaultyProxy, MotoS3
from test_remote_build import bucket_bytes, make_bucket

pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")

SHARD_SIZE = 8
OPTIONS = ["--size", "16", "--labels", "folder", "--shard-size", str(SHARD_SIZE), "--val-fraction", "0.2"]
OPTIONS += ["--seed", "3"]
# Ray takes 127.0.0.1 as every node's address, not this machine's network address (tests/helpers/ray_cluster.py)
RAY_ON_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
KILLED_BUILD = [sys.executable, str(REPO / "tests" / "helpers" / "killed_build.py")]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Two label folders, 120 images of two sizes, and inputs a build skips for three reasons."""
    root = tmp_path_factory.mktemp("distributed") / "src"
    write_images(root / "cats", 70, size=(48, 40))
    write_images(root / "dogs", 50, size=(40, 56), start=70)
    (root / "dogs" / "broken.png").write_bytes(b"not a png at all")
    (root / "cats" / "notes.txt").write_text("not an image")
    write_images(root, 1, prefix="stray")
    return root


@pytest.fixture(scope="module")
def reference(source: Path, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    result = run_shards("build", source, out, *OPTIONS, "--workers", "2")
    assert result.returncode == 0, result.stderr
    reasons = {item["reason"] for item in read_manifest(out)["skipped"]}
    assert len(reasons) == 3, reasons  # broken file, not an image name, outside a label folder
    return folder_bytes(out)


@pytest.mark.slow
def test_one_process_gives_the_bytes_of_two(tmp_path: Path, source: Path, reference) -> None:
    result = run_shards("build", source, tmp_path / "out", *OPTIONS, "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert folder_bytes(tmp_path / "out") == reference


@pytest.mark.slow
def test_parts_in_any_order_then_merge_give_the_same_bytes(tmp_path: Path, source: Path, reference) -> None:
    out = tmp_path / "out"
    planned = run_shards("plan", source, out, *OPTIONS)
    assert planned.returncode == 0, planned.stderr
    assert "16 shard(s)" in planned.stdout  # ceil(96 / 8) train + ceil(24 / 8) val... as listed below
    early = run_shards("merge", out)
    assert early.returncode == 2 and "no part is finished" in early.stderr
    for part in ("3/4", "1/4"):
        result = run_shards("build", out, "--part", part, "--workers", "1")
        assert result.returncode == 0, result.stderr
    missing = run_shards("merge", out)
    assert missing.returncode == 2
    assert "parts 2, 4 of 4 are not finished" in missing.stderr and len(missing.stderr.splitlines()) == 1
    assert not (out / "manifest.json").exists()
    for part in ("4/4", "2/4", "2/4"):  # a part made twice: the second run has nothing to do
        assert run_shards("build", out, "--part", part).returncode == 0
    merged = run_shards("merge", out)
    assert merged.returncode == 0, merged.stderr
    assert folder_bytes(out) == reference  # .plan and .build gone too


@pytest.mark.slow
def test_a_part_killed_then_rerun_makes_only_the_rest(tmp_path: Path, source: Path, reference) -> None:
    out = tmp_path / "out"
    assert run_shards("plan", source, out, *OPTIONS).returncode == 0
    environment = {**os.environ, "KILL_AFTER_SAMPLES": "45"}  # mid-shard, 5 shards in
    command = [*KILLED_BUILD, "build", str(out), "--part", "1/2", "--workers", "1"]
    with started(command, env=environment, start_new_session=True) as process:
        assert process.wait(timeout=120) == -signal.SIGKILL
    made_before = {path.name: path.stat().st_ino for path in out.glob("*.tar")}
    assert 4 <= len(made_before) < 8
    rerun = run_shards("build", out, "--part", "1/2", "--workers", "1")
    assert rerun.returncode == 0 and "resuming" in rerun.stderr, rerun.stderr
    assert {name: (out / name).stat().st_ino for name in made_before} == made_before  # not made again
    assert run_shards("build", out, "--part", "2/2").returncode == 0
    assert run_shards("merge", out).returncode == 0
    assert folder_bytes(out) == reference


@pytest.mark.slow
def test_part_mistakes_are_one_line(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "out"
    no_plan = run_shards("build", out, "--part", "1/2")
    assert no_plan.returncode == 2 and "run `shards plan SRC OUT` first" in no_plan.stderr
    assert run_shards("plan", source, out, *OPTIONS).returncode == 0
    for args, said in [
        (["--part", "1/2", "--size", "32"], "give --size to `shards plan`"),
        (["--part", "3/2"], "is not K/N with 1 <= K <= N"),
        (["--part", "0/2"], "is not K/N"),
        ([out, "--part", "1/2"], "takes OUT alone"),
    ]:
        result = run_shards("build", out, *args)
        assert result.returncode == 2 and said in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    bytes_cap = run_shards("plan", source, tmp_path / "other", "--shard-bytes", "1MB")
    assert bytes_cap.returncode == 2 and "only a local build" in bytes_cap.stderr


@pytest.mark.slow
def test_no_ray_or_no_cluster_is_one_line(tmp_path: Path, source: Path) -> None:
    without_ray = "import sys; sys.modules['ray'] = None; from shards.cli import main; sys.exit(main(sys.argv[1:]))"
    result = run_process(
        [sys.executable, "-c", without_ray, "build", source, tmp_path / "a", "--executor", "ray"], timeout=60
    )
    assert result.returncode == 2 and "pip install 'vaegan-pipeline[ray]'" in result.stderr, result.stderr
    nobody = run_shards("build", source, tmp_path / "b", "--executor", "ray", "--ray-address", "127.0.0.1:1")
    assert nobody.returncode == 2 and "nothing answers at --ray-address 127.0.0.1:1" in nobody.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_an_address_where_something_else_listens_is_one_line_at_once(tmp_path: Path, source: Path) -> None:
    """An HTTP server where the Ray head should be passes a TCP check; ray.init then retried for minutes.
    The gRPC handshake tells them apart within CONNECT_SECONDS."""
    with FaultyProxy(1, lambda *request: "503") as web:  # any HTTP server: this one answers 503 to all
        began = time.monotonic()
        result = run_shards(
            "build", source, tmp_path / "c", "--executor", "ray", "--ray-address", f"127.0.0.1:{web.port}"
        )
        took = time.monotonic() - began
    assert result.returncode == 2, result.stderr
    assert "is not a Ray head" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert took < 60 and not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def moto():
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="module")
def ray_cluster(moto):
    """A head and a worker node (one CPU each) on 127.0.0.1 for the Ray tests; shut down after them,
    every process it started killed even if a test failed (conftest.started). Its nodes reach moto's S3
    the way a real cluster's nodes reach a store: with the store's own variables in their environment."""
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as temp:
        # RAY_TMPDIR: Ray writes the newest cluster's address into RAY_TMPDIR/ray/ (default /tmp/ray/), a
        # folder it does not make and a fresh machine lacks; here it goes into this cluster's own folder
        Path(temp, "ray").mkdir()
        for name, value in {**RAY_ON_LOOPBACK, **moto.environment(), "RAY_TMPDIR": temp}.items():
            patch.setenv(name, value)
        command = [sys.executable, str(REPO / "tests" / "helpers" / "ray_cluster.py"), temp]
        with started(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as cluster:
            line = cluster.stdout.readline()
            assert line.startswith("address "), "the test cluster did not start"
            cluster.address = line.split()[1]
            yield cluster
            cluster.communicate(timeout=60)  # closes its input: the helper shuts the cluster down


def ray_build(source: Path, out: Path | str, cluster, *extra: str) -> list[str]:
    return ["build", str(source), str(out), *OPTIONS, "--executor", "ray", "--ray-address", cluster.address, *extra]


@pytest.mark.slow
def test_ray_gives_the_same_bytes(tmp_path: Path, source: Path, reference, ray_cluster) -> None:
    result = run_shards(*ray_build(source, tmp_path / "out", ray_cluster))
    assert result.returncode == 0, result.stderr
    assert folder_bytes(tmp_path / "out") == reference


@pytest.mark.slow
def test_ray_builds_into_s3(tmp_path: Path, source: Path, reference, ray_cluster, moto) -> None:
    """Tasks upload their shards themselves, from the node they ran on; the driver uploads the manifest."""
    make_bucket(moto, "ray")
    result = run_shards(*ray_build(source, "s3://ray/shards", ray_cluster))  # moto's variables: set by ray_cluster
    assert result.returncode == 0, result.stderr
    assert bucket_bytes(moto, "ray/shards") == reference


@pytest.mark.slow
def test_ray_driver_killed_then_rerun_makes_only_the_rest(tmp_path: Path, source: Path, reference, ray_cluster):
    out = tmp_path / "out"
    environment = {**os.environ, "KILL_AFTER_RECORDS": "6"}
    command = [*KILLED_BUILD, *ray_build(source, out, ray_cluster)]
    with started(command, env=environment, start_new_session=True) as driver:
        assert driver.wait(timeout=120) == -signal.SIGKILL
    journal = (out / ".build" / "journal.jsonl").read_text().splitlines()
    made_before = {record["name"]: (out / record["name"]).stat().st_ino for record in map(json.loads, journal[1:])}
    assert len(made_before) == 6 and not (out / "manifest.json").exists()
    rerun = run_shards(*ray_build(source, out, ray_cluster))
    assert rerun.returncode == 0 and "resuming" in rerun.stderr, rerun.stderr
    assert {name: (out / name).stat().st_ino for name in made_before} == made_before
    assert folder_bytes(out) == reference


@pytest.mark.slow
def test_ray_worker_node_lost_mid_build(tmp_path: Path, ray_cluster) -> None:
    """Runs last of the Ray tests: it leaves the cluster with its head alone."""
    distinct = write_images(tmp_path / "distinct", 12, size=(384, 288))
    source = tmp_path / "src" / "photos"
    source.mkdir(parents=True)
    for index in range(600):  # hard links: many inputs, little disk
        os.link(distinct[index % len(distinct)], source / f"photo-{index:04d}.png")
    local = run_shards("build", source.parent, tmp_path / "local", *OPTIONS)
    assert local.returncode == 0, local.stderr
    planned_shards = len(list((tmp_path / "local").glob("*.tar")))

    out = tmp_path / "out"
    journal = out / ".build" / "journal.jsonl"
    with started(
        [sys.executable, "-m", "shards", *ray_build(source.parent, out, ray_cluster)], stderr=subprocess.PIPE, text=True
    ) as driver:
        deadline = time.monotonic() + 120
        while not (journal.exists() and len(journal.read_text().splitlines()) > 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        ray_cluster.stdin.write("remove-worker\n")
        ray_cluster.stdin.flush()
        assert ray_cluster.stdout.readline().strip() == "removed"
        made_when_lost = len(journal.read_text().splitlines()) - 1
        _, stderr = driver.communicate(timeout=300)
        assert driver.returncode == 0, stderr
    assert 2 <= made_when_lost < planned_shards - 10  # the node was lost with most of the build to go
    assert folder_bytes(out) == folder_bytes(tmp_path / "local")


@pytest.mark.slow
def test_the_slurm_array_script_plans_makes_every_part_and_merges(tmp_path: Path, source: Path, reference):
    """launch/shards-array.sbatch run as SLURM runs a batch script, with `sbatch` standing in
    (tests/helpers/fake_sbatch.py): the array's parts run last first, the merge after them all."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f'#!/bin/sh\nexec {sys.executable} {REPO / "tests" / "helpers" / "fake_sbatch.py"} "$@"\n')
    sbatch.chmod(0o755)
    out = tmp_path / "an out folder"  # a space: the script must quote it
    log = tmp_path / "jobs.jsonl"
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PARTS": "3",
        "PART_CPUS": "1",
        "FAKE_SBATCH_LOG": str(log),
    }
    script = REPO / "launch" / "shards-array.sbatch"
    result = run_process(["bash", str(script), str(source), str(out), *OPTIONS], timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    array, merge = [json.loads(line) for line in log.read_text().splitlines()]
    assert array["array"] == "1-3%3" and array["ran"] == 3 and array["succeeded"]
    assert merge["dependency"] == f"afterok:{array['id']}" and merge["succeeded"]
    assert folder_bytes(out) == reference


def test_external_sort_orders_more_rows_than_a_run_holds(tmp_path: Path, monkeypatch) -> None:
    import random

    from shards.build import external_sort

    monkeypatch.setattr(external_sort, "RUN_ROWS", 7)
    monkeypatch.setattr(external_sort, "FAN_IN", 3)
    generator = random.Random(5)
    rows = [[f"{generator.getrandbits(64):016x}", f"name {i}", "cat" if i % 3 else None] for i in range(200)]
    rows += [[rows[0][0], "a tie, broken by the rest", None]]
    sorter = external_sort.ExternalSort(tmp_path, "rows")
    for row in rows:
        sorter.add(row)
    assert list(sorter) == sorted(rows, key=lambda row: (row[0], row[1]))
    assert len(sorter.runs) <= 3  # merged down to the fan-in before the last merge


@pytest.mark.slow
def test_a_plan_sorted_in_many_runs_gives_the_same_bytes(tmp_path: Path, source: Path, reference, monkeypatch):
    from shards.build import external_sort
    from shards.build.options import build_options
    from shards.build.plan import write_plan
    from shards.cli import build_parser

    monkeypatch.setattr(external_sort, "RUN_ROWS", 5)
    out = tmp_path / "out"
    write_plan(source, out, build_options(build_parser().parse_args(["plan", str(source), str(out), *OPTIONS])))
    assert run_shards("build", out, "--part", "1/1").returncode == 0
    assert run_shards("merge", out).returncode == 0
    assert folder_bytes(out) == reference


@pytest.mark.slow
@pytest.mark.parametrize("fifo", ["plan.json", "inputs-train.jsonl.gz"])
def test_a_fifo_in_place_of_a_plan_file_is_refused_never_waited_on(tmp_path: Path, source: Path, fifo: str) -> None:
    import os

    out = tmp_path / "out"
    assert run_shards("plan", source, out, *OPTIONS).returncode == 0
    (out / ".plan" / fifo).unlink()
    os.mkfifo(out / ".plan" / fifo)
    for command in (["build", out, "--part", "1/2"], ["merge", out]):
        result = run_shards(*command, timeout=60)  # a wait would end in a timeout
        if command[0] == "merge" and fifo != "plan.json":
            continue  # merge reads the plan, not its inputs
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert (
            result.stderr.strip()
            == f"shards {command[0]}: error: {out / '.plan' / fifo}: cannot read it (not a regular file)"
        )


def built_parts(tmp_path: Path, source: Path) -> Path:
    """A plan of `source` with both of its 2 parts made, not yet merged."""
    out = tmp_path / "out"
    assert run_shards("plan", source, out, *OPTIONS).returncode == 0
    for part in ("1/2", "2/2"):
        assert run_shards("build", out, "--part", part, "--workers", "0").returncode == 0
    return out


def refused_merge(out: Path) -> str:
    """merge refused in one line, nothing published or deleted: the plan and every shard stay."""
    shards_before = sorted(path.name for path in out.glob("*.tar"))
    result = run_shards("merge", out)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (out / "manifest.json").exists() and (out / ".plan" / "plan.json").is_file()
    assert sorted(path.name for path in out.glob("*.tar")) == shards_before
    return result.stderr.strip()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "overwritten", "cut short"])
def test_merge_checks_each_recorded_shard_against_the_bytes(tmp_path: Path, source: Path, damage: str) -> None:
    """A shard deleted, overwritten by another one's bytes, or cut short after its part recorded it: merge
    says which, in one line, and publishes nothing; put right, the merge gives the reference bytes."""
    out = built_parts(tmp_path, source)
    victim, other = out / "train-000001.tar", out / "train-000002.tar"
    kept = victim.read_bytes()
    if damage == "deleted":
        victim.unlink()
    elif damage == "overwritten":
        victim.write_bytes(other.read_bytes())
    else:
        victim.write_bytes(kept[: len(kept) // 2])
    line = refused_merge(out)
    expected = {"deleted": "is missing", "overwritten": "sha256", "cut short": "bytes, its part recorded"}[damage]
    assert f"{victim} " in line and expected in line, line
    victim.write_bytes(kept)
    assert run_shards("merge", out).returncode == 0
    assert run_shards("verify", out).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("forged", "expected"),
    [
        ("name", "the plan numbers that shard train-"),
        ("truncated", "not a valid parts record: not JSON"),
        ("not utf-8", "not UTF-8"),
        ("wrong type", "not a valid parts record"),
        ("not planned", "not a shard of the plan"),
    ],
)
def test_merge_refuses_a_forged_or_damaged_record_before_writing_or_deleting(
    tmp_path: Path, source: Path, forged: str, expected: str
) -> None:
    out = built_parts(tmp_path, source)
    record_file = out / ".plan" / "parts" / "1-of-2.jsonl"
    lines = record_file.read_bytes().splitlines()
    first = json.loads(lines[0])
    if forged == "name":
        first["name"] = "../../etc/passwd"
    elif forged == "wrong type":
        first["next"] = str(first["next"])
    elif forged == "not planned":
        first["next"] += 1
    changed = json.dumps(first).encode()
    if forged == "truncated":
        changed = lines[0][: len(lines[0]) // 2]
    elif forged == "not utf-8":
        changed = lines[0] + b"\xff"
    record_file.write_bytes(b"\n".join([changed, *lines[1:]]) + b"\n")
    line = refused_merge(out)
    assert str(record_file) in line and expected in line, line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("options", "size", 99999), "options.size"),  # a part would allocate ~10 GB
        (("options", "shard_size", 0), "options.shard_size"),
        (("options", "format", "exe"), "options.format"),
        (("counts", "train", "96"), "counts.train"),
        (("root", None, None), "root"),
        (("source", None, None), "source"),
        (("counts", "train", 10**9), "shards planned, more than 10,000,000"),
        (("counts", "train", 10**5), "does not hold the inputs the plan's counts say"),
        (("counts", "train", 1), "does not hold the inputs the plan's counts say"),
    ],
)
def test_an_edited_plan_is_one_line_for_every_part_and_merge(tmp_path: Path, source: Path, edit, expected) -> None:
    """plan.json's fields are checked as `shards plan` writes them, its options by the command line's own
    validators, and its counts against the inputs a part reads: an edited plan is one line, never a
    traceback, a part that allocates without bound, or parts that exit 0 and leave merge waiting."""
    out = tmp_path / "out"
    assert run_shards("plan", source, out, *OPTIONS).returncode == 0
    plan_file = out / ".plan" / "plan.json"
    header = json.loads(plan_file.read_text())
    key, field, value = edit
    if field is None:
        header[key] = None if key == "root" else {}
    else:
        header[key][field] = value
    plan_file.write_text(json.dumps(header))
    results = [run_shards("build", out, "--part", f"{part}/2", timeout=60) for part in (1, 2)]
    if "counts say" not in expected:
        results.append(run_shards("merge", out, timeout=60))
    refused = [result for result in results if result.returncode != 0]
    assert refused, [result.stdout for result in results]
    for result in refused:
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


@pytest.mark.slow
def test_a_plain_build_never_mixes_with_a_plan_it_did_not_make(tmp_path: Path, source: Path) -> None:
    """`shards build SRC OUT` into a folder holding an unfinished plan is refused (a part would later finish
    it over shards of other options); --overwrite drops the plan, and a part then finds none."""
    out = tmp_path / "out"
    assert run_shards("plan", source, out, *OPTIONS).returncode == 0
    other = ["--size", "8", "--shard-size", "5"]
    refused = run_shards("build", source, out, *other)
    assert refused.returncode == 2 and "holds a planned build in progress" in refused.stderr, refused.stderr
    assert not list(out.glob("*.tar")) and (out / ".plan" / "plan.json").is_file()
    assert run_shards("build", source, out, *other, "--overwrite").returncode == 0
    assert not (out / ".plan").exists()
    late_part = run_shards("build", out, "--part", "1/2")
    assert late_part.returncode == 2 and "has no plan" in late_part.stderr
    assert run_shards("verify", out).returncode == 0


@pytest.mark.slow
def test_merge_refuses_parts_whose_records_miss_a_planned_shard(tmp_path: Path, source: Path) -> None:
    """Both parts finished, but part 2's record lacks its last shard's line (a record cut by an editor or a
    copy, still valid line by line): the coverage check names part 2 and merge publishes nothing; without
    it, a manifest short of a shard would be published and that shard deleted as stale."""
    out = built_parts(tmp_path, source)
    record = out / ".plan" / "parts" / "2-of-2.jsonl"
    lines = record.read_text().splitlines()
    assert len(lines) > 1
    record.write_text("\n".join(lines[:-1]) + "\n")
    line = refused_merge(out)
    assert "parts 2 of 2 are not finished" in line, line
    record.write_text("\n".join(lines) + "\n")
    assert run_shards("merge", out).returncode == 0
