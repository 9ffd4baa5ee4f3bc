"""Synthetic hazards that popular loaders get wrong silently (DICOM.md "Reading"), made in the tests."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from dicom_io import (
    GeometryError,
    GeometryOptions,
    Modality,
    ReadOptions,
    read_volume,
    read_volumes,
    scan,
)
from dicom_io.image_writer import SeriesHeader, write_image_series
from dicom_io.nifti import load_nifti_lps, write_nifti

SHAPE = (12, 24, 20)
SPACING = (2.5, 0.8, 0.7)


def _affine(tilt_deg: float = 0.0) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 0] = [
        0.0,
        -math.sin(math.radians(tilt_deg)) * SPACING[0],
        math.cos(math.radians(tilt_deg)) * SPACING[0],
    ]
    affine[:3, 1] = [0.0, SPACING[1], 0.0]
    affine[:3, 2] = [SPACING[2], 0.0, 0.0]
    affine[:3, 3] = [-8.0, -10.0, 40.0]
    return affine


def _phantom(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k, r, c = np.indices(SHAPE)
    return (100.0 * k + 3.0 * r + c + rng.integers(0, 5, SHAPE)).astype(np.float32) - 1000.0


def _write(folder: Path, array: np.ndarray, *, series_number: int = 1, description: str = "axial") -> Path:
    header = SeriesHeader(
        modality=Modality.CT,
        patient_name="Hazard^Test",
        patient_id="HZ1",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid=generate_uid(entropy_srcs=[str(folder), str(series_number)]),
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2",
        study_date="20260101",
        series_number=series_number,
        series_description=description,
    )
    write_image_series(array, _affine(), header, folder)
    return folder


@pytest.fixture
def series(tmp_path: Path) -> Path:
    return _write(tmp_path / "ct", _phantom())


def test_clean_series_reads_with_its_grid(series: Path) -> None:
    volume = read_volume(series)
    assert volume.shape == SHAPE
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-4)
    np.testing.assert_allclose(volume.affine, _affine(), atol=1e-4)
    np.testing.assert_allclose(volume.array, _phantom(), atol=0.5)


def test_shuffled_instance_numbers_do_not_scramble_slices(series: Path) -> None:
    files = sorted(series.glob("*.dcm"))
    numbers = np.random.default_rng(3).permutation(len(files)) + 1
    for f, n in zip(files, numbers, strict=True):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = int(n)
        ds.save_as(f)
    np.testing.assert_allclose(read_volume(series).array, _phantom(), atol=0.5)


def test_missing_slice_is_refused_with_its_neighbours(series: Path) -> None:
    files = sorted(series.glob("*.dcm"))
    files[5].unlink()
    with pytest.raises(
        GeometryError, match=rf"1 missing slice\(s\): a gap of 5 mm between .*{files[4].name} and"
    ):
        read_volume(series)


def test_duplicated_slice_is_refused(series: Path) -> None:
    ds = pydicom.dcmread(sorted(series.glob("*.dcm"))[3])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(series / "copy.dcm")
    with pytest.raises(GeometryError, match=r"1 duplicate slice position\(s\), e\.g\. .* and .*copy\.dcm"):
        read_volume(series)


def _tilt(series: Path, degrees: float) -> None:
    step = SPACING[0] / math.cos(math.radians(degrees))
    for f in series.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        k = round((float(ds.ImagePositionPatient[2]) - 40.0) / SPACING[0])
        # a tilted gantry: the table moves along z, the slice plane is tilted about x
        ds.ImageOrientationPatient = [
            1,
            0,
            0,
            0,
            math.cos(math.radians(degrees)),
            -math.sin(math.radians(degrees)),
        ]
        ds.ImagePositionPatient = [-8.0, -10.0, 40.0 + k * step]
        ds.GantryDetectorTilt = degrees
        ds.save_as(f)


def test_gantry_tilt_refused_then_resampled_without_inflating_the_volume(series: Path) -> None:
    _tilt(series, 15.0)
    with pytest.raises(GeometryError, match=r"gantry tilt of 15\.00°"):
        read_volume(series)
    volume = read_volume(series, ReadOptions(GeometryOptions(resample_tilt=True)))
    assert volume.geometry.was_resampled
    # true slice distance along the normal is the table step * cos(tilt) = 2.5 mm: not 2.59 (3.5% too large)
    assert volume.spacing[0] == pytest.approx(SPACING[0], rel=1e-3)
    assert volume.shape[0] == SHAPE[0]
    assert volume.shape[1] > SHAPE[1]  # grid widened to hold the sheared slices


def test_two_series_and_a_localizer_in_one_folder(tmp_path: Path) -> None:
    _write(tmp_path / "a", _phantom(1), series_number=2, description="first")
    _write(tmp_path / "b", _phantom(2)[:, ::-1].copy(), series_number=3, description="second")
    _write(tmp_path / "loc", _phantom(3)[:1], series_number=1, description="scout")
    for f in (tmp_path / "loc").glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(f)
    result = read_volumes(tmp_path)
    assert sorted(v.series.series_description for v in result.volumes) == ["first", "second"]
    [excluded] = [x for s in result.inventory.series for x in s.exclusions]
    assert excluded.reason.startswith("localizer/scout image")
    np.testing.assert_allclose(
        next(v for v in result.volumes if v.series.series_description == "first").array, _phantom(1), atol=0.5
    )


def test_lps_ras_round_trip_through_nifti(series: Path, tmp_path: Path) -> None:
    volume = read_volume(series)
    path = write_nifti(volume, tmp_path / "v.nii.gz")
    array, affine = load_nifti_lps(path)
    np.testing.assert_array_equal(array, volume.array)
    np.testing.assert_allclose(affine, volume.affine, atol=1e-5)
    ras = nib.load(str(path)).affine
    assert ras[0, 3] == pytest.approx(-volume.origin[0]) and ras[1, 3] == pytest.approx(-volume.origin[1])
    # an independent reader (ITK works in LPS) agrees on the origin and on where voxel (k, r, c) lies
    itk = sitk.ReadImage(str(path))
    np.testing.assert_allclose(itk.GetOrigin(), volume.origin, atol=1e-4)
    point = itk.TransformIndexToPhysicalPoint((3, 5, 7))  # ITK index order is (column, row, slice)
    np.testing.assert_allclose(point, volume.index_to_lps([7, 5, 3]), atol=1e-4)


def test_bad_files_are_named_and_the_good_series_still_reads(series: Path, tmp_path: Path) -> None:
    bad = tmp_path / "mixed"
    shutil.copytree(series, bad)
    (bad / "notes.txt").write_text("not dicom")
    data = (series / sorted(p.name for p in series.glob("*.dcm"))[0]).read_bytes()
    (bad / "truncated.dcm").write_bytes(data[:300])
    other = _write(tmp_path / "other", _phantom(5), series_number=9, description="broken")
    for f in other.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"
        ds.save_as(f, enforce_file_format=False)
        shutil.move(f, bad / f"ts_{f.name}")
    result = read_volumes(bad)
    assert [v.series.series_description for v in result.volumes] == ["axial"]
    skipped = {Path(s.name).name: s.reason for s in result.inventory.skipped}
    assert skipped["notes.txt"].startswith("not a DICOM file")
    assert "truncated.dcm" in skipped
    [refusal] = result.refusals
    assert "transfer syntax 1.2.3.4.5.6" in refusal.reason and "ts_" in refusal.reason


def test_unknown_modality_and_no_pixels_are_explained(series: Path) -> None:
    f = sorted(series.glob("*.dcm"))[5]
    ds = pydicom.dcmread(f)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    ds.save_as(f)
    inventory = scan(series)
    [excluded] = inventory.series[0].exclusions
    assert "Enhanced SR Storage" in excluded.reason
    with pytest.raises(GeometryError, match="missing slice"):
        read_volume(series)  # the remaining slices no longer form a complete grid: refused, not guessed
