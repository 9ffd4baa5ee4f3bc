"""Uncertainty Parametric Map: float values with units on the source grid, dcmqi read-back, refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from dicom_io.ai_result import AnalysisResult, ResultError, UncertaintyQuantity
from dicom_io.gate import check_parametric_map, onto_grid
from dicom_io.parametric_map import build_parametric_map
from tests.dicom_io import result_factory as rf

synthetic, synthetic_result = rf.synthetic, rf.synthetic_result  # fixtures


def test_values_units_and_grid(synthetic_result: AnalysisResult, tmp_path: Path) -> None:
    pm = build_parametric_map(synthetic_result)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert pm.BitsAllocated == 32 and "FloatPixelData" in pm
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = mapping.MeasurementUnitsCodeSequence[0]
    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("{nats}", "UCUM")
    quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator) == ("PRED_ENTROPY", "99MEDSEG")
    assert (mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept) == (1.0, 0.0)
    assert {i.CodingSchemeDesignator for i in pm.CodingSchemeIdentificationSequence} >= {"99MEDSEG", "99IHE"}
    assert pm.ContentQualification == "RESEARCH" and "NOT FOR CLINICAL USE" in pm.SeriesDescription

    path = tmp_path / "pm.dcm"
    pm.save_as(path, enforce_file_format=True)
    volume = hd.imread(path).get_volume()
    got, covered = onto_grid(
        volume.array, volume.affine, synthetic_result.source.affine, synthetic_result.source.shape
    )
    assert covered.all()
    np.testing.assert_array_equal(got, synthetic_result.uncertainty_map)


def test_frames_ascend_along_the_normal_and_reference_their_source(synthetic_result: AnalysisResult) -> None:
    """dcmqi (and so Slicer) stacks PM frames in file order; they must ascend along row x column."""
    pm = build_parametric_map(synthetic_result)
    iop = np.asarray(pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient)
    normal = np.cross(iop[:3], iop[3:])
    items = pm.PerFrameFunctionalGroupsSequence
    distances = [float(np.dot(i.PlanePositionSequence[0].ImagePositionPatient, normal)) for i in items]
    assert distances == sorted(distances)
    assert [int(i.FrameContentSequence[0].DimensionIndexValues) for i in items] == list(
        range(1, len(items) + 1)
    )
    referenced = {i.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID for i in items}
    assert referenced == {f.sop_instance_uid for f in synthetic_result.source.frames}


def test_dcmqi_reads_back_the_same_values(synthetic_result: AnalysisResult, tmp_path: Path) -> None:
    path = tmp_path / "pm.dcm"
    build_parametric_map(synthetic_result).save_as(path, enforce_file_format=True)
    checks = check_parametric_map(synthetic_result, path)
    assert [c.check for c in checks] == ["dciodvfy", "dcmqi paramap2itkimage"]
    assert all(c.passed for c in checks), "\n".join(map(str, checks))


def test_mutual_information_is_labelled_as_such(synthetic_result: AnalysisResult) -> None:
    result = dataclasses.replace(
        synthetic_result, uncertainty_quantity=UncertaintyQuantity.MUTUAL_INFORMATION
    )
    mapping = build_parametric_map(result).SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.LUTLabel == "MUTUAL_INFO"
    assert mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == "MUTUAL_INFO"


def test_negative_uncertainty_is_refused(synthetic_result: AnalysisResult) -> None:
    negative = synthetic_result.uncertainty_map.copy()
    negative[0, 0, 0] = -0.5
    with pytest.raises(ResultError, match=r"negative values \(min -0.5\).*>= 0 nats"):
        build_parametric_map(dataclasses.replace(synthetic_result, uncertainty_map=negative))


def test_non_finite_uncertainty_is_refused(synthetic_result: AnalysisResult) -> None:
    bad = synthetic_result.uncertainty_map.copy()
    bad[1, 1, 1] = np.nan
    with pytest.raises(ResultError, match="uncertainty map holds NaN"):
        dataclasses.replace(synthetic_result, uncertainty_map=bad)
