"""Simulated hospital sites: one scanner and protocol each, read from ``configs/sites/*.yaml``.

Sites differ on purpose (noise, kernel, calibration drift, slice thickness, matrix, patient position,
contrast use, transfer syntax, vendor), so that a federation across them is non-IID the way real
hospitals are. Each file is validated once on load into frozen models; errors name the file and field.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicom_io.image_writer import PixelEncoding
from dicom_io.volume import Modality
from medseg.synth.anatomy import ContrastPhase

SITES_DIR = Path(__file__).resolve().parents[2] / "configs" / "sites"

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]


class SiteConfigError(ValueError):
    """A site file is missing or invalid (the message names the file, the field and the bad value)."""


class PatientPosition(StrEnum):
    """Patient position relative to the scanner (PS3.3 C.7.3.1.1.2); decides image orientation."""

    HFS = "HFS"  # head first, supine
    HFP = "HFP"  # head first, prone
    FFS = "FFS"  # feet first, supine


class SliceOrder(StrEnum):
    """Order in which slices are numbered (InstanceNumber 1 first)."""

    HEAD_TO_FEET = "head_to_feet"
    FEET_TO_HEAD = "feet_to_head"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Equipment(_Frozen):
    """General Equipment module values written into every series of the site (PS3.3 C.7.5.1)."""

    manufacturer: str = Field(min_length=1)
    model_name: str = Field(min_length=1)
    station_name: str = ""
    institution_name: str = ""
    software_versions: str = ""
    device_serial_number: str = ""


class Acquisition(_Frozen):
    """Grid and protocol: matrix, field of view, slices, position, contrast use."""

    matrix: int = Field(ge=32, le=1024)
    fov_mm: Positive
    fov_jitter_mm: NonNegative = 0.0
    slices: int = Field(ge=1, le=2000)
    slice_thickness_mm: Positive
    slice_spacing_mm: Positive
    slice_order: SliceOrder = SliceOrder.HEAD_TO_FEET
    positions: dict[PatientPosition, Probability] = Field(default_factory=lambda: {PatientPosition.HFS: 1.0})
    contrast_probability: Probability = 0.5
    contrast_phase: ContrastPhase = ContrastPhase.PORTAL_VENOUS  # when this site's enhanced scans are taken
    kvp: Positive | None = None
    convolution_kernel: str = ""

    @model_validator(mode="after")
    def _positions_sum_to_one(self) -> Acquisition:
        total = sum(self.positions.values())
        if not self.positions or abs(total - 1.0) > 1e-6:
            raise ValueError(f"positions probabilities must sum to 1, got {total:g} ({self.positions})")
        return self

    @model_validator(mode="after")
    def _contrast_phase_is_enhanced(self) -> Acquisition:
        if self.contrast_phase is ContrastPhase.NON_CONTRAST:
            raise ValueError(
                "contrast_phase is the phase of the enhanced scans; contrast_probability sets how many "
                "are unenhanced"
            )
        return self


class Reconstruction(_Frozen):
    """Image formation: resolution, edge enhancement, noise and calibration (see ``ScannerModel``)."""

    blur_sigma_mm: NonNegative = 0.6
    sharpen: NonNegative = 0.0
    noise_sigma: NonNegative = 10.0
    hu_scale: Positive = 1.0
    hu_offset: float = 0.0
    bias_field_strength: NonNegative = 0.0
    intensity_scale: Positive = 1.0  # MR vendors store signal on different scales


class LesionRates(_Frozen):
    """How often lesions occur at this site (Poisson means per organ)."""

    liver_mean: NonNegative = 1.5
    lung_mean: NonNegative = 0.8
    none_probability: Probability = 0.25


class MRProtocol(_Frozen):
    """MR Image module values (PS3.3 C.8.3.1)."""

    repetition_time_ms: Positive = 500.0
    echo_time_ms: Positive = 12.0
    field_strength_t: Positive = 1.5
    flip_angle_deg: Positive = 90.0
    sequence_name: str = "T1_SE"


class SiteProfile(_Frozen):
    """One simulated site: a scanner, a protocol, how its files are encoded and what its patients have."""

    name: str = Field(pattern=r"^[a-z0-9_]+$")
    description: str = ""
    modality: Modality
    equipment: Equipment
    acquisition: Acquisition
    reconstruction: Reconstruction = Reconstruction()
    lesions: LesionRates = LesionRates()
    transfer_syntax: PixelEncoding = PixelEncoding.EXPLICIT_VR_LITTLE_ENDIAN
    mr: MRProtocol | None = None

    @model_validator(mode="after")
    def _modality_fits(self) -> SiteProfile:
        if self.modality not in (Modality.CT, Modality.MR):
            raise ValueError(f"modality must be CT or MR, got {self.modality.value}")
        if (self.modality is Modality.MR) != (self.mr is not None):
            raise ValueError("an 'mr' section is required for MR sites and not allowed for CT sites")
        return self


def _format_errors(source: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
    return f"{source}: invalid site profile: " + "; ".join(lines)


def _resolve(name_or_path: str | Path, sites_dir: Path | None) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate
    return (sites_dir or SITES_DIR) / f"{name_or_path}.yaml"


def load_site(name_or_path: str | Path, *, sites_dir: Path | None = None) -> SiteProfile:
    """Load and validate a site: a shipped name (``site_a``) or a path to a YAML file."""
    path = _resolve(name_or_path, sites_dir)
    if not path.is_file():
        known = (
            ", ".join(s.name for s in list_sites(sites_dir=sites_dir))
            if (sites_dir or SITES_DIR).is_dir()
            else ""
        )
        raise SiteConfigError(f"site {str(name_or_path)!r}: no file {path}; known sites: {known or 'none'}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SiteConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise SiteConfigError(f"{path}: expected a mapping of site fields, got {type(data).__name__}")
    try:
        return SiteProfile.model_validate(data)
    except ValidationError as err:
        raise SiteConfigError(_format_errors(path, err)) from err


def list_sites(*, sites_dir: Path | None = None, modality: Modality | None = None) -> tuple[SiteProfile, ...]:
    """Every site in ``sites_dir`` (default ``configs/sites``), by name, optionally of one modality."""
    folder = sites_dir or SITES_DIR
    sites = tuple(load_site(p) for p in sorted(folder.glob("*.yaml")))
    return tuple(s for s in sites if modality is None or s.modality is modality)
