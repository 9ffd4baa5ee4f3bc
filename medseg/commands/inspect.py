"""``medseg inspect PATH [--json]``: what a folder holds, what would be read, and why anything is not."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="list studies and series in a folder/zip/DICOMDIR, and what would be read as a volume",
        description="Headers only: fast on large folders. Nothing is modified on disk.",
    )
    p.add_argument("path", nargs="+", help="folder (recursive), zip, DICOMDIR or files")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--include-derived", action="store_true", help="treat DERIVED images as volumes")
    p.add_argument("--resample-tilt", action="store_true", help="accept gantry tilt (resampled when read)")
    p.add_argument("--resample-spacing", action="store_true", help="accept uneven slice spacing (resampled)")
    p.set_defaults(func=run)


def inspect_report(args: argparse.Namespace) -> dict[str, Any]:
    """The inspect result as plain data (the table and ``--json`` both render it)."""
    from dicom_io.errors import DicomIOError
    from dicom_io.geometry import GeometryOptions
    from dicom_io.reader import ReadOptions, check_candidate, scan
    from medseg.commands.progress import progress_bar

    options = ReadOptions(
        geometry=GeometryOptions(resample_tilt=args.resample_tilt, resample_spacing=args.resample_spacing),
        include_derived=args.include_derived,
    )
    with progress_bar("reading headers", quiet=args.quiet or args.json) as progress:
        inventory = scan(args.path, include_derived=args.include_derived, progress=progress)
    series = []
    for entry in inventory.series:
        volumes = []
        for c in entry.candidates:
            item: dict[str, Any] = {"split": c.split_label, "frames": len(c.frames)}
            try:
                plan = check_candidate(c, options)
                item.update(
                    status="read" if not plan.report.was_resampled else "read (resampled)",
                    shape=[
                        len(c.frames) if plan.resample is None else plan.resample.target_shape[0],
                        c.frames[0].rows,
                        c.frames[0].columns,
                    ],
                    spacing_mm=round(plan.report.slice_spacing_mm, 4),
                    resampled=list(plan.report.resampled),
                )
            except DicomIOError as err:
                item.update(status="refused", reason=str(err))
            volumes.append(item)
        series.append(
            {
                "study": entry.study_instance_uid,
                "series": entry.series_instance_uid,
                "number": entry.series_number,
                "description": entry.series_description,
                "modality": entry.modality,
                "instances": entry.instance_count,
                "volumes": volumes,
                "excluded": [
                    {"count": len(x.names), "reason": x.reason, "files": list(x.names)}
                    for x in entry.exclusions
                ],
                "notes": list(entry.notes),
            }
        )
    return {
        "series": series,
        "skipped_files": [{"file": s.name, "reason": s.reason} for s in inventory.skipped],
    }


def run(args: argparse.Namespace) -> int:
    report = inspect_report(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if args.quiet:
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Series found")
    for col in ("study", "#", "description", "mod", "inst", "volume", "status"):
        table.add_column(col, overflow="fold")
    reasons: list[str] = []

    def note(text: str) -> str:
        reasons.append(text)
        return f"[{len(reasons)}]"

    for s in report["series"]:
        head = (s["study"][-8:], str(s["number"] or ""), s["description"][:30], s["modality"])
        for v in s["volumes"]:
            status = v["status"]
            if v.get("reason"):
                status += " " + note(v["reason"])
            if v.get("resampled"):
                status += " " + note("; ".join(v["resampled"]))
            shape = "x".join(str(n) for n in v.get("shape", [])) or "-"
            table.add_row(*head, str(v["frames"]), f"{shape} {v['split']}".strip(), status)
        for x in s["excluded"]:
            table.add_row(*head, str(x["count"]), "-", "excluded " + note(x["reason"]))
        for text in s["notes"]:
            table.add_row(*head, "", "", "note " + note(text))
    console = Console()
    console.print(table)
    for i, text in enumerate(reasons, start=1):
        console.print(f"[{i}] {text}", highlight=False, markup=False)
    if report["skipped_files"]:
        console.print(f"{len(report['skipped_files'])} file(s) skipped:")
        for s in report["skipped_files"]:
            console.print(f"  {s['file']}: {s['reason']}", highlight=False)
    return 0
