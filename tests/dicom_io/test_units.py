"""Tests of dicom_io.units: presentation of CR/DX on real files, SUVbw on synthetic PET headers, rescale."""

from __future__ import annotations

import logging
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_io.errors import InconsistentSeriesError, UnsupportedInputError
from dicom_io.units import (
    hounsfield,
    projection_presentation,
    rescale,
    suv_body_weight,
    suv_body_weight_factor,
)

DATA = (Path(__file__).parents[2] / ".." / "shared" / "data").resolve()
# FUJI CR, MONOCHROME1, window 550/1024, no rescale; the same image stored uncompressed and as JPEG 2000.
CR_UNCOMPRESSED = DATA / "pydicom-data" / "data_store" / "data" / "RG3_UNCR.dcm"
CR_JPEG2000 = DATA / "pydicom-data" / "data_store" / "data" / "RG3_J2KI.dcm"
# FUJIFILM DX (canine thorax), MONOCHROME1 with PresentationLUTShape INVERSE, window 128/256, 8 bit.
DX_MONOCHROME1 = DATA / "highdicom" / "data" / "test_files" / "dx_image.dcm"


def _read(path: Path) -> tuple[Dataset, npt.NDArray[np.int64]]:
    if not path.exists():
        pytest.fail(f"shared test data not found: {path}")
    ds = pydicom.dcmread(path)
    return ds, ds.pixel_array.astype(np.int64)


def _linear_window(x: npt.NDArray[np.int64], center: float, width: float) -> npt.NDArray[np.float64]:
    """PS3.3 C.11.2.1.2.1 LINEAR window onto [0, 1], written out by hand as the reference."""
    y = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.asarray(np.clip(y, 0.0, 1.0))


def _read_pgm(path: Path) -> npt.NDArray[np.uint8]:
    header, pixels = path.read_bytes().split(maxsplit=4)[:4], path.read_bytes().split(maxsplit=4)[4]
    assert header[0] == b"P5" and header[3] == b"255"
    columns, rows = int(header[1]), int(header[2])
    return np.frombuffer(pixels[-rows * columns :], dtype=np.uint8).reshape(rows, columns)


# ---------------------------------------------------------------------------------------------------------
# CR / DX presentation on real files
# ---------------------------------------------------------------------------------------------------------


def test_cr_monochrome1_is_windowed_then_inverted() -> None:
    ds, raw = _read(CR_UNCOMPRESSED)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    out = projection_presentation(raw, ds)
    assert out.dtype == np.float32 and out.shape == raw.shape
    assert out.min() >= 0.0 and out.max() <= 1.0

    right = 1.0 - _linear_window(raw, 550, 1024)  # window first, then invert
    wrong = _linear_window(raw.max() - raw, 550, 1024)  # invert first (cornerstone3D#2215)
    np.testing.assert_allclose(out, right, atol=1e-6)
    assert np.abs(out - wrong).max() > 0.05

    # Outside the collimation (stored 0) the header says Border Density WHITE: exactly 1.0, which the
    # invert-first order cannot give (0 becomes 1023, above the window centre 550 + 512 only by 0.5).
    assert ds.BorderDensity == "WHITE"
    border = raw[:, :300]
    assert (border == 0).all()
    assert (out[:, :300] == 1.0).all()
    assert wrong[:, :300].max() < 1.0
    # Along row 300-500: direct exposure (air beside the leg) dark, soft tissue brighter, tibia brightest.
    air = out[300:500, 480:640].mean()
    soft_tissue = out[300:500, 680:760].mean()
    bone = out[300:500, 800:920].mean()
    assert air < 0.1 < soft_tissue < bone < 1.0


def test_cr_jpeg2000_gives_the_same_presentation() -> None:
    ds_plain, raw_plain = _read(CR_UNCOMPRESSED)
    ds_j2k, raw_j2k = _read(CR_JPEG2000)
    assert ds_j2k.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"  # JPEG 2000 (lossy allowed)
    assert ds_j2k.PhotometricInterpretation == "MONOCHROME1"
    plain = projection_presentation(raw_plain, ds_plain)
    j2k = projection_presentation(raw_j2k, ds_j2k)
    # RG3_J2KI is irreversible (LossyImageCompressionRatio 30): equal up to the compression error.
    assert np.abs(plain - j2k).mean() < 2e-3
    assert np.abs(plain - j2k).max() < 0.02
    assert np.corrcoef(plain.ravel(), j2k.ravel())[0, 1] > 0.9999
    assert (j2k[:, :300] == 1.0).all()


def test_dx_monochrome1_with_inverse_shape_is_inverted_once() -> None:
    ds, raw = _read(DX_MONOCHROME1)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.PresentationLUTShape == "INVERSE"
    out = projection_presentation(raw, ds)
    # Window 128/256 on 8 bits maps x to x/255; INVERSE with MONOCHROME1 is a single inversion.
    np.testing.assert_allclose(out, 1.0 - raw / 255.0, atol=1e-6)
    # Air around the dog (top right, bottom rows) dark; lungs darker than the spine band.
    air = np.concatenate([out[0:8, 90:211].ravel(), out[160:169, :].ravel()]).mean()
    lungs = out[66:96, 105:150].mean()
    spine = out[40:56, 0:100].mean()
    assert air < 0.05 < lungs < spine
    assert spine > 0.5


def test_dx_window_is_applied_before_inversion() -> None:
    """With an asymmetric window the order matters; the result must equal window-then-invert."""
    ds, raw = _read(DX_MONOCHROME1)
    ds.WindowCenter, ds.WindowWidth = 100, 120
    out = projection_presentation(raw, ds)
    right = 1.0 - _linear_window(raw, 100, 120)
    wrong = _linear_window(255 - raw, 100, 120)
    np.testing.assert_allclose(out, right, atol=1e-6)
    assert np.abs(out - wrong).max() > 0.4


@pytest.mark.parametrize("path", [CR_UNCOMPRESSED, DX_MONOCHROME1], ids=["CR", "DX"])
def test_presentation_matches_dcmtk(path: Path, tmp_path: Path) -> None:
    """DCMTK's dcmj2pnm (first VOI window, its own polarity rules) renders the same grey levels."""
    exe = shutil.which("dcmj2pnm")
    if exe is None:
        pytest.fail("dcmj2pnm (DCMTK) is not installed: run scripts/setup.sh")
    ds, raw = _read(path)
    pgm = tmp_path / "rendered.pgm"
    subprocess.run([exe, "--use-window", "1", "--write-raw-pnm", str(path), str(pgm)], check=True)
    reference = _read_pgm(pgm) / 255.0
    out = projection_presentation(raw, ds)
    assert np.abs(out - reference).max() <= 1.0 / 255 + 1e-6  # 8-bit rounding only


# ---------------------------------------------------------------------------------------------------------
# Presentation on synthetic headers
# ---------------------------------------------------------------------------------------------------------


def _projection_header(photometric: str = "MONOCHROME2", bits: int = 12, signed: bool = False) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.PixelRepresentation = 1 if signed else 0
    ds.SamplesPerPixel = 1
    return ds


RAMP = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)


def test_no_voi_uses_the_full_modality_range() -> None:
    out = projection_presentation(RAMP, _projection_header())
    np.testing.assert_allclose(out, RAMP / 4095.0, atol=1e-6)
    inverted = projection_presentation(RAMP, _projection_header("MONOCHROME1"))
    np.testing.assert_allclose(inverted, 1.0 - RAMP / 4095.0, atol=1e-6)


def test_negative_rescale_slope_keeps_higher_modality_values_brighter() -> None:
    ds = _projection_header()
    ds.RescaleSlope, ds.RescaleIntercept = -1.0, 4095.0
    out = projection_presentation(RAMP, ds)
    np.testing.assert_allclose(out, 1.0 - RAMP / 4095.0, atol=1e-6)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    windowed = projection_presentation(RAMP, ds)
    assert windowed[0, 0] > windowed[-1, -1]  # stored 0 is modality value 4095: the brightest


def test_linear_exact_and_sigmoid_windows() -> None:
    ds = _projection_header()
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2048, 1024, "LINEAR_EXACT"
    exact = projection_presentation(RAMP, ds)
    expected = np.clip((RAMP - 2048.0) / 1024 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(exact, expected, atol=1e-6)
    ds.VOILUTFunction = "SIGMOID"
    sigmoid = projection_presentation(RAMP, ds)
    np.testing.assert_allclose(sigmoid, 1.0 / (1.0 + np.exp(-4.0 * (RAMP - 2048.0) / 1024)), atol=1e-6)


def test_voi_lut_sequence_and_preference() -> None:
    ds = _projection_header("MONOCHROME1")
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 10]
    item.LUTData = [min(v // 2, 1023) for v in range(4096)]  # 10-bit output, saturating at 2046
    ds.VOILUTSequence = Sequence([item])
    out = projection_presentation(RAMP, ds)
    np.testing.assert_allclose(out, 1.0 - np.minimum(RAMP // 2, 1023) / 1023.0, atol=1e-6)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2048, 4096, "LINEAR_EXACT"
    np.testing.assert_allclose(projection_presentation(RAMP, ds), 1.0 - RAMP / 4096.0, atol=1e-6)
    np.testing.assert_allclose(projection_presentation(RAMP, ds, prefer_voi_lut=True), out, atol=1e-6)


def test_identity_shape_on_monochrome1_follows_the_shape_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    ds = _projection_header("MONOCHROME1")
    ds.PresentationLUTShape = "IDENTITY"
    with caplog.at_level(logging.WARNING, logger="dicom_io.units"):
        out = projection_presentation(RAMP, ds)
    np.testing.assert_allclose(out, RAMP / 4095.0, atol=1e-6)
    assert "PresentationLUTShape (2050,0020) is IDENTITY" in caplog.text
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PresentationLUTShape = "INVERSE"
    np.testing.assert_allclose(projection_presentation(RAMP, ds), 1.0 - RAMP / 4095.0, atol=1e-6)


def test_presentation_error_paths() -> None:
    ds = _projection_header()
    with pytest.raises(UnsupportedInputError, match=r"one 2-D frame .* got shape \(2, 16, 16\)"):
        projection_presentation(np.stack([RAMP, RAMP]), ds)
    with pytest.raises(UnsupportedInputError, match=r"PhotometricInterpretation \(0028,0004\) is 'RGB'"):
        projection_presentation(RAMP, _projection_header("RGB"))
    bad_shape = _projection_header()
    bad_shape.PresentationLUTShape = "LIN OD"
    with pytest.raises(UnsupportedInputError, match=r"PresentationLUTShape \(2050,0020\) is 'LIN OD'"):
        projection_presentation(RAMP, bad_shape)
    lut_seq = _projection_header()
    plut = Dataset()
    plut.LUTDescriptor = [256, 0, 8]
    plut.LUTData = list(range(256))
    lut_seq.PresentationLUTSequence = Sequence([plut])
    with pytest.raises(UnsupportedInputError, match=r"PresentationLUTSequence \(2050,0010\) is present"):
        projection_presentation(RAMP, lut_seq)
    narrow = _projection_header()
    narrow.WindowCenter, narrow.WindowWidth = 100, 0.5
    with pytest.raises(InconsistentSeriesError, match=r"WindowWidth \(0028,1051\).*LINEAR"):
        projection_presentation(RAMP, narrow)
    unknown = _projection_header()
    unknown.WindowCenter, unknown.WindowWidth, unknown.VOILUTFunction = 100, 50, "LOG"
    with pytest.raises(InconsistentSeriesError, match=r"VOILUTFunction \(0028,1056\) 'LOG'"):
        projection_presentation(RAMP, unknown)
    no_bits = _projection_header()
    del no_bits.BitsStored
    with pytest.raises(InconsistentSeriesError, match=r"BitsStored \(0028,0101\) is missing"):
        projection_presentation(RAMP, no_bits)


# ---------------------------------------------------------------------------------------------------------
# SUVbw on synthetic PET headers
# ---------------------------------------------------------------------------------------------------------

WEIGHT_KG = 70.0
DOSE_BQ = 370e6
HALF_LIFE_S = 3600.0  # one half-life after one hour of uptake makes the decayed dose exactly half


def _pet_header(**overrides: object) -> Dataset:
    """A BQML, START-corrected PET header: injected 10:00, series and acquisition at 11:00 on 2024-01-02."""
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "PT"
    ds.Units = "BQML"
    ds.CorrectedImage = ["DECY", "ATTN", "SCAT"]
    ds.DecayCorrection = "START"
    ds.PatientWeight = WEIGHT_KG
    ds.SeriesDate, ds.SeriesTime = "20240102", "110000"
    ds.AcquisitionDate, ds.AcquisitionTime = "20240102", "110000"
    item = Dataset()
    item.RadiopharmaceuticalStartTime = "100000"
    item.RadionuclideTotalDose = DOSE_BQ
    item.RadionuclideHalfLife = HALF_LIFE_S
    ds.RadiopharmaceuticalInformationSequence = Sequence([item])
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _radiopharmaceutical(ds: Dataset) -> Dataset:
    item: Dataset = ds.RadiopharmaceuticalInformationSequence[0]
    return item


HALF_DECAYED = WEIGHT_KG * 1000 / (DOSE_BQ / 2)  # 70 000 g / 185 MBq


def test_start_decay_gives_the_hand_computed_factor() -> None:
    assert suv_body_weight_factor(_pet_header()) == pytest.approx(70_000 / 185e6, rel=1e-12)
    # Two hours of an F-18 half-life (6586.2 s): 2 ** (-7200 / 6586.2) = 0.46866...
    ds = _pet_header(SeriesTime="120000", AcquisitionTime="120000")
    _radiopharmaceutical(ds).RadionuclideHalfLife = 6586.2
    assert suv_body_weight_factor(ds) == pytest.approx(70_000 / (370e6 * 2 ** (-7200 / 6586.2)), rel=1e-12)


def test_suv_body_weight_scales_the_array() -> None:
    activity = np.array([[0.0, 5000.0], [10_000.0, 185e6 / 70_000]])
    suv = suv_body_weight(activity, _pet_header())
    assert suv.dtype == np.float32
    np.testing.assert_allclose(suv, activity * HALF_DECAYED, rtol=1e-6)
    assert suv[1, 1] == pytest.approx(1.0)


def test_admin_decay_correction_uses_the_injected_dose() -> None:
    ds = _pet_header(DecayCorrection="ADMIN", SeriesTime="150000", AcquisitionTime="150000")
    assert suv_body_weight_factor(ds) == pytest.approx(70_000 / 370e6, rel=1e-12)


def test_gml_is_already_suv() -> None:
    assert suv_body_weight_factor(_pet_header(Units="GML", PatientWeight=None)) == 1.0


def test_full_start_datetime_across_midnight() -> None:
    ds = _pet_header(SeriesDate="20240102", SeriesTime="003000", AcquisitionTime="003000")
    item = _radiopharmaceutical(ds)
    item.RadiopharmaceuticalStartDateTime = "20240101233000"
    item.RadiopharmaceuticalStartTime = "233000"
    assert suv_body_weight_factor(ds) == pytest.approx(HALF_DECAYED, rel=1e-12)
    # The same header with only the time of day is ambiguous: refused, not guessed.
    del item.RadiopharmaceuticalStartDateTime
    with pytest.raises(
        InconsistentSeriesError,
        match=r"RadiopharmaceuticalStartTime \(0018,1072\) 23:30:00 is after the scan start.*"
        r"RadiopharmaceuticalStartDateTime \(0018,1078\)",
    ):
        suv_body_weight_factor(ds)


def test_start_datetime_with_utc_offset_is_compared_in_local_time() -> None:
    ds = _pet_header(TimezoneOffsetFromUTC="+0100")
    _radiopharmaceutical(ds).RadiopharmaceuticalStartDateTime = "20240102090000+0000"  # 10:00 local
    assert suv_body_weight_factor(ds) == pytest.approx(HALF_DECAYED, rel=1e-12)


def test_post_processed_series_uses_the_earliest_acquisition_time() -> None:
    # GE post-processing: SeriesTime 14:00 is the reprocessing time; the bed positions began at 11:00.
    ds = _pet_header(SeriesTime="140000", AcquisitionTime="111500")
    factor = suv_body_weight_factor(ds, scan_start=datetime(2024, 1, 2, 11, 0, 0))
    assert factor == pytest.approx(HALF_DECAYED, rel=1e-12)
    with pytest.raises(InconsistentSeriesError, match=r"SeriesTime \(0008,0031\).*after.*pass scan_start"):
        suv_body_weight_factor(ds)


def test_series_time_before_the_earliest_acquisition_is_the_scan_time() -> None:
    ds = _pet_header(AcquisitionTime="113000")  # a later bed position of a normal series
    assert suv_body_weight_factor(ds, scan_start=datetime(2024, 1, 2, 11, 5)) == pytest.approx(HALF_DECAYED)


def test_ge_private_scan_datetime_is_preferred_for_post_processed_series() -> None:
    ds = _pet_header(SeriesTime="140000", AcquisitionTime="111500")
    block = ds.private_block(0x0009, "GEMS_PETD_01", create=True)
    block.add_new(0x0D, "DT", "20240102110000")
    assert suv_body_weight_factor(ds, scan_start=datetime(2024, 1, 2, 11, 15)) == pytest.approx(HALF_DECAYED)


def test_missing_weight_is_named() -> None:
    with pytest.raises(
        InconsistentSeriesError,
        match=r"PatientWeight \(0010,1030\) is missing: SUVbw needs the patient's weight",
    ):
        suv_body_weight_factor(_pet_header(PatientWeight=None))
    with pytest.raises(
        InconsistentSeriesError, match=r"PatientWeight \(0010,1030\) is '?0(\.0)?'?; it must be > 0"
    ):
        suv_body_weight_factor(_pet_header(PatientWeight=0))


def test_missing_dose_is_named() -> None:
    ds = _pet_header()
    del _radiopharmaceutical(ds).RadionuclideTotalDose
    with pytest.raises(
        InconsistentSeriesError,
        match=r"RadionuclideTotalDose \(0018,1074\) in RadiopharmaceuticalInformationSequence "
        r"\(0054,0016\) is missing",
    ):
        suv_body_weight_factor(ds)


def test_counts_are_refused() -> None:
    with pytest.raises(UnsupportedInputError, match=r"Units \(0054,1001\) is CNTS.*Philips.*\(7053,1000\)"):
        suv_body_weight_factor(_pet_header(Units="CNTS"))


def test_corrected_image_without_decay_correction_is_refused() -> None:
    with pytest.raises(InconsistentSeriesError, match=r"CorrectedImage \(0028,0051\) is .* without DECY"):
        suv_body_weight_factor(_pet_header(CorrectedImage=["ATTN", "SCAT"]))
    with pytest.raises(InconsistentSeriesError, match=r"CorrectedImage \(0028,0051\) is .* without ATTN"):
        suv_body_weight_factor(_pet_header(CorrectedImage="DECY"))


def test_other_suv_error_paths() -> None:
    with pytest.raises(InconsistentSeriesError, match=r"Units \(0054,1001\) is missing"):
        suv_body_weight_factor(_pet_header(Units=None))
    with pytest.raises(UnsupportedInputError, match=r"Units \(0054,1001\) is 'PROPCNTS'"):
        suv_body_weight_factor(_pet_header(Units="PROPCNTS"))
    with pytest.raises(InconsistentSeriesError, match=r"DecayCorrection \(0054,1102\) is 'NONE'"):
        suv_body_weight_factor(_pet_header(DecayCorrection="NONE"))
    with pytest.raises(InconsistentSeriesError, match=r"DecayCorrection \(0054,1102\) is missing"):
        suv_body_weight_factor(_pet_header(DecayCorrection=None))
    with pytest.raises(
        InconsistentSeriesError, match=r"RadiopharmaceuticalInformationSequence \(0054,0016\)"
    ):
        suv_body_weight_factor(_pet_header(RadiopharmaceuticalInformationSequence=None))
    no_half_life = _pet_header()
    del _radiopharmaceutical(no_half_life).RadionuclideHalfLife
    with pytest.raises(InconsistentSeriesError, match=r"RadionuclideHalfLife \(0018,1075\).* is missing"):
        suv_body_weight_factor(no_half_life)
    no_start = _pet_header()
    del _radiopharmaceutical(no_start).RadiopharmaceuticalStartTime
    with pytest.raises(
        InconsistentSeriesError, match=r"RadiopharmaceuticalStartDateTime \(0018,1078\).*missing"
    ):
        suv_body_weight_factor(no_start)
    with pytest.raises(InconsistentSeriesError, match=r"SeriesTime \(0008,0031\) is missing"):
        suv_body_weight_factor(_pet_header(SeriesTime=None))
    with pytest.warns(UserWarning, match="Invalid value for VR DA"):  # pydicom warns when it is set
        bad_date = _pet_header(SeriesDate="2024-01-02")
    with pytest.raises(
        InconsistentSeriesError, match=r"SeriesDate \(0008,0021\) is '2024-01-02', not a valid DA"
    ):
        suv_body_weight_factor(bad_date)
    with pytest.raises(
        InconsistentSeriesError, match=r"AcquisitionDate \(0008,0022\)/.* are missing.*scan_start"
    ):
        suv_body_weight_factor(_pet_header(AcquisitionDate=None, AcquisitionTime=None))
    late = _pet_header()
    _radiopharmaceutical(late).RadiopharmaceuticalStartDateTime = "20240102113000"
    with pytest.raises(
        InconsistentSeriesError, match=r"RadiopharmaceuticalStartDateTime \(0018,1078\) .* after"
    ):
        suv_body_weight_factor(late)


# ---------------------------------------------------------------------------------------------------------
# Linear rescale
# ---------------------------------------------------------------------------------------------------------


def test_hounsfield_and_rescale() -> None:
    raw = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)
    hu = hounsfield(raw, 1.0, -1024.0)
    assert hu.dtype == np.float32
    np.testing.assert_array_equal(hu, [[-1024, 0], [1024, 3071]])
    mr = rescale(raw.astype(np.int16), 0.5, 0.25)
    np.testing.assert_array_equal(mr, [[0.25, 512.25], [1024.25, 2047.75]])


def test_rescale_error_paths() -> None:
    raw = np.zeros((2, 2), dtype=np.int16)
    with pytest.raises(InconsistentSeriesError, match=r"RescaleSlope \(0028,1053\) is 0.0"):
        rescale(raw, 0.0, 0.0)
    with pytest.raises(InconsistentSeriesError, match=r"RescaleSlope \(0028,1053\) is nan"):
        hounsfield(raw, float("nan"), 0.0)
    with pytest.raises(InconsistentSeriesError, match=r"RescaleIntercept \(0028,1052\) is inf"):
        rescale(raw, 1.0, float("inf"))
