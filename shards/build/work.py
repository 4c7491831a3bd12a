"""`shards build`: list SRC, split and order the images, transform them in parallel, write shards.

Order of work: the images of a split are shuffled by `seed`, and shard k of a split is planned to hold
inputs [k x shard_size, (k+1) x shard_size) of that order, before any image is read. The inputs stream
through local worker processes (or run as one task per shard on Ray, shards/build/ray_executor.py, or as
parts of a planned build, shards/build/plan.py); each finished shard is renamed into place and recorded in
the journal, so an interrupted build makes only what is missing, and every way of building gives
byte-identical shards and manifest.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards import __version__
from shards.build.imageops import ImageSpec, prepare_chunk
from shards.build.journal import Journal
from shards.build.parallel import chunked, ordered_map
from shards.build.publish import Publisher, publisher_for
from shards.build.sources import Entry, Listing
from shards.errors import UserError
from shards.format.manifest import FORMAT_VERSION, SPLITS, shard_name
from shards.format.shard_writer import ShardWriter
from shards.progress import progress_bar

WORK_DIR_NAME = ".build"
# writing errors that are the user's to fix (disk full, quota, read-only, permissions)
OUT_WRITE_ERRORS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)
CHUNK_SIZE = 16  # images per task sent to a worker: amortises inter-process overhead


@dataclass(frozen=True)
class BuildOptions:
    image: ImageSpec = field(default_factory=ImageSpec)
    shard_size: int = 1000
    shard_bytes: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    labels: str = "none"  # "none" | "folder" (a list file's label column is always read)

    def as_dict(self) -> dict:
        options = asdict(self)
        options.update(options.pop("image"))
        return options

    @classmethod
    def from_dict(cls, options: dict) -> BuildOptions:
        """The inverse of as_dict (a plan's options, read back)."""
        image_fields = ImageSpec.__dataclass_fields__
        image = ImageSpec(**{key: value for key, value in options.items() if key in image_fields})
        return cls(image=image, **{key: value for key, value in options.items() if key not in image_fields})


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic by the key alone, so a sample keeps its split whatever the seed or the set."""
    return "val" if int(key[:12], 16) < val_fraction * 16**12 else "train"


def order_key(seed: int, split: str, key: str) -> str:
    """A sample's place in its split's shuffled order: a keyed hash, so the order is the same however the
    inputs were listed, and a plan can sort more of them than memory holds (shards/build/plan.py)."""
    return hashlib.blake2b(f"{seed}:{split}:{key}".encode(), digest_size=8).hexdigest()


def plan_splits(entries: Sequence[Entry], val_fraction: float, seed: int) -> dict[str, list[Entry]]:
    splits: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    for entry in entries:
        splits[split_of(entry.key, val_fraction)].append(entry)
    for split, members in splits.items():
        members.sort(key=lambda entry: (order_key(seed, split, entry.key), entry.relpath))
    return splits


def shard_ranges(total: int, shard_size: int) -> list[tuple[int, int]]:
    """The planned shards of a split: inputs [start, stop) of its shuffled order. Fixed before any image
    is read, so that any executor, and any part of a build, makes the same shard from the same inputs;
    a shard whose inputs were all skipped is not written (its number is left out)."""
    return [(start, min(start + shard_size, total)) for start in range(0, total, shard_size)]


@dataclass(frozen=True)
class Segment:
    """A run of consecutive planned shards to make: inputs [start, stop) of one split."""

    split: str
    start: int
    stop: int


def pending_segments(
    counts: dict[str, int], records: list[dict], options: BuildOptions, ranges: list[tuple] | None = None
) -> list[Segment]:
    """What is left to make, given the journal's records. ranges: (split, start, stop) planned shards
    to consider (a part's); all of them by default. With --shard-bytes, shards are cut by size as they
    are made, so only a single, sequential build can make them: what is left is the split's rest."""
    segments: list[Segment] = []
    for split in SPLITS:
        done = {record["next"] for record in records if record["split"] == split}
        if options.shard_bytes is not None:
            position = max(done, default=0)
            if position < counts[split]:
                segments.append(Segment(split, position, counts[split]))
            continue
        planned = shard_ranges(counts[split], options.shard_size)
        if ranges is not None:
            planned = [(start, stop) for (of, start, stop) in ranges if of == split]
        for start, stop in planned:
            if stop in done:
                continue
            if segments and segments[-1].split == split and segments[-1].stop == start:
                segments[-1] = Segment(split, segments[-1].start, stop)
            else:
                segments.append(Segment(split, start, stop))
    return segments


class SplitWriter:
    """Cuts one split's stream of samples into shards and journals each finished one.

    Every record says where the inputs it covers end ("next"), the inputs skipped among them and, unless
    all were, the shard made of the rest. Planned shards (the default) end at every multiple of
    shard_size; with shard_bytes, at shard_size samples or the byte cap, numbered in order."""

    def __init__(
        self,
        split: str,
        total: int,
        out: Path,
        work_dir: Path,
        journal: Journal | list[dict],
        options: BuildOptions,
        publisher: Publisher,
        first_index: int = 0,
    ):
        """journal: where finished shards are recorded (anything with append); first_index: the number
        of the next shard with --shard-bytes, which numbers shards in order (planned shards are numbered
        by their inputs)."""
        self.split, self.total, self.out, self.work_dir = split, total, out, work_dir
        self.journal, self.options, self.publisher = journal, options, publisher
        self.planned = options.shard_bytes is None
        self.position = 0
        self.next_index = first_index
        self.shard: ShardWriter | None = None
        self.skipped: list[dict] = []

    def start_at(self, position: int) -> None:
        assert self.shard is None and not self.skipped, "a segment starts where a shard ended"
        self.position = position

    def consume(self, result: tuple) -> None:
        kind, key_or_path, payload = result
        if kind == "skip":
            self.skipped.append({"path": key_or_path, "reason": payload})
        else:
            limit = self.options.shard_bytes
            if self.shard and limit and self.shard.tar_bytes_with(payload.values()) > limit:
                self._close()
            if self.shard is None:
                self.shard = ShardWriter(self.out / shard_name(self.split, self._new_index()), self.work_dir)
            self.shard.add(key_or_path, payload)
        self.position += 1
        if self._shard_ends():
            self._close()

    def _new_index(self) -> int:
        if self.planned:
            return self.position // self.options.shard_size
        self.next_index += 1
        return self.next_index - 1

    def _shard_ends(self) -> bool:
        if self.position == self.total:
            return True
        if self.planned:
            return self.position % self.options.shard_size == 0
        return self.shard is not None and self.shard.count == self.options.shard_size

    def _close(self) -> None:
        # journalled once published: a crash in between redoes the shard (byte-identical), never skips one
        # that a remote OUT lacks
        entry = {"split": self.split, "next": self.position, "skipped": self.skipped}
        if self.shard is None:
            self.publisher.after_published(lambda: self.journal.append(entry))
        else:
            entry.update(self.shard.finish())
            self.publisher.publish_shard(self.shard.final_path, lambda: self.journal.append(entry))
        self.shard, self.skipped = None, []

    def abort(self) -> None:
        if self.shard:
            self.shard.abort()
            self.shard = None


@dataclass(frozen=True)
class SourceSummary:
    """What the manifest says of SRC: all a build needs of the listing once the inputs are planned."""

    fingerprint: str
    images: int
    labels: list[str] | None
    rejected: list[tuple[str, str]]

    @classmethod
    def of(cls, listing: Listing) -> SourceSummary:
        return cls(listing.fingerprint, len(listing.entries), listing.label_names, listing.rejected)


def journal_header(options: BuildOptions, fingerprint: str) -> dict:
    return {"format_version": FORMAT_VERSION, "options": options.as_dict(), "sources": fingerprint, "layout": 2}


def check_plannable(options: BuildOptions) -> None:
    """Ray and parts make planned shards; --shard-bytes cuts shards by what they turn out to hold."""
    if options.shard_bytes is not None:
        raise UserError("--shard-bytes cuts shards as they are made, which only a local build can do; use --shard-size")


def no_inputs(src: Path | str, rejected: Sequence) -> UserError:
    return UserError(f"no image files found in {src} ({len(rejected)} other files skipped)")


def publish(manifest: dict, publisher: Publisher, src: Path | str) -> None:
    """The build's last step: the manifest, once every shard it names is in OUT."""
    if not any(manifest["splits"][split]["count"] for split in SPLITS):
        reasons = _top_reasons(manifest)
        raise UserError(f"no usable image in {src}: all {len(manifest['skipped'])} inputs were skipped ({reasons})")
    publisher.remove_stale_shards(manifest)
    publisher.publish_manifest(manifest)


@contextlib.contextmanager
def writing_to(location: str) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno not in OUT_WRITE_ERRORS:
            raise
        raise UserError(f"cannot write to {location}: {error.strerror} (finished shards are kept)") from None


def write_segments(
    segments: list[Segment],
    inputs: Callable[[Segment], Sequence[Entry]],
    totals: Mapping[str, int],
    label_index: dict[str, int],
    options: BuildOptions,
    workers: int,
    publisher: Publisher,
    work_dir: Path,
    journal: Journal,
) -> None:
    """Make the shards of `segments` in `workers` local processes: the inputs stream through them in
    chunks, in order, and this process cuts the results into shards."""
    out = publisher.local_out
    writers = {}
    for split in SPLITS:
        made = sum(1 for record in journal.records if record["split"] == split and "name" in record)
        writers[split] = SplitWriter(split, totals[split], out, work_dir, journal, options, publisher, made)
    starts: deque[tuple[SplitWriter, int | None]] = deque()  # per chunk sent: its writer, its segment's start

    def chunks() -> Iterator[list[tuple]]:
        for segment in segments:
            todo = [(entry, label_index.get(entry.label)) for entry in inputs(segment)]
            for number, chunk in enumerate(chunked(todo, CHUNK_SIZE)):
                starts.append((writers[segment.split], segment.start if number == 0 else None))
                yield chunk

    resumed = " (resuming)" if journal.resumed else ""
    with progress_bar() as progress, publisher.uploading():
        task = progress.add_task(f"building{resumed}", total=sum(segment.stop - segment.start for segment in segments))
        try:
            for results in ordered_map(prepare_chunk, chunks(), workers, options.image):
                writer, start = starts.popleft()
                if start is not None:
                    writer.start_at(start)
                for result in results:
                    writer.consume(result)
                progress.advance(task, len(results))
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise


def make_range(split: str, start: int, total: int, todo: list[tuple], options: BuildOptions, out: str) -> list[dict]:
    """One planned shard made end to end in this process, wherever it runs (a Ray task): its inputs read,
    transformed and written to OUT (a folder this machine sees, or a store). Returns its journal
    records. Each attempt writes under its own temporary folder, so a retried task cannot collide."""
    publisher = publisher_for(out)
    work_dir = publisher.local_out / WORK_DIR_NAME / "tasks" / uuid.uuid4().hex
    work_dir.mkdir(parents=True)
    records: list[dict] = []  # handed back to the driver, which journals them
    writer = SplitWriter(split, total, publisher.local_out, work_dir, records, options, publisher)
    writer.start_at(start)
    try:
        with publisher.uploading():
            for result in prepare_chunk(todo, options.image):
                writer.consume(result)
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return records


def make_work_dir(out: Path, name: str = WORK_DIR_NAME) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        work_dir = out / name
        work_dir.mkdir(parents=True, exist_ok=True)
        probe = work_dir / "write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"OUT is not writable: {out}: {error.strerror or error}") from None
    return work_dir


@contextlib.contextmanager
def exclusive(work_dir: Path, out: str) -> Iterator[None]:
    """One build per OUT at a time: two would share the journal and the temporary shard names."""
    with open(work_dir / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out} is being built by another process; wait for it or choose another OUT") from None
        yield


def build_manifest(source: SourceSummary, records: list[dict], options: BuildOptions) -> dict:
    """The manifest from the journal's records, in whatever order they were made: the same inputs and
    options give the same bytes, whichever executor made the shards."""
    skipped = [{"path": path, "reason": reason} for path, reason in source.rejected]
    splits = {}
    for split in SPLITS:
        in_order = {record["next"]: record for record in records if record["split"] == split}
        shards = []
        for _, record in sorted(in_order.items()):
            skipped += record["skipped"]
            if "name" in record:
                shards.append({key: record[key] for key in ("name", "count", "bytes", "sha256")})
        splits[split] = {"count": sum(shard["count"] for shard in shards), "shards": shards}
    spec = options.image
    return {
        "format_version": FORMAT_VERSION,
        "created_by": f"shards {__version__}",
        "image": {"size": spec.size, "format": spec.format, "mode": spec.mode, "channels": len(spec.mode)},
        "options": options.as_dict(),
        "labels": source.labels,
        "splits": splits,
        "skipped": sorted(skipped, key=lambda item: (item["path"], item["reason"])),
        "source": {"fingerprint": source.fingerprint, "images": source.images},
    }


def _top_reasons(manifest: dict) -> str:
    counts: dict[str, int] = {}
    for item in manifest["skipped"]:
        counts[item["reason"]] = counts.get(item["reason"], 0) + 1
    top = sorted(counts.items(), key=lambda pair: -pair[1])[:3]
    return ", ".join(f"{count} {reason}" for reason, count in top)
