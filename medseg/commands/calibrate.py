"""``medseg calibrate MODEL DATASET -o MODEL_DIR``: fit the decision weights on a dataset's val split."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="fit per-label decision weights (the label map's argmax) on a dataset's val split",
        description=(
            "Runs the model's Monte-Carlo inference on the val split of a dataset manifest (the one it was "
            "trained on: never on the cases a report is made of), fits one factor per structure on the mean "
            "probabilities before the argmax (soft-Dice training draws structures too wide) and writes a "
            "model folder with the same weights, the factors in spec.yaml and a new Device UID."
        ),
    )
    p.add_argument("model", help="model name or folder")
    p.add_argument("dataset", type=Path, help="dataset folder or manifest.json")
    p.add_argument("-o", "--output", required=True, type=Path, help="model folder to write")
    p.add_argument("--samples", type=int, default=None, help="Monte-Carlo samples (default: the spec's)")
    p.add_argument("--site", action="append", default=[], help="only these sites' cases (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from medseg.calibration import calibrate
    from medseg.commands.progress import progress_bar
    from medseg.model import choose_device, load_model

    model = load_model(args.model, device=choose_device(args.device))
    with progress_bar("validation cases", quiet=args.quiet) as progress:
        calibrated, calibration = calibrate(
            model,
            args.dataset,
            args.output,
            samples=args.samples,
            sites=args.site,
            command=args.command_line,
            progress=progress,
        )
    console = Console(quiet=args.quiet)
    table = Table(title=f"decision weights on {calibration.cases} val cases (Dice on the source grid)")
    for column in ("structure", "weight", "Dice before", "Dice after"):
        table.add_column(column)
    for name, weight in calibration.weights.items():
        table.add_row(
            name, f"{weight:g}", f"{calibration.dice_before[name]:.4f}", f"{calibration.dice_after[name]:.4f}"
        )
    table.add_row("mean", "", f"{calibration.mean_before:.4f}", f"{calibration.mean_after:.4f}")
    console.print(table)
    console.print(f"{calibrated!r} -> {args.output}")
    return 0
