"""TID 1500 Measurement Report of an analysis result as a Comprehensive 3D SR (DICOM.md 17-19).

Content tree (PS3.16 TID 1500):

- root (126000, DCM, "Imaging Measurement Report") with ContentTemplateSequence 1500 (OHIF and Slicer need
  both), language, the model as device observer (TID 1004, Device Observer UID = model Device UID),
  procedure reported and an image library (TID 1600) of the source images that the content references;
- Imaging Measurements: per non-empty structure a TID 1411 volumetric group that references its SEG
  segment, paired with a TID 1410 planar group on the same Tracking UID whose region is the outline
  (SCOORD POLYLINE) of the structure on its largest cross-section, referencing that source image. OHIF
  (3.13) fails on any group without geometry and merges groups by Tracking UID (DICOM.md 18a). Per lesion a
  TID 1410 group with a SCOORD CIRCLE of its diameter on the source image through its centre (a SCOORD3D
  is not drawn or breaks OHIF, DICOM.md 18); its LPS centre and box are measurements;
- Qualitative Evaluations (TID 1500 row 12): declared structures that were not found ("Absent": the model
  looked and found nothing, DICOM.md 13), why structures need review, a plain-text summary of every
  lesion, the result's notes (Monte-Carlo settings, findings left unlisted, a scan outside the training
  data) and the "not for clinical use" statement. When nothing at all was found, one TID 1410 group
  outlines the examined image area of a middle slice with every declared structure "Absent", because
  OHIF cannot open a report without measurement groups.

Numbers without a standard concept are coded in the declared private scheme of ``dicom_io.coding``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from scipy import ndimage

from dicom_io import coding, provenance
from dicom_io.ai_result import (
    AnalysisResult,
    LesionFinding,
    ResultError,
    SegmentDescription,
    StructureMeasurements,
)
from dicom_io.derived import DerivedKind, character_set, derived_identity, source_images, tracking_uid
from dicom_io.volume import ImageVolume, IntensityUnit, Modality, SourceFrame

log = logging.getLogger(__name__)

QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# What "mean intensity" is called, by the unit the reader produced (CID 7180 / CID 7181).
_INTENSITY: dict[IntensityUnit, tuple[Code, Code]] = {
    IntensityUnit.HOUNSFIELD: (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit),
    IntensityUnit.SUV_BODY_WEIGHT: (codes.DCM.Suvbw, codes.UCUM.StandardizedUptakeValueBodyWeight),
    IntensityUnit.MR_STORED: (codes.DCM.MRSignalIntensity, codes.UCUM.NoUnits),
}
_PROCEDURE: dict[Modality, Code] = {
    Modality.CT: codes.cid100.CTUnspecifiedBodyRegion,
    Modality.MR: codes.cid100.MRIUnspecifiedBodyRegion,
    Modality.PT: codes.cid100.PETUnspecifiedBodyRegion,
    Modality.CR: codes.cid100.XRUnspecifiedBodyRegion,
    Modality.DX: codes.cid100.XRUnspecifiedBodyRegion,
}


@dataclass(frozen=True)
class ReportedValue:
    """One numeric measurement as the SR states it; the gate checks a read-back against these."""

    tracking_uid: str
    tracking_id: str
    name: Code
    value: float
    unit: Code
    derivation: Code | None = None

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Identity within a report: group, concept and derivation."""
        d = self.derivation
        return (self.tracking_uid, self.name.value, self.name.scheme_designator, d.value if d else "")


@dataclass(frozen=True)
class CrossSection:
    """A structure's largest cross-section: slice index, closed outline (column, row) and area."""

    slice_index: int
    outline: npt.NDArray[np.float64]
    area_mm2: float


def outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """Closed outline of the largest 4-connected component of a 2-D mask, holes filled.

    Vertices are pixel corners in DICOM image coordinates ``(column, row)``, where (0, 0) is the top
    left corner of the top left pixel (PS3.3 C.18.6.1.2), so the polygon encloses exactly the component's
    pixels. The first vertex is repeated at the end (a closed POLYLINE, PS3.3 C.18.6.1.1).
    """
    labels, n = ndimage.label(mask)
    if n == 0:
        raise ResultError("cannot outline an empty mask")
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    component = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
    p = np.pad(component, 1)
    inner = p[1:-1, 1:-1]
    succ: dict[tuple[int, int], list[tuple[int, int]]] = {}
    # Clockwise around each pixel (x right, y down): top, right, bottom, left side where outside.
    sides = (
        (~p[:-2, 1:-1], (0, 0), (1, 0)),
        (~p[1:-1, 2:], (1, 0), (1, 1)),
        (~p[2:, 1:-1], (1, 1), (0, 1)),
        (~p[1:-1, :-2], (0, 1), (0, 0)),
    )
    for outside, (sx, sy), (ex, ey) in sides:
        rows, cols = np.nonzero(inner & outside)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            succ.setdefault((c + sx, r + sy), []).append((c + ex, r + ey))
    start = min(succ, key=lambda v: (v[1], v[0]))
    points = [start]
    previous = start
    current = succ[start].pop()
    while current != start:
        points.append(current)
        options = succ[current]
        # at a pinch vertex prefer the right turn, which stays on the same pixel's boundary
        dx, dy = current[0] - previous[0], current[1] - previous[1]
        right = (current[0] - dy, current[1] + dx)
        nxt = right if right in options else options[0]
        options.remove(nxt)
        previous, current = current, nxt
    points.append(start)
    xy = np.asarray(points, dtype=np.float64)
    turn = np.ones(len(xy), dtype=bool)  # keep only corners: drop points inside straight runs
    d = np.diff(xy, axis=0)
    turn[1:-1] = np.any(d[1:] != d[:-1], axis=1)
    return np.asarray(xy[turn])


def largest_cross_section(volume: ImageVolume, mask: npt.NDArray[np.bool_]) -> CrossSection:
    """The slice where the structure is largest, its outline and its area there."""
    per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1)
    k = int(np.argmax(per_slice))
    _, row_mm, col_mm = volume.spacing
    return CrossSection(k, outline(mask[k]), float(per_slice[k]) * row_mm * col_mm)


def _source_for_region(frame: SourceFrame) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=frame.sop_class_uid,
        referenced_sop_instance_uid=frame.sop_instance_uid,
        referenced_frame_numbers=[frame.frame_number] if frame.frame_number else None,
    )


def structure_values(
    result: AnalysisResult, segment: SegmentDescription, m: StructureMeasurements
) -> list[ReportedValue]:
    """The TID 1411 numbers of one structure (volume, mean intensity and the uncertainty summaries)."""
    uid, tid = tracking_uid(result, f"segment {segment.label}"), segment.name
    mean = codes.SCT.Mean
    values = [ReportedValue(uid, tid, codes.SCT.Volume, m.volume_ml, coding.MILLILITER)]
    intensity = _INTENSITY.get(result.source.unit)
    if m.mean_intensity is not None and intensity is not None:
        values.append(ReportedValue(uid, tid, intensity[0], m.mean_intensity, intensity[1], mean))
    values += [
        ReportedValue(uid, tid, coding.PREDICTIVE_ENTROPY, m.mean_entropy, coding.NATS, mean),
        ReportedValue(uid, tid, coding.MUTUAL_INFORMATION, m.mean_mutual_information, coding.NATS, mean),
        ReportedValue(uid, tid, coding.BOUNDARY_ENTROPY, m.boundary_entropy, coding.NATS),
        ReportedValue(uid, tid, coding.VOLUME_SPREAD, m.volume_spread_ml, coding.MILLILITER),
        ReportedValue(uid, tid, coding.SAMPLE_AGREEMENT, m.sample_agreement, codes.UCUM.NoUnits),
    ]
    return values


def area_value(result: AnalysisResult, segment: SegmentDescription, section: CrossSection) -> ReportedValue:
    """The TID 1410 number of a structure's outline group: its area on the largest cross-section."""
    uid = tracking_uid(result, f"segment {segment.label}")
    return ReportedValue(uid, segment.name, codes.SCT.Area, section.area_mm2, codes.UCUM.SquareMillimeter)


def lesion_values(result: AnalysisResult, lesion: LesionFinding) -> list[ReportedValue]:
    """The TID 1410 numbers of one lesion: size, detection certainty and its spread, LPS centre and box."""
    uid, tid = tracking_uid(result, f"lesion {lesion.index}"), f"lesion {lesion.index}"
    mm, one, pct = codes.UCUM.Millimeter, codes.UCUM.NoUnits, codes.UCUM.Percent
    values = [
        ReportedValue(uid, tid, codes.SCT.Diameter, lesion.diameter_mm, mm),
        ReportedValue(uid, tid, codes.DCM.CertaintyOfFinding, 100.0 * lesion.score, pct),
        ReportedValue(uid, tid, coding.SCORE_SPREAD, 100.0 * lesion.score_spread, pct),
        ReportedValue(uid, tid, coding.DETECTION_RATE, lesion.detection_rate, one),
        ReportedValue(uid, tid, coding.BOX_SPREAD, lesion.box_spread_mm, mm),
    ]
    for codes_, coords in (
        (coding.CENTRE_LPS, lesion.centre_lps),
        (coding.BOX_MIN_LPS, lesion.box_min_lps),
        (coding.BOX_MAX_LPS, lesion.box_max_lps),
    ):
        values += [ReportedValue(uid, tid, c, float(v), mm) for c, v in zip(codes_, coords, strict=True)]
    return values


def _measurement(v: ReportedValue) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=v.name, value=v.value, unit=v.unit, derivation=v.derivation)


def _present_segments(result: AnalysisResult) -> list[tuple[int, SegmentDescription, bool]]:
    counts = np.bincount(result.label_map.ravel())  # labels are >= 0 (AnalysisResult checks)
    present = {int(v) for v in np.flatnonzero(counts)}
    return [(n, s, s.label in present) for n, s in enumerate(result.segments, start=1)]


def reported_values(result: AnalysisResult) -> tuple[ReportedValue, ...]:
    """Every number ``build_sr`` writes, in order: the expected content of an SR read-back."""
    measured = {m.label: m for m in result.structures}
    out: list[ReportedValue] = []
    for _, segment, present in _present_segments(result):
        if present:
            out += structure_values(result, segment, _measurements_of(result, segment, measured))
            section = largest_cross_section(result.source, result.label_map == segment.label)
            out.append(area_value(result, segment, section))
    for lesion in result.lesions:
        out += lesion_values(result, lesion)
    return tuple(out)


def _measurements_of(
    result: AnalysisResult, segment: SegmentDescription, measured: dict[int, StructureMeasurements]
) -> StructureMeasurements:
    if segment.label not in measured:
        raise ResultError(
            f"series {result.source.series.series_instance_uid}: segment {segment.name!r} (label "
            f"{segment.label}) is present in the label map but has no StructureMeasurements; the SR needs "
            "its volume and uncertainty: add them to AnalysisResult.structures"
        )
    return measured[segment.label]


def _needs_review() -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=coding.NEEDS_REVIEW, value=codes.SCT.Yes)


def _structure_groups(
    result: AnalysisResult,
    seg: Dataset,
    number: int,
    segment: SegmentDescription,
    m: StructureMeasurements,
    section: CrossSection,
) -> list[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
]:
    uid = tracking_uid(result, f"segment {segment.label}")
    tracking = hd.sr.TrackingIdentifier(uid=uid, identifier=segment.name[:64])
    sites = [hd.sr.FindingSite(segment.anatomic_region)] if segment.anatomic_region else None
    algorithm = provenance.sr_algorithm_identification(result.algorithm)
    review = [_needs_review()] if m.needs_review else None
    volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(result.source.series.series_instance_uid),
        ),
        finding_type=segment.type,
        finding_category=segment.category,
        finding_sites=sites,
        algorithm_id=algorithm,
        measurements=[_measurement(v) for v in structure_values(result, segment, m)],
        qualitative_evaluations=review,
    )
    planar = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=section.outline,
            source_image=_source_for_region(result.source.frames[section.slice_index]),
        ),
        finding_type=segment.type,
        finding_category=segment.category,
        finding_sites=sites,
        algorithm_id=algorithm,
        measurements=[_measurement(area_value(result, segment, section))],
        qualitative_evaluations=review,
        geometric_purpose=codes.DCM.Outline,
    )
    return [volumetric, planar]


def lesion_voxel(volume: ImageVolume, lesion: LesionFinding) -> tuple[int, float, float]:
    """Slice index through a lesion's centre, and the centre's (row, column) index on that slice."""
    k, r, c = np.linalg.solve(volume.affine, np.array([*lesion.centre_lps, 1.0]))[:3]
    ki = round(float(k))
    if not (
        0 <= ki < volume.shape[0] and -0.5 <= r < volume.shape[1] - 0.5 and -0.5 <= c < volume.shape[2] - 0.5
    ):
        raise ResultError(
            f"series {volume.series.series_instance_uid}: lesion {lesion.index} centre {lesion.centre_lps} "
            f"(voxel index {k:.1f}, {r:.1f}, {c:.1f}) is outside the source volume {volume.shape}; "
            "findings must lie on the source grid"
        )
    return ki, float(r), float(c)


def _lesion_group(
    result: AnalysisResult, lesion: LesionFinding
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    source = result.source
    ki, ri, ci = lesion_voxel(source, lesion)
    _, _, col_mm = source.spacing
    radius_px = max(lesion.diameter_mm / 2.0 / col_mm, 0.5)
    centre = (ci + 0.5, ri + 0.5)  # pixel centre in DICOM image coordinates (PS3.3 C.18.6.1.2)
    uid = tracking_uid(result, f"lesion {lesion.index}")
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=f"lesion {lesion.index}"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
            graphic_data=np.array([centre, (centre[0] + radius_px, centre[1])]),
            source_image=_source_for_region(source.frames[ki]),
        ),
        finding_type=codes.SCT.Lesion,
        finding_category=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=provenance.sr_algorithm_identification(result.algorithm),
        measurements=[_measurement(v) for v in lesion_values(result, lesion)],
        qualitative_evaluations=[_needs_review()] if lesion.needs_review else None,
    )


def _examined_region_group(
    result: AnalysisResult, k: int
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The "nothing found" group: the whole image area of a middle slice, every structure "Absent".

    OHIF 3.13 cannot open a TID 1500 report without measurement groups ("Cannot destructure property
    'displaySetInstanceUID' of 'measurement'"), so a report of nothing carries one TID 1410 group whose
    region is the examined image area (a rectangle on the pixel borders of one source slice) and whose
    qualitative evaluations say each declared structure is absent.
    """
    rows, cols = result.source.shape[1:]
    rectangle = np.array([[0, 0], [cols, 0], [cols, rows], [0, rows], [0, 0]], dtype=np.float64)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(result, "examined region"), identifier="nothing found"
        ),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=rectangle,
            source_image=_source_for_region(result.source.frames[k]),
        ),
        algorithm_id=provenance.sr_algorithm_identification(result.algorithm),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=s.type, value=codes.SCT.Absent) for s in result.segments
        ],
    )


def _lesion_summary(lesion: LesionFinding) -> str:
    def xyz(v: Sequence[float]) -> str:
        return "(" + ", ".join(f"{x:.1f}" for x in v) + ")"

    return (
        f"lesion {lesion.index}: centre {xyz(lesion.centre_lps)} mm LPS, box {xyz(lesion.box_min_lps)} to "
        f"{xyz(lesion.box_max_lps)} mm, diameter {lesion.diameter_mm:.1f} mm, score {lesion.score:.2f} "
        f"+/- {lesion.score_spread:.2f}, found in {100 * lesion.detection_rate:.0f}% of samples"
        + (", needs review" if lesion.needs_review else "")
    )


def _qualitative_evaluations(result: AnalysisResult) -> hd.sr.ContainerContentItem | None:
    """TID 1500 row 12: absent structures, review reasons, lesion summaries, notes, clinical-use statement."""
    items: list[hd.sr.ContentItem] = []
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    for _, segment, present in _present_segments(result):
        if not present:
            items.append(
                hd.sr.CodeContentItem(name=segment.type, value=codes.SCT.Absent, relationship_type=contains)
            )
    names = {s.label: s.name for s in result.segments}
    for m in result.structures:
        if m.needs_review:
            why = "; ".join(m.review_reasons) or "flagged by the model's uncertainty checks"
            text = f"{names[m.label]} needs review: {why}"
            items.append(
                hd.sr.TextContentItem(name=codes.DCM.Comment, value=text[:1024], relationship_type=contains)
            )
    for lesion in result.lesions:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Finding, value=_lesion_summary(lesion), relationship_type=contains
            )
        )
    if not any(present for _, _, present in _present_segments(result)) and not result.lesions:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value="No declared structure and no lesion was found by the model.",
                relationship_type=contains,
            )
        )
    for note in result.notes:
        items.append(
            hd.sr.TextContentItem(name=codes.DCM.Comment, value=note[:1024], relationship_type=contains)
        )
    if not result.algorithm.for_clinical_use:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=provenance.usage_statement(result.algorithm),
                relationship_type=contains,
            )
        )
    if not items:
        return None
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _library_images(volume: ImageVolume, headers: Sequence[Dataset], slices: set[int]) -> list[Dataset]:
    wanted = {volume.frames[k].sop_instance_uid for k in slices}
    return [h for h in headers if str(h.SOPInstanceUID) in wanted]


def build_sr(result: AnalysisResult, seg: Dataset) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``result``, whose volumetric groups reference segments of ``seg``.

    ``seg`` must be the Segmentation built from the same result (``dicom_io.seg.build_seg``): segment
    numbers follow the declaration order of ``result.segments``.
    """
    if str(seg.get("SOPClassUID", "")) not in (
        "1.2.840.10008.5.1.4.1.1.66.4",
        "1.2.840.10008.5.1.4.1.1.66.7",
    ):
        raise ResultError(
            f"build_sr needs the result's Segmentation, got SOP Class {seg.get('SOPClassUID')!r}"
        )
    if len(seg.SegmentSequence) < len(result.segments) or str(seg.StudyInstanceUID) != (
        result.source.series.study_instance_uid
    ):
        raise ResultError(
            f"SEG {seg.SOPInstanceUID} does not belong to this result (study {seg.StudyInstanceUID}, "
            f"{len(seg.SegmentSequence)} segments); build it with build_seg(result) first"
        )
    identity = derived_identity(result, DerivedKind.SR)
    headers = source_images(result.source)
    measured = {m.label: m for m in result.structures}
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    key_slices: set[int] = set()
    for number, segment, present in _present_segments(result):
        if present:
            section = largest_cross_section(result.source, result.label_map == segment.label)
            key_slices.add(section.slice_index)
            groups += _structure_groups(
                result, seg, number, segment, _measurements_of(result, segment, measured), section
            )
    for lesion in result.lesions:
        key_slices.add(lesion_voxel(result.source, lesion)[0])
        groups.append(_lesion_group(result, lesion))
    if not groups:  # nothing found: one group with geometry, so that viewers can open the report
        middle = result.source.shape[0] // 2
        key_slices.add(middle)
        groups.append(_examined_region_group(result, middle))

    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    content = hd.sr.ContentSequence()
    content.extend(hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE))
    content.extend(
        hd.sr.ObservationContext(observer_device_context=provenance.device_observer(result.algorithm))
    )
    content.append(
        hd.sr.CodeContentItem(
            name=codes.DCM.ProcedureReported,
            value=_PROCEDURE.get(result.source.modality, codes.cid100.ImagingProcedure),
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    # TID 1600 lists the images the content references (the outline and lesion slices); listing all
    # source images made pixelmed's validator run out of memory on a 300-slice series, and the SEG
    # references the whole series anyway (Source Series for Segmentation, evidence sequence).
    library = _library_images(result.source, headers, key_slices)
    if library:
        content.extend(hd.sr.ImageLibrary(library))
    if groups:
        measurements = hd.sr.ContainerContentItem(
            name=codes.DCM.ImagingMeasurements, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        measurements.ContentSequence = hd.sr.ContentSequence()
        for group in groups:
            measurements.ContentSequence.extend(group)
        content.append(measurements)
    qualitative = _qualitative_evaluations(result)
    if qualitative is not None:
        content.append(qualitative)
    root.ContentSequence = content

    sr = hd.sr.Comprehensive3DSR(
        evidence=[*headers, seg],
        content=root,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=result.algorithm.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[provenance.contributing_equipment(result.algorithm)],
        series_description=provenance.series_description("AI measurement report", result.algorithm),
        coding_schemes=coding.coding_schemes(),
        specific_character_set=character_set(headers),
    )
    log.debug(
        "built TID 1500 SR of series %s: %d measurement groups",
        result.source.series.series_instance_uid,
        len(groups),
    )
    return sr
