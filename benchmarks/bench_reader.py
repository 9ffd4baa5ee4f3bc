"""Reader speed and memory against SimpleITK's ImageSeriesReader, in the same run (issue 2 target).

Writes a synthetic 512x512xN CT series (uncompressed) with the project's writer, then alternates reading
it with ``dicom_io.read_volume`` (all checks on) and with SimpleITK (GDCM), several repetitions each.
Prints the median times, their ratio (target <= 1.0) and the reader's peak traced memory over the volume's
size (target <= 2.0).

    .venv/bin/python benchmarks/bench_reader.py [--slices 300] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicom_io import Modality, read_volume
from dicom_io.image_writer import SeriesHeader, write_image_series


def make_series(folder: Path, slices: int) -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(40.0, 20.0, size=(slices, 512, 512)).astype(np.float32)
    affine = np.diag([1.25, 0.7, 0.7, 1.0])
    affine[:3, 3] = [-180.0, -180.0, -300.0]
    affine = affine[:, [0, 1, 2, 3]]
    affine[:3, :3] = np.array([[0, 0, 0.7], [0, 0.7, 0], [1.25, 0, 0]])  # slices along z, rows y, cols x
    header = SeriesHeader(
        modality=Modality.CT,
        patient_name="Bench^Reader",
        patient_id="BENCH",
        study_instance_uid="1.2.826.0.1.3680043.8.498.10",
        series_instance_uid="1.2.826.0.1.3680043.8.498.11",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.12",
        study_date="20260101",
    )
    write_image_series(array, affine, header, folder)


def read_sitk(folder: Path) -> np.ndarray:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ct"
        make_series(folder, args.slices)
        ours, theirs = [], []
        read_volume(folder), read_sitk(folder)  # warm the page cache and imports for both
        for _ in range(args.repeats):
            t = time.perf_counter()
            volume = read_volume(folder)
            ours.append(time.perf_counter() - t)
            del volume
            t = time.perf_counter()
            array = read_sitk(folder)
            theirs.append(time.perf_counter() - t)
            del array
        tracemalloc.start()
        volume = read_volume(folder)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        check = read_sitk(folder)
        agree = bool(np.allclose(check, volume.array))
    ratio = statistics.median(ours) / statistics.median(theirs)
    memory = peak / volume.array.nbytes
    print(f"series: 512x512x{args.slices} CT, uncompressed, {args.repeats} repetitions")
    for name, times in (("dicom_io.read_volume ", ours), ("SimpleITK series read", theirs)):
        print(f"{name}: median {statistics.median(times):.3f} s  (all {[round(x, 3) for x in times]})")
    print(f"time ratio ours/SimpleITK = {ratio:.2f} (target <= 1.0)")
    print(
        f"peak traced memory / volume size = {memory:.2f} (target <= 2.0); same voxels as SimpleITK: {agree}"
    )


if __name__ == "__main__":
    main()
