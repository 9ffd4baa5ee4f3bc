"""Analysis results for the writer tests, built from real or synthetic volumes and label maps.

The uncertainty map is deterministic: predictive entropy that peaks (ln 2 nats) on every label boundary
and decays with the distance to it, the shape a Monte-Carlo sampler produces around an organ outline.
The measurements are computed from the arrays the way medseg reports them, so SR values can be checked.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from scipy import ndimage

from dicom_io.ai_result import (
    AlgorithmIdentity,
    AnalysisResult,
    LesionFinding,
    SegmentDescription,
    StructureMeasurements,
    UncertaintyQuantity,
)
from dicom_io.image_writer import SeriesHeader, deterministic_uid, write_image_series
from dicom_io.nifti import load_nifti_lps
from dicom_io.reader import read_volume
from dicom_io.volume import ImageVolume, Modality
from tests.conftest import reorient_like

ALGORITHM = AlgorithmIdentity(
    name="medseg-test-model",
    version="1.2.0",
    device_uid=deterministic_uid("medseg tests", "model weights 1"),
    manufacturer="medseg",
    software_version="0.1.0",
)

# TotalSegmentator v2 "total" task label numbers (totalsegmentator/map_to_binary.py, class_map["total"]):
# five present in example_seg_dicom.nii.gz, and gallbladder (4), which that file does not contain, declared
# so that the real data also carries a "checked, absent" segment. SNOMED CT codes from pydicom's codedict.
TOTALSEG_LABELS: dict[int, tuple[str, Code, tuple[int, int, int]]] = {
    5: ("liver", codes.SCT.Liver, (221, 130, 101)),
    1: ("spleen", codes.SCT.Spleen, (157, 108, 162)),
    6: ("stomach", codes.SCT.Stomach, (216, 132, 105)),
    52: ("aorta", codes.SCT.Aorta, (224, 97, 76)),
    79: ("spinal cord", codes.SCT.SpinalCord, (244, 214, 49)),
    4: ("gallbladder", codes.SCT.Gallbladder, (139, 150, 98)),
}
TOTALSEG = Path("TotalSegmentator/tests/reference_files")


def segment(label: int, name: str, type_: Code, colour: tuple[int, int, int]) -> SegmentDescription:
    return SegmentDescription(
        label=label,
        name=name,
        category=codes.SCT.AnatomicalStructure,
        type=type_,
        colour_rgb=colour,
    )


def uncertainty_from_labels(
    label_map: npt.NDArray[np.integer], spacing: Sequence[float], width_mm: float = 3.0
) -> npt.NDArray[np.float32]:
    """Entropy-like map (nats): ln 2 on label boundaries, Gaussian decay with the distance to them."""
    edges = np.zeros(label_map.shape, dtype=bool)
    for axis in range(3):
        diff = np.diff(label_map, axis=axis) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        edges[tuple(lo)] |= diff
        edges[tuple(hi)] |= diff
    if not edges.any():
        return np.full(label_map.shape, 0.01, dtype=np.float32)
    distance = ndimage.distance_transform_edt(~edges, sampling=spacing)
    return (math.log(2) * np.exp(-0.5 * (distance / width_mm) ** 2) + 0.01).astype(np.float32)


def measure(
    volume: ImageVolume,
    label_map: npt.NDArray[np.integer],
    uncertainty: npt.NDArray[np.float32],
    segments: Sequence[SegmentDescription],
) -> tuple[StructureMeasurements, ...]:
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    out = []
    for seg in segments:
        mask = label_map == seg.label
        n = int(mask.sum())
        boundary = mask & ~ndimage.binary_erosion(mask)
        out.append(
            StructureMeasurements(
                label=seg.label,
                volume_ml=n * voxel_ml,
                mean_intensity=float(volume.array[mask].mean()) if n else None,
                mean_entropy=float(uncertainty[mask].mean()) if n else 0.0,
                mean_mutual_information=float(uncertainty[mask].mean() / 3) if n else 0.0,
                boundary_entropy=float(uncertainty[boundary].mean()) if n else 0.0,
                volume_spread_ml=0.02 * n * voxel_ml,
                sample_agreement=0.93 if n else 1.0,
                needs_review=seg.label % 2 == 1 and n > 0,
                review_reasons=("boundary entropy above 0.3 nats",) if seg.label % 2 == 1 and n else (),
            )
        )
    return tuple(out)


def lesion_at(volume: ImageVolume, index: int, centre_krc: Sequence[float], size_mm: float) -> LesionFinding:
    centre = volume.index_to_lps(np.asarray(centre_krc, dtype=float))
    half = size_mm / 2
    return LesionFinding(
        index=index,
        centre_lps=(float(centre[0]), float(centre[1]), float(centre[2])),
        box_min_lps=(float(centre[0] - half), float(centre[1] - half), float(centre[2] - half)),
        box_max_lps=(float(centre[0] + half), float(centre[1] + half), float(centre[2] + half)),
        score=0.87,
        score_spread=0.05,
        detection_rate=0.9,
        box_spread_mm=1.5,
        needs_review=index == 2,
    )


def make_result(
    volume: ImageVolume,
    label_map: npt.NDArray[np.integer],
    segments: Sequence[SegmentDescription],
    lesions: Sequence[LesionFinding] = (),
    quantity: UncertaintyQuantity = UncertaintyQuantity.ENTROPY,
    algorithm: AlgorithmIdentity = ALGORITHM,
) -> AnalysisResult:
    uncertainty = uncertainty_from_labels(label_map, volume.spacing)
    return AnalysisResult(
        source=volume,
        label_map=label_map,
        segments=tuple(segments),
        uncertainty_map=uncertainty,
        uncertainty_quantity=quantity,
        structures=measure(volume, label_map, uncertainty, segments),
        lesions=tuple(lesions),
        algorithm=algorithm,
    )


def reidentified_copy(source: Path, out: Path, name: str) -> Path:
    """Copy a series whose exporter emptied the Study/Series/SOP Instance UIDs, giving it UIDs again.

    TotalSegmentator's example CT has empty StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID and
    SOPClassUID in the data sets (the SOP values survive only in the file meta). Derived objects must
    reference a study, so the test copy gets deterministic Study/Series UIDs and the SOP UIDs of its own
    file meta; pixel data are copied untouched (still JPEG 2000).
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in sorted(p for p in source.iterdir() if p.is_file()):
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = deterministic_uid(name, str(ds.FrameOfReferenceUID), "study")
        ds.SeriesInstanceUID = deterministic_uid(name, str(ds.FrameOfReferenceUID), "series")
        ds.PatientID = ds.PatientID or name.replace(" ", "-")  # OHIF finds no study for an ID with a space
        ds.PatientName = ds.PatientName or name.replace(" ", "^")
        ds.StudyID = ds.StudyID or "1"
        ds.SeriesNumber = ds.get("SeriesNumber") or 1
        ds.save_as(out / f"{path.name}.dcm", enforce_file_format=True)
    return out


def synthetic_volume(out: Path, shape: tuple[int, int, int] = (12, 48, 40)) -> ImageVolume:
    """A small CT series written and read back by the project's own writer and reader (oblique-free)."""
    k, r, c = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    body = ((r - shape[1] / 2) / (shape[1] * 0.45)) ** 2 + ((c - shape[2] / 2) / (shape[2] * 0.45)) ** 2 < 1
    array = np.where(body, 40.0 + 0.5 * k, -1000.0).astype(np.float32)
    affine = np.array(
        [[0.0, 0.0, 0.8, -16.0], [0.0, 0.8, 0.0, -20.0], [2.5, 0.0, 0.0, 100.0], [0, 0, 0, 1.0]]
    )
    header = SeriesHeader(
        modality=Modality.CT,
        patient_name="Synthetic^Writer",
        patient_id="SYN-WRITER",
        study_instance_uid=deterministic_uid("writer tests", "study"),
        series_instance_uid=deterministic_uid("writer tests", "series", str(shape)),
        frame_of_reference_uid=deterministic_uid("writer tests", "for"),
        study_date="20240102",
        series_description="synthetic CT for writer tests",
        manufacturer="medseg synthetic",
    )
    write_image_series(array, affine, header, out)
    return read_volume(out)


# ---------------------------------------------------------------- fixtures (imported by the writer tests)


@pytest.fixture(scope="session")
def ts_volume(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> ImageVolume:
    """TotalSegmentator's real DICOM CT (re-identified copy, see ``reidentified_copy``)."""
    copy = reidentified_copy(
        shared_data / TOTALSEG / "example_ct_dicom",
        tmp_path_factory.mktemp("totalseg") / "ct",
        "TotalSegmentator example",
    )
    return read_volume(copy)


@pytest.fixture(scope="session")
def ts_labels(shared_data: Path, ts_volume: ImageVolume) -> npt.NDArray[np.uint8]:
    """TotalSegmentator's own segmentation of that CT, on its grid, reduced to ``TOTALSEG_LABELS``."""
    labels, affine = load_nifti_lps(shared_data / TOTALSEG / "example_seg_dicom.nii.gz")
    labels, affine = reorient_like(ts_volume.affine, labels, affine)
    assert np.allclose(affine, ts_volume.affine, atol=1e-4), "TotalSegmentator labels are not on the CT grid"
    keep = np.isin(labels, list(TOTALSEG_LABELS))
    return np.ascontiguousarray(np.where(keep, labels, 0), dtype=np.uint8)


def ts_segments() -> list[SegmentDescription]:
    return [segment(label, name, code, colour) for label, (name, code, colour) in TOTALSEG_LABELS.items()]


@pytest.fixture(scope="session")
def ts_result(ts_volume: ImageVolume, ts_labels: npt.NDArray[np.uint8]) -> AnalysisResult:
    """Real CT + TotalSegmentator labels + two lesions in the liver; gallbladder declared but absent."""
    lesions = [lesion_at(ts_volume, 1, (6, 250, 180), 14.0), lesion_at(ts_volume, 2, (12, 230, 150), 9.0)]
    return make_result(ts_volume, ts_labels, ts_segments(), lesions)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> ImageVolume:
    return synthetic_volume(tmp_path_factory.mktemp("synthetic") / "ct")


SYNTHETIC_SEGMENTS = (
    segment(1, "liver", codes.SCT.Liver, (221, 130, 101)),
    segment(2, "spleen", codes.SCT.Spleen, (157, 108, 162)),  # declared, never present
    segment(7, "left kidney", codes.SCT.Kidney, (185, 102, 83)),
)


def synthetic_labels(volume: ImageVolume) -> npt.NDArray[np.uint8]:
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[3:9, 10:30, 8:24] = 1
    labels[5, 17:20, 12:16] = 0  # a hole: the outline must enclose it
    k, r, c = np.ogrid[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
    labels[((k - 6) / 3.0) ** 2 + ((r - 36) / 6.0) ** 2 + ((c - 30) / 5.0) ** 2 < 1] = 7
    return labels


@pytest.fixture
def synthetic_result(synthetic: ImageVolume) -> AnalysisResult:
    labels = synthetic_labels(synthetic)
    return make_result(synthetic, labels, SYNTHETIC_SEGMENTS, [lesion_at(synthetic, 1, (6, 20, 16), 6.0)])
