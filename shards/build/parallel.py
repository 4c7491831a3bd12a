"""An ordered, bounded parallel map over processes: results come back in input order, and at most
a few chunks per worker are in flight, so memory stays flat however many images there are."""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNKS_IN_FLIGHT_PER_WORKER = 4
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _worker_setup(parent: int) -> None:
    """In each worker: die with the parent (a kill -9 of the build must not leave orphans decoding
    images), and leave Ctrl-C to the parent, which stops the pool and says how to resume."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def ordered_map(
    function: Callable[..., list[R]],
    chunks: Iterable[Sequence[T]],
    workers: int,
    *args: Any,
) -> Iterator[list[R]]:
    """Yield `function(chunk, *args)` for each chunk, in order. workers=0 runs in this process."""
    if workers <= 0:
        for chunk in chunks:
            yield function(chunk, *args)
        return
    # spawn, not fork: the caller may already run threads (rich's progress bar refresh).
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_worker_setup, initargs=(os.getpid(),)
    )
    with pool:
        in_flight: deque[Future] = deque()
        limit = workers * CHUNKS_IN_FLIGHT_PER_WORKER
        try:
            for chunk in chunks:
                in_flight.append(pool.submit(function, chunk, *args))
                if len(in_flight) >= limit:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        finally:
            for future in in_flight:
                future.cancel()
