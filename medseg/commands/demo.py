"""``medseg demo``: zero arguments; a synthetic CT study through the whole pipeline with the shipped model."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="generate a synthetic CT study and run the whole pipeline on it with the shipped model",
        description=(
            "Generates one synthetic abdominal CT study (site_a, seed 0), runs medseg run on it with the "
            "shipped default model and writes SEG, Parametric Map, SR, preview PNG and summary.json. "
            "The input series is kept in OUT/input so a viewer can show it with the results."
        ),
    )
    p.add_argument(
        "-o", "--output", type=Path, default=Path("medseg-demo"), help="folder (default ./medseg-demo)"
    )
    p.add_argument("--site", default="site_a", help="synthetic site profile (default site_a)")
    p.add_argument("--seed", type=int, default=0, help="case seed (default 0)")
    p.set_defaults(
        func=run,
        model=None,
        samples=None,
        profile="broad",
        no_preview=False,
        device=None,
        assign_missing_uids=False,
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from medseg.commands.run import execute
    from medseg.synth.dataset import Split, synthesize_case, write_case
    from medseg.synth.sites import load_site

    console = Console(stderr=True, quiet=args.quiet)
    study_dir = args.output / "input"
    with console.status("generating a synthetic CT study"):
        case = synthesize_case(load_site(args.site), args.seed, 0)
        entry = write_case(case, study_dir, manifest_root=args.output, split=Split.TEST)
    demo_seed, args.seed = args.seed, None  # --seed picks the case; dropout uses the model's seed
    summary = execute(args.output / entry.image_dir, args.output / "results", args)
    console.print(
        f"demo ({args.site}, case seed {demo_seed}): input series in {study_dir / 'dicom'}, results in "
        f"{Path(summary.output)}; ground truth in {study_dir / 'labels.nii.gz'}"
    )
    return 0
