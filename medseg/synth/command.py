"""``medseg synth -o DIR``: synthetic studies per simulated site, with ground truth and a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

SIZES = {"small": 256, "full": None}  # in-plane matrix cap; None keeps each site's matrix


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate synthetic CT/MR studies (DICOM, label maps, lesion boxes, manifest) per site",
        description=(
            "Generate anatomy-like torso studies with exactly known ground truth, as real DICOM series from "
            "simulated scanners (configs/sites/*.yaml). The same seed gives byte-identical files."
        ),
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="dataset folder (created)")
    p.add_argument(
        "--site",
        action="append",
        default=None,
        metavar="NAME",
        help="site name or YAML path; repeat or comma-separate (default: every shipped site of --modality)",
    )
    p.add_argument("--cases", type=int, default=4, metavar="N", help="cases per site (default 4)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    p.add_argument(
        "--modality",
        choices=["CT", "MR"],
        default=None,
        help="which shipped sites to use by default (default CT)",
    )
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="full",
        help="small: at most 256x256 in-plane, for quick tries",
    )
    p.add_argument(
        "--slices", type=int, default=None, metavar="N", help="override the slice count (quick tries)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dicom_io.volume import Modality
    from medseg.commands.progress import progress_bar
    from medseg.synth.dataset import Split, generate_dataset
    from medseg.synth.sites import list_sites, load_site

    modality = Modality(args.modality) if args.modality else None
    if args.site:
        names = [n.strip() for item in args.site for n in item.split(",") if n.strip()]
        sites = [load_site(n) for n in names]
        wrong = [s.name for s in sites if modality is not None and s.modality is not modality]
        if wrong:
            raise ValueError(
                f"sites {wrong} are not {modality.value if modality else ''}; drop --modality or those sites"
            )
    else:
        sites = list(list_sites(modality=modality or Modality.CT))
        if not sites:
            raise ValueError(
                f"no shipped {(modality or Modality.CT).value} sites found; pass --site PATH.yaml"
            )
    with progress_bar("generating cases", quiet=args.quiet) as progress:
        dataset = generate_dataset(
            args.output,
            sites,
            args.cases,
            seed=args.seed,
            matrix=SIZES[args.size],
            slices=args.slices,
            progress=progress,
        )
    if not args.quiet:
        table = Table(title=f"synthetic dataset (seed {args.seed})")
        for column in (
            "site",
            "modality",
            "cases",
            "train/val/test",
            "grid",
            "spacing mm",
            "encoding",
            "lesions",
        ):
            table.add_column(column)
        for site in sites:
            cases = dataset.manifest.select(site=site.name)
            splits = "/".join(str(sum(c.split is s for c in cases)) for s in Split)
            first = cases[0]
            table.add_row(
                site.name,
                site.modality.value,
                str(len(cases)),
                splits,
                "x".join(str(v) for v in first.shape),
                " x ".join(f"{v:.3g}" for v in first.spacing_mm),
                site.transfer_syntax.value,
                str(sum(c.lesion_count for c in cases)),
            )
        console = Console()
        console.print(table)
        console.print(f"manifest: {dataset.manifest_path}")
    return 0
