"""``medseg import-bundle BUNDLE --spec SPEC -o MODEL_DIR``: bring a model trained elsewhere."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-bundle",
        help="import a local MONAI bundle (network + weights) as a medseg model folder",
        description=(
            "Builds the bundle's network_def (configs/inference.json|yaml), loads models/model.pt, and saves "
            "it with the labels, SNOMED CT codes, preprocessing and review thresholds of SPEC (a model spec "
            "whose network section says 'architecture: bundle'). Use the folder with medseg run --model."
        ),
    )
    p.add_argument("bundle", type=Path, help="bundle folder")
    p.add_argument("--spec", required=True, type=Path, help="model spec YAML for the bundle's outputs")
    p.add_argument("-o", "--output", required=True, type=Path, help="model folder to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from medseg.bundle import import_bundle

    model = import_bundle(args.bundle, args.spec, args.output)
    Console(quiet=args.quiet).print(f"imported {model!r} -> {args.output}")
    return 0
