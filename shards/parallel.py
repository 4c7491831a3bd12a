"""An ordered, bounded parallel map over processes: results come back in input order, and at most
a few chunks per worker are in flight, so memory stays flat however many images there are."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNKS_IN_FLIGHT_PER_WORKER = 4


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
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
