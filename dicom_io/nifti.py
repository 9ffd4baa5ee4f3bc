"""NIfTI export and import at the LPS/RAS boundary (DICOM.md 8).

Inside the product every array is indexed (slice, row, column) with an LPS affine. NIfTI files store
(i, j, k) = (column, row, slice) with a RAS affine; this module is the only place that converts, and the
round trip is tested.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt

from dicom_io.volume import ImageVolume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# (k, r, c) index -> (c, r, k) index: the axis swap between our arrays and NIfTI's
_SWAP = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def nifti_affine(affine_lps: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """RAS affine of the NIfTI (i, j, k) = (column, row, slice) index for an LPS (k, r, c) affine."""
    return np.asarray(LPS_TO_RAS @ affine_lps @ _SWAP)


def array_to_nifti(array: npt.NDArray[Any], affine_lps: npt.NDArray[np.float64]) -> nib.Nifti1Image:
    """Any (slice, row, column) array on an LPS grid as a NIfTI image (qform and sform both set)."""
    img = nib.Nifti1Image(np.ascontiguousarray(np.transpose(array, (2, 1, 0))), nifti_affine(affine_lps))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    return img


def write_nifti(volume: ImageVolume, path: str | Path) -> Path:
    """Write a volume as NIfTI (RAS); values are the volume's physical units (float32)."""
    path = Path(path)
    nib.save(array_to_nifti(volume.array, volume.affine), path)
    return path


def load_nifti_lps(path: str | Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Read a NIfTI file back into the product's convention: (slice, row, column) array, LPS affine."""
    img = nib.load(str(path))
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ValueError(f"{path}: not a NIfTI image ({type(img).__name__})")
    data = np.asanyarray(img.dataobj)
    if img.header.get_slope_inter() != (None, None):
        data = img.get_fdata(dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D NIfTI image, got shape {data.shape}")
    affine_lps = LPS_TO_RAS @ np.asarray(img.affine, dtype=np.float64) @ _SWAP
    return np.transpose(data, (2, 1, 0)), affine_lps


def geometry_sidecar(volume: ImageVolume) -> dict[str, Any]:
    """What was checked, refused or resampled, as researchers expect next to a converted volume."""
    g = volume.geometry
    return {
        "SeriesInstanceUID": volume.series.series_instance_uid,
        "SeriesDescription": volume.series.series_description,
        "StudyInstanceUID": volume.series.study_instance_uid,
        "FrameOfReferenceUID": volume.series.frame_of_reference_uid,
        "Modality": volume.modality.value,
        "Units": volume.unit.value,
        "Shape(slice,row,column)": list(volume.shape),
        "Spacing(slice,row,column)_mm": [round(s, 6) for s in volume.spacing],
        "AffineLPS(slice,row,column)": np.round(volume.affine, 6).tolist(),
        "GeometryChecks": list(g.checks),
        "Resampled": list(g.resampled),
        "SliceSpacingRange_mm": [g.spacing_min_mm, g.spacing_max_mm],
        "GantryTilt_deg": round(g.tilt_degrees, 4),
        "SourceInstances": len(volume.source_headers),
        "Acquisition": dict(volume.series.extra),
    }


def write_sidecar(volume: ImageVolume, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(geometry_sidecar(volume), indent=2) + "\n")
    return path
