"""What an analysis found, in the terms the DICOM result writers need (SEG, Parametric Map, SR).

This is the boundary between ``medseg`` (which produces predictions) and ``dicom_io`` (which writes them):
plain arrays on the source grid of an ``ImageVolume`` plus coded descriptions, nothing about networks.
Every object validates itself on construction, so a writer never sees a label map on the wrong grid, a
segment without a code, or a measurement without its unit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydicom.sr.coding import Code

from dicom_io.errors import DicomIOError
from dicom_io.volume import ImageVolume

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class ResultError(DicomIOError):
    """An analysis result that cannot be written as valid DICOM (wrong grid, missing code, bad value)."""


@dataclass(frozen=True)
class AlgorithmIdentity:
    """The model that produced a result, for IHE AI Results provenance (Contributing Equipment).

    ``device_uid`` changes whenever the weights change (a retrained or federated model gets a new one),
    so a PACS can tell results of different models apart. ``for_clinical_use`` False makes every object
    say "not for clinical use" (the shipped demo model).
    """

    name: str
    version: str
    device_uid: str
    manufacturer: str = "medseg"
    software_version: str = "0"
    for_clinical_use: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ResultError(f"algorithm name and version must not be empty: {self.name!r} {self.version!r}")
        if not _UID.match(self.device_uid) or len(self.device_uid) > 64:
            raise ResultError(f"algorithm {self.name}: device UID {self.device_uid!r} is not a DICOM UID")


@dataclass(frozen=True)
class SegmentDescription:
    """One structure of the label map, coded in SNOMED CT (PS3.3 C.8.20.4, CID 7150/7151).

    ``label`` is its integer value in ``AnalysisResult.label_map``; segment numbers in the SEG are assigned
    1..n in the order of ``AnalysisResult.segments``.
    """

    label: int
    name: str
    category: Code
    type: Code
    anatomic_region: Code | None = None
    colour_rgb: tuple[int, int, int] = (255, 0, 0)

    def __post_init__(self) -> None:
        if self.label < 1:
            raise ResultError(f"segment {self.name!r}: label value must be >= 1, got {self.label}")
        if not self.name:
            raise ResultError(f"segment with label {self.label}: name must not be empty")
        for role, code in (("category", self.category), ("type", self.type)):
            if not isinstance(code, Code) or not code.value or not code.scheme_designator:
                raise ResultError(f"segment {self.name!r}: {role} code is missing or empty ({code!r})")
        if any(not 0 <= c <= 255 for c in self.colour_rgb):
            raise ResultError(f"segment {self.name!r}: colour {self.colour_rgb} is not 8-bit RGB")


_NON_NEGATIVE = (
    "volume_ml",
    "mean_entropy",
    "mean_mutual_information",
    "boundary_entropy",
    "volume_spread_ml",
)


@dataclass(frozen=True)
class StructureMeasurements:
    """Per-structure numbers for the TID 1500 report (one TID 1411 volumetric group each).

    ``mean_intensity`` is in the source volume's unit (HU for CT). Entropy and mutual information are in
    nats. ``volume_spread_ml`` is the standard deviation of the volume across Monte-Carlo samples and
    ``sample_agreement`` the mean pairwise Dice between samples (1 = all samples agree).
    """

    label: int
    volume_ml: float
    mean_intensity: float | None
    mean_entropy: float
    mean_mutual_information: float
    boundary_entropy: float
    volume_spread_ml: float
    sample_agreement: float
    needs_review: bool
    review_reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ResultError(f"structure label {self.label}: {name} must be finite, >= 0; got {value}")
        if not 0.0 <= self.sample_agreement <= 1.0:
            raise ResultError(
                f"structure {self.label}: sample_agreement {self.sample_agreement} not in [0, 1]"
            )


@dataclass(frozen=True)
class LesionFinding:
    """One detected focal lesion, in LPS millimetres, after merging Monte-Carlo samples into one finding.

    ``score`` is the mean detection score, ``score_spread`` its standard deviation over samples,
    ``detection_rate`` the fraction of samples that found it and ``box_spread_mm`` the mean standard deviation
    of the box corners.
    """

    index: int
    centre_lps: tuple[float, float, float]
    box_min_lps: tuple[float, float, float]
    box_max_lps: tuple[float, float, float]
    score: float
    score_spread: float
    detection_rate: float
    box_spread_mm: float
    needs_review: bool

    def __post_init__(self) -> None:
        if any(lo > hi for lo, hi in zip(self.box_min_lps, self.box_max_lps, strict=True)):
            raise ResultError(f"lesion {self.index}: box min {self.box_min_lps} > max {self.box_max_lps}")
        if not 0.0 <= self.score <= 1.0 or not 0.0 <= self.detection_rate <= 1.0:
            raise ResultError(
                f"lesion {self.index}: score {self.score} or rate {self.detection_rate} not in [0, 1]"
            )

    @property
    def diameter_mm(self) -> float:
        """Largest box extent: the size a radiologist would quote."""
        return float(max(hi - lo for lo, hi in zip(self.box_min_lps, self.box_max_lps, strict=True)))


class UncertaintyQuantity(StrEnum):
    """Which uncertainty the Parametric Map holds (both in nats)."""

    ENTROPY = "entropy"  # predictive entropy: total uncertainty
    MUTUAL_INFORMATION = "mutual_information"  # epistemic part: disagreement between samples


@dataclass(frozen=True)
class AnalysisResult:
    """Everything written back for one source series: SEG, Parametric Map and SR are built from this alone.

    ``label_map`` (uint8/uint16, shape of ``source.array``) holds ``SegmentDescription.label`` values;
    ``uncertainty_map`` (float32, same shape) holds ``uncertainty_quantity`` in nats. A segment may be empty
    (declared, nothing found): it is still written, and its measurements say volume 0.
    """

    source: ImageVolume
    label_map: npt.NDArray[np.integer]
    segments: tuple[SegmentDescription, ...]
    uncertainty_map: npt.NDArray[np.float32]
    uncertainty_quantity: UncertaintyQuantity
    structures: tuple[StructureMeasurements, ...]
    lesions: tuple[LesionFinding, ...]
    algorithm: AlgorithmIdentity
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        grid = self.source.array.shape
        series = self.source.series.series_instance_uid
        if self.label_map.shape != grid:
            raise ResultError(
                f"series {series}: label map shape {self.label_map.shape} is not the source grid {grid}; "
                "resample the prediction onto the source volume first"
            )
        if self.uncertainty_map.shape != grid:
            raise ResultError(
                f"series {series}: uncertainty map {self.uncertainty_map.shape} != source {grid}"
            )
        if not np.issubdtype(self.label_map.dtype, np.integer):
            raise ResultError(f"series {series}: label map dtype {self.label_map.dtype} is not integer")
        object.__setattr__(self, "uncertainty_quantity", UncertaintyQuantity(self.uncertainty_quantity))
        if not self.segments:
            raise ResultError(f"series {series}: at least one segment must be declared")
        labels = [s.label for s in self.segments]
        if len(set(labels)) != len(labels):
            raise ResultError(f"series {series}: duplicate segment labels {labels}")
        present = {int(v) for v in np.unique(self.label_map)} - {0}
        undeclared = present - set(labels)
        if undeclared:
            raise ResultError(
                f"series {series}: label map holds values {sorted(undeclared)} with no segment description "
                "(every label needs a SNOMED CT code)"
            )
        measured = {m.label for m in self.structures}
        if not measured <= set(labels):
            raise ResultError(
                f"series {series}: measured labels {sorted(measured - set(labels))} are undeclared"
            )
        if not np.all(np.isfinite(self.uncertainty_map)):
            raise ResultError(f"series {series}: uncertainty map holds NaN or infinite values")

    def segment_number(self, label: int) -> int:
        """SEG segment number (1-based, in declaration order) of a label value."""
        for number, segment in enumerate(self.segments, start=1):
            if segment.label == label:
                return number
        raise ResultError(f"label {label} is not a declared segment")
