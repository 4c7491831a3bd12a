"""`shards plan`, `shards build OUT --part K/N` and `shards merge`: one build cut into parts that any
scheduler runs (a SLURM job array: launch/shards-array.sbatch), on any machines, in any order, at once.

`OUT/.plan/` holds what the parts share. `plan.json`: SRC, the options and what the manifest says of
SRC; `inputs-SPLIT.jsonl.gz`: the split's inputs in their shuffled order, a JSON line each (`[relpath,
label]`, and the path when it is not the plan's root + relpath), which fixes every planned shard's inputs
(shards/build/work.py). Part K of N makes its contiguous share of the planned shards, journals them under
`.build/part-K-of-N/` (resumable), and once all are made writes `.plan/parts/K-of-N.jsonl`, the records
`merge` reads. `merge` checks that those cover every planned shard and writes the manifest: the same
bytes as a one-machine build. On an object store, `.plan/` lies under OUT's prefix.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from shards.build.external_sort import ExternalSort
from shards.build.inputs import list_sources
from shards.build.journal import Journal
from shards.build.options import build_option_defaults, build_option_validators
from shards.build.plan_records import check_plan_header, check_recorded_shards, planned_names, read_records
from shards.build.publish import publisher_for
from shards.build.sources import Entry, Fingerprint, scan_local_sources
from shards.build.work import (
    WORK_DIR_NAME,
    BuildOptions,
    Segment,
    SourceSummary,
    build_manifest,
    check_plannable,
    exclusive,
    journal_header,
    make_work_dir,
    no_inputs,
    order_key,
    pending_segments,
    publish,
    shard_ranges,
    split_of,
    write_segments,
    writing_to,
)
from shards.errors import UserError
from shards.format.manifest import SPLITS
from shards.regular_files import open_regular, read_regular
from shards.store.failures import StoreNotFound
from shards.store.remote import RemoteFolder, is_remote

PLAN_DIR = ".plan"
PLAN_NAME = "plan.json"
PARTS_DIR = "parts"
PLAN_VERSION = 1
DONE_NAME = re.compile(r"(\d+)-of-(\d+)\.jsonl")


def inputs_name(split: str) -> str:
    return f"inputs-{split}.jsonl.gz"


class PlanStore:
    """OUT/.plan, in a folder or under a store's prefix."""

    def __init__(self, out: Path | str) -> None:
        self.location = f"{str(out).rstrip('/')}/{PLAN_DIR}"
        self.remote = RemoteFolder(self.location) if is_remote(out) else None
        self.folder = None if self.remote else Path(out) / PLAN_DIR

    def put(self, name: str, data: bytes | Path) -> None:
        """Whole or not at all: a reader never sees half a file."""
        if self.remote:
            if isinstance(data, Path):
                self.remote.upload(data, name)
            else:
                self.remote.write_bytes(name, data)
            return
        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(target.name + ".tmp")
        if isinstance(data, Path):
            shutil.copyfile(data, temp)
        else:
            temp.write_bytes(data)
        os.replace(temp, target)

    def get(self, name: str) -> bytes | None:
        if self.remote:
            try:
                return self.remote.read_bytes(name)
            except StoreNotFound:
                return None
        try:
            return read_regular(self.folder / name)
        except FileNotFoundError:
            return None
        except OSError as error:  # a FIFO in its place, say
            raise UserError(f"{self.folder / name}: cannot read it ({error.strerror or error})") from None

    def local_copy(self, name: str, scratch: Path) -> Path:
        if not self.remote:
            return self.folder / name
        path = scratch / name
        with open(path, "wb") as into:
            self.remote.download(name, self.remote.size(name), into)
        return path

    def size(self) -> int:
        """Bytes of the plan: plan.json and the inputs (asked where they lie, not downloaded)."""
        names = [PLAN_NAME, *map(inputs_name, SPLITS)]
        if self.remote:
            return sum(self.remote.size(name) for name in names)
        return sum((self.folder / name).stat().st_size for name in names)

    def names(self, folder: str) -> list[str]:
        if self.remote:
            return RemoteFolder(f"{self.location}/{folder}").names()
        where = self.folder / folder
        return sorted(path.name for path in where.iterdir()) if where.is_dir() else []

    def remove(self, folder: str = "") -> None:
        if self.remote:
            if not folder:
                self.remove(PARTS_DIR)  # a store has no folders to remove: every file goes by name
            for name in self.names(folder):
                self.remote.delete(f"{folder}/{name}" if folder else name)
        else:
            shutil.rmtree(self.folder / folder, ignore_errors=True)

    def header(self) -> dict | None:
        data = self.get(PLAN_NAME)
        if data is None:
            return None
        where = f"{self.location}/{PLAN_NAME}"
        try:
            header = json.loads(data)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deeply
            raise UserError(f"{where} is damaged: run `shards plan` again") from None
        if not isinstance(header, dict) or header.get("format_version") != PLAN_VERSION:
            raise UserError(f"{where} is not a plan this version reads: run `shards plan` again")
        nullable = {name for name, default in build_option_defaults().items() if default is None}
        return check_plan_header(header, where, build_option_validators(), nullable)


@dataclass(frozen=True)
class Plan:
    header: dict

    @property
    def options(self) -> BuildOptions:
        return BuildOptions.from_dict(self.header["options"])

    @property
    def counts(self) -> dict[str, int]:
        return self.header["counts"]

    @property
    def source(self) -> SourceSummary:
        source = self.header["source"]
        rejected = [tuple(item) for item in self.header["rejected"]]
        return SourceSummary(source["fingerprint"], source["images"], source["labels"], rejected)

    def part_ranges(self, part: int, parts: int) -> list[tuple[str, int, int]]:
        """Part K of N: the K-th of N near-equal runs of the planned shards, train's then val's."""
        planned = [
            (split, start, stop)
            for split in SPLITS
            for start, stop in shard_ranges(self.counts[split], self.options.shard_size)
        ]
        return planned[len(planned) * (part - 1) // parts : len(planned) * part // parts]


def write_plan(src: Path | str, out: Path | str, options: BuildOptions) -> tuple[Plan, int]:
    """List SRC once and write OUT/.plan; returns the plan and its size in bytes. The same plan again
    keeps the parts already made; a different one starts the build over. A local SRC is streamed: its
    inputs are ordered by an external sort, never all held in memory."""
    check_plannable(options)
    publisher = publisher_for(out)
    with tempfile.TemporaryDirectory(prefix="shards-plan-") as scratch:
        entries, rejected, fingerprint = _scan(src, options, publisher.local_out)
        splits = {split: ExternalSort(Path(scratch), split) for split in SPLITS}
        labels: set[str] = set()
        root = None
        for entry in entries:
            entry = entry.absolute()
            if root is None:
                root = entry.path[: -len(entry.relpath)] if entry.path.endswith(entry.relpath) else ""
            split = split_of(entry.key, options.val_fraction)
            row = [order_key(options.seed, split, entry.key), entry.relpath, entry.label]
            splits[split].add(row if entry.path == root + entry.relpath else [*row, entry.path])
            if entry.label is not None:
                labels.add(entry.label)
        counts = {split: splits[split].count for split in SPLITS}
        if root is None:
            raise no_inputs(src, rejected)
        header = {
            "format_version": PLAN_VERSION,
            "src": str(src) if is_remote(src) else os.path.abspath(src),
            "root": root,
            "options": options.as_dict(),
            "source": {"fingerprint": fingerprint(), "images": sum(counts.values()), "labels": sorted(labels) or None},
            "rejected": sorted(rejected),
            "counts": counts,
        }
        header = json.loads(json.dumps(header))  # as it reads back: tuples become lists
        store = PlanStore(out)
        plan = Plan(header)
        if store.header() == header:
            return plan, store.size()
        store.remove(PARTS_DIR)  # parts made for another plan
        publisher.finished_build(options, header["source"]["fingerprint"], overwrite=True)  # drops an old manifest
        for split in SPLITS:
            path = Path(scratch) / inputs_name(split)
            _write_inputs(path, splits[split])
            store.put(inputs_name(split), path)
    store.put(PLAN_NAME, json.dumps(header, indent=1).encode())  # last: a plan.json means its inputs are there
    return plan, store.size()


def _scan(src: Path | str, options: BuildOptions, out: Path) -> tuple[Iterator[Entry], list, Callable[[], str]]:
    """SRC's inputs as a stream, what was rejected, and (once the stream is read) SRC's fingerprint."""
    labels_from_folders = options.labels == "folder"
    if is_remote(src):  # an object store's listing comes whole from fsspec anyway
        listing = list_sources(src, labels_from_folders)
        return iter(listing.entries), listing.rejected, lambda: listing.fingerprint
    rejected: list[tuple[str, str]] = []
    fingerprint = Fingerprint()
    scan = scan_local_sources(Path(src), labels_from_folders, out, rejected)
    return map(fingerprint.add, scan), rejected, fingerprint.hexdigest


def _write_inputs(path: Path, rows: ExternalSort) -> None:
    """One JSON line per input in its split's order: [relpath, label] and, when it is not root + relpath,
    the path."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed:
        text = io.TextIOWrapper(packed, encoding="utf-8", errors="surrogateescape")
        for row in rows:
            text.write(json.dumps(row[1:], ensure_ascii=False) + "\n")
        text.flush()
        text.detach()


def read_inputs(path: Path, root: str, start: int, stop: int, total: int) -> list[Entry]:
    """Inputs [start, stop) of a split of `total`, read as a stream: a part holds only its own in memory.
    The file must hold what the plan's counts say: a part past its end, or one ending the split before
    the file does, is one line (an edited plan), never a part that makes nothing and exits 0."""
    entries = []
    try:
        raw = open_regular(path)
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror or error})") from None
    extra = False
    try:
        with raw, gzip.open(raw, "rt", encoding="utf-8", errors="surrogateescape") as lines:
            for number, line in enumerate(lines):
                if number >= stop:
                    extra = True
                    break
                if number >= start:
                    row = json.loads(line)
                    entries.append(Entry(row[0], row[2] if len(row) > 2 else root + row[0], row[1]))
    except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError) as error:  # gzip, JSON, a row's shape
        raise UserError(f"{path}: damaged ({type(error).__name__}): run `shards plan` again") from None
    if len(entries) != stop - start or (stop == total and extra):
        raise UserError(
            f"{path}: does not hold the inputs the plan's counts say (inputs {start}..{stop} of {total}): the plan "
            "was changed since `shards plan` wrote it; run `shards plan` again"
        )
    return entries


def refuse_or_drop_plan(out: Path | str, overwrite: bool) -> None:
    """A plain `shards build` never mixes with a plan it did not make: while OUT holds one it is refused,
    unless --overwrite, which drops the plan and its parts' records (parts run later then find none)."""
    store = PlanStore(out)
    if store.get(PLAN_NAME) is None:
        return
    if not overwrite:
        raise UserError(
            f"{out} holds a planned build in progress ({PLAN_DIR}/): finish it with `shards build OUT --part K/N` "
            "and `shards merge OUT`, or pass --overwrite to build over it (the plan is dropped)"
        )
    store.remove()


def read_plan(out: Path | str) -> tuple[PlanStore, Plan]:
    store = PlanStore(out)
    header = store.header()
    if header is None:
        raise UserError(f"{out} has no plan ({PLAN_DIR}/{PLAN_NAME}): run `shards plan SRC OUT` first")
    return store, Plan(header)


def build_part(out: Path | str, part: int, parts: int, workers: int) -> tuple[int, int]:
    """Make part `part` of `parts`; returns (shards planned in it, inputs in it). A part already made is
    not made again; one interrupted resumes from its journal when rerun where it ran (or on a shared OUT)."""
    store, plan = read_plan(out)
    options, counts = plan.options, plan.counts
    ranges = plan.part_ranges(part, parts)
    done_name = f"{PARTS_DIR}/{part}-of-{parts}.jsonl"
    inputs_in_part = sum(stop - start for _, start, stop in ranges)
    if store.get(done_name) is not None:
        return len(ranges), inputs_in_part
    publisher = publisher_for(out)
    work_dir = make_work_dir(publisher.local_out, f"{WORK_DIR_NAME}/part-{part}-of-{parts}")
    with exclusive(work_dir, f"part {part}/{parts} of {publisher.location}"):
        header = {**journal_header(options, plan.source.fingerprint), "part": [part, parts]}
        journal = Journal(work_dir, header)
        segments = pending_segments(counts, journal.records, options, ranges)
        with tempfile.TemporaryDirectory(prefix="shards-part-") as scratch:
            loaded = _load_segments(store, plan, segments, Path(scratch))
        label_index = {name: index for index, name in enumerate(plan.source.labels or [])}
        with writing_to(publisher.location):
            write_segments(
                segments, loaded.__getitem__, counts, label_index, options, workers, publisher, work_dir, journal
            )
        lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in journal.records)
        store.put(done_name, lines.encode())
        shutil.rmtree(work_dir)
    return len(ranges), inputs_in_part


def _load_segments(store: PlanStore, plan: Plan, segments: list[Segment], scratch: Path) -> dict[Segment, list[Entry]]:
    loaded: dict[Segment, list[Entry]] = {}
    for split in SPLITS:
        mine = [segment for segment in segments if segment.split == split]
        if not mine:
            continue
        path = store.local_copy(inputs_name(split), scratch)
        first, last = mine[0].start, mine[-1].stop
        entries = read_inputs(path, plan.header["root"], first, last, plan.counts[split])
        for segment in mine:
            loaded[segment] = entries[segment.start - first : segment.stop - first]
    return loaded


def merge(out: Path | str) -> dict:
    """Check that the parts cover every planned shard, then write the manifest and drop the plan."""
    store, plan = read_plan(out)
    records, sizes = [], set()
    planned = planned_names(plan.part_ranges(1, 1), plan.options.shard_size)
    for name in store.names(PARTS_DIR):
        match = DONE_NAME.fullmatch(name)
        if match:
            sizes.add(int(match[2]))
            data = store.get(f"{PARTS_DIR}/{name}") or b""
            records += read_records(data, f"{store.location}/{PARTS_DIR}/{name}", planned)
    missing = _missing_parts(plan, records, sizes)
    if missing:
        raise UserError(missing)
    check_recorded_shards(out, records)  # before the manifest is published and the plan deleted
    manifest = build_manifest(plan.source, records, plan.options)
    publisher = publisher_for(out)
    publish(manifest, publisher, plan.header["src"])
    store.remove()
    if not is_remote(out):
        shutil.rmtree(Path(out) / WORK_DIR_NAME, ignore_errors=True)
    return manifest


def _missing_parts(plan: Plan, records: list[dict], sizes: set[int]) -> str | None:
    """None when every planned shard has its record; else the line that says which parts to run."""
    made = {(record["split"], record["next"]) for record in records}
    if all((split, stop) in made for split, _, stop in plan.part_ranges(1, 1)):
        return None
    if not sizes:
        return "no part is finished yet: run `shards build OUT --part K/N` for K = 1..N first"
    parts = max(sizes)
    missing = [
        str(part)
        for part in range(1, parts + 1)
        if any((split, stop) not in made for split, _, stop in plan.part_ranges(part, parts))
    ]
    return f"parts {', '.join(missing)} of {parts} are not finished: run `shards build OUT --part K/{parts}` for each"
