"""The output gate and the result writer: real data end to end, tampering, missing tools, no half output."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io import gate
from dicom_io.ai_result import AnalysisResult
from dicom_io.gate import (
    GateError,
    GateReport,
    GateTools,
    check_seg,
    check_sr,
    onto_grid,
    sr_validation_parts,
)
from dicom_io.parametric_map import build_parametric_map
from dicom_io.result_writer import PM_FILE, SEG_FILE, SR_FILE, write_results
from dicom_io.seg import SegProfile, build_seg
from dicom_io.sr import build_sr
from dicom_io.volume import ImageVolume
from medseg.model_spec import ReviewSpec
from tests.dicom_io import result_factory as rf

synthetic, synthetic_result = rf.synthetic, rf.synthetic_result  # fixtures
ts_volume, ts_labels, ts_result = rf.ts_volume, rf.ts_labels, rf.ts_result


def _summary(report: GateReport) -> str:
    return "\n" + str(report)


# ---------------------------------------------------------------- read-back geometry


def test_onto_grid_undoes_axis_order_and_flips() -> None:
    grid = np.diag([2.0, 0.5, 0.5, 1.0])
    grid[:3, 3] = (10.0, -5.0, 3.0)
    ours = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    # the same voxels stored (column, row, reversed slice) with the matching affine
    theirs = np.flip(np.transpose(ours, (2, 1, 0)), axis=2)
    affine = np.zeros((4, 4))
    affine[:3, 0] = grid[:3, 2]
    affine[:3, 1] = grid[:3, 1]
    affine[:3, 2] = -grid[:3, 0]
    affine[:3, 3] = grid[:3, 3] + 3 * grid[:3, 0]
    affine[3, 3] = 1
    got, covered = onto_grid(theirs, affine, grid, (4, 5, 6))
    assert covered.all()
    np.testing.assert_array_equal(got, ours)


def test_onto_grid_places_a_cropped_image_and_refuses_other_grids() -> None:
    grid = np.eye(4)
    crop = np.ones((2, 2, 2), dtype=np.uint8)
    shifted = np.eye(4)
    shifted[:3, 3] = (1, 2, 3)
    got, covered = onto_grid(crop, shifted, grid, (4, 5, 6))
    assert got.sum() == 8 and got[1:3, 2:4, 3:5].all() and covered.sum() == 8
    half = np.eye(4)
    half[:3, 3] = (0.5, 0, 0)
    with pytest.raises(ValueError, match="voxel centres are offset"):
        onto_grid(crop, half, grid, (4, 5, 6))
    rotated = np.eye(4)
    rotated[:2, :2] = [[0.8, -0.6], [0.6, 0.8]]
    with pytest.raises(ValueError, match="index axes do not map"):
        onto_grid(crop, rotated, grid, (4, 5, 6))
    outside = np.eye(4)
    outside[:3, 3] = (3, 0, 0)
    with pytest.raises(ValueError, match="fall outside the source grid"):
        onto_grid(crop, outside, grid, (4, 5, 6))


# ---------------------------------------------------------------- the gate catches what is wrong


def test_gate_detects_a_changed_voxel(synthetic_result: AnalysisResult, tmp_path: Path) -> None:
    seg = build_seg(synthetic_result)
    frames = np.frombuffer(seg.PixelData, dtype=np.uint8).copy()
    frames[len(frames) // 3] ^= 0xFF  # eight voxels of one frame flipped
    seg.PixelData = frames.tobytes()
    path = tmp_path / "tampered.dcm"
    seg.save_as(path, enforce_file_format=True)
    checks = {c.check: c for c in check_seg(synthetic_result, path)}
    assert checks["dciodvfy"].passed  # still a valid object...
    for name in ("highdicom read-back", "dcmqi segimage2itkimage"):  # ...but not our mask
        assert not checks[name].passed and "voxels differ" in checks[name].detail


def test_gate_reports_dciodvfy_errors(synthetic_result: AnalysisResult, tmp_path: Path) -> None:
    seg = build_seg(synthetic_result)
    del seg.ContentLabel  # Type 1 in the Content Identification macro
    path = tmp_path / "invalid.dcm"
    seg.save_as(path, enforce_file_format=True)
    check = next(c for c in check_seg(synthetic_result, path) if c.check == "dciodvfy")
    assert not check.passed and "ContentLabel" in check.detail


def test_missing_tools_fail_and_say_how_to_install(synthetic_result: AnalysisResult, tmp_path: Path) -> None:
    path = tmp_path / "seg.dcm"
    build_seg(synthetic_result).save_as(path, enforce_file_format=True)
    tools = dataclasses.replace(
        GateTools.discover(), dciodvfy=None, segimage2itkimage=Path("/nonexistent/seg2itk")
    )
    checks = {c.check: c for c in check_seg(synthetic_result, path, tools)}
    assert not checks["dciodvfy"].passed and "dicom3tools" in checks["dciodvfy"].detail
    assert not checks["dcmqi segimage2itkimage"].passed
    assert "/nonexistent/seg2itk" in checks["dcmqi segimage2itkimage"].detail
    assert "pip install dcmqi" in checks["dcmqi segimage2itkimage"].detail
    assert checks["highdicom read-back"].passed


def test_gate_failure_leaves_no_output(synthetic_result: AnalysisResult, tmp_path: Path) -> None:
    out = tmp_path / "out"
    tools = dataclasses.replace(GateTools.discover(), java=None, tid1500reader=None)
    with pytest.raises(
        GateError, match=r"SR pixelmed DicomSRValidator: java not found.*pixelmed-apps"
    ) as info:
        write_results(synthetic_result, out, tools=tools)
    assert {c.check for c in info.value.report.failures} == {
        "pixelmed DicomSRValidator",
        "dcmqi tid1500reader",
    }
    assert list(out.iterdir()) == []  # nothing published, staging removed

    with pytest.raises(GateError, match="tid1500reader not found"):
        write_results(synthetic_result, out, tools=tools, keep_rejected=True)
    (rejected,) = out.iterdir()
    assert rejected.name.startswith("REJECTED-")
    assert {p.name for p in rejected.iterdir()} == {SEG_FILE, PM_FILE, SR_FILE, "preview.png"}


# ---------------------------------------------------------------- large reports: pixelmed in parts

MOST_LESIONS = ReviewSpec.model_fields["max_lesion_findings"].default  # what a model reports at most


def _with_many_lesions(result: AnalysisResult, n: int) -> AnalysisResult:
    """``result`` with ``n`` lesions spread over its slices, rows and columns."""
    k, r, c = result.source.shape
    lesions = [
        rf.lesion_at(result.source, i + 1, (i % k, 4 + (5 * i) % (r - 8), 4 + (7 * i) % (c - 8)), 5.0)
        for i in range(n)
    ]
    return dataclasses.replace(result, lesions=tuple(lesions))


def _groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    (container,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    return list(container.ContentSequence)


def _numeric(items: list[pydicom.Dataset]) -> int:
    return sum((i.ValueType == "NUM") + _numeric(list(i.get("ContentSequence", []))) for i in items)


def test_sr_validation_parts_share_the_groups_and_keep_the_rest(synthetic_result: AnalysisResult) -> None:
    result = _with_many_lesions(synthetic_result, MOST_LESIONS)
    sr = build_sr(result, build_seg(result))
    parts = sr_validation_parts(sr, 40)
    assert len(parts) > 2
    uids = [[item.UID for item in g.ContentSequence if item.ValueType == "UIDREF"] for g in _groups(sr)]
    assert [
        u
        for part in parts
        for u in [[i.UID for i in g.ContentSequence if i.ValueType == "UIDREF"] for g in _groups(part)]
    ] == uids  # every group once, in order
    rest = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue != "126010"]
    for part in parts:
        assert [i for i in part.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue != "126010"] == rest
        groups = _groups(part)
        assert len(groups) >= 2  # pixelmed misses errors in a lone group
        assert len(groups) == 2 or _numeric(groups[:-1]) <= 40
    assert sr_validation_parts(sr, 10**6) == [sr]
    assert len(_groups(sr)) == 2 * 2 + MOST_LESIONS  # both present structures: volumetric and outline


@pytest.mark.slow
def test_report_with_the_most_lesions_passes_the_whole_gate(
    synthetic_result: AnalysisResult, tmp_path: Path
) -> None:
    """A model's longest report (its ``max_lesion_findings``) once ran pixelmed out of Java heap."""
    written = write_results(_with_many_lesions(synthetic_result, MOST_LESIONS), tmp_path)
    assert written.gate.ok, _summary(written.gate)
    check = next(c for c in written.gate.checks if c.check == "pixelmed DicomSRValidator")
    assert "parts of at most" in check.detail


@pytest.mark.slow
def test_an_error_in_any_part_fails_the_gate(
    synthetic_result: AnalysisResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gate, "PIXELMED_MEASUREMENTS_PER_RUN", 20)
    result = _with_many_lesions(synthetic_result, 3)
    seg = build_seg(result)
    sr_path, seg_path = tmp_path / "sr.dcm", tmp_path / "seg.dcm"
    build_sr(result, seg).save_as(sr_path, enforce_file_format=True)
    sr = pydicom.dcmread(sr_path)
    last = _groups(sr)[-1]  # a measurement of the last lesion loses its value
    del next(item for item in last.ContentSequence if item.ValueType == "NUM").MeasuredValueSequence
    sr.save_as(sr_path, enforce_file_format=True)
    seg.save_as(seg_path, enforce_file_format=True)
    n = len(sr_validation_parts(sr, 20))
    assert n > 1
    check = next(c for c in check_sr(result, sr_path, seg_path) if c.check == "pixelmed DicomSRValidator")
    assert not check.passed
    assert f"part {n} of {n}" in check.detail and "Template 300 Measurement" in check.detail


@pytest.mark.slow
def test_out_of_heap_halves_the_part_and_still_fails_honestly(
    synthetic_result: AnalysisResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(gate, "PIXELMED_HEAP", "-Xmx24m")  # far below what any report needs (fails in 3 s)
    result = _with_many_lesions(synthetic_result, 4)
    seg = build_seg(result)
    sr_path, seg_path = tmp_path / "sr.dcm", tmp_path / "seg.dcm"
    build_sr(result, seg).save_as(sr_path, enforce_file_format=True)
    seg.save_as(seg_path, enforce_file_format=True)
    with caplog.at_level("INFO", logger="dicom_io.gate"):
        check = next(c for c in check_sr(result, sr_path, seg_path) if c.check == "pixelmed DicomSRValidator")
    assert not check.passed and "OutOfMemoryError" in check.detail
    assert "validating its 8 groups in two halves" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm", "sr.dcm"]  # halves went to scratch


# ---------------------------------------------------------------- real data, whole gate


@pytest.mark.slow
def test_totalsegmentator_result_passes_the_whole_gate(ts_result: AnalysisResult, tmp_path: Path) -> None:
    """TotalSegmentator's CT + its own segmentation (5 organs, gallbladder declared absent, 2 lesions)."""
    written = write_results(ts_result, tmp_path, SegProfile.BROAD)
    assert written.gate.ok and not written.gate.not_checkable, _summary(written.gate)
    assert {c.check for c in written.gate.checks} >= {
        "dciodvfy",
        "highdicom read-back",
        "dcmqi segimage2itkimage",
        "dcmqi paramap2itkimage",
        "pixelmed DicomSRValidator",
        "dcmqi tid1500reader",
    }
    assert {p.name for p in tmp_path.iterdir()} == {SEG_FILE, PM_FILE, SR_FILE, "preview.png"}
    assert written.sizes["seg"] == written.seg.stat().st_size > 0
    assert set(written.seconds) >= {"build_seg", "build_pm", "build_sr", "write", "gate", "publish"}
    # reruns give the same UIDs
    seg = pydicom.dcmread(written.seg, stop_before_pixels=True)
    pm = pydicom.dcmread(written.parametric_map, stop_before_pixels=True)
    sr = pydicom.dcmread(written.sr)
    rebuilt = build_seg(ts_result)
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (rebuilt.SeriesInstanceUID, rebuilt.SOPInstanceUID)
    assert pm.SOPInstanceUID == build_parametric_map(ts_result).SOPInstanceUID
    assert sr.SOPInstanceUID == build_sr(ts_result, rebuilt).SOPInstanceUID
    assert len({seg.SeriesInstanceUID, pm.SeriesInstanceUID, sr.SeriesInstanceUID}) == 3


@pytest.mark.slow
def test_totalsegmentator_compact_profile(ts_result: AnalysisResult, tmp_path: Path) -> None:
    written = write_results(ts_result, tmp_path, "compact", preview=False)
    assert written.gate.ok, _summary(written.gate)
    assert written.preview is None
    unchecked = {(c.object, c.check) for c in written.gate.not_checkable}
    assert unchecked == {("SEG", "dciodvfy"), ("SR", "dciodvfy on LABELMAP segment references")}
    assert all(not c.passed for c in written.gate.not_checkable)  # recorded, never counted as a pass
    assert pydicom.dcmread(written.seg, stop_before_pixels=True).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"


@pytest.mark.slow
def test_nothing_found_is_a_valid_result(ts_volume: ImageVolume, tmp_path: Path) -> None:
    """All-zero prediction: SEG with every segment declared and empty, SR saying so; the gate passes.

    (ohif-check showed this SR opening in OHIF 3.13 with the examined-area rectangle.)
    """
    empty = rf.make_result(ts_volume, np.zeros(ts_volume.shape, np.uint8), rf.ts_segments())
    written = write_results(empty, tmp_path, preview=False)
    assert written.gate.ok, _summary(written.gate)
    seg = pydicom.dcmread(written.seg)
    assert len(seg.SegmentSequence) == len(rf.TOTALSEG_LABELS)
    assert int(seg.NumberOfFrames) == len(rf.TOTALSEG_LABELS) * ts_volume.shape[0]
    assert not np.frombuffer(seg.PixelData, np.uint8).any()
    sr = pydicom.dcmread(written.sr)
    names = [i.ConceptNameCodeSequence[0].CodeValue for i in sr.ContentSequence]
    assert "126010" in names and "C0034375" in names  # the "nothing found" group and the absent list
