"""DICOM Segmentation of an analysis result, on the source grid, with highdicom (DICOM.md 11-15).

Every frame references its source image (Derivation Image Sequence with Spatial Locations Preserved,
PS3.3 C.7.6.16.2.6) because the label map is passed to highdicom as a ``highdicom.Volume`` with the source
affine, and highdicom matches each plane to the source frame at the same position. Segments are numbered
1..n in the order of ``AnalysisResult.segments``, coded in SNOMED CT (PS3.3 C.8.20.4), AUTOMATIC, with the
model's algorithm identification and a tracking UID shared with the SR. Declared segments that are empty
are kept: they record "checked, absent" (DICOM.md 13).
"""

from __future__ import annotations

import logging
from enum import StrEnum

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from dicom_io import provenance
from dicom_io.ai_result import AnalysisResult, ResultError
from dicom_io.derived import DerivedKind, character_set, derived_identity, source_images, tracking_uid

log = logging.getLogger(__name__)


class SegProfile(StrEnum):
    """Which SEG encoding to write, by who must read it (DICOM.md 15).

    ``broad``: BINARY, uncompressed, every frame of every segment (empty ones included, so that no viewer
    shifts overlays): what every viewer and dcmqi read. ``compact``: LABELMAP (Supplement 243, SOP Class
    1.2.840.10008.5.1.4.1.1.66.7), one frame per slice, RLE Lossless. highdicom allows Implicit/Explicit VR
    Little Endian, RLE, JPEG-LS and JPEG 2000 Lossless for LABELMAP; RLE is chosen because dcmqi 1.5.7
    (DCMTK) decodes it while it fails on JPEG 2000, and OHIF decodes RLE natively.
    """

    BROAD = "broad"
    COMPACT = "compact"

    @property
    def segmentation_type(self) -> hd.seg.SegmentationTypeValues:
        if self is SegProfile.COMPACT:
            return hd.seg.SegmentationTypeValues.LABELMAP
        return hd.seg.SegmentationTypeValues.BINARY

    @property
    def transfer_syntax(self) -> UID:
        return RLELossless if self is SegProfile.COMPACT else ExplicitVRLittleEndian


def segment_number_map(result: AnalysisResult) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]:
    """The label map with label values replaced by SEG segment numbers (1..n in declaration order).

    This is the array every read-back of the SEG must reproduce voxel for voxel.
    """
    n = len(result.segments)
    dtype = np.uint8 if n < 256 else np.uint16
    if result.label_map.min(initial=0) < 0:
        raise ResultError(
            f"series {result.source.series.series_instance_uid}: label map holds negative values "
            f"(min {result.label_map.min()}); labels are 0 (background) or a declared segment label"
        )
    top = max(int(result.label_map.max(initial=0)), max(s.label for s in result.segments))
    lut = np.zeros(top + 1, dtype=dtype)
    for number, segment in enumerate(result.segments, start=1):
        lut[segment.label] = number
    out: npt.NDArray[np.uint8] | npt.NDArray[np.uint16] = lut[result.label_map]
    return out


def segment_descriptions(result: AnalysisResult) -> list[hd.seg.SegmentDescription]:
    """One SNOMED CT coded description per declared segment (PS3.3 C.8.20.4, CID 7150/7151)."""
    algorithm = provenance.seg_algorithm_identification(result.algorithm)
    out = []
    for number, segment in enumerate(result.segments, start=1):
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=segment.name[:64],
                segmented_property_category=segment.category,
                segmented_property_type=segment.type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=tracking_uid(result, f"segment {segment.label}"),
                tracking_id=segment.name[:64],
                anatomic_regions=[segment.anatomic_region] if segment.anatomic_region else None,
                display_color=hd.color.CIELabColor.from_rgb(*segment.colour_rgb),
            )
        )
    return out


def build_seg(result: AnalysisResult, profile: SegProfile = SegProfile.BROAD) -> hd.seg.Segmentation:
    """The DICOM Segmentation of ``result`` in the encoding of ``profile``.

    Raises
    ------
    ResultError
        When the source cannot be referenced (no UIDs, resampled volume) or a source frame ends up without
        a reference (highdicom could not match a plane to its source image).
    """
    profile = SegProfile(profile)
    source = result.source
    identity = derived_identity(result, DerivedKind.SEG, profile.value)
    headers = source_images(source)
    numbers = segment_number_map(result)
    volume = hd.Volume(
        numbers,
        affine=np.asarray(source.affine),
        coordinate_system="PATIENT",
        frame_of_reference_uid=source.series.frame_of_reference_uid,
    )
    seg = hd.seg.Segmentation(
        source_images=headers,
        pixel_array=volume,
        segmentation_type=profile.segmentation_type,
        segment_descriptions=segment_descriptions(result),
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=result.algorithm.manufacturer,
        manufacturer_model_name=result.algorithm.name,
        software_versions=result.algorithm.software_version,
        device_serial_number=result.algorithm.device_uid,  # Type 1: identifies these weights
        content_description=provenance.series_description("AI segmentation", result.algorithm),
        content_label="AI_SEGMENTATION",
        transfer_syntax_uid=profile.transfer_syntax,
        omit_empty_frames=False,
        contributing_equipment=[provenance.contributing_equipment(result.algorithm)],
        series_description=provenance.series_description("AI segmentation", result.algorithm),
        specific_character_set=character_set(headers),
    )
    seg.ImageComments = provenance.usage_statement(result.algorithm)
    _check_references(seg, result)
    log.debug(
        "built %s SEG of series %s: %d segments, %d frames",
        profile.value,
        source.series.series_instance_uid,
        len(result.segments),
        int(seg.NumberOfFrames),
    )
    return seg


def _check_references(seg: hd.seg.Segmentation, result: AnalysisResult) -> None:
    """Every frame carries a source image reference and every source instance is referenced (DICOM.md 11)."""
    referenced: set[str] = set()
    for i, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        sources = [
            s.ReferencedSOPInstanceUID
            for d in item.get("DerivationImageSequence", [])
            for s in d.get("SourceImageSequence", [])
        ]
        if not sources:
            raise ResultError(
                f"series {result.source.series.series_instance_uid}: SEG frame {i} has no source image "
                "reference; the label map plane did not match any source frame position"
            )
        referenced.update(str(s) for s in sources)
    expected = {f.sop_instance_uid for f in result.source.frames}
    if referenced != expected:
        raise ResultError(
            f"series {result.source.series.series_instance_uid}: SEG references {len(referenced)} source "
            f"instances, the volume has {len(expected)}; missing e.g. {sorted(expected - referenced)[:2]}"
        )
