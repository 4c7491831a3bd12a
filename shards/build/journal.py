"""The build journal: one JSON line per finished shard, appended after the shard is renamed into
place. A rerun after a crash trusts exactly the shards the journal lists and redoes the rest, so
the result is the same as a run that was never interrupted."""

from __future__ import annotations

import json
import os
from pathlib import Path

from shards.regular_files import read_regular

JOURNAL_NAME = "journal.jsonl"


class Journal:
    def __init__(self, work_dir: Path, header: dict) -> None:
        self.path = work_dir / JOURNAL_NAME
        self.header = header
        self.records = self._read_matching()
        # Rewrite without a torn last line, so that appends start on a fresh line.
        lines = [json.dumps(entry, sort_keys=True) for entry in [header, *self.records]]
        temp = self.path.with_suffix(".tmp")
        temp.write_text("\n".join(lines) + "\n")
        os.replace(temp, self.path)

    def _read_matching(self) -> list[dict]:
        """Records of an earlier run with the same header, or [] (the earlier run is discarded)."""
        if not self.path.exists():
            return []
        lines = read_regular(self.path).decode("utf-8", "surrogateescape").splitlines()
        try:
            if json.loads(lines[0]) != self.header:
                return []
        except (IndexError, json.JSONDecodeError):
            return []
        records = []
        for line in lines[1:]:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # the line being written when the process died
        return records

    @property
    def resumed(self) -> bool:
        return bool(self.records)

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as file:
            file.write(json.dumps(record, sort_keys=True) + "\n")
            file.flush()
            os.fsync(file.fileno())
