"""Group instances into series and split series into candidate volumes (DICOM.md 1, 5, 6).

Each 2-D frame, whether a single-frame instance or one frame of an enhanced multi-frame instance, becomes
a ``FrameHeader`` with its own geometry (per-frame functional groups, PS3.3 C.7.6.16). Frames are grouped
by SeriesInstanceUID and split on what makes frames belong to different volumes: orientation, matrix,
pixel spacing, ImageType, echo time; then, where slice positions repeat, on acquisition, temporal position
or instance. Localizers, derived and secondary-capture images are excluded with their reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_io.discovery import Discovery, InstanceHeader, SkippedFile, header_value
from dicom_io.volume import Modality

# SOP classes read as volumes (PS3.4 B.5), by the modality they carry.
VOLUME_SOP_CLASSES: dict[str, Modality] = {
    "1.2.840.10008.5.1.4.1.1.2": Modality.CT,  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1": Modality.CT,  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2": Modality.CT,  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4": Modality.MR,  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1": Modality.MR,  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.4": Modality.MR,  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128": Modality.PT,  # PET Image Storage
    "1.2.840.10008.5.1.4.1.1.130": Modality.PT,  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.128.1": Modality.PT,  # Legacy Converted Enhanced PET
    "1.2.840.10008.5.1.4.1.1.1": Modality.CR,  # CR Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1": Modality.DX,  # DX for Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": Modality.DX,  # DX for Processing
}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT", "SURVIEW", "TOPOGRAM", "REF_SURVIEW"})
MOSAIC_IMAGE_TYPE = "MOSAIC"
UNIDENTIFIED_SERIES_PREFIX = "no-uid:"
# Tags tested for presence only (an int tag avoids pydicom's keyword lookup).
PIXEL_DATA, FLOAT_PIXEL_DATA = 0x7FE00010, 0x7FE00008
PER_FRAME_FUNCTIONAL_GROUPS, SHARED_FUNCTIONAL_GROUPS = 0x52009230, 0x52009229
# ImageType values beyond the third are vendor-defined (PS3.3 C.7.6.1.1.2); of those, only the ones naming a
# complex component separate volumes (magnitude vs phase), as in dcm2niix. Others (GE's "ADD") do not.
COMPLEX_COMPONENT_TYPES = frozenset({"M", "P", "R", "I", "MAGNITUDE", "PHASE", "REAL", "IMAGINARY", "MIXED"})


@dataclass(frozen=True)
class FrameHeader:
    """Geometry and pixel semantics of one 2-D frame, from its own (or its instance's) header."""

    instance: InstanceHeader
    frame_number: int | None  # 1-based for multi-frame instances
    position: tuple[float, float, float] | None  # ImagePositionPatient, LPS mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (row cosines, column cosines)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    rows: int
    columns: int
    slice_thickness: float | None
    rescale_slope: float
    rescale_intercept: float
    image_type: tuple[str, ...]
    echo_time: float | None
    acquisition_number: int | None
    temporal_index: int | None
    stack_id: str | None

    @property
    def name(self) -> str:
        return (
            self.instance.name
            if self.frame_number is None
            else f"{self.instance.name} frame {self.frame_number}"
        )


@dataclass(frozen=True)
class VolumeCandidate:
    """Frames that should form one volume, before geometry checks."""

    modality: Modality
    frames: tuple[FrameHeader, ...]
    split_label: str  # why this volume was split from the rest of its series ("" when it is the series)


@dataclass(frozen=True)
class Exclusion:
    """Instances of a series that are not part of any volume, and why."""

    names: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class SeriesEntry:
    """One series of one study: the volumes it yields and the instances it excludes."""

    study_instance_uid: str
    series_instance_uid: str
    series_number: int | None
    series_description: str
    modality: str
    instance_count: int
    candidates: tuple[VolumeCandidate, ...]
    exclusions: tuple[Exclusion, ...]
    notes: tuple[str, ...] = ()  # tolerant-reading decisions the user should know about


@dataclass(frozen=True)
class Inventory:
    """Everything a source holds, organised by study and series (what ``medseg inspect`` shows)."""

    series: tuple[SeriesEntry, ...]
    skipped: tuple[SkippedFile, ...]

    @property
    def candidates(self) -> tuple[VolumeCandidate, ...]:
        return tuple(c for s in self.series for c in s.candidates)


def _floats(value: object) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None


def _float(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _int(value: object) -> int | None:
    f = _float(value)
    return None if f is None else int(f)


def _item(seq_owner: Dataset | None, keyword: str) -> Dataset | None:
    if seq_owner is None:
        return None
    seq = seq_owner.get(keyword)
    return seq[0] if seq else None


def _functional_group(header: Dataset, frame_index: int, keyword: str) -> Dataset | None:
    """A functional-group item for one frame: per-frame first, then shared (PS3.3 C.7.6.16)."""
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        found = _item(per_frame[frame_index], keyword)
        if found is not None:
            return found
    return _item(_item(header, "SharedFunctionalGroupsSequence"), keyword)


def _joined(values: Sequence[str]) -> str:
    return "\\".join(values)


def _image_type(header: Dataset) -> tuple[str, ...]:
    value = header_value(header, "ImageType")
    if value is None:
        return ()
    return tuple(str(v).upper() for v in ([value] if isinstance(value, str) else value))


def _frame_type(item: Dataset, header: Dataset) -> tuple[str, ...]:
    value = item.get("FrameType")
    if value is None:
        return _image_type(header)
    return tuple(str(v).upper() for v in ([value] if isinstance(value, str) else value))


def frame_headers(instance: InstanceHeader) -> list[FrameHeader]:
    """One ``FrameHeader`` per frame of an instance (single- or multi-frame)."""
    h = instance.header
    pixel = instance.image_pixel
    rows, columns = int(pixel.rows or 0), int(pixel.columns or 0)
    n_frames = int(pixel.number_of_frames or 1)
    if PER_FRAME_FUNCTIONAL_GROUPS not in h and SHARED_FUNCTIONAL_GROUPS not in h:
        spacing = _floats(header_value(h, "PixelSpacing")) or _floats(header_value(h, "ImagerPixelSpacing"))
        position = _floats(header_value(h, "ImagePositionPatient"))
        orientation = _floats(header_value(h, "ImageOrientationPatient"))
        thickness = _float(header_value(h, "SliceThickness"))
        slope = _float(header_value(h, "RescaleSlope")) or 1.0
        intercept = _float(header_value(h, "RescaleIntercept")) or 0.0
        image_type = _image_type(h)
        echo_time = _float(header_value(h, "EchoTime"))
        acquisition = _int(header_value(h, "AcquisitionNumber"))
        temporal = _int(header_value(h, "TemporalPositionIdentifier"))
        return [
            FrameHeader(
                instance=instance,
                frame_number=None if n_frames == 1 else i + 1,
                position=None
                if position is None or len(position) != 3
                else (position[0], position[1], position[2]),
                orientation=orientation,
                pixel_spacing=None if spacing is None or len(spacing) != 2 else (spacing[0], spacing[1]),
                rows=rows,
                columns=columns,
                slice_thickness=thickness,
                rescale_slope=slope,
                rescale_intercept=intercept,
                image_type=image_type,
                echo_time=echo_time,
                acquisition_number=acquisition,
                temporal_index=temporal,
                stack_id=None,
            )
            for i in range(n_frames)
        ]
    frames = []
    for i in range(n_frames):
        pos = _floats(getattr(_functional_group(h, i, "PlanePositionSequence"), "ImagePositionPatient", None))
        ori = _floats(
            getattr(_functional_group(h, i, "PlaneOrientationSequence"), "ImageOrientationPatient", None)
        )
        measures = _functional_group(h, i, "PixelMeasuresSequence")
        spacing = _floats(getattr(measures, "PixelSpacing", None))
        transform = _functional_group(h, i, "PixelValueTransformationSequence")
        content = _functional_group(h, i, "FrameContentSequence")
        frame_type_item = _functional_group(h, i, "MRImageFrameTypeSequence") or _functional_group(
            h, i, "CTImageFrameTypeSequence"
        )
        frame_type = _image_type(h) if frame_type_item is None else _frame_type(frame_type_item, h)
        component = getattr(frame_type_item, "ComplexImageComponent", None)
        if component:
            frame_type = (*frame_type, str(component).upper())
        echo = _functional_group(h, i, "MREchoSequence")
        frames.append(
            FrameHeader(
                instance=instance,
                frame_number=i + 1,
                position=None if pos is None or len(pos) != 3 else (pos[0], pos[1], pos[2]),
                orientation=ori,
                pixel_spacing=None if spacing is None or len(spacing) != 2 else (spacing[0], spacing[1]),
                rows=rows,
                columns=columns,
                slice_thickness=_float(getattr(measures, "SliceThickness", None)),
                rescale_slope=_float(getattr(transform, "RescaleSlope", None)) or 1.0,
                rescale_intercept=_float(getattr(transform, "RescaleIntercept", None)) or 0.0,
                image_type=frame_type,
                echo_time=_float(getattr(echo, "EffectiveEchoTime", None)),
                acquisition_number=_int(getattr(content, "FrameAcquisitionNumber", None))
                or _int(h.get("AcquisitionNumber")),
                temporal_index=_int(getattr(content, "TemporalPositionIndex", None)),
                stack_id=str(getattr(content, "StackID", "")) or None,
            )
        )
    return frames


def exclusion_reason(instance: InstanceHeader, *, include_derived: bool) -> str | None:
    """Why an instance cannot be part of an image volume, or None if it can."""
    header = instance.header
    sop_class = instance.sop_class_uid
    if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary capture (a screenshot, not an acquired image)"
    if sop_class not in VOLUME_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "missing SOPClassUID"
        return f"SOP class {name} ({sop_class}) is not an image volume this reader handles"
    if PIXEL_DATA not in header and FLOAT_PIXEL_DATA not in header and not _has_pixels(instance):
        return "no Pixel Data (7FE0,0010)"
    image_type = _image_type(header)
    if LOCALIZER_IMAGE_TYPES & set(image_type):
        return f"localizer/scout image (ImageType {_joined(image_type)})"
    if MOSAIC_IMAGE_TYPE in image_type:
        return "Siemens mosaic (several slices tiled in one image): not de-mosaicked; use dcm2niix"
    if image_type and image_type[0] == "DERIVED" and not include_derived:
        return (
            f"derived image (ImageType {_joined(image_type)}); pass include_derived=True "
            "(--include-derived) to read it as a volume"
        )
    return None


def _has_pixels(instance: InstanceHeader) -> bool:
    # headers are read with stop_before_pixels, so pixel data is never present; trust Rows/Columns then
    return bool(instance.image_pixel.rows) and bool(instance.image_pixel.columns)


def _rounded(values: Sequence[float] | None, decimals: int) -> tuple[float, ...] | None:
    return None if values is None else tuple(round(float(v), decimals) + 0.0 for v in values)


def _image_type_key(image_type: tuple[str, ...]) -> tuple[str, ...]:
    return image_type[:3] + tuple(sorted(COMPLEX_COMPONENT_TYPES.intersection(image_type[3:])))


def _split_key(frame: FrameHeader) -> tuple[Hashable, ...]:
    return (
        _rounded(frame.orientation, 4),
        frame.rows,
        frame.columns,
        _rounded(frame.pixel_spacing, 4),
        _image_type_key(frame.image_type),
        None if frame.echo_time is None else round(frame.echo_time, 3),
    )


def _describe_split(frame: FrameHeader, varying: set[int]) -> str:
    labels = []
    if 0 in varying:
        labels.append(f"orientation {frame.orientation}")
    if 1 in varying or 2 in varying:
        labels.append(f"matrix {frame.rows}x{frame.columns}")
    if 3 in varying:
        labels.append(f"pixel spacing {frame.pixel_spacing}")
    if 4 in varying:
        labels.append(f"ImageType {_joined(frame.image_type)}")
    if 5 in varying:
        labels.append(f"echo time {frame.echo_time} ms")
    return ", ".join(labels)


def _position_key(frame: FrameHeader) -> tuple[float, ...] | None:
    return _rounded(frame.position, 2)


_REPEAT_SPLITTERS: tuple[tuple[str, Callable[[FrameHeader], Hashable]], ...] = (
    ("acquisition", lambda f: f.acquisition_number),
    ("temporal position", lambda f: f.temporal_index),
    ("stack", lambda f: f.stack_id),
    ("instance", lambda f: f.instance.sop_instance_uid if f.frame_number is not None else None),
)


def _split_repeats(frames: list[FrameHeader]) -> list[tuple[str, list[FrameHeader]]]:
    """Split frames whose positions repeat into one volume per acquisition/time point/instance.

    Only a split that leaves every part with unique positions (and more than one frame) is taken, so a
    duplicated slice stays in its volume and is refused there, by name, rather than silently dropped.
    """
    positions = [_position_key(f) for f in frames]
    if len(set(positions)) == len(positions):
        return [("", frames)]
    for label, key in _REPEAT_SPLITTERS:
        groups: dict[Hashable, list[FrameHeader]] = defaultdict(list)
        for f in frames:
            groups[key(f)].append(f)
        if len(groups) < 2 or None in groups:
            continue
        parts = list(groups.values())
        if all(len(p) > 1 and len({_position_key(f) for f in p}) == len(p) for p in parts):
            return [(f"{label} {k}", p) for k, p in groups.items()]
    return [("", frames)]


def build_inventory(discovery: Discovery, *, include_derived: bool = False) -> Inventory:
    """Group discovered instances into studies/series and split them into candidate volumes."""
    by_series: dict[tuple[str, str], list[InstanceHeader]] = defaultdict(list)
    skipped = list(discovery.skipped)
    for inst in discovery.instances:
        h = inst.header
        series_uid = str(header_value(h, "SeriesInstanceUID", "") or "")
        if not series_uid:
            # Tolerant reading (anonymizers sometimes blank UIDs): group by what identifies a series instead,
            # and say so in the series notes. Writers later refuse to reference an empty UID.
            series_uid = UNIDENTIFIED_SERIES_PREFIX + "|".join(
                str(h.get(k, "") or "")
                for k in ("FrameOfReferenceUID", "SeriesNumber", "SeriesDescription", "Modality")
            )
        by_series[(str(header_value(h, "StudyInstanceUID", "") or ""), series_uid)].append(inst)

    entries = []
    for (study_uid, series_uid), instances in by_series.items():
        first = instances[0].header
        excluded: dict[str, list[str]] = defaultdict(list)
        usable: list[FrameHeader] = []
        for inst in instances:
            reason = exclusion_reason(inst, include_derived=include_derived)
            if reason is not None:
                excluded[reason].append(inst.name)
            else:
                usable.extend(frame_headers(inst))
        candidates = _split_candidates(usable, excluded)
        notes: tuple[str, ...] = ()
        if series_uid.startswith(UNIDENTIFIED_SERIES_PREFIX):
            notes = (
                "SeriesInstanceUID (0020,000E) is empty: instances grouped by FrameOfReferenceUID, "
                "SeriesNumber, SeriesDescription and Modality",
            )
        entries.append(
            SeriesEntry(
                notes=notes,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                series_number=_int(first.get("SeriesNumber")),
                series_description=str(first.get("SeriesDescription", "")),
                modality=str(first.get("Modality", "")),
                instance_count=len(instances),
                candidates=tuple(candidates),
                exclusions=tuple(Exclusion(tuple(names), reason) for reason, names in excluded.items()),
            )
        )
    entries.sort(key=lambda e: (e.study_instance_uid, e.series_number or 0, e.series_instance_uid))
    return Inventory(tuple(entries), tuple(skipped))


def _split_candidates(frames: list[FrameHeader], excluded: dict[str, list[str]]) -> list[VolumeCandidate]:
    by_key: dict[tuple[Hashable, ...], list[FrameHeader]] = defaultdict(list)
    for f in frames:
        by_key[_split_key(f)].append(f)
    keys = list(by_key)
    varying = {i for i in range(len(keys[0]))} if keys else set()
    varying = {i for i in varying if len({k[i] for k in keys}) > 1}
    candidates = []
    for group in by_key.values():
        modality = VOLUME_SOP_CLASSES[group[0].instance.sop_class_uid]
        header_modality = str(group[0].instance.header.get("Modality", ""))
        if (
            header_modality
            and header_modality != modality.value
            and not ({header_modality, modality.value} <= {"CR", "DX"})
        ):
            reason = f"Modality {header_modality!r} disagrees with SOP class ({modality.value})"
            excluded[reason].extend(f.instance.name for f in group)
            continue
        split = _describe_split(group[0], varying)
        for repeat_label, part in _split_repeats(group):
            label = ", ".join(s for s in (split, repeat_label) if s)
            candidates.append(VolumeCandidate(modality, tuple(part), label))
    return candidates


def projected_positions(frames: Sequence[FrameHeader], normal: np.ndarray) -> np.ndarray:
    """Distance of each frame along the slice normal (DICOM.md 2: sort by this, never by InstanceNumber)."""
    return np.array([np.dot(f.position, normal) for f in frames if f.position is not None])
