"""TID 1500 SR writer: outlines, content tree, geometry per group, "nothing found", example SRs, refusals."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.ai_result import AnalysisResult, ResultError
from dicom_io.seg import build_seg
from dicom_io.sr import build_sr, largest_cross_section, outline, reported_values
from dicom_io.volume import ImageVolume
from tests.dicom_io import result_factory as rf
from tests.dicom_io.result_factory import ALGORITHM, SYNTHETIC_SEGMENTS, lesion_at, make_result

synthetic, synthetic_result = rf.synthetic, rf.synthetic_result  # fixtures


def _walk(item: Dataset, depth: int = 0) -> Iterator[tuple[int, Dataset]]:
    for child in item.get("ContentSequence", []):
        yield depth, child
        yield from _walk(child, depth + 1)


def _name(item: Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeValue)


def _groups(sr: Dataset) -> list[Dataset]:
    measurements = [i for i in sr.ContentSequence if _name(i) == "126010"]
    return list(measurements[0].ContentSequence) if measurements else []


def _child(group: Dataset, code: str) -> list[Dataset]:
    return [i for i in group.ContentSequence if _name(i) == code]


# ---------------------------------------------------------------- outlines


def test_outline_of_a_rectangle_is_its_four_corners() -> None:
    mask = np.zeros((6, 7), dtype=bool)
    mask[1:4, 2:6] = True
    xy = outline(mask)
    assert xy.tolist() == [[2, 1], [6, 1], [6, 4], [2, 4], [2, 1]]  # (column, row) pixel corners, closed


def test_outline_fills_holes_and_keeps_the_largest_component() -> None:
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False  # hole
    mask[15:17, 15:17] = True  # small second component
    xy = outline(mask)
    assert xy.tolist() == [[2, 2], [12, 2], [12, 12], [2, 12], [2, 2]]


def test_outline_of_an_l_shape_and_a_diagonal_staircase() -> None:
    mask = np.zeros((5, 5), dtype=bool)
    mask[0:3, 0] = True
    mask[2, 0:3] = True
    assert outline(mask).tolist() == [[0, 0], [1, 0], [1, 2], [3, 2], [3, 3], [0, 3], [0, 0]]
    stairs = np.tril(np.ones((4, 4), dtype=bool))
    xy = outline(stairs)
    assert xy[0].tolist() == xy[-1].tolist() and len(xy) == 2 * 4 + 2 + 1  # corners + closing point
    # shoelace area equals the pixel count: the polygon encloses exactly the mask
    x, y = xy[:, 0], xy[:, 1]
    assert abs(0.5 * np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])) == stairs.sum()


def test_outline_of_nothing_is_refused() -> None:
    with pytest.raises(ResultError, match="cannot outline an empty mask"):
        outline(np.zeros((4, 4), dtype=bool))


def test_largest_cross_section(synthetic_result: AnalysisResult) -> None:
    section = largest_cross_section(synthetic_result.source, synthetic_result.label_map == 1)
    assert section.slice_index == 3  # slices 3..8 have 20x16 pixels, slice 5 has a hole
    _, row_mm, col_mm = synthetic_result.source.spacing
    assert section.area_mm2 == pytest.approx(20 * 16 * row_mm * col_mm)


# ---------------------------------------------------------------- content tree


def test_root_template_observer_and_library(synthetic_result: AnalysisResult) -> None:
    sr = build_sr(synthetic_result, build_seg(synthetic_result))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    uids = [i.UID for _, i in _walk(sr) if i.ValueType == "UIDREF" and _name(i) == "121012"]
    assert uids == [ALGORITHM.device_uid]  # Device Observer UID
    library = [i for i in sr.ContentSequence if _name(i) == "111028"]
    assert len(library) == 1
    texts = [i.TextValue for _, i in _walk(sr) if i.ValueType == "TEXT"]
    assert any("NOT FOR CLINICAL USE" in t for t in texts)
    assert any(e.get("DeviceUID") == ALGORITHM.device_uid for e in sr.ContributingEquipmentSequence)


def test_each_structure_has_a_volumetric_and_an_outline_group_on_one_tracking_uid(
    synthetic_result: AnalysisResult,
) -> None:
    seg = build_seg(synthetic_result)
    sr = build_sr(synthetic_result, seg)
    groups = _groups(sr)
    assert len(groups) == 2 * 2 + 1  # liver, kidney (spleen is empty) + one lesion
    by_uid: dict[str, list[Dataset]] = {}
    for group in groups:
        assert group.ContentTemplateSequence[0].TemplateIdentifier in ("1410", "1411")
        uid = _child(group, "112040")[0].UID  # Tracking Unique Identifier
        by_uid.setdefault(uid, []).append(group)
    liver = next(g for g in by_uid.values() if len(g) == 2 and _child(g[0], "112039")[0].TextValue == "liver")
    volumetric, planar = sorted(
        liver, key=lambda g: g.ContentTemplateSequence[0].TemplateIdentifier, reverse=True
    )
    segment_ref = _child(volumetric, "121191")[0].ReferencedSOPSequence[0]
    assert (
        segment_ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        and segment_ref.ReferencedSegmentNumber == 1
    )
    region = _child(planar, "111030")[0]  # Image Region
    assert region.GraphicType == "POLYLINE"
    data = np.asarray(region.GraphicData).reshape(-1, 2)
    assert data[0].tolist() == data[-1].tolist()
    source = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert source == synthetic_result.source.frames[3].sop_instance_uid  # the largest cross-section
    # every group carries geometry or a segment reference *and* shares its UID with a geometric one (18a)
    for members in by_uid.values():
        assert any(_child(g, "111030") for g in members)


def test_lesion_is_a_circle_on_the_slice_through_its_centre(synthetic_result: AnalysisResult) -> None:
    sr = build_sr(synthetic_result, build_seg(synthetic_result))
    lesion = next(g for g in _groups(sr) if _child(g, "112039")[0].TextValue == "lesion 1")
    region = _child(lesion, "111030")[0]
    assert region.GraphicType == "CIRCLE"
    (cx, cy), (px, _) = np.asarray(region.GraphicData).reshape(2, 2)
    assert (cx, cy) == (16.5, 20.5)  # centre of voxel (k=6, r=20, c=16)
    _, _, col_mm = synthetic_result.source.spacing
    assert (px - cx) * col_mm == pytest.approx(3.0)  # radius of the 6 mm box
    frame = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    assert frame == synthetic_result.source.frames[6].sop_instance_uid
    names = {_name(i) for i in lesion.ContentSequence if i.ValueType == "NUM"}
    assert {"81827009", "111012", "CENTRE_L", "CENTRE_P", "CENTRE_S", "BOX_MIN_L", "BOX_MAX_S"} <= names


def test_absent_structures_and_review_reasons_are_qualitative_evaluations(
    synthetic_result: AnalysisResult,
) -> None:
    sr = build_sr(synthetic_result, build_seg(synthetic_result))
    qualitative = [i for i in sr.ContentSequence if _name(i) == "C0034375"]
    assert len(qualitative) == 1
    codes_ = [
        (_name(i), i.ConceptCodeSequence[0].CodeMeaning)
        for i in qualitative[0].ContentSequence
        if i.ValueType == "CODE"
    ]
    assert codes_ == [("78961009", "Absent")]  # spleen: declared, looked for, not found
    texts = [i.TextValue for i in qualitative[0].ContentSequence if i.ValueType == "TEXT"]
    assert any(t.startswith("liver needs review") for t in texts)
    assert any(t.startswith("lesion 1: centre (") for t in texts)
    assert not any(t.startswith("3 more lesion candidates") for t in texts)
    note = "3 more lesion candidates below the 20 highest not listed"
    noted = dataclasses.replace(synthetic_result, notes=(note,))
    sr = build_sr(noted, build_seg(noted))
    qualitative = [i for i in sr.ContentSequence if _name(i) == "C0034375"]
    texts = [i.TextValue for i in qualitative[0].ContentSequence if i.ValueType == "TEXT"]
    assert note in texts


def test_reported_values_are_what_the_sr_says(synthetic_result: AnalysisResult) -> None:
    sr = build_sr(synthetic_result, build_seg(synthetic_result))
    measurements = next(i for i in sr.ContentSequence if _name(i) == "126010")
    written = [
        (
            float(i.MeasuredValueSequence[0].NumericValue),
            i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue,
        )
        for _, i in _walk(measurements)
        if i.ValueType == "NUM"
    ]
    expected = [(v.value, v.unit.value) for v in reported_values(synthetic_result)]
    assert len(written) == len(expected) == 2 * 8 + 14  # per structure 7 + area, per lesion 14
    for (value, unit), (want, want_unit) in zip(sorted(written), sorted(expected), strict=True):
        assert unit == want_unit and value == pytest.approx(want, rel=1e-9, abs=1e-12)
    units = {u for _, u in written}
    assert {"ml", "{nats}", "[hnsf'U]", "mm2", "mm", "%", "1"} <= units


def test_nothing_found_report_outlines_the_examined_image(synthetic: ImageVolume) -> None:
    """No structure, no lesion: one group with geometry (OHIF cannot open a report without groups)."""
    empty = make_result(synthetic, np.zeros(synthetic.shape, np.uint8), SYNTHETIC_SEGMENTS)
    sr = build_sr(empty, build_seg(empty))
    (group,) = _groups(sr)
    assert _child(group, "112039")[0].TextValue == "nothing found"
    region = _child(group, "111030")[0]
    rows, cols = synthetic.shape[1:]
    assert region.GraphicType == "POLYLINE"
    assert np.asarray(region.GraphicData).reshape(-1, 2).tolist() == [
        [0, 0],
        [cols, 0],
        [cols, rows],
        [0, rows],
        [0, 0],
    ]
    middle = synthetic.frames[synthetic.shape[0] // 2].sop_instance_uid
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == middle
    absent = [
        (_name(i), i.ConceptCodeSequence[0].CodeMeaning)
        for i in group.ContentSequence
        if i.ValueType == "CODE"
    ]
    assert [(s.type.value, "Absent") for s in SYNTHETIC_SEGMENTS] == [a for a in absent if a[1] == "Absent"]
    assert not [i for i in group.ContentSequence if i.ValueType == "NUM"]
    qualitative = next(i for i in sr.ContentSequence if _name(i) == "C0034375")
    texts = [i.TextValue for i in qualitative.ContentSequence if i.ValueType == "TEXT"]
    assert any("No declared structure and no lesion" in t for t in texts)
    assert reported_values(empty) == ()


# ---------------------------------------------------------------- refusals


def test_lesion_outside_the_volume_is_refused(synthetic_result: AnalysisResult) -> None:
    far = lesion_at(synthetic_result.source, 3, (40, 20, 16), 5.0)
    result = dataclasses.replace(synthetic_result, lesions=(far,))
    with pytest.raises(ResultError, match=r"lesion 3 centre .* is outside the source volume"):
        build_sr(result, build_seg(result))


def test_present_structure_without_measurements_is_refused(synthetic_result: AnalysisResult) -> None:
    result = dataclasses.replace(synthetic_result, structures=synthetic_result.structures[1:])
    with pytest.raises(ResultError, match=r"segment 'liver' .* has no StructureMeasurements"):
        build_sr(result, build_seg(result))


def test_sr_needs_the_results_segmentation(synthetic_result: AnalysisResult, shared_data: Path) -> None:
    other = pydicom.dcmread(shared_data / "dcmqi/data/segmentations/liver.dcm")
    with pytest.raises(ResultError, match="does not belong to this result"):
        build_sr(synthetic_result, other)
    with pytest.raises(ResultError, match="needs the result's Segmentation"):
        build_sr(synthetic_result, synthetic_result.source.source_headers[0])


# ---------------------------------------------------------------- reading the reference SRs


@pytest.mark.parametrize("name", ["sr_document.dcm", "sr_document_with_multiple_groups.dcm"])
def test_highdicom_example_srs_read(shared_data: Path, name: str) -> None:
    sr = hd.sr.srread(shared_data / "highdicom/data/test_files" / name)
    report = hd.sr.MeasurementReport.from_sequence([sr])  # the data set is the root content item
    groups = report.get_planar_roi_measurement_groups() + report.get_volumetric_roi_measurement_groups()
    groups += report.get_image_measurement_groups()
    assert groups


def test_dcmqi_example_sr_reads_with_its_segment_references(shared_data: Path) -> None:
    sr = hd.sr.srread(shared_data / "dcmqi/data/sr-example/sr.dcm")
    report = hd.sr.MeasurementReport.from_sequence([sr])
    groups = report.get_volumetric_roi_measurement_groups()
    assert groups
    seg = pydicom.dcmread(shared_data / "dcmqi/data/sr-example/seg.dcm", stop_before_pixels=True)
    for group in groups:
        assert group.referenced_segment is not None
        reference = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert reference.ReferencedSegmentNumber >= 1
        assert group.get_measurements()
