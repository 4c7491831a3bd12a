"""Sorting more rows than memory should hold: runs of RUN_ROWS rows sorted in memory and written to
temporary files, then merged as streams. `shards plan` orders 100M inputs with this in a flat amount of
memory (bench/shards_build.py --distributed)."""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

RUN_ROWS = 100_000  # about 30 MB of rows in memory at a time
FAN_IN = 128  # runs merged at once: open files, well under the usual limit of 1,024


class ExternalSort:
    """Rows are JSON-able lists whose first item decides the order (ties broken by the rest)."""

    def __init__(self, scratch: Path, name: str) -> None:
        self.scratch, self.name = scratch, name
        self.rows: list[list] = []
        self.runs: list[Path] = []
        self.count = 0
        self._file_numbers = itertools.count()

    def add(self, row: list) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= RUN_ROWS:
            self._spill()

    def _spill(self) -> None:
        self.rows.sort()
        self.runs.append(self._write(iter(self.rows)))
        self.rows = []

    def _write(self, rows: Iterator[list]) -> Path:
        path = self.scratch / f"{self.name}-{next(self._file_numbers)}.jsonl"
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as file:
            for row in rows:
                file.write(json.dumps(row, ensure_ascii=False) + "\n")
        return path

    def __iter__(self) -> Iterator[list]:
        if not self.runs:
            yield from sorted(self.rows)
            return
        if self.rows:
            self._spill()
        while len(self.runs) > FAN_IN:  # merge the oldest runs into one until few enough remain
            merged = self._write(heapq.merge(*map(_read, self.runs[:FAN_IN])))
            for path in self.runs[:FAN_IN]:
                path.unlink()
            self.runs = [*self.runs[FAN_IN:], merged]
        yield from heapq.merge(*map(_read, self.runs))


def _read(path: Path) -> Iterator[list]:
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        for line in file:
            yield json.loads(line)
