"""``medseg train-detector MODEL DATASET -o MODEL_DIR``: give a model a RetinaNet lesion detector."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-detector",
        help="train a RetinaNet lesion detector guided by a model's lesion probability",
        description=(
            "Trains a MONAI RetinaNet on the train and val cases of a dataset manifest. It reads the model's "
            "input channels plus the model's Monte-Carlo mean probability of its focal (lesion) label, and "
            "writes a model folder with the same segmentation weights and the detector beside them; "
            "medseg run then reports its findings (boxes with score, score spread, detection rate across "
            "the Monte-Carlo samples) instead of the lesion channel's. The Device UID changes."
        ),
    )
    p.add_argument("model", help="model name or folder")
    p.add_argument("dataset", type=Path, help="dataset folder or manifest.json")
    p.add_argument("-o", "--output", required=True, type=Path, help="model folder to write")
    p.add_argument("--epochs", type=int, default=None, help="override the detector's epochs")
    p.add_argument("--iterations", type=int, default=None, help="override iterations per epoch")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, patches and augmentation")
    p.add_argument("--site", action="append", default=[], help="only these sites' cases (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from medseg.commands.progress import status_bar
    from medseg.model import choose_device, load_model
    from medseg.training import train_lesion_detector

    device = choose_device(args.device)
    model = load_model(args.model, device=device)
    console = Console(stderr=True, quiet=args.quiet)
    with status_bar("detector", console, quiet=args.quiet) as progress:
        saved = train_lesion_detector(
            model,
            args.dataset,
            args.output,
            epochs=args.epochs,
            iterations_per_epoch=args.iterations,
            seed=args.seed,
            sites=args.site,
            device=device,
            command=args.command_line,
            progress=progress,
        )
    console.print(f"{saved.detector!r} -> {args.output}")
    return 0
