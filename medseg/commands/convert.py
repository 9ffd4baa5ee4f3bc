"""``medseg convert PATH -o DIR``: one NIfTI per volume plus a JSON sidecar of geometry decisions."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert every readable volume to NIfTI (RAS) with a JSON sidecar, as dcm2niix does",
    )
    p.add_argument("path", nargs="+", help="folder (recursive), zip, DICOMDIR or files")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder (created)")
    p.add_argument("--resample-tilt", action="store_true", help="resample gantry-tilted series (recorded)")
    p.add_argument("--resample-spacing", action="store_true", help="resample uneven slice spacing (recorded)")
    p.add_argument("--include-derived", action="store_true", help="also convert DERIVED images")
    p.set_defaults(func=run)


def _stem(number: int | None, description: str, index: int) -> str:
    desc = re.sub(r"[^A-Za-z0-9]+", "_", description).strip("_") or "series"
    return f"{number if number is not None else 0:04d}_{desc}_{index}"


def run(args: argparse.Namespace) -> int:
    from dicom_io.geometry import GeometryOptions
    from dicom_io.nifti import geometry_sidecar, write_nifti
    from dicom_io.reader import ReadOptions, read_volumes
    from medseg.commands.progress import progress_bar

    options = ReadOptions(
        geometry=GeometryOptions(resample_tilt=args.resample_tilt, resample_spacing=args.resample_spacing),
        include_derived=args.include_derived,
    )
    with progress_bar("converting", quiet=args.quiet) as progress:
        result = read_volumes(args.path, options, progress=progress)
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, volume in enumerate(result.volumes, start=1):
        stem = _stem(volume.series.series_number, volume.series.series_description, i)
        nii = write_nifti(volume, out / f"{stem}.nii.gz")
        (out / f"{stem}.json").write_text(json.dumps(geometry_sidecar(volume), indent=2) + "\n")
        written.append(nii)
    refusals = [
        {
            "series": r.series_instance_uid,
            "description": r.series_description,
            "split": r.split_label,
            "reason": r.reason,
        }
        for r in result.refusals
    ]
    (out / "refused.json").write_text(json.dumps(refusals, indent=2) + "\n")
    if not args.quiet:
        for path in written:
            print(f"wrote {path}")
        for r in refusals:
            print(f"refused {r['series']} {r['split']}: {r['reason']}")
    if not written:
        print("medseg convert: no volume could be read (see refused.json)")
        return 1
    return 0
