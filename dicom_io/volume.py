"""The typed result of reading: an image volume in physical units on an LPS grid.

Array layout follows highdicom's ``Volume``: ``array[k, r, c]`` is slice ``k``, row ``r``, column ``c``
of the source frames, and ``affine`` maps the index vector ``(k, r, c, 1)`` to patient coordinates in
millimetres in DICOM's LPS convention (PS3.3 C.7.6.2.1.1). NIfTI export converts to RAS explicitly
(``dicom_io.nifti``); nothing else in the product uses RAS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicom_io.errors import InconsistentSeriesError


class Modality(StrEnum):
    """Modalities that the reader turns into physical units."""

    CT = "CT"
    MR = "MR"
    PT = "PT"
    CR = "CR"
    DX = "DX"


class IntensityUnit(StrEnum):
    """What one voxel value means after the reader's conversion (never network normalization)."""

    HOUNSFIELD = "HU"
    SUV_BODY_WEIGHT = "SUVbw g/ml"
    MR_STORED = "MR stored value (arbitrary units)"
    PRESENTATION = "presentation value (VOI applied, MONOCHROME1 inverted)"


@dataclass(frozen=True)
class SourceFrame:
    """The DICOM frame a slice of the volume came from (needed to write SEG/SR on the same grid)."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based for multi-frame instances, None for single-frame ones


@dataclass(frozen=True)
class GeometryReport:
    """What the reader checked about the slice grid, and what it decided (written to sidecars)."""

    slice_count: int
    slice_spacing_mm: float
    spacing_min_mm: float
    spacing_max_mm: float
    tilt_degrees: float
    checks: tuple[str, ...]
    resampled: tuple[str, ...] = ()  # non-empty only when the caller asked for resampling

    @property
    def was_resampled(self) -> bool:
        return bool(self.resampled)


@dataclass(frozen=True)
class SeriesContext:
    """Identity of the series a volume was read from, and the acquisition facts later stages use."""

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    series_number: int | None
    series_description: str
    manufacturer: str
    patient_id: str
    extra: tuple[tuple[str, str], ...] = ()  # e.g. EchoTime, MagneticFieldStrength, ConvolutionKernel


@dataclass(frozen=True, repr=False)
class ImageVolume:
    """Voxels in physical units on an LPS grid, with what is needed to write results back on it.

    Validated on construction; the arrays are made read-only so that no later stage mutates a shared
    volume by accident.
    """

    array: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    modality: Modality
    unit: IntensityUnit
    series: SeriesContext
    frames: tuple[SourceFrame, ...]
    geometry: GeometryReport
    source_headers: tuple[Dataset, ...] = field(default=())  # pixel-less headers, one per source instance

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise InconsistentSeriesError(
                f"series {self.series.series_instance_uid}: volume must be 3-D (slices, rows, columns), "
                f"got shape {self.array.shape}"
            )
        if self.array.dtype != np.float32:
            raise InconsistentSeriesError(
                f"series {self.series.series_instance_uid}: volume dtype must be float32, "
                f"got {self.array.dtype}"
            )
        if self.affine.shape != (4, 4) or not np.allclose(self.affine[3], [0, 0, 0, 1]):
            raise InconsistentSeriesError(
                f"series {self.series.series_instance_uid}: affine must be a 4x4 homogeneous matrix"
            )
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-9:
            raise InconsistentSeriesError(
                f"series {self.series.series_instance_uid}: affine is singular (zero spacing?)"
            )
        if self.frames and len(self.frames) != self.array.shape[0] and not self.geometry.was_resampled:
            raise InconsistentSeriesError(
                f"series {self.series.series_instance_uid}: {len(self.frames)} source frames for "
                f"{self.array.shape[0]} slices"
            )
        self.array.setflags(write=False)
        self.affine.setflags(write=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        k, r, c = self.array.shape
        return (k, r, c)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column) index axes."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def direction(self) -> npt.NDArray[np.float64]:
        """Unit LPS direction of each index axis, as columns (slice, row, column)."""
        return np.asarray(self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def origin(self) -> npt.NDArray[np.float64]:
        """LPS position of the centre of voxel (0, 0, 0)."""
        return np.asarray(self.affine[:3, 3])

    def index_to_lps(self, index: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map (..., 3) voxel indices (k, r, c) to LPS millimetres."""
        idx = np.asarray(index, dtype=np.float64)
        return np.asarray(idx @ self.affine[:3, :3].T + self.affine[:3, 3])

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return (
            f"ImageVolume(shape={self.shape}, spacing=({sp}) mm, modality={self.modality.value}, "
            f"unit={self.unit.value!r}, series={self.series.series_instance_uid}, "
            f"resampled={self.geometry.was_resampled})"
        )
