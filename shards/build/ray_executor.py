"""`shards build --executor ray`: each planned shard is a Ray task, run on whichever node of the cluster
has a free CPU; this process (the driver) lists SRC, journals each shard as its task returns, shows the
progress and writes the manifest, exactly as a local build does.

Every node must see SRC and OUT at the same paths (a shared file system) or reach them as URLs (s3://,
gs://), and have this package installed. A task writes its shard under a temporary name of its own and
renames (or uploads) it whole, so the task Ray runs again after a node is lost cannot collide with the
lost attempt. At most two tasks per CPU of the cluster wait at a time: the driver's memory stays flat.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from shards.build.journal import Journal
from shards.build.sources import Entry
from shards.build.work import BuildOptions, Segment, make_range, shard_ranges
from shards.errors import UserError
from shards.progress import progress_bar
from shards.store.remote import is_remote

TASKS_PER_CPU = 2
TASK_RETRIES = 5  # Ray runs a task again when its node dies; a task that raises is not retried


CONNECT_SECONDS = 10  # Ray itself waits minutes for a head that does not answer
# HTTP/2's client connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5): Ray's head (its
# GCS, or the Ray client server of ray://) speaks gRPC, so it answers with a SETTINGS frame of its own
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 0x04, 0, 0, 0, 0, 0])
SETTINGS_FRAME_TYPE = 0x04


@contextlib.contextmanager
def joined(address: str | None) -> Iterator[Any]:
    """Ray, connected to the cluster at `address` ("auto": the one this machine belongs to) for the
    block; None for a local build."""
    if address is None:
        yield None
        return
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'vaegan-pipeline[ray]' (or pip install ray)") from None
    if address != "auto":
        _check_answers(address)
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        found = "no Ray cluster found from this machine" if address == "auto" else f"cannot join Ray at {address}"
        advice = "start one with `ray start --head` or pass --ray-address HOST:PORT"
        raise UserError(f"{found} ({error}); {advice}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_answers(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r} is not HOST:PORT (or auto)")
    try:
        connection = socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS)
    except OSError as error:
        reason = error.strerror or error
        raise UserError(f"nothing answers at --ray-address {address} ({reason}): is the Ray head up?") from None
    # Something listens; ray.init would retry for minutes if it is not Ray. A gRPC server answers an HTTP/2
    # preface with its SETTINGS frame (the 4th byte of a frame is its type) within the same bound.
    with connection:
        try:
            connection.sendall(HTTP2_PREFACE)
            answer = connection.recv(9)
        except OSError:
            answer = b""
    if len(answer) < 4 or answer[3] != SETTINGS_FRAME_TYPE:
        raise UserError(
            f"what answers at --ray-address {address} is not a Ray head (no gRPC within {CONNECT_SECONDS} s): "
            "give the address `ray start --head` printed (its GCS port, 6379 by default)"
        )


def make_on_ray(
    ray: Any,
    segments: Sequence[Segment],
    plan: dict[str, list[Entry]],
    label_index: dict[str, int],
    options: BuildOptions,
    out: str,
    journal: Journal,
) -> None:
    """Make the planned shards of `segments` as Ray tasks, journalling each as it returns."""
    make = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(make_range)
    limit = TASKS_PER_CPU * max(1, int(ray.cluster_resources().get("CPU", 1)))
    out = out if is_remote(out) else str(Path(out).resolve())
    pending: dict = {}
    resumed = " (resuming)" if journal.resumed else ""
    with progress_bar() as progress:
        task = progress.add_task(f"building on Ray{resumed}", total=sum(s.stop - s.start for s in segments))
        for segment in segments:
            total = len(plan[segment.split])
            for start, stop in shard_ranges(segment.stop - segment.start, options.shard_size):
                start, stop = segment.start + start, segment.start + stop
                inputs = plan[segment.split][start:stop]
                todo = [(entry.absolute(), label_index.get(entry.label)) for entry in inputs]
                pending[make.remote(segment.split, start, total, todo, options, out)] = stop - start
                while len(pending) >= limit:
                    progress.advance(task, _journal_one(ray, pending, journal))
        while pending:
            progress.advance(task, _journal_one(ray, pending, journal))


def _journal_one(ray, pending: dict, journal: Journal) -> int:
    """Wait for any task to return; journal its records; returns how many inputs it covered."""
    [ready], _ = ray.wait(list(pending), num_returns=1)
    try:
        records = ray.get(ready)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, (UserError, OSError)):  # the user's to fix, said as a local build says it
            raise cause from None
        raise
    for record in records:
        journal.append(record)
    return pending.pop(ready)
