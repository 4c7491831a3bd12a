"""`shards build`: list SRC, split and order the images, transform them in parallel, write shards.

Order of work: the images of a split are shuffled by `seed` and streamed, in that order, through
worker processes; this process writes them into shards of `shard_size` samples (or `shard_bytes`).
Each finished shard is renamed into place and recorded in the journal, so an interrupted build
resumes after its last recorded shard and ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards import __version__
from shards.errors import UserError
from shards.imageops import ImageSpec, prepare_chunk
from shards.journal import Journal
from shards.manifest import FORMAT_VERSION, SPLITS, shard_name
from shards.parallel import chunked, ordered_map
from shards.progress import progress_bar
from shards.publish import Publisher, publisher_for
from shards.shard_writer import ShardWriter
from shards.sources import Entry, Listing, list_sources

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


def split_of(key: str, val_fraction: float) -> str:
    """Deterministic by the key alone, so a sample keeps its split whatever the seed or the set."""
    return "val" if int(key[:12], 16) < val_fraction * 16**12 else "train"


def plan_splits(entries: Sequence[Entry], val_fraction: float, seed: int) -> dict[str, list[Entry]]:
    splits: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    for entry in entries:  # entries arrive sorted by relpath, so the shuffle below is reproducible
        splits[split_of(entry.key, val_fraction)].append(entry)
    for split, members in splits.items():
        random.Random(f"{seed}:{split}").shuffle(members)
    return splits


class SplitWriter:
    """Cuts one split's stream of samples into shards and journals each finished one."""

    def __init__(
        self,
        split: str,
        out: Path,
        work_dir: Path,
        journal: Journal,
        options: BuildOptions,
        publisher: Publisher,
    ):
        self.split, self.out, self.work_dir = split, out, work_dir
        self.journal, self.options, self.publisher = journal, options, publisher
        done = journal.split_records(split)
        self.finished = bool(done) and done[-1].get("end", False)
        self.position = done[-1]["next"] if done else 0
        self.next_index = sum(1 for record in done if "name" in record)
        self.shard: ShardWriter | None = None
        self.skipped: list[dict] = []

    def consume(self, result: tuple) -> None:
        kind, key_or_path, payload = result
        if kind == "skip":
            self.skipped.append({"path": key_or_path, "reason": payload})
        else:
            limit = self.options.shard_bytes
            if self.shard and limit and self.shard.tar_bytes_with(payload.values()) > limit:
                self._close()
            if self.shard is None:
                name = shard_name(self.split, self.next_index)
                self.shard = ShardWriter(self.out / name, self.work_dir)
                self.next_index += 1
            self.shard.add(key_or_path, payload)
        self.position += 1
        if self.shard and self.shard.count == self.options.shard_size:
            self._close()

    def _close(self) -> None:
        assert self.shard is not None
        record = self.shard.finish()
        # journalled once published: a crash in between redoes the shard (byte-identical), never skips one
        # that a remote OUT lacks
        entry = {"split": self.split, "next": self.position, "skipped": self.skipped, **record}
        self.publisher.publish_shard(self.shard.final_path, lambda: self.journal.append(entry))
        self.shard, self.skipped = None, []

    def abort(self) -> None:
        if self.shard:
            self.shard.abort()
            self.shard = None

    def end(self) -> None:
        if self.shard:
            self._close()
        entry = {"split": self.split, "end": True, "next": self.position, "skipped": self.skipped}
        self.publisher.after_published(lambda: self.journal.append(entry))
        self.finished = True


def build(src: Path, out: Path | str, options: BuildOptions, workers: int, overwrite: bool = False) -> dict:
    """Build (or finish building) OUT from SRC; returns the manifest. OUT may be a remote folder
    (s3://, gs://, http(s)://, shards/publish.py): the shards are made in a local staging folder and
    uploaded as each is finished, the manifest last."""
    publisher = publisher_for(out)
    listing = list_sources(src, labels_from_folders=options.labels == "folder", exclude=publisher.local_out)
    if not listing.entries:
        raise UserError(f"no image files found in {src} ({len(listing.rejected)} other files skipped)")
    out = publisher.local_out
    work_dir = _make_work_dir(out)
    with _exclusive(work_dir, publisher.location):
        existing = publisher.finished_build(options, listing.fingerprint, overwrite)
        if existing is not None:
            shutil.rmtree(work_dir)
            publisher.done()
            return existing
        try:
            manifest = _write_shards(out, work_dir, listing, options, workers, publisher)
        except OSError as error:
            if error.errno not in OUT_WRITE_ERRORS:
                raise
            raise UserError(f"cannot write to {out}: {error.strerror} (finished shards are kept)") from None
        if not any(manifest["splits"][split]["count"] for split in SPLITS):
            shutil.rmtree(work_dir)
            reasons = _top_reasons(manifest)
            raise UserError(f"no usable image in {src}: all {len(manifest['skipped'])} inputs were skipped ({reasons})")
        publisher.remove_stale_shards(manifest)
        publisher.publish_manifest(manifest)
        shutil.rmtree(work_dir)
        publisher.done()
    return manifest


def _write_shards(
    out: Path,
    work_dir: Path,
    listing: Listing,
    options: BuildOptions,
    workers: int,
    publisher: Publisher,
) -> dict:
    header = {"format_version": FORMAT_VERSION, "options": options.as_dict(), "sources": listing.fingerprint}
    journal = Journal(work_dir, header)
    label_index = {name: index for index, name in enumerate(listing.label_names or [])}
    plan = plan_splits(listing.entries, options.val_fraction, options.seed)
    writers = {split: SplitWriter(split, out, work_dir, journal, options, publisher) for split in SPLITS}
    remaining = sum(len(plan[split]) - writers[split].position for split in SPLITS if not writers[split].finished)
    resumed = " (resuming)" if journal.resumed else ""
    with progress_bar() as progress, publisher.uploading():
        task = progress.add_task(f"building{resumed}", total=remaining)
        for split in SPLITS:
            writer = writers[split]
            if writer.finished:
                continue
            todo = [(entry, label_index.get(entry.label)) for entry in plan[split][writer.position :]]
            try:
                for results in ordered_map(prepare_chunk, chunked(todo, CHUNK_SIZE), workers, options.image):
                    for result in results:
                        writer.consume(result)
                    progress.advance(task, len(results))
                writer.end()
            except BaseException:
                writer.abort()
                raise
    return _manifest(listing, journal, options)


def _make_work_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        work_dir = out / WORK_DIR_NAME
        work_dir.mkdir(exist_ok=True)
        probe = work_dir / "write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"OUT is not writable: {out}: {error.strerror or error}") from None
    return work_dir


@contextlib.contextmanager
def _exclusive(work_dir: Path, out: str) -> Iterator[None]:
    """One build per OUT at a time: two would share the journal and the temporary shard names."""
    with open(work_dir / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{out} is being built by another process; wait for it or choose another OUT") from None
        yield


def _manifest(listing: Listing, journal: Journal, options: BuildOptions) -> dict:
    skipped = [{"path": path, "reason": reason} for path, reason in listing.rejected]
    splits = {}
    for split in SPLITS:
        shards = []
        for record in journal.split_records(split):
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
        "labels": listing.label_names,
        "splits": splits,
        "skipped": sorted(skipped, key=lambda item: (item["path"], item["reason"])),
        "source": {"fingerprint": listing.fingerprint, "images": len(listing.entries)},
    }


def _top_reasons(manifest: dict) -> str:
    counts: dict[str, int] = {}
    for item in manifest["skipped"]:
        counts[item["reason"]] = counts.get(item["reason"], 0) + 1
    top = sorted(counts.items(), key=lambda pair: -pair[1])[:3]
    return ", ".join(f"{count} {reason}" for reason, count in top)
