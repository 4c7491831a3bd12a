"""`pipeline plot RUN_DIR [--out PNG]`: a run's loss curves, from RUN_DIR/metrics.jsonl, as one PNG.

One panel per logged quantity against the step: each loss term and metric the plugin logs, one panel
for the keys that share a prefix before `/` (`lr/encoder`, `lr/decoder`, ... together), throughput
last. A panel whose positive values span more than two decades has a log scale.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from shards.command_line import check_output_file, one_line
from shards.errors import UserError

NOT_PLOTTED = ("step", "images")
LOG_SCALE_SPAN = 100.0  # max / min of a panel's values above which its y axis is logarithmic

Series = dict[str, tuple[list[float], list[float]]]  # label -> (steps, values)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text(errors="replace").splitlines()  # a damaged line is skipped like a torn one
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror or error}); is {run_dir} a run folder?") from None
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line torn by a killed run, or damaged
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int | float) and not isinstance(step, bool):
            records.append(record)
    if not records:
        raise UserError(f"{path}: no logged steps yet")
    return records


def panels(records: list[dict]) -> dict[str, Series]:
    """Panel title -> its curves, in the order the keys first appear (throughput last)."""
    grouped: dict[str, Series] = defaultdict(dict)
    for record in records:
        if "event" in record:  # something the run did (a rollback), not a measurement
            continue
        for key, value in record.items():
            if key in NOT_PLOTTED or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            panel, _, label = key.partition("/")
            steps, values = grouped[panel].setdefault(label or panel, ([], []))
            steps.append(record["step"])
            values.append(value)
    if "images_per_s" in grouped:
        grouped["images_per_s"] = grouped.pop("images_per_s")
    return dict(grouped)


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("pipeline plot needs matplotlib: pip install 'vaegan-pipeline[eval]'") from None
    return Figure


def check_image_path(out: Path) -> None:
    """Before reading anything: a file matplotlib can write, by its suffix."""
    formats = _figure_class()().canvas.get_supported_filetypes()
    if out.suffix.lower().lstrip(".") not in formats:
        raise UserError(f"{out}: give a file name ending in one of .{', .'.join(sorted(formats))}")
    check_output_file(out)


def plain(text: str) -> str:
    """Text that matplotlib shows as it is (a `$` would start mathtext, which can fail to parse)."""
    return text.replace("$", r"\$")


def loss_figure(records: list[dict], title: str):
    """A matplotlib Figure (no pyplot, so no display backend is ever involved)."""
    Figure = _figure_class()
    curves = panels(records)
    if not curves:
        raise UserError("nothing to plot: no logged step holds a number besides step and images")
    columns = min(3, len(curves))
    rows = math.ceil(len(curves) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), dpi=100, layout="constrained")
    figure.suptitle(plain(title))
    for axes, (name, series) in zip(figure.subplots(rows, columns, squeeze=False).flat, curves.items(), strict=False):
        for label, (steps, values) in series.items():
            axes.plot(steps, values, label=plain(label), marker="." if len(steps) < 30 else None)
        values = [value for _, series_values in series.values() for value in series_values]
        if min(values) > 0 and max(values) / min(values) > LOG_SCALE_SPAN:
            axes.set_yscale("log")
        axes.set_title(plain(name))
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if len(series) > 1:
            axes.legend(fontsize="small")
    for axes in list(figure.axes)[len(curves) :]:
        axes.set_visible(False)
    return figure


def plot(args: argparse.Namespace) -> int:
    out = args.out or args.run_dir / "loss-curves.png"
    check_image_path(out)
    records = read_metrics(args.run_dir)
    title = f"{args.run_dir.resolve().name}: {len(records)} logged steps, to step {records[-1]['step']}"
    figure = loss_figure(records, title)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out)
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror or error}") from None
    print(f"wrote {one_line(str(out))}")
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plot",
        help="a run's loss curves as a PNG",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run's output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, metavar="PNG", help="where the PNG goes (default RUN_DIR/loss-curves.png)")
    parser.set_defaults(handler=plot)
