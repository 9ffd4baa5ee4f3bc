"""What every derived object (SEG, Parametric Map, SR) takes from its source series.

Derived objects are written on the source grid and reference every source instance (DICOM.md 11-12), so
they need the source headers with their identity (Study, Series, SOP Instance UIDs) intact. Their own UIDs
are pure functions of the source series UID and the model's Device UID (plus the object kind), so a rerun
of the same model on the same series gives the same UIDs and a PACS replaces rather than duplicates.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from enum import StrEnum

from pydicom.dataset import Dataset

from dicom_io.ai_result import AnalysisResult, ResultError
from dicom_io.image_writer import deterministic_uid
from dicom_io.volume import ImageVolume

log = logging.getLogger(__name__)


class DerivedKind(StrEnum):
    """The result objects, with the series number each is written under."""

    SEG = "seg"
    PM = "pm"
    SR = "sr"

    @property
    def series_number(self) -> int:
        return {DerivedKind.SEG: 9001, DerivedKind.PM: 9002, DerivedKind.SR: 9003}[self]


@dataclass(frozen=True)
class DerivedIdentity:
    """UIDs and numbers of one derived object."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int = 1


def derived_identity(result: AnalysisResult, kind: DerivedKind, variant: str = "") -> DerivedIdentity:
    """Deterministic identity of one result object (``variant`` separates e.g. the SEG profiles)."""
    check_source(result.source)
    parts = (result.source.series.series_instance_uid, result.algorithm.device_uid, kind.value, variant)
    return DerivedIdentity(
        study_instance_uid=result.source.series.study_instance_uid,
        series_instance_uid=deterministic_uid(*parts, "series"),
        sop_instance_uid=deterministic_uid(*parts, "instance"),
        series_number=kind.series_number,
    )


def tracking_uid(result: AnalysisResult, what: str) -> str:
    """Tracking Unique Identifier of a segment or finding, shared by SEG and SR (TID 4108)."""
    return deterministic_uid(result.source.series.series_instance_uid, result.algorithm.device_uid, what)


def check_source(volume: ImageVolume) -> None:
    """Refuse sources that results cannot be written against (PS3.3 C.7.2.1, C.7.3.1: Type 1 UIDs)."""
    series = volume.series.series_instance_uid or "(no SeriesInstanceUID)"
    if volume.geometry.was_resampled:
        raise ResultError(
            f"series {series}: the volume was resampled on reading ({'; '.join(volume.geometry.resampled)}); "
            "results must be encoded on the acquired grid so every frame references its source image: "
            "resample the prediction back onto the source frames before writing"
        )
    if not volume.series.study_instance_uid or not volume.series.series_instance_uid:
        raise ResultError(
            f"series {series}: the source has an empty StudyInstanceUID or SeriesInstanceUID "
            f"({volume.series.study_instance_uid!r}, {volume.series.series_instance_uid!r}); derived objects "
            "must reference a study and series: re-identify the source series (assign UIDs) first"
        )
    if not volume.frames or not volume.source_headers:
        raise ResultError(
            f"series {series}: the volume has no source frames/headers to reference; read it with "
            "dicom_io.read_volume so that the source instances are known"
        )


def source_images(volume: ImageVolume) -> list[Dataset]:
    """The pixel-less source headers, one per source instance, each with its SOP Class/Instance UID.

    highdicom needs only the metadata of the source images (not Pixel Data) to build references. Some
    exporters leave SOP Class/Instance UID empty in the data set and keep them only in the file meta
    information (PS3.10 7.1 says both must be equal); such headers are copied and the values filled from
    the file meta (or the reader's frame list), with a warning, and never changed in the caller's volume.
    """
    check_source(volume)
    series = volume.series.series_instance_uid
    frame_uids: list[tuple[str, str]] = []  # (class, instance) per source instance, first-seen order
    seen: set[str] = set()
    for f in volume.frames:
        if f.sop_instance_uid not in seen:
            seen.add(f.sop_instance_uid)
            frame_uids.append((f.sop_class_uid, f.sop_instance_uid))
    if len(frame_uids) != len(volume.source_headers):
        raise ResultError(
            f"series {series}: {len(volume.source_headers)} source headers for {len(frame_uids)} "
            "source instances; the volume's headers and frames disagree"
        )
    headers: list[Dataset] = []
    repaired = 0
    for header, (sop_class, sop_instance) in zip(volume.source_headers, frame_uids, strict=True):
        meta = getattr(header, "file_meta", None)
        have_class = str(header.get("SOPClassUID", "") or "")
        have_instance = str(header.get("SOPInstanceUID", "") or "")
        if have_class and have_instance:
            headers.append(header)
            continue
        fixed = copy.deepcopy(header)
        fixed.SOPClassUID = (
            have_class
            or str(getattr(meta, "MediaStorageSOPClassUID", "") if meta is not None else "")
            or sop_class
        )
        fixed.SOPInstanceUID = (
            have_instance
            or str(getattr(meta, "MediaStorageSOPInstanceUID", "") if meta is not None else "")
            or sop_instance
        )
        headers.append(fixed)
        repaired += 1
    if repaired:
        log.warning(
            "series %s: %d source headers had an empty SOP Class/Instance UID; referenced with the values "
            "of their file meta information",
            series,
            repaired,
        )
    referenced = {str(h.SOPInstanceUID) for h in headers}
    expected = {uid for _, uid in frame_uids}
    if referenced != expected:
        raise ResultError(
            f"series {series}: source headers name instances {sorted(referenced - expected)[:3]} that are "
            f"not among the volume's frames (missing {sorted(expected - referenced)[:3]})"
        )
    return headers


def character_set(headers: list[Dataset]) -> str | list[str] | None:
    """Specific Character Set for a derived object: the source's, or none (default repertoire).

    highdicom copies the first source's value and rejects an empty one, which some exporters write
    (dcmqi's ct-3slice); empty means the default repertoire (PS3.3 C.12.1.1.2), i.e. no attribute.
    """
    value = headers[0].get("SpecificCharacterSet") if headers else None
    if not value:
        return None
    if isinstance(value, str):
        return value
    return [str(v) for v in value]  # multi-valued (code extensions)
