"""`shards inspect`: a summary table of a shard folder, and a contact sheet of its samples."""

from __future__ import annotations

import math
from collections import Counter

from PIL import Image
from rich.markup import escape
from rich.table import Table

from shards.format.manifest import SPLITS
from shards.format.samples import decode_image
from shards.format.tar_index import DamagedTar, read_samples
from shards.read.folder import ShardFolder

GRID_PADDING = 2


def summary_table(manifest: dict) -> Table:
    image = manifest["image"]
    table = Table(title=f"{image['size']}x{image['size']} {image['mode']} {image['format']} shards")
    for column in ("split", "shards", "images", "MiB", "KiB/image"):
        table.add_column(column, justify="right")
    for split in SPLITS:
        shards = manifest["splits"][split]["shards"]
        count = manifest["splits"][split]["count"]
        size = sum(shard.get("bytes", 0) for shard in shards)
        per_image = f"{size / count / 1024:.1f}" if count else "-"
        table.add_row(split, str(len(shards)), f"{count:,}", f"{size / 2**20:.1f}", per_image)
    labels = manifest.get("labels")
    table.caption = f"{len(labels)} labels" if labels else "no labels"
    return table


def skipped_table(manifest: dict) -> Table | None:
    reasons = Counter(item["reason"] for item in manifest["skipped"])
    if not reasons:
        return None
    table = Table(title=f"{sum(reasons.values())} inputs skipped (paths in manifest.json)")
    table.add_column("reason")
    table.add_column("count", justify="right")
    for reason, count in reasons.most_common():
        table.add_row(escape(reason), str(count))  # reasons quote file names and errors: never markup
    return table


def contact_sheet(folder: ShardFolder, manifest: dict, split: str, count: int) -> Image.Image:
    """The first `count` samples of the split, in shard order, in a square-ish grid (only the shards
    they are in are read, or fetched)."""
    size, image_format = manifest["image"]["size"], manifest["image"]["format"]
    tiles = []
    for shard in manifest["splits"][split]["shards"]:
        for key, members in read_samples(folder.local_path(shard)):
            if image_format not in members:
                raise DamagedTar(f"{shard['name']}: sample {key} has no .{image_format}")
            tile = decode_image(members[image_format])
            if tile.size != (size, size):  # the sheet is sized by the manifest: tiles must fit it
                raise DamagedTar(f"{shard['name']}: sample {key} is {tile.size[0]}x{tile.size[1]}, not {size}x{size}")
            tiles.append(tile)
            if len(tiles) == count:
                break
        if len(tiles) == count:
            break
    columns = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = max(1, math.ceil(len(tiles) / columns))
    step = size + GRID_PADDING
    sheet = Image.new(manifest["image"]["mode"], (columns * step + GRID_PADDING, rows * step + GRID_PADDING), 128)
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        sheet.paste(tile, (GRID_PADDING + column * step, GRID_PADDING + row * step))
    return sheet
