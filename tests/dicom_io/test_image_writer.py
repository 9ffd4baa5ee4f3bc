"""The image series writer: values, geometry, encodings, determinism and refusals."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_io.image_writer import (
    ImageWriteError,
    PixelEncoding,
    SeriesHeader,
    StoredType,
    choose_rescale,
    write_image_series,
)
from dicom_io.volume import Modality


def _header(modality: Modality = Modality.CT, **kw: object) -> SeriesHeader:
    base: dict[str, object] = dict(
        modality=modality,
        patient_name="TEST^WRITER",
        patient_id="W1",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.3",
        study_date="20210304",
        manufacturer="Test",
        kvp=120.0,
    )
    base.update(kw)
    return SeriesHeader(**base)  # type: ignore[arg-type]


def _affine(ps: float = 0.8, dz: float = -2.5, rot_deg: float = 0.0) -> np.ndarray:
    t = np.radians(rot_deg)
    row_dir = np.array([np.cos(t), np.sin(t), 0.0])
    col_dir = np.array([-np.sin(t), np.cos(t), 0.0])
    a = np.eye(4)
    a[:3, 0] = np.cross(row_dir, col_dir) * dz
    a[:3, 1] = col_dir * ps
    a[:3, 2] = row_dir * ps
    a[:3, 3] = (-100.0, -80.5, 40.0)
    return a


def _volume(shape: tuple[int, int, int] = (6, 32, 40)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.rint(rng.uniform(-1024, 1500, shape)).astype(np.float32)


@pytest.mark.parametrize("encoding", list(PixelEncoding))
def test_values_and_geometry_round_trip_with_pydicom(tmp_path: Path, encoding: PixelEncoding) -> None:
    vol, aff = _volume(), _affine()
    written = write_image_series(vol, aff, _header(), tmp_path, encoding=encoding)
    assert len(written.paths) == vol.shape[0]
    for k, path in enumerate(written.paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == encoding.uid
        assert ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.SOPInstanceUID == written.sop_instance_uids[k]
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, vol[k])
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient], aff[:3, 3] + k * aff[:3, 0], atol=1e-4
        )
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        np.testing.assert_allclose(iop[:3] * float(ds.PixelSpacing[1]), aff[:3, 2], atol=1e-5)
        np.testing.assert_allclose(iop[3:] * float(ds.PixelSpacing[0]), aff[:3, 1], atol=1e-5)
        assert ds.InstanceNumber == k + 1


def test_oblique_grid_reads_back_in_simpleitk(tmp_path: Path) -> None:
    vol, aff = _volume(), _affine(ps=0.7, dz=3.0, rot_deg=20.0)
    write_image_series(vol, aff, _header(), tmp_path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    img = reader.Execute()
    direction = np.array(img.GetDirection()).reshape(3, 3)
    spacing = np.array(img.GetSpacing())
    np.testing.assert_allclose(direction[:, 0] * spacing[0], aff[:3, 2], atol=1e-4)
    np.testing.assert_allclose(direction[:, 1] * spacing[1], aff[:3, 1], atol=1e-4)
    np.testing.assert_allclose(direction[:, 2] * spacing[2], aff[:3, 0], atol=1e-4)
    np.testing.assert_allclose(img.GetOrigin(), aff[:3, 3], atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vol)


def test_same_input_gives_identical_bytes(tmp_path: Path) -> None:
    vol, aff = _volume(), _affine()
    a = write_image_series(vol, aff, _header(), tmp_path / "a", encoding=PixelEncoding.RLE_LOSSLESS)
    b = write_image_series(vol, aff, _header(), tmp_path / "b", encoding=PixelEncoding.RLE_LOSSLESS)
    for pa, pb in zip(a.paths, b.paths, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    assert len(set(a.sop_instance_uids)) == len(a.paths)


def test_mr_series_is_uint16_without_rescale(tmp_path: Path) -> None:
    vol = np.abs(_volume())
    written = write_image_series(vol, _affine(), _header(Modality.MR), tmp_path)
    ds = pydicom.dcmread(written.paths[0])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    assert written.stored_type is StoredType.UINT16 and ds.PixelRepresentation == 0
    assert "RescaleSlope" not in ds and "EchoTime" in ds
    np.testing.assert_array_equal(ds.pixel_array, vol[0])


def test_choose_rescale_keeps_slope_one_when_it_fits() -> None:
    assert choose_rescale(np.array([-1024.0, 3071.0]), StoredType.INT16) == (1.0, 0.0)
    assert choose_rescale(np.array([-1024.0, 3071.0]), StoredType.UINT16) == (1.0, -1024.0)
    slope, intercept = choose_rescale(np.array([0.0, 1e6]), StoredType.UINT16)
    assert slope > 1.0 and round((1e6 - intercept) / slope) <= 65535


def test_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ImageWriteError, match="must be 3-D"):
        write_image_series(np.zeros((4, 4)), _affine(), _header(), tmp_path)
    skew = _affine()
    skew[:3, 1] = (0.5, 0.8, 0.0)
    with pytest.raises(ImageWriteError, match="not orthogonal"):
        write_image_series(_volume(), skew, _header(), tmp_path)
    with pytest.raises(ImageWriteError, match="NaN"):
        write_image_series(np.full((2, 4, 4), np.nan), _affine(), _header(), tmp_path)
    with pytest.raises(ImageWriteError, match="YYYYMMDD"):
        _header(study_date="2021-03-04")
    with pytest.raises(ImageWriteError, match="zero-length"):
        write_image_series(_volume(), np.diag([0.0, 1.0, 1.0, 1.0]), _header(), tmp_path)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
@pytest.mark.parametrize("modality", [Modality.CT, Modality.MR])
def test_dciodvfy_reports_no_errors(tmp_path: Path, modality: Modality) -> None:
    vol = np.abs(_volume((2, 16, 16)))
    written = write_image_series(vol, _affine(), _header(modality), tmp_path)
    out = subprocess.run(["dciodvfy", str(written.paths[0])], capture_output=True, text=True, check=False)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]
    assert not errors, errors
