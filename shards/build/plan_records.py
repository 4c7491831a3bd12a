"""What a plan and its parts record, checked as strictly as a manifest before a part or `shards merge`
acts on it: `plan.json` (every field of the type `shards plan` writes, the build options within the bounds
of the command line's own validators), and each record of `.plan/parts/K-of-N.jsonl` (UTF-8 JSON lines,
every field of the type a part writes, a planned shard's end and, for a shard, the name the plan numbers it
with), and then the bytes each record describes: the shard in OUT must have the recorded size and sha256.
A forged or damaged file, or a shard deleted or overwritten since its part recorded it, is one line naming
it, before anything is written or deleted."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from shards.errors import UserError, check_structure, parse_json
from shards.format.manifest import MAX_SHARD_BYTES, Count, Record, SkippedRecord, shard_name
from shards.regular_files import file_sha256
from shards.store.failures import StoreNotFound
from shards.store.remote import RemoteFolder, is_remote

# every part lists the planned shards: 10M of 1,000 images is 10 billion images, and a list of them fits
MAX_PLANNED_SHARDS = 10**7


class SourceSummaryRecord(Record):
    fingerprint: str
    images: Count
    labels: list[str] | None


class CountsRecord(Record):
    train: Count
    val: Count


class PlanHeaderRecord(Record):
    format_version: Literal[1]
    src: str
    root: str
    options: dict[str, Any]
    source: SourceSummaryRecord
    rejected: list[Annotated[list[str], Field(min_length=2, max_length=2)]]  # [path, reason]
    counts: CountsRecord


def check_plan_header(
    header: Any, where: str, option_types: dict[str, Callable[[str], Any]], nullable: set[str]
) -> dict:
    """plan.json's content, checked; `option_types`: each build option's command-line validator (argparse
    `type`, or the choices it takes), so that an edited plan cannot ask for more than the command can;
    `nullable`: the options whose default is null."""
    check_structure(PlanHeaderRecord, header, where, "plan", UserError)
    options = header["options"]
    unknown = sorted(set(options) ^ set(option_types))
    if unknown:
        raise UserError(f"{where}: not a valid plan: options: {unknown[0]!r} is unknown or missing")
    for name, check in option_types.items():
        value = options[name]
        if value is None and name not in nullable:
            raise UserError(f"{where}: not a valid plan: options.{name}: null")
        if value is not None and (type(value) not in (int, float, str) or isinstance(value, bool)):
            raise UserError(f"{where}: not a valid plan: options.{name}: {value!r:.80} is not a number or a word")
        try:
            if value is not None and check(str(value)) != value:
                raise ValueError(f"{value!r:.80} does not read back as itself")
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            raise UserError(f"{where}: not a valid plan: options.{name}: {error}") from None
    shards = sum(-(-count // options["shard_size"]) for count in header["counts"].values())
    if shards > MAX_PLANNED_SHARDS:
        raise UserError(
            f"{where}: not a valid plan: counts: {shards:,} shards planned, more than {MAX_PLANNED_SHARDS:,}"
        )
    return header


class PartRecord(Record):
    split: Literal["train", "val"]
    next: Count  # where the inputs the record covers end
    skipped: list[SkippedRecord]
    name: str | None = None  # absent when every input of the shard was skipped
    count: Count | None = None
    bytes: Annotated[int, Field(ge=0, le=MAX_SHARD_BYTES)] | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    @model_validator(mode="after")
    def _a_shard_whole_or_none(self) -> PartRecord:
        given = [value is not None for value in (self.name, self.count, self.bytes, self.sha256)]
        if any(given) and not all(given):
            raise ValueError("a shard's record has all of name, count, bytes and sha256")
        return self


def read_records(data: bytes, where: str, planned: dict[tuple[str, int], str]) -> list[dict]:
    """The records of one finished part; `planned`: (split, end of its inputs) -> the shard's name, for
    every shard of the plan."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a parts record: not UTF-8; delete it and run that part again") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        at = f"{where}, line {number}"
        record = parse_json(line.encode(), at, "parts record", UserError)
        check_structure(PartRecord, record, at, "parts record", UserError)
        key = (record["split"], record["next"])
        if key not in planned:
            raise UserError(f"{at}: not a shard of the plan ({key[0]} inputs ending at {key[1]})")
        if record.get("name") is not None and record["name"] != planned[key]:
            raise UserError(f"{at}: names {record['name'][:80]!r}; the plan numbers that shard {planned[key]}")
        records.append(record)
    return records


def planned_names(ranges: list[tuple[str, int, int]], shard_size: int) -> dict[tuple[str, int], str]:
    """Each planned shard (split, end of its inputs) and its name: numbered by its first input."""
    return {(split, stop): shard_name(split, start // shard_size) for split, start, stop in ranges}


class _Discard:
    def write(self, data: bytes) -> None:
        pass


def check_recorded_shards(out: Path | str, records: list[dict]) -> None:
    """Each recorded shard in OUT has the size and sha256 its part recorded."""
    remote = RemoteFolder(str(out)) if is_remote(out) else None
    for record in records:
        if record.get("name") is None:
            continue
        name = record["name"]
        where = f"{str(out).rstrip('/')}/{name}"
        size, digest = _remote_facts(remote, name, record) if remote else _local_facts(Path(out) / name)
        if size is None:
            problem = "is missing"
        elif size != record["bytes"]:
            problem = f"is {size:,} bytes, its part recorded {record['bytes']:,}"
        elif digest != record["sha256"]:
            problem = "does not have the sha256 its part recorded"
        else:
            continue
        raise UserError(
            f"{where} {problem} (deleted or overwritten since its part made it): run `shards build OUT --part "
            "K/N` again for the part that made it, after deleting its record in .plan/parts/"
        )


def _local_facts(path: Path) -> tuple[int | None, str]:
    try:
        return path.stat().st_size, file_sha256(path)
    except FileNotFoundError:
        return None, ""
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror or error})") from None


def _remote_facts(remote: RemoteFolder, name: str, record: dict) -> tuple[int | None, str]:
    try:
        size = remote.size(name)
    except StoreNotFound:
        return None, ""
    if size != record["bytes"]:
        return size, ""
    return size, remote.download(name, size, _Discard())
