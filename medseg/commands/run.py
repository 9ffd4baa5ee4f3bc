"""``medseg run INPUT -o OUT``: the main job, DICOM in, checked DICOM results out."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from medseg.pipeline import RunSummary


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="segment every CT series in INPUT with uncertainty; write SEG, Parametric Map and SR into OUT",
        description=(
            "Reader -> model -> Monte-Carlo uncertainty -> DICOM SEG, Parametric Map and TID 1500 SR -> "
            "gate (dciodvfy, DicomSRValidator, dcmqi and highdicom read-back) -> files. Nothing is written "
            "that did not pass the gate. OUT/summary.json holds the summary for scripts."
        ),
    )
    p.add_argument("input", help="folder, zip, DICOMDIR or files")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--model", default=None, help="shipped model name or model folder (default: default_ct)")
    p.add_argument("--samples", type=int, default=None, help="Monte-Carlo samples (default: the model's)")
    p.add_argument("--seed", type=int, default=None, help="dropout seed (default: the model's)")
    p.add_argument(
        "--profile", choices=["broad", "compact"], default="broad", help="SEG profile (default broad)"
    )
    p.add_argument("--no-preview", action="store_true", help="skip the PNG preview")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--assign-missing-uids",
        action="store_true",
        help="series exported with empty Study/Series UIDs: assign deterministic ones in memory (reported)",
    )
    p.set_defaults(func=run)


def _review_cell(row: dict[str, Any]) -> str:
    """A structure's review column: why, in a word or two (the reasons themselves are in summary.json)."""
    why = []
    if len(row["review_reasons"]) > len(row["outside_training_data"]):
        why.append("uncertain")
    if row["outside_training_data"]:
        why.append("outside training data")
    return f"REVIEW: {', '.join(why)}" if why else ""


def print_summary(summary: RunSummary, console: Console) -> None:
    """The short table a person reads after a run (summary.json has everything)."""
    from rich.table import Table

    for series in summary.series:
        table = Table(title=f"{series.series_description or series.series_instance_uid} {series.shape}")
        for column in ("structure", "volume mL", "mean", "entropy", "MI", "agreement", "review"):
            table.add_column(column, justify="left" if column in ("structure", "review") else "right")
        for row in series.structures:
            table.add_row(
                row["name"],
                f"{row['volume_ml']:.1f}",
                "" if row["mean_intensity"] is None else f"{row['mean_intensity']:.0f}",
                f"{row['mean_entropy']:.3f}",
                f"{row['mean_mutual_information']:.4f}",
                f"{row['sample_agreement']:.3f}",
                _review_cell(row),
            )
        console.print(table)
        for lesion in series.lesions:
            console.print(
                f"  lesion {lesion['index']}: centre "
                f"{tuple(round(c, 1) for c in lesion['centre_lps'])} mm LPS, "
                f"score {lesion['score']:.2f} +/- {lesion['score_spread']:.2f}, found by "
                f"{lesion['detection_rate']:.0%} of samples{' REVIEW' if lesion['needs_review'] else ''}"
            )
        for repair in series.repairs:
            console.print(f"  repaired (opt-in): {repair}")
        for note in series.notes:
            console.print(f"  note: {note}")
        for kind, path in series.outputs.items():
            console.print(f"  {kind}: {path}")
        console.print(
            "  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in series.seconds.items() if ":" not in k)
        )
    for skipped in summary.skipped:
        console.print(f"  skipped {skipped['series']}: {skipped['reason']}")
    if not summary.for_clinical_use:
        from dicom_io.provenance import NOT_FOR_CLINICAL_USE  # highdicom: not at start-up

        console.print(f"{summary.model} {summary.model_version}: research use only, {NOT_FOR_CLINICAL_USE}")
    console.print(
        f"summary: {Path(summary.output) / 'summary.json'}  (total {summary.seconds['total']:.1f} s)"
    )


def execute(
    input_path: str | Path, output: Path, args: argparse.Namespace, *, samples: int | None = None
) -> RunSummary:
    """Load the model and run the pipeline with a progress line per stage (shared with ``medseg demo``)."""
    from rich.console import Console

    from dicom_io.result_writer import SegProfile
    from medseg.model import DEFAULT_MODEL, choose_device, load_model
    from medseg.pipeline import run_pipeline

    console = Console(stderr=True, quiet=args.quiet)
    model = load_model(args.model or DEFAULT_MODEL, device=choose_device(args.device))
    with console.status("starting") as status:
        summary = run_pipeline(
            input_path,
            output,
            model,
            samples=samples,
            seed=args.seed,
            profile=SegProfile(args.profile),
            preview=not args.no_preview,
            assign_missing_uids=args.assign_missing_uids,
            stage=lambda name, done, total: status.update(f"{name} (series {done + 1}/{total})"),
        )
    print_summary(summary, Console(quiet=args.quiet))
    return summary


def run(args: argparse.Namespace) -> int:
    execute(args.input, args.output, args, samples=args.samples)
    return 0
