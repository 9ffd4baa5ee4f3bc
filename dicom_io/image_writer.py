"""Write a 3-D array in physical units as a single-frame CT or MR image series.

The inverse of reading: ``array[k, r, c]`` is slice ``k``, row ``r``, column ``c`` and ``affine`` maps
``(k, r, c, 1)`` to LPS millimetres (the convention of ``dicom_io.volume``). Column 0 of the affine is the
step between slices, column 1 the step down one row (ImageOrientationPatient column direction times
PixelSpacing[0]) and column 2 the step along one column (row direction times PixelSpacing[1]); see
PS3.3 C.7.6.2.1.1.

Used by the synthetic study generator and by tests that need real series on disk. Every header value is
taken from the caller's ``SeriesHeader``; nothing depends on the clock, so the same input gives
byte-identical files.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
)

from dicom_io.errors import DicomIOError, UnsupportedInputError
from dicom_io.volume import Modality

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (slices written, total)

_SOP_CLASS = {Modality.CT: CTImageStorage, Modality.MR: MRImageStorage}


class PixelEncoding(StrEnum):
    """Transfer syntaxes the writer can produce (all lossless: ground truth must survive the round trip)."""

    EXPLICIT_VR_LITTLE_ENDIAN = "explicit_vr_little_endian"
    JPEG2000_LOSSLESS = "jpeg2000_lossless"
    RLE_LOSSLESS = "rle_lossless"

    @property
    def uid(self) -> UID:
        """The transfer syntax UID (PS3.5 A.4, PS3.6 Annex A)."""
        return {
            PixelEncoding.EXPLICIT_VR_LITTLE_ENDIAN: ExplicitVRLittleEndian,
            PixelEncoding.JPEG2000_LOSSLESS: JPEG2000Lossless,
            PixelEncoding.RLE_LOSSLESS: RLELossless,
        }[self]


class StoredType(StrEnum):
    """Integer type of the stored pixel values (PixelRepresentation 1 or 0, PS3.3 C.7.6.3.1)."""

    INT16 = "int16"
    UINT16 = "uint16"


class ImageWriteError(DicomIOError):
    """The array, affine or header cannot form a valid image series."""


@dataclass(frozen=True)
class MRAcquisition:
    """The MR Image module attributes that have no sensible default (PS3.3 C.8.3.1)."""

    repetition_time_ms: float = 500.0
    echo_time_ms: float = 12.0
    magnetic_field_strength_t: float = 1.5
    flip_angle_deg: float = 90.0
    scanning_sequence: str = "SE"
    sequence_variant: str = "NONE"
    sequence_name: str = "T1_SE"


@dataclass(frozen=True)
class SeriesHeader:
    """Patient, study, series and equipment context of the written series.

    UIDs come from the caller so that a deterministic caller gets deterministic files; instance UIDs are
    derived from the series UID and the slice index.
    """

    modality: Modality
    patient_name: str
    patient_id: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    study_date: str  # YYYYMMDD, never the clock
    study_time: str = "120000"
    patient_birth_date: str = ""
    patient_sex: str = "O"
    patient_age: str = ""
    patient_position: str = "HFS"  # PS3.3 C.7.3.1.1.2
    study_id: str = "1"
    accession_number: str = ""
    study_description: str = ""
    series_description: str = ""
    series_number: int = 1
    body_part_examined: str = ""
    manufacturer: str = ""
    manufacturer_model_name: str = ""
    station_name: str = ""
    institution_name: str = ""
    device_serial_number: str = ""
    software_versions: str = ""
    slice_thickness_mm: float | None = None  # defaults to the slice step
    convolution_kernel: str = ""
    kvp: float | None = None
    window_center: float | None = None  # defaults: soft tissue for CT, percentiles for MR
    window_width: float | None = None
    mr: MRAcquisition | None = None
    deidentified: bool = True

    def __post_init__(self) -> None:
        if len(self.study_date) != 8 or not self.study_date.isdigit():
            raise ImageWriteError(f"study_date {self.study_date!r} is not YYYYMMDD")
        if self.modality not in _SOP_CLASS:
            raise UnsupportedInputError(
                f"modality {self.modality.value}: the image writer writes CT or MR only"
            )


@dataclass(frozen=True)
class WrittenSeries:
    """What was written, so that callers can record it (paths in slice order)."""

    paths: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    transfer_syntax_uid: str
    rescale_slope: float
    rescale_intercept: float
    stored_type: StoredType


def _check_geometry(shape: tuple[int, ...], affine: npt.NDArray[np.float64]) -> None:
    if len(shape) != 3 or min(shape) < 1:
        raise ImageWriteError(f"array must be 3-D (slices, rows, columns), got shape {shape}")
    if affine.shape != (4, 4) or not np.allclose(affine[3], [0, 0, 0, 1]):
        raise ImageWriteError("affine must be a 4x4 homogeneous matrix (last row 0 0 0 1)")
    steps = affine[:3, :3]
    norms = np.linalg.norm(steps, axis=0)
    if np.any(norms < 1e-6):
        raise ImageWriteError(f"affine has a zero-length axis (step lengths {norms.round(4).tolist()} mm)")
    row_dir, col_dir = steps[:, 2] / norms[2], steps[:, 1] / norms[1]
    if abs(float(row_dir @ col_dir)) > 1e-4:
        raise ImageWriteError("affine row and column axes are not orthogonal; DICOM pixels are rectangular")


def choose_rescale(
    array: npt.NDArray[np.floating] | npt.NDArray[np.integer], stored_type: StoredType
) -> tuple[float, float]:
    """Pick RescaleSlope/Intercept so that ``round((array - intercept) / slope)`` fits the stored type.

    Slope 1 (lossless for integer-valued physical units such as HU) whenever the range allows it; the
    intercept is 0 when that fits, else the conventional -1024 for unsigned CT, else the minimum.
    """
    lo, hi = float(np.min(array)), float(np.max(array))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ImageWriteError("array holds NaN or infinite values; physical units must be finite")
    tmin, tmax = (-32768, 32767) if stored_type is StoredType.INT16 else (0, 65535)
    span = hi - lo
    slope = 1.0 if span <= (tmax - tmin) else span / (tmax - tmin)
    for intercept in (0.0, -1024.0, math.floor(lo) if slope == 1.0 else lo - tmin * slope):
        if round((lo - intercept) / slope) >= tmin and round((hi - intercept) / slope) <= tmax:
            return slope, intercept
    raise ImageWriteError(f"values {lo}..{hi} do not fit {stored_type.value}")  # unreachable by design


_UID_NAMESPACE = uuid.UUID("6f1c2b4e-8d0a-5b7e-9c3f-2a1d4e5f6a7b")


def deterministic_uid(*parts: str) -> str:
    """A UID that is a pure function of ``parts``: ``2.25.`` + a name-based (SHA-1, version 5) UUID.

    PS3.5 B.2 allows UUID-derived UIDs under ``2.25``. ``pydicom.uid.generate_uid(prefix=None, ...)``
    ignores its entropy sources and returns a random UUID, so it cannot be used for reproducible output.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def _instance_uid(series_uid: str, index: int) -> str:
    return deterministic_uid(series_uid, "instance", str(index))


def _format_ds(value: float) -> str:
    """Decimal String (max 16 characters, PS3.5 6.2) with enough precision for geometry."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.9g}"
    return text


def _base_dataset(header: SeriesHeader) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = _SOP_CLASS[header.modality]
    # Patient (C.7.1.1)
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = header.patient_birth_date
    ds.PatientSex = header.patient_sex
    if header.patient_age:
        ds.PatientAge = header.patient_age
    if header.deidentified:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "Synthetic data: no real patient"
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = header.study_instance_uid
    ds.StudyDate = header.study_date
    ds.StudyTime = header.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = header.study_id
    ds.AccessionNumber = header.accession_number
    if header.study_description:
        ds.StudyDescription = header.study_description
    # General Series (C.7.3.1)
    ds.Modality = header.modality.value
    ds.SeriesInstanceUID = header.series_instance_uid
    ds.SeriesNumber = header.series_number
    ds.SeriesDate = header.study_date
    ds.SeriesTime = header.study_time
    if header.series_description:
        ds.SeriesDescription = header.series_description
    if header.body_part_examined:
        ds.BodyPartExamined = header.body_part_examined
    ds.PatientPosition = header.patient_position
    if not header.body_part_examined:  # Type 2C, required for paired body parts: present-but-unknown
        ds.Laterality = ""
    # Frame of Reference (C.7.4.1)
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment (C.7.5.1)
    ds.Manufacturer = header.manufacturer
    if header.manufacturer_model_name:
        ds.ManufacturerModelName = header.manufacturer_model_name
    if header.station_name:
        ds.StationName = header.station_name
    if header.institution_name:
        ds.InstitutionName = header.institution_name
    if header.device_serial_number:
        ds.DeviceSerialNumber = header.device_serial_number
    if header.software_versions:
        ds.SoftwareVersions = header.software_versions
    # General Image / General Acquisition (C.7.6.1, C.7.10.1)
    ds.ContentDate = header.study_date
    ds.ContentTime = header.study_time
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "AXIAL"]
        if header.modality is Modality.CT
        else ["ORIGINAL", "PRIMARY", "OTHER"]
    )
    # Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    if header.modality is Modality.CT:  # CT Image (C.8.2.1)
        ds.KVP = _format_ds(header.kvp) if header.kvp is not None else ""
        if header.convolution_kernel:
            ds.ConvolutionKernel = header.convolution_kernel
    else:  # MR Image (C.8.3.1)
        mr = header.mr or MRAcquisition()
        ds.ScanningSequence = mr.scanning_sequence
        ds.SequenceVariant = mr.sequence_variant
        ds.SequenceName = mr.sequence_name
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = _format_ds(mr.repetition_time_ms)
        ds.EchoTime = _format_ds(mr.echo_time_ms)
        ds.EchoTrainLength = 1
        ds.FlipAngle = _format_ds(mr.flip_angle_deg)
        ds.MagneticFieldStrength = _format_ds(mr.magnetic_field_strength_t)
        ds.ImagedNucleus = "1H"
    return ds


def write_image_series(
    array: npt.NDArray[np.floating] | npt.NDArray[np.integer],
    affine: npt.ArrayLike,
    header: SeriesHeader,
    output_dir: Path | str,
    *,
    encoding: PixelEncoding = PixelEncoding.EXPLICIT_VR_LITTLE_ENDIAN,
    stored_type: StoredType | None = None,
    progress: ProgressCallback | None = None,
) -> WrittenSeries:
    """Write ``array`` (slices, rows, columns; physical units) as one single-frame file per slice.

    Parameters
    ----------
    array
        Voxel values in physical units (HU for CT, arbitrary units for MR).
    affine
        4x4 map from ``(k, r, c, 1)`` to LPS mm; axis-aligned or oblique, but rows and columns orthogonal.
    header
        Patient/study/series/equipment context; its UIDs make the output deterministic.
    output_dir
        Created if missing; files are named ``IM00001.dcm``... in slice order.
    encoding
        Transfer syntax; all choices are lossless.
    stored_type
        Defaults to INT16 for CT (the common vendor choice) and UINT16 for MR. RescaleSlope/Intercept are
        chosen by ``choose_rescale``; MR series with slope 1 and intercept 0 carry no rescale attributes
        (they are not part of the MR Image module).
    progress
        Called with (slices written, total).
    """
    aff = np.asarray(affine, dtype=np.float64)
    _check_geometry(array.shape, aff)
    stype = stored_type or (StoredType.INT16 if header.modality is Modality.CT else StoredType.UINT16)
    slope, intercept = choose_rescale(array, stype)
    dtype = np.int16 if stype is StoredType.INT16 else np.uint16
    stored = np.rint((np.asarray(array, dtype=np.float64) - intercept) / slope).astype(dtype)

    steps = aff[:3, :3]
    row_spacing, col_spacing = float(np.linalg.norm(steps[:, 1])), float(np.linalg.norm(steps[:, 2]))
    row_dir = steps[:, 2] / col_spacing  # direction along a row (increasing column index)
    col_dir = steps[:, 1] / row_spacing  # direction down a column (increasing row index)
    normal = np.cross(row_dir, col_dir)
    slice_step = float(np.linalg.norm(steps[:, 0]))
    thickness = header.slice_thickness_mm if header.slice_thickness_mm is not None else slice_step

    if header.window_center is not None and header.window_width is not None:
        window = (header.window_center, header.window_width)
    elif header.modality is Modality.CT:
        window = (40.0, 400.0)
    else:
        p1, p99 = (float(v) for v in np.percentile(array[:: max(1, array.shape[0] // 8)], [1, 99]))
        window = ((p1 + p99) / 2, max(p99 - p1, 1.0))

    base = _base_dataset(header)
    base.Rows, base.Columns = int(array.shape[1]), int(array.shape[2])
    base.PixelRepresentation = 1 if stype is StoredType.INT16 else 0
    base.PixelSpacing = [_format_ds(row_spacing), _format_ds(col_spacing)]
    base.ImageOrientationPatient = [_format_ds(v) for v in (*row_dir, *col_dir)]
    base.SliceThickness = _format_ds(thickness)
    if header.modality is Modality.CT or (slope, intercept) != (1.0, 0.0):
        base.RescaleIntercept = _format_ds(intercept)
        base.RescaleSlope = _format_ds(slope)
        if header.modality is Modality.CT:
            base.RescaleType = "HU"
    base.WindowCenter = _format_ds(window[0])
    base.WindowWidth = _format_ds(window[1])

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = array.shape[0]
    paths: list[Path] = []
    uids: list[str] = []
    for k in range(n):
        ds = Dataset()
        ds.update(base)
        sop_uid = UID(_instance_uid(header.series_instance_uid, k))
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        position = aff[:3, 3] + k * steps[:, 0]
        ds.ImagePositionPatient = [_format_ds(v) for v in position]
        ds.SliceLocation = _format_ds(float(position @ normal))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        plane = np.ascontiguousarray(stored[k])
        if encoding is PixelEncoding.EXPLICIT_VR_LITTLE_ENDIAN:
            ds.PixelData = plane.tobytes()
        else:
            ds.compress(encoding.uid, plane, generate_instance_uid=False)
        path = out / f"IM{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(sop_uid)
        if progress is not None:
            progress(k + 1, n)
    log.debug("wrote %d %s slices to %s (%s)", n, header.modality.value, out, encoding.value)
    return WrittenSeries(tuple(paths), tuple(uids), str(encoding.uid), slope, intercept, stype)
