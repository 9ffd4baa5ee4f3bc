"""DICOM SEG writer: grid and references, coding, profiles, determinism, provenance, refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_io.ai_result import AlgorithmIdentity, AnalysisResult, ResultError, SegmentDescription
from dicom_io.gate import check_seg, load_itk_lps, onto_grid
from dicom_io.image_writer import deterministic_uid
from dicom_io.reader import read_volume
from dicom_io.seg import SegProfile, build_seg, segment_number_map
from dicom_io.volume import ImageVolume
from tests.dicom_io import result_factory as rf
from tests.dicom_io.result_factory import (
    ALGORITHM,
    SYNTHETIC_SEGMENTS,
    TOTALSEG,
    make_result,
    segment,
    synthetic_labels,
)

synthetic, synthetic_result = rf.synthetic, rf.synthetic_result  # fixtures

DCMQI_SEG = Path("dcmqi/data/segmentations")


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def test_liver_nrrd_as_seg_matches_dcmqi_liver_seg(shared_data: Path, tmp_path: Path) -> None:
    """dcmqi's liver mask (NRRD) written on its 3-slice CT equals dcmqi's own liver.dcm: frames and mask."""
    volume = read_volume(shared_data / DCMQI_SEG / "ct-3slice")
    mask, affine = load_itk_lps(shared_data / DCMQI_SEG / "liver_seg.nrrd")
    labels, covered = onto_grid(mask, affine, volume.affine, volume.shape)
    assert covered.all()
    liver = segment(1, "Liver", codes.SCT.Liver, (221, 130, 101))
    ours = build_seg(make_result(volume, labels.astype(np.uint8), [liver]))
    path = _save(ours, tmp_path / "liver_ours.dcm")

    reference = hd.seg.segread(shared_data / DCMQI_SEG / "liver.dcm")
    mine = hd.seg.segread(path)
    ref_uids = {
        str(i.ReferencedSOPInstanceUID)
        for s in reference.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    our_uids = {
        str(i.ReferencedSOPInstanceUID)
        for s in mine.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    assert our_uids == ref_uids == {f.sop_instance_uid for f in volume.frames}
    uids = sorted(ref_uids)
    theirs = reference.get_pixels_by_source_instance(uids, segment_numbers=[1], ignore_spatial_locations=True)
    got = mine.get_pixels_by_source_instance(uids, segment_numbers=[1])
    assert theirs.sum() > 1000
    np.testing.assert_array_equal(got, theirs)
    assert all(
        check.passed for check in check_seg(make_result(volume, labels.astype(np.uint8), [liver]), path)
    )


def test_broad_profile_is_binary_uncompressed_with_every_frame(synthetic_result: AnalysisResult) -> None:
    seg = build_seg(synthetic_result)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.SegmentationType == "BINARY"
    assert seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    slices = synthetic_result.source.shape[0]
    assert int(seg.NumberOfFrames) == len(SYNTHETIC_SEGMENTS) * slices  # the empty spleen keeps its frames
    per_segment = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(set(per_segment)) == [1, 2, 3] and per_segment.count(2) == slices
    for item in seg.PerFrameFunctionalGroupsSequence:  # DICOM.md 11: every frame names its source image
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.SpatialLocationsPreserved == "YES"


def test_compact_profile_is_labelmap_rle_and_reads_back(
    synthetic_result: AnalysisResult, tmp_path: Path
) -> None:
    seg = build_seg(synthetic_result, "compact")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    assert seg.SegmentationType == "LABELMAP"
    assert seg.file_meta.TransferSyntaxUID == RLELossless
    assert int(seg.NumberOfFrames) == synthetic_result.source.shape[0]
    path = _save(seg, tmp_path / "compact.dcm")
    read = hd.seg.segread(path).get_volume(combine_segments=True, relabel=False)
    got, covered = onto_grid(
        read.array, read.affine, synthetic_result.source.affine, synthetic_result.source.shape
    )
    assert covered.all()
    np.testing.assert_array_equal(got, segment_number_map(synthetic_result))


def test_segments_are_coded_automatic_with_algorithm_and_colour(synthetic_result: AnalysisResult) -> None:
    seg = build_seg(synthetic_result)
    assert len(seg.SegmentSequence) == 3
    for number, (item, declared) in enumerate(
        zip(seg.SegmentSequence, SYNTHETIC_SEGMENTS, strict=True), start=1
    ):
        assert item.SegmentNumber == number and item.SegmentLabel == declared.name
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == codes.SCT.AnatomicalStructure.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == declared.type.value
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (ALGORITHM.name, ALGORITHM.version)
        assert len(item.RecommendedDisplayCIELabValue) == 3
        assert item.TrackingUID.startswith("2.25.")
    assert segment_number_map(synthetic_result).max() == 3  # label 7 is segment 3


def test_uids_are_deterministic_per_series_model_and_profile(synthetic_result: AnalysisResult) -> None:
    first, again = build_seg(synthetic_result), build_seg(synthetic_result)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    compact = build_seg(synthetic_result, SegProfile.COMPACT)
    assert compact.SOPInstanceUID != first.SOPInstanceUID
    retrained = dataclasses.replace(
        synthetic_result,
        algorithm=dataclasses.replace(ALGORITHM, device_uid=deterministic_uid("medseg tests", "weights 2")),
    )
    assert build_seg(retrained).SOPInstanceUID != first.SOPInstanceUID
    assert first.StudyInstanceUID == synthetic_result.source.series.study_instance_uid
    assert first.FrameOfReferenceUID == synthetic_result.source.series.frame_of_reference_uid


def test_provenance_and_not_for_clinical_use(synthetic_result: AnalysisResult) -> None:
    seg = build_seg(synthetic_result)
    ours = [e for e in seg.ContributingEquipmentSequence if e.get("DeviceUID") == ALGORITHM.device_uid]
    assert len(ours) == 1
    purpose = ours[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1",
        "99IHE",
        "Processing Algorithm",
    )
    assert ours[0].ManufacturerModelName == ALGORITHM.name
    assert ALGORITHM.version in ours[0].SoftwareVersions
    assert "NOT FOR CLINICAL USE" in seg.SeriesDescription and "NOT FOR CLINICAL USE" in seg.ImageComments
    cleared = dataclasses.replace(
        synthetic_result, algorithm=dataclasses.replace(ALGORITHM, for_clinical_use=True)
    )
    assert "CLINICAL" not in build_seg(cleared).SeriesDescription


def test_source_headers_are_pixel_less_and_suffice(synthetic: ImageVolume) -> None:
    """highdicom needs only the source metadata (Pixel Data is never read for references)."""
    assert all("PixelData" not in h for h in synthetic.source_headers)
    result = make_result(synthetic, synthetic_labels(synthetic), SYNTHETIC_SEGMENTS)
    assert int(build_seg(result).NumberOfFrames) > 0


def test_prediction_on_another_grid_is_refused(synthetic: ImageVolume) -> None:
    labels = np.zeros((synthetic.shape[0], synthetic.shape[1] // 2, synthetic.shape[2]), dtype=np.uint8)
    with pytest.raises(ResultError, match=r"label map shape .* is not the source grid .* resample"):
        make_result(synthetic, labels, SYNTHETIC_SEGMENTS)


def test_label_without_code_is_refused(synthetic: ImageVolume) -> None:
    with pytest.raises(ResultError, match="type code is missing or empty"):
        SegmentDescription(label=1, name="thing", category=codes.SCT.Organ, type=None)  # type: ignore[arg-type]
    labels = synthetic_labels(synthetic)
    labels[0, 0, 0] = 9
    with pytest.raises(ResultError, match=r"values \[9\] with no segment description"):
        make_result(synthetic, labels, SYNTHETIC_SEGMENTS)


def test_source_without_study_uid_is_refused(shared_data: Path) -> None:
    """TotalSegmentator's export has empty Study/Series UIDs: results cannot reference it."""
    volume = read_volume(shared_data / TOTALSEG / "example_ct_dicom")
    result = make_result(volume, np.zeros(volume.shape, np.uint8), SYNTHETIC_SEGMENTS[:1])
    with pytest.raises(ResultError, match=r"empty StudyInstanceUID or SeriesInstanceUID.*re-identify"):
        build_seg(result)


def test_resampled_volume_is_refused(synthetic_result: AnalysisResult) -> None:
    source = synthetic_result.source
    resampled = dataclasses.replace(
        source, geometry=dataclasses.replace(source.geometry, resampled=("tilt corrected",))
    )
    result = dataclasses.replace(synthetic_result, source=resampled)
    with pytest.raises(ResultError, match=r"was resampled on reading.*resample the prediction back"):
        build_seg(result)


def test_algorithm_without_valid_device_uid_is_refused() -> None:
    with pytest.raises(ResultError, match="is not a DICOM UID"):
        AlgorithmIdentity(name="m", version="1", device_uid="not-a-uid")


@pytest.mark.parametrize(
    "name",
    ["seg_image_ct_binary.dcm", "seg_image_ct_binary_overlap.dcm", "seg_image_ct_binary_fractional.dcm"],
)
def test_highdicom_example_segs_read(shared_data: Path, name: str) -> None:
    seg = hd.seg.segread(shared_data / "highdicom/data/test_files" / name)
    volume = seg.get_volume(combine_segments=False)
    assert volume.array.ndim == 4 and len(seg.SegmentSequence) == volume.array.shape[-1]


def test_dcmqi_example_segs_read(shared_data: Path) -> None:
    liver = hd.seg.segread(shared_data / DCMQI_SEG / "liver.dcm")
    assert liver.SegmentSequence[0].SegmentLabel and liver.SegmentationType == "BINARY"
    overlaps = hd.seg.segread(shared_data / DCMQI_SEG / "partial_overlaps.dcm")
    assert len(overlaps.SegmentSequence) == 5
    assert overlaps.get_volume(combine_segments=False).array.shape[-1] == 5
