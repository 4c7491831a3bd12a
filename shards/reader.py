"""The readers' public names where the README has always imported them (`from shards.reader import
open_split, webdataset`); they live in shards/read/reader.py."""

from shards.read.reader import ShardSplit, open_split, webdataset

__all__ = ["ShardSplit", "open_split", "webdataset"]
