"""`shards build` on one machine or a Ray cluster: list SRC, then make every pending shard (shards/build/work.py)
and publish the manifest last."""

from __future__ import annotations

import shutil
from pathlib import Path

from shards.build.inputs import list_sources
from shards.build.journal import Journal
from shards.build.publish import publisher_for
from shards.build.ray_executor import joined, make_on_ray
from shards.build.work import (
    BuildOptions,
    SourceSummary,
    build_manifest,
    check_plannable,
    exclusive,
    journal_header,
    make_work_dir,
    no_inputs,
    pending_segments,
    plan_splits,
    publish,
    write_segments,
    writing_to,
)
from shards.format.manifest import SPLITS


def build(
    src: Path | str,
    out: Path | str,
    options: BuildOptions,
    workers: int,
    overwrite: bool = False,
    ray_address: str | None = None,
) -> dict:
    """Build (or finish building) OUT from SRC; returns the manifest. OUT may be a remote folder
    (s3://, gs://, shards/publish.py): the shards are made in a local staging folder and uploaded as
    each is finished, the manifest last. ray_address: make the shards as tasks on that Ray cluster
    (shards/ray_executor.py) instead of in `workers` local processes."""
    if ray_address is not None:
        check_plannable(options)
    publisher = publisher_for(out)
    listing = list_sources(src, labels_from_folders=options.labels == "folder", exclude=publisher.local_out)
    if not listing.entries:
        raise no_inputs(src, listing.rejected)
    with joined(ray_address) as ray:  # first: a cluster out of reach leaves OUT as it was
        return _build(src, listing, publisher, options, workers, overwrite, ray)


def _build(src, listing, publisher, options, workers, overwrite, ray) -> dict:
    work_dir = make_work_dir(publisher.local_out)
    with exclusive(work_dir, publisher.location):
        existing = publisher.finished_build(options, listing.fingerprint, overwrite)
        if existing is not None:
            shutil.rmtree(work_dir)
            publisher.done()
            return existing
        journal = Journal(work_dir, journal_header(options, listing.fingerprint))
        plan = plan_splits(listing.entries, options.val_fraction, options.seed)
        label_index = {name: index for index, name in enumerate(listing.label_names or [])}
        counts = {split: len(plan[split]) for split in SPLITS}
        segments = pending_segments(counts, journal.records, options)
        with writing_to(publisher.location):
            if ray is not None:
                make_on_ray(ray, segments, plan, label_index, options, publisher.location, journal)
            else:
                inputs = lambda segment: plan[segment.split][segment.start : segment.stop]  # noqa: E731
                write_segments(segments, inputs, counts, label_index, options, workers, publisher, work_dir, journal)
        manifest = build_manifest(SourceSummary.of(listing), journal.records, options)
        publish(manifest, publisher, src)
        shutil.rmtree(work_dir)
        publisher.done()
    return manifest
