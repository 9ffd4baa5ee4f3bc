"""``medseg train SPEC DATASET -o MODEL_DIR``: train a model on a dataset manifest."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a segmentation model from a spec on a dataset manifest",
        description=(
            "Train the network a model spec describes on the train split of a dataset manifest "
            "(medseg synth writes one), validating on its val split after every epoch. The output folder "
            "becomes a model folder (spec.yaml, weights.pt of the best epoch, provenance.json, "
            "training_range.json: each structure's HU and the scans' spacing over the train split, which "
            "inference flags a scan outside of) with checkpoints/last.pt for --resume."
        ),
    )
    p.add_argument("spec", help="model spec YAML (configs/models/*.yaml)")
    p.add_argument("dataset", type=Path, help="dataset folder or manifest.json")
    p.add_argument("-o", "--output", required=True, type=Path, help="model folder to write")
    p.add_argument("--epochs", type=int, default=None, help="override the spec's epochs")
    p.add_argument("--iterations", type=int, default=None, help="override iterations per epoch")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, patches and augmentation")
    p.add_argument("--init", default=None, metavar="MODEL", help="fine-tune from a model (name or folder)")
    p.add_argument("--freeze-encoder", action="store_true", help="with --init: keep the encoder fixed")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    p.add_argument("--site", action="append", default=[], help="train only on these sites (repeatable)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from medseg.commands.progress import status_bar
    from medseg.model import choose_device
    from medseg.model_spec import load_spec
    from medseg.training import train

    if args.freeze_encoder and not args.init:
        raise ValueError("--freeze-encoder needs --init MODEL (there is no trained encoder to keep)")
    spec = load_spec(args.spec)
    console = Console(stderr=True, quiet=args.quiet)

    with status_bar("training", console, quiet=args.quiet) as progress:
        result = train(
            spec,
            args.dataset,
            args.output,
            epochs=args.epochs,
            iterations_per_epoch=args.iterations,
            seed=args.seed,
            init=args.init,
            freeze=args.freeze_encoder,
            resume=args.resume,
            sites=args.site,
            device=choose_device(args.device),
            command=args.command_line,
            progress=progress,
        )
    console.print(
        f"model {result.model.spec.name}: best validation Dice {result.best_dice:.4f} "
        f"after {result.epochs} epochs "
        f"({result.seconds / 60:.1f} min) -> {args.output}"
    )
    return 0
