"""Time SEG + Parametric Map + SR building, the output gate and publishing, per SEG profile.

A synthetic 512 x 512 x 300 CT (written by the project's image writer, read back by its reader, so the
SEG/PM/SR reference real instances) with 6 ellipsoid structures, one of them declared but empty, two
lesions, and an entropy-like uncertainty map. Prints seconds per step and file sizes per profile.

    .venv/bin/python benchmarks/bench_writers.py [--slices 300] [--out /tmp/bench_writers]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from pydicom.sr.codedict import codes
from scipy import ndimage

from dicom_io.ai_result import (
    AlgorithmIdentity,
    AnalysisResult,
    LesionFinding,
    SegmentDescription,
    StructureMeasurements,
    UncertaintyQuantity,
)
from dicom_io.image_writer import SeriesHeader, deterministic_uid, write_image_series
from dicom_io.reader import read_volume
from dicom_io.result_writer import write_results
from dicom_io.seg import SegProfile
from dicom_io.volume import ImageVolume, Modality

STRUCTURES = (  # label, name, SNOMED CT type, colour, centre (k, r, c) as fractions, radii in voxels
    (1, "liver", codes.SCT.Liver, (221, 130, 101), (0.5, 0.45, 0.35), (60, 90, 110)),
    (2, "spleen", codes.SCT.Spleen, (157, 108, 162), (0.5, 0.45, 0.75), (40, 50, 35)),
    (3, "left kidney", codes.SCT.Kidney, (185, 102, 83), (0.6, 0.6, 0.68), (30, 35, 25)),
    (4, "right kidney", codes.SCT.Kidney, (185, 102, 83), (0.6, 0.6, 0.32), (30, 35, 25)),
    (5, "aorta", codes.SCT.Aorta, (224, 97, 76), (0.5, 0.55, 0.5), (140, 10, 10)),
    (6, "gallbladder", codes.SCT.Gallbladder, (139, 150, 98), (0.5, 0.5, 0.5), (0, 0, 0)),  # empty
)


def synthetic_ct(out: Path, slices: int) -> ImageVolume:
    shape = (slices, 512, 512)
    _, r, c = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((r - 256) / 230.0) ** 2 + ((c - 256) / 240.0) ** 2 < 1
    array = np.where(body, 40.0, -1000.0).astype(np.float32) + np.zeros(shape, np.float32)
    affine = np.array([[0, 0, 0.78, -200.0], [0, 0.78, 0, -200.0], [1.5, 0, 0, -300.0], [0, 0, 0, 1.0]])
    header = SeriesHeader(
        modality=Modality.CT,
        patient_name="Benchmark^Writers",
        patient_id="BENCH-WRITERS",
        study_instance_uid=deterministic_uid("bench writers", "study"),
        series_instance_uid=deterministic_uid("bench writers", "series", str(slices)),
        frame_of_reference_uid=deterministic_uid("bench writers", "for"),
        study_date="20240101",
        series_description="synthetic CT for writer benchmark",
        manufacturer="medseg synthetic",
    )
    write_image_series(array, affine, header, out)
    return read_volume(out)


def synthetic_result(volume: ImageVolume) -> AnalysisResult:
    shape = volume.shape
    k, r, c = np.ogrid[: shape[0], : shape[1], : shape[2]]
    labels = np.zeros(shape, np.uint8)
    segments, structures = [], []
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    for label, name, type_, colour, centre, radii in STRUCTURES:
        segments.append(
            SegmentDescription(label, name, codes.SCT.AnatomicalStructure, type_, colour_rgb=colour)
        )
        if radii[0]:
            cz, cy, cx = (f * n for f, n in zip(centre, shape, strict=True))
            inside = ((k - cz) / radii[0]) ** 2 + ((r - cy) / radii[1]) ** 2 + ((c - cx) / radii[2]) ** 2 < 1
            labels[inside & (labels == 0)] = label
    boundary = labels != ndimage.grey_erosion(labels, size=3)
    entropy = (0.69 * ndimage.gaussian_filter(boundary.astype(np.float32), 2.0) + 0.01).astype(np.float32)
    for label, *_ in STRUCTURES:
        mask = labels == label
        n = int(mask.sum())
        structures.append(
            StructureMeasurements(
                label=label,
                volume_ml=n * voxel_ml,
                mean_intensity=float(volume.array[mask].mean()) if n else None,
                mean_entropy=float(entropy[mask].mean()) if n else 0.0,
                mean_mutual_information=float(entropy[mask].mean() / 3) if n else 0.0,
                boundary_entropy=0.3 if n else 0.0,
                volume_spread_ml=0.02 * n * voxel_ml,
                sample_agreement=0.95 if n else 1.0,
                needs_review=label == 5,
            )
        )
    lesions = []
    for index, (kk, rr, cc) in enumerate(((150, 230, 180), (170, 240, 200)), start=1):
        centre = volume.index_to_lps([kk, rr, cc])
        lesions.append(
            LesionFinding(
                index=index,
                centre_lps=tuple(float(x) for x in centre),  # type: ignore[arg-type]
                box_min_lps=tuple(float(x) - 6 for x in centre),  # type: ignore[arg-type]
                box_max_lps=tuple(float(x) + 6 for x in centre),  # type: ignore[arg-type]
                score=0.8,
                score_spread=0.05,
                detection_rate=0.9,
                box_spread_mm=1.0,
                needs_review=index == 2,
            )
        )
    return AnalysisResult(
        source=volume,
        label_map=labels,
        segments=tuple(segments),
        uncertainty_map=entropy,
        uncertainty_quantity=UncertaintyQuantity.ENTROPY,
        structures=tuple(structures),
        lesions=tuple(lesions),
        algorithm=AlgorithmIdentity("medseg-bench", "1.0", deterministic_uid("bench writers", "model")),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_writers"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    shutil.rmtree(args.out, ignore_errors=True)
    t = time.perf_counter()
    volume = synthetic_ct(args.out / "ct", args.slices)
    print(f"synthetic CT {volume.shape} written and read in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    result = synthetic_result(volume)
    took = time.perf_counter() - t
    print(f"result with {len(result.segments)} structures, {len(result.lesions)} lesions: {took:.1f} s")
    for profile in SegProfile:
        t = time.perf_counter()
        written = write_results(result, args.out / profile.value, profile)
        total = time.perf_counter() - t
        steps = ", ".join(f"{k} {v:.1f}" for k, v in written.seconds.items())
        sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in written.sizes.items())
        print(f"{profile.value:8} total {total:.1f} s ({steps}); sizes: {sizes}")
        for check in written.gate.checks:
            print(f"         {check}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
