"""Read image volumes from a source: discover -> group and split -> check geometry -> decode -> units.

``scan`` reads headers only (fast, for ``medseg inspect``); ``read_volumes`` reads every volume it can and
returns the others as refusals with their reason, so that one bad series never stops the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_io import units
from dicom_io.decoding import FrameDecoder
from dicom_io.discovery import ProgressCallback, Source, discover
from dicom_io.errors import (
    DicomIOError,
    InconsistentSeriesError,
    UnsupportedInputError,
)
from dicom_io.geometry import GeometryOptions, GeometryPlan, plan_geometry, resample_stack
from dicom_io.series import FrameHeader, Inventory, VolumeCandidate, build_inventory
from dicom_io.volume import ImageVolume, IntensityUnit, Modality, SeriesContext, SourceFrame

log = logging.getLogger(__name__)

UNIT_OF: dict[Modality, IntensityUnit] = {
    Modality.CT: IntensityUnit.HOUNSFIELD,
    Modality.MR: IntensityUnit.MR_STORED,
    Modality.PT: IntensityUnit.SUV_BODY_WEIGHT,
    Modality.CR: IntensityUnit.PRESENTATION,
    Modality.DX: IntensityUnit.PRESENTATION,
}
CONTEXT_KEYWORDS = (
    "BodyPartExamined",
    "PatientPosition",
    "SliceThickness",
    "ConvolutionKernel",
    "KVP",
    "MagneticFieldStrength",
    "EchoTime",
    "RepetitionTime",
    "FlipAngle",
    "ManufacturerModelName",
)


@dataclass(frozen=True)
class ReadOptions:
    """What the reader may do beyond reading: include derived images, resample (recorded when it does)."""

    geometry: GeometryOptions = field(default_factory=GeometryOptions)
    include_derived: bool = False


@dataclass(frozen=True)
class Refusal:
    """A candidate volume that was not read, and why (named, never silent)."""

    series_instance_uid: str
    series_description: str
    split_label: str
    reason: str
    error: DicomIOError = field(repr=False, compare=False)


@dataclass(frozen=True)
class ReadResult:
    """Volumes read, volumes refused, and the inventory they came from."""

    volumes: tuple[ImageVolume, ...]
    refusals: tuple[Refusal, ...]
    inventory: Inventory


def scan(
    source: Source, *, include_derived: bool = False, progress: ProgressCallback | None = None
) -> Inventory:
    """Headers only: the studies, series and candidate volumes in ``source``."""
    return build_inventory(discover(source, progress=progress), include_derived=include_derived)


def series_label(candidate: VolumeCandidate) -> str:
    """How errors name a candidate volume: its series, and the split that separated it."""
    h = candidate.frames[0].instance.header
    uid = str(h.get("SeriesInstanceUID", "") or "(no SeriesInstanceUID)")
    desc = str(h.get("SeriesDescription", "") or "")
    label = f"series {uid}" + (f" ({desc})" if desc else "")
    return label + (f" [{candidate.split_label}]" if candidate.split_label else "")


def check_candidate(candidate: VolumeCandidate, options: ReadOptions) -> GeometryPlan:
    """Geometry checks on headers only; raises ``DicomIOError`` with the reason."""
    _check_consistent(candidate)
    return plan_geometry(candidate.frames, options.geometry, series_label(candidate))


def _check_consistent(candidate: VolumeCandidate) -> None:
    label = series_label(candidate)
    first = candidate.frames[0].instance.header
    pixels = list({f.instance.name: f.instance.image_pixel for f in candidate.frames}.values())
    for key, attribute in (
        ("BitsAllocated", "bits_allocated"),
        ("PixelRepresentation", "pixel_representation"),
        ("SamplesPerPixel", "samples_per_pixel"),
        ("PhotometricInterpretation", "photometric_interpretation"),
    ):
        values = {str(getattr(p, attribute)) for p in pixels}
        if len(values) > 1:
            raise InconsistentSeriesError(f"{label}: {key} differs between instances: {sorted(values)}")
    if int(first.get("SamplesPerPixel", 1) or 1) != 1:
        raise UnsupportedInputError(
            f"{label}: colour images (SamplesPerPixel {first.get('SamplesPerPixel')}) are not grey-scale"
        )


def read_candidate(candidate: VolumeCandidate, options: ReadOptions | None = None) -> ImageVolume:
    """Decode one candidate volume into physical units on its checked grid."""
    options = options or ReadOptions()
    plan = check_candidate(candidate, options)
    frames = [candidate.frames[i] for i in plan.order]
    label = series_label(candidate)
    first = frames[0]
    stack = np.empty((len(frames), first.rows, first.columns), dtype=np.float32)
    converter = _unit_converter(candidate, label)
    decoder = FrameDecoder()
    for k, frame in enumerate(frames):
        converter(decoder.decode(frame), frame, frame.instance.header, stack[k])
    array = stack
    if plan.resample is not None:
        array = resample_stack(stack, plan.resample, fill_value=float(stack.min()))
        del stack
    headers = _unique_headers(frames)
    return ImageVolume(
        array=array,
        affine=plan.affine,
        modality=candidate.modality,
        unit=UNIT_OF[candidate.modality],
        series=_series_context(first.instance.header),
        frames=tuple(
            SourceFrame(f.instance.sop_class_uid, f.instance.sop_instance_uid, f.frame_number) for f in frames
        ),
        geometry=plan.report,
        source_headers=headers,
    )


def read_volumes(
    source: Source, options: ReadOptions | None = None, *, progress: ProgressCallback | None = None
) -> ReadResult:
    """Read every candidate volume in ``source``; refused ones come back with their reason."""
    options = options or ReadOptions()
    inventory = scan(source, include_derived=options.include_derived)
    volumes, refusals = [], []
    candidates = [(entry, c) for entry in inventory.series for c in entry.candidates]
    for i, (entry, candidate) in enumerate(candidates):
        try:
            volumes.append(read_candidate(candidate, options))
        except DicomIOError as err:
            log.warning("%s", err)
            refusals.append(
                Refusal(
                    entry.series_instance_uid, entry.series_description, candidate.split_label, str(err), err
                )
            )
        if progress is not None:
            progress(i + 1, len(candidates))
    return ReadResult(tuple(volumes), tuple(refusals), inventory)


def read_volume(source: Source, options: ReadOptions | None = None) -> ImageVolume:
    """Read exactly one volume; anything else is an error that lists what was found."""
    result = read_volumes(source, options)
    if len(result.volumes) == 1:
        return result.volumes[0]
    found = "; ".join(
        [f"volume {v.series.series_instance_uid} {v.shape}" for v in result.volumes]
        + [f"refused {r.series_instance_uid}: {r.reason}" for r in result.refusals]
    )
    if not result.volumes and len(result.refusals) == 1:
        raise result.refusals[0].error
    raise DicomIOError(
        f"{source}: expected exactly one image volume, found {len(result.volumes)} "
        f"({found or 'no image series'}); select one series or use read_volumes()"
    )


# Writes one frame's stored values, in physical units, into its slice of the volume.
Converter = Callable[[npt.NDArray[np.generic], FrameHeader, Dataset, npt.NDArray[np.float32]], object]


def _unit_converter(candidate: VolumeCandidate, label: str) -> Converter:
    modality = candidate.modality
    if modality in (Modality.CT, Modality.MR):
        return lambda raw, f, _ds, out: units.rescale(raw, f.rescale_slope, f.rescale_intercept, out=out)
    if modality in (Modality.CR, Modality.DX):
        return lambda raw, _f, ds, out: np.copyto(out, units.projection_presentation(raw, ds))
    if modality == Modality.PT:
        header = candidate.frames[0].instance.header
        try:
            factor = units.suv_body_weight_factor(header, scan_start=_earliest_acquisition(candidate))
        except DicomIOError as err:
            raise type(err)(f"{label}: {err}") from err
        return lambda raw, f, _ds, out: units.rescale(
            raw, f.rescale_slope * factor, f.rescale_intercept * factor, out=out
        )
    raise UnsupportedInputError(f"{label}: modality {modality} has no physical-unit conversion")


def _earliest_acquisition(candidate: VolumeCandidate) -> datetime | None:
    found = []
    for f in candidate.frames:
        h = f.instance.header
        date, time = str(h.get("AcquisitionDate", "") or ""), str(h.get("AcquisitionTime", "") or "")
        if date and time:
            try:
                found.append(datetime.strptime(date + time.split(".")[0].ljust(6, "0"), "%Y%m%d%H%M%S"))
            except ValueError:
                continue
    return min(found) if found else None


def _unique_headers(frames: list[FrameHeader]) -> tuple[Dataset, ...]:
    seen: dict[str, Dataset] = {}
    for f in frames:
        seen.setdefault(f.instance.name, f.instance.header)
    return tuple(seen.values())


def _series_context(h: Dataset) -> SeriesContext:
    extra = tuple((k, str(h.get(k))) for k in CONTEXT_KEYWORDS if h.get(k) not in (None, ""))
    series_number = h.get("SeriesNumber")
    return SeriesContext(
        study_instance_uid=str(h.get("StudyInstanceUID", "") or ""),
        series_instance_uid=str(h.get("SeriesInstanceUID", "") or ""),
        frame_of_reference_uid=str(h.get("FrameOfReferenceUID", "") or "") or None,
        series_number=None if series_number in (None, "") else int(series_number),
        series_description=str(h.get("SeriesDescription", "") or ""),
        manufacturer=str(h.get("Manufacturer", "") or ""),
        patient_id=str(h.get("PatientID", "") or ""),
        extra=extra,
    )
