"""Float Parametric Map of the uncertainty map, on the source grid, with highdicom (DICOM.md 16).

Uncertainty is a continuous quantity with a unit, so it is written as a Parametric Map (PS3.3 A.75) with
32-bit float pixels and a Real World Value Mapping (PS3.3 C.7.6.16.2.11) that says what the values are
(predictive entropy or mutual information) and in which unit (nats), never as a fake binary SEG. The map
references every source image through the same plane matching the SEG uses.
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_io import coding, provenance
from dicom_io.ai_result import AnalysisResult, ResultError, UncertaintyQuantity
from dicom_io.derived import DerivedKind, character_set, derived_identity, source_images

log = logging.getLogger(__name__)

_QUANTITY = {
    UncertaintyQuantity.ENTROPY: (coding.PREDICTIVE_ENTROPY, "ENTROPY", "Predictive entropy"),
    UncertaintyQuantity.MUTUAL_INFORMATION: (coding.MUTUAL_INFORMATION, "MUTUAL_INFO", "Mutual information"),
}


def real_world_value_mapping(result: AnalysisResult) -> hd.pm.RealWorldValueMapping:
    """Identity mapping of the stored floats to the quantity in nats (PS3.3 C.7.6.16.2.11)."""
    code, label, text = _QUANTITY[result.uncertainty_quantity]
    lo, hi = float(result.uncertainty_map.min()), float(result.uncertainty_map.max())
    return hd.pm.RealWorldValueMapping(
        lut_label=label,
        lut_explanation=f"{text} of the Monte-Carlo predictions (nats)",
        unit=coding.NATS,
        value_range=(lo, hi if hi > lo else lo + 1.0),
        slope=1.0,
        intercept=0.0,
        quantity_definition=code,
    )


def _order_frames_along_normal(pm: hd.pm.ParametricMap) -> None:
    """Reorder the frames so that they ascend along row x column direction, renumbering the dimension.

    dcmqi's ``paramap2itkimage`` (1.5.7, and so 3D Slicer) puts frame i at slice i without reading the
    per-frame positions, assuming frames ascend along the normal of Image Orientation (Patient);
    highdicom writes them descending (its right-handed volume convention), which those readers would show
    upside down. Frame order is free in a multi-frame image (PS3.3 C.7.6.17), so ascending order costs
    nothing. Dimension Index Values are renumbered 1..n in the new order.
    """
    n = int(pm.NumberOfFrames)
    orientation = np.asarray(
        pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float
    )
    normal = np.cross(orientation[:3], orientation[3:])
    items = list(pm.PerFrameFunctionalGroupsSequence)
    distance = [float(np.dot(i.PlanePositionSequence[0].ImagePositionPatient, normal)) for i in items]
    order = np.argsort(distance, kind="stable")
    if np.array_equal(order, np.arange(n)):
        return
    frames = np.frombuffer(pm.FloatPixelData, dtype="<f4").reshape(n, -1)
    pm.FloatPixelData = np.ascontiguousarray(frames[order]).tobytes()
    pm.PerFrameFunctionalGroupsSequence = [items[i] for i in order]
    for index, item in enumerate(pm.PerFrameFunctionalGroupsSequence, start=1):
        item.FrameContentSequence[0].DimensionIndexValues = index


def build_parametric_map(result: AnalysisResult) -> hd.pm.ParametricMap:
    """The uncertainty map of ``result`` as a float32 Parametric Map on the source grid."""
    source = result.source
    values = np.ascontiguousarray(result.uncertainty_map, dtype=np.float32)
    if float(values.min()) < 0:
        raise ResultError(
            f"series {source.series.series_instance_uid}: {result.uncertainty_quantity.value} map has "
            f"negative values (min {float(values.min()):.3g}); entropy and mutual information are >= 0 nats"
        )
    identity = derived_identity(result, DerivedKind.PM)
    headers = source_images(source)
    volume = hd.Volume(
        values,
        affine=np.asarray(source.affine),
        coordinate_system="PATIENT",
        frame_of_reference_uid=source.series.frame_of_reference_uid,
    )
    hi = float(values.max())
    _, _, text = _QUANTITY[result.uncertainty_quantity]
    pm = hd.pm.ParametricMap(
        source_images=headers,
        pixel_array=volume,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=result.algorithm.manufacturer,
        manufacturer_model_name=result.algorithm.name,
        software_versions=result.algorithm.software_version,
        device_serial_number=result.algorithm.device_uid,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[real_world_value_mapping(result)],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=hi / 2 if hi > 0 else 0.5,
                window_width=hi or 1.0,
                voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,  # widths < 1 nat are valid then
            )
        ],
        content_label="UNCERTAINTY",
        content_description=provenance.series_description(f"{text} (nats)", result.algorithm),
        content_qualification=provenance.content_qualification(result.algorithm),
        contributing_equipment=[provenance.contributing_equipment(result.algorithm)],
        series_description=provenance.series_description(f"AI {text.lower()}", result.algorithm),
        coding_schemes=coding.coding_schemes(),
        specific_character_set=character_set(headers),
    )
    pm.ImageComments = provenance.usage_statement(result.algorithm)
    _order_frames_along_normal(pm)
    # Frame Anatomy functional group (PS3.3 C.7.6.16.2.8): dcmqi's paramap2itkimage dereferences it
    # unconditionally and crashes without it. The map covers the whole source volume, so the region is
    # the generic "Anatomical structure" and laterality "U" (unpaired: the map is not of one side); Frame
    # Laterality also satisfies the condition of General Series Laterality (Type 2C).
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [hd.sr.CodedConcept.from_code(codes.SCT.AnatomicalStructure)]
    anatomy.FrameLaterality = "U"
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [anatomy]
    referenced = {
        str(s.ReferencedSOPInstanceUID)
        for item in pm.PerFrameFunctionalGroupsSequence
        for d in item.get("DerivationImageSequence", [])
        for s in d.get("SourceImageSequence", [])
    }
    missing = {f.sop_instance_uid for f in source.frames} - referenced
    if missing:
        raise ResultError(
            f"series {source.series.series_instance_uid}: Parametric Map frames do not reference "
            f"{len(missing)} source instances (e.g. {sorted(missing)[0]}); the grid does not match the source"
        )
    log.debug("built uncertainty Parametric Map of series %s", source.series.series_instance_uid)
    return pm
