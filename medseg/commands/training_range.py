"""``medseg training-range MODEL DATASET -o MODEL_DIR``: record the intensities a model was trained on."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "training-range",
        help="record each structure's intensities over a dataset's train split with a model",
        description=(
            "Measures each structure's median HU and spread inside its labels on the train split of the "
            "dataset manifest the model was trained on, and writes a model folder with the same weights and "
            "Device UID plus training_range.json. Inference then flags a structure whose intensity lies "
            "outside that range (another contrast phase, a noisier or miscalibrated scanner) and a scan "
            "coarser than any training scan (slice and pixel spacing). 'medseg train' records it itself; "
            "this is for models trained before it did."
        ),
    )
    p.add_argument("model", help="model name or folder")
    p.add_argument("dataset", type=Path, help="dataset folder or manifest.json the model was trained on")
    p.add_argument("-o", "--output", required=True, type=Path, help="model folder to write")
    p.add_argument("--site", action="append", default=[], help="only these sites' cases (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from medseg.commands.progress import progress_bar
    from medseg.model import load_model
    from medseg.training import record_training_range

    model = load_model(args.model)
    with progress_bar("train cases", quiet=args.quiet) as progress:
        saved = record_training_range(
            model, args.dataset, args.output, sites=args.site, command=args.command_line, progress=progress
        )
    assert saved.training_range is not None
    found = saved.training_range
    console = Console(quiet=args.quiet)
    table = Table(title=f"intensities over {found.cases} train cases ({found.unit})")
    for column in ("structure", "cases", "median", "spread"):
        table.add_column(column)
    for name, r in found.structures.items():
        table.add_row(
            name,
            str(r.cases),
            f"{r.median[0]:.0f} to {r.median[1]:.0f}",
            f"{r.spread[0]:.0f} to {r.spread[1]:.0f}",
        )
    console.print(table)
    if found.spacing is not None:
        low, high = found.spacing.slice_mm
        console.print(f"slice spacing {low:.2f} to {high:.2f} mm", end="; ")
        low, high = found.spacing.pixel_mm
        console.print(f"pixel spacing {low:.2f} to {high:.2f} mm")
    console.print(f"{saved!r} -> {args.output}")
    return 0
