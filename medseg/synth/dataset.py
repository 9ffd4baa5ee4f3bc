"""Generate synthetic studies per site and write them as a dataset: DICOM series, label maps, lesion boxes.

Layout of a dataset folder (every path in the manifest is relative to the manifest)::

    manifest.json
    site_a/site_a-0000/dicom/IM00001.dcm ...   the image series (CT or MR Image Storage)
    site_a/site_a-0000/labels.nii.gz           ground truth on exactly the series grid (RAS affine)
    site_a/site_a-0000/lesions.json            one box per lesion, LPS millimetres

Everything is a function of the dataset seed, the site name and the case index (and the grid size), so
the same call writes byte-identical files, UIDs and dates included. Training, validation and federated
sites read the manifest with ``load_dataset``.
"""

from __future__ import annotations

import datetime as dt
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, ValidationError

from dicom_io.image_writer import MRAcquisition, SeriesHeader, deterministic_uid, write_image_series
from dicom_io.nifti import array_to_nifti, load_nifti_lps
from dicom_io.volume import Modality
from medseg.synth.anatomy import (
    ContrastPhase,
    Grid,
    Label,
    Lesion,
    LesionPlan,
    ScannerModel,
    build_phantom,
    render_ct,
    render_mr,
    simulate_scanner,
)
from medseg.synth.sites import PatientPosition, SiteProfile, SliceOrder

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]  # (cases done, total)

MANIFEST_NAME = "manifest.json"
GENERATOR = "medseg synth"
# In-plane directions (row direction, column direction) of ImageOrientationPatient per position.
_ORIENTATION = {
    PatientPosition.HFS: ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    PatientPosition.HFP: ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    PatientPosition.FFS: ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
}


class Split(StrEnum):
    """Which part of the experiment a case belongs to."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class DatasetError(ValueError):
    """A manifest or one of its files is missing or invalid (names the file and the problem)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LesionBox(_Frozen):
    """One lesion: its axis-aligned box in world LPS millimetres and where it is."""

    index: int
    label: int = int(Label.LESION)
    organ: str
    kind: str
    center_lps: tuple[float, float, float]
    min_corner_lps: tuple[float, float, float]
    max_corner_lps: tuple[float, float, float]
    diameter_mm: float
    voxel_count: int


class LesionList(_Frozen):
    """Contents of ``lesions.json``."""

    case_id: str
    coordinate_system: Literal["LPS"] = "LPS"
    units: Literal["mm"] = "mm"
    lesions: tuple[LesionBox, ...]


class CaseEntry(_Frozen):
    """One case of the manifest; paths are relative to the manifest's folder."""

    case_id: str
    site: str
    split: Split
    modality: Modality
    case_seed: int
    image_dir: str
    label_map: str
    lesions: str
    shape: tuple[int, int, int]  # slices, rows, columns
    spacing_mm: tuple[float, float, float]  # slice step, row step, column step
    patient_position: PatientPosition
    contrast_phase: ContrastPhase
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    lesion_count: int


class DatasetManifest(_Frozen):
    """Contents of ``manifest.json``: what was generated, from which seed, and the label vocabulary."""

    format_version: Literal[1] = 1
    generator: str = GENERATOR
    seed: int
    labels: dict[str, int]
    sites: tuple[str, ...]
    cases: tuple[CaseEntry, ...]

    def select(self, *, split: Split | str | None = None, site: str | None = None) -> tuple[CaseEntry, ...]:
        """Cases of one split and/or one site (e.g. what a federated client trains on)."""
        want = Split(split) if split is not None else None
        return tuple(
            c for c in self.cases if (want is None or c.split is want) and (site is None or c.site == site)
        )


@dataclass(frozen=True)
class SynthDataset:
    """A loaded manifest plus the folder its relative paths start from."""

    manifest_path: Path
    manifest: DatasetManifest

    @property
    def root(self) -> Path:
        return self.manifest_path.parent

    def image_dir(self, case: CaseEntry) -> Path:
        return self.root / case.image_dir

    def label_map(self, case: CaseEntry) -> Path:
        return self.root / case.label_map

    def lesions(self, case: CaseEntry) -> Path:
        return self.root / case.lesions

    def split_entries(self, split: Split, sites: Sequence[str] = ()) -> list[CaseEntry]:
        """The manifest's cases of one split (optionally only some sites); an error when there are none."""
        entries = [e for e in self.manifest.select(split=split) if not sites or e.site in sites]
        if not entries:
            raise DatasetError(
                f"dataset {self.manifest_path}: no {split} cases{' for ' + ', '.join(sites) if sites else ''}"
            )
        return entries


@dataclass(frozen=True, repr=False)
class SynthCase:
    """One generated case in memory: image in physical units and ground truth on the same LPS grid."""

    case_id: str
    site: SiteProfile
    case_index: int
    case_seed: int
    image: npt.NDArray[np.float32]  # (slices, rows, columns), HU for CT, arbitrary units for MR
    labels: npt.NDArray[np.uint8]
    affine: npt.NDArray[np.float64]  # (k, r, c, 1) -> LPS mm
    lesions: tuple[Lesion, ...]
    position: PatientPosition
    phase: ContrastPhase
    header: SeriesHeader

    def __repr__(self) -> str:
        return (
            f"SynthCase({self.case_id}, shape={self.image.shape}, position={self.position.value}, "
            f"phase={self.phase.value}, lesions={len(self.lesions)})"
        )


def case_seed(seed: int, site: str, index: int) -> int:
    """The seed of one case: independent streams per (dataset seed, site, index)."""
    ss = np.random.SeedSequence([seed, zlib.crc32(site.encode()), index])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _uid(*parts: object) -> str:
    return deterministic_uid("medseg-synth", *(str(p) for p in parts))


def _choose(rng: np.random.Generator, options: dict[PatientPosition, float]) -> PatientPosition:
    keys = list(options)
    return keys[int(rng.choice(len(keys), p=np.array([options[k] for k in keys])))]


def case_grid(
    site: SiteProfile, rng: np.random.Generator, position: PatientPosition, *, matrix: int, slices: int
) -> Grid:
    """The image grid of one case: site FOV (with jitter), table offset and slice order."""
    acq = site.acquisition
    fov = acq.fov_mm + rng.uniform(-acq.fov_jitter_mm, acq.fov_jitter_mm)
    ps = round(fov / matrix, 4)
    dz = acq.slice_spacing_mm
    row_dir, col_dir = (np.array(v) for v in _ORIENTATION[position])
    centre = np.array([rng.uniform(-10.0, 10.0), rng.uniform(-10.0, 10.0), -40.0 + rng.uniform(-15.0, 15.0)])
    step_z = -dz if acq.slice_order is SliceOrder.HEAD_TO_FEET else dz
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, step_z)
    affine[:3, 1] = col_dir * ps
    affine[:3, 2] = row_dir * ps
    origin = centre - (slices - 1) / 2 * affine[:3, 0] - (matrix - 1) / 2 * (affine[:3, 1] + affine[:3, 2])
    affine[:3, 3] = np.round(origin, 3)
    return Grid((slices, matrix, matrix), affine)


def synthesize_case(
    site: SiteProfile,
    seed: int,
    index: int,
    *,
    matrix: int | None = None,
    slices: int | None = None,
    scanner: SiteProfile | None = None,
    phase: ContrastPhase | None = None,
) -> SynthCase:
    """Generate one case of ``site`` in memory (no I/O).

    Parameters
    ----------
    site
        Scanner and protocol.
    seed, index
        Dataset seed and case number; together with the site name they fix everything.
    matrix, slices
        Override the site's in-plane matrix and slice count (quick tries, tests); spacing in z and the
        field of view stay the site's.
    scanner
        Reconstruct with another site's scanner (blur, kernel, noise, HU calibration) instead of the
        site's own. Anatomy, contrast phase and grid stay those of ``site``'s case, so a scanner shift
        can be measured paired with the same case as ``site`` images it (the same patient, rescanned).
    phase
        Image the case in this contrast phase instead of the one the site's protocol draws for it: the
        same patient and grid, another protocol (a phase no training site uses, paired with itself).
    """
    if scanner is not None and scanner.modality is not site.modality:
        raise ValueError(
            f"cannot image a {site.name} ({site.modality.value}) case on {scanner.name}'s "
            f"{scanner.modality.value} scanner"
        )
    n = matrix or site.acquisition.matrix
    nk = slices or site.acquisition.slices
    cseed = case_seed(seed, site.name, index)
    rng = np.random.default_rng(cseed)
    position = _choose(rng, site.acquisition.positions)
    enhanced = rng.uniform() < site.acquisition.contrast_probability
    site_phase = site.acquisition.contrast_phase if enhanced else ContrastPhase.NON_CONTRAST
    phase = site_phase if phase is None else phase
    grid = case_grid(site, rng, position, matrix=n, slices=nk)
    rates = site.lesions
    plan = LesionPlan(
        liver_mean=rates.liver_mean, lung_mean=rates.lung_mean, none_probability=rates.none_probability
    )
    thickness = site.acquisition.slice_thickness_mm
    phantom = build_phantom(grid, rng, lesions=plan, slice_thickness_mm=thickness)
    imaging = scanner or site  # whose scanner reconstructs the image and is named in the header
    rec = imaging.reconstruction
    scanner_model = ScannerModel(
        blur_sigma_mm=rec.blur_sigma_mm,
        sharpen=rec.sharpen,
        noise_sigma=rec.noise_sigma,
        hu_scale=rec.hu_scale,
        hu_offset=rec.hu_offset,
        bias_field_strength=rec.bias_field_strength,
    )
    if site.modality is Modality.CT:
        raw = render_ct(phantom, rng, phase)
        image = simulate_scanner(raw, phantom, rng, scanner_model, slice_thickness_mm=thickness)
        np.clip(image, -1024.0, 3071.0, out=image)
    else:
        raw = render_mr(phantom, rng, phase)
        image = simulate_scanner(
            raw, phantom, rng, scanner_model, slice_thickness_mm=thickness, magnitude=True
        )
        image *= np.float32(rec.intensity_scale)
        np.clip(image, 0.0, 65535.0, out=image)
    np.rint(image, out=image)  # what the series stores: integers with slope 1

    case_id = f"{site.name}-{index:04d}"
    size = f"{nk}x{n}x{n}"
    if scanner is not None:  # a new series of the same patient, from the other site's machine
        size += f"-on-{scanner.name}"
    if phase is not site_phase:  # a new series of the same patient, in another contrast phase
        size += f"-{phase.value}"
    date = dt.date(2020, 1, 1) + dt.timedelta(days=int(cseed % 1461))
    tod = int(cseed // 1461 % 36000)
    mr = site.mr
    eq = imaging.equipment
    header = SeriesHeader(
        modality=site.modality,
        patient_name=f"SYNTH^{site.name.upper()}^{index:04d}",
        patient_id=f"SYN{seed}-{site.name}-{index:04d}",
        study_instance_uid=_uid(seed, site.name, index, size, "study"),
        series_instance_uid=_uid(seed, site.name, index, size, "series"),
        frame_of_reference_uid=_uid(seed, site.name, index, size, "frame-of-reference"),
        study_date=date.strftime("%Y%m%d"),
        study_time=f"{8 + tod // 3600:02d}{tod // 60 % 60:02d}{tod % 60:02d}",
        patient_birth_date=(date - dt.timedelta(days=int(365.25 * (30 + cseed % 50)))).strftime("%Y%m%d"),
        patient_sex="F" if cseed % 2 else "M",
        patient_position=position.value,
        study_id=f"{index + 1}",
        accession_number=f"A{cseed % 10**8:08d}",
        study_description="Synthetic CT abdomen" if site.modality is Modality.CT else "Synthetic MR abdomen",
        series_description=("CT " if site.modality is Modality.CT else "T1 ") + phase.value.replace("_", " "),
        series_number=2,
        body_part_examined="ABDOMEN",
        manufacturer=eq.manufacturer,
        manufacturer_model_name=eq.model_name,
        station_name=eq.station_name,
        institution_name=eq.institution_name,
        device_serial_number=eq.device_serial_number,
        software_versions=eq.software_versions,
        slice_thickness_mm=thickness,
        convolution_kernel=imaging.acquisition.convolution_kernel,
        kvp=imaging.acquisition.kvp,
        mr=None
        if mr is None
        else MRAcquisition(
            repetition_time_ms=mr.repetition_time_ms,
            echo_time_ms=mr.echo_time_ms,
            magnetic_field_strength_t=mr.field_strength_t,
            flip_angle_deg=mr.flip_angle_deg,
            sequence_name=mr.sequence_name,
        ),
    )
    return SynthCase(
        case_id=case_id,
        site=site,
        case_index=index,
        case_seed=cseed,
        image=image,
        labels=phantom.labels,
        affine=grid.affine,
        lesions=phantom.lesions,
        position=position,
        phase=phase,
        header=header,
    )


def label_map_nifti(labels: npt.NDArray[np.uint8], affine_lps: npt.NDArray[np.float64]) -> nib.Nifti1Image:
    """The label map as NIfTI on the same grid: voxel axes (column, row, slice) as dcm2niix writes them,
    affine converted from LPS to RAS (NIfTI's world space) by negating the first two world axes."""
    img = array_to_nifti(labels, affine_lps)
    img.header.set_xyzt_units("mm")
    return img


def load_label_map(path: Path | str) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float64]]:
    """Read a label map written by ``label_map_nifti``: array (slices, rows, columns) and its LPS affine."""
    try:
        data, lps = load_nifti_lps(path)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise DatasetError(f"{path}: cannot read label map: {err}") from err
    return np.ascontiguousarray(data, dtype=np.uint8), lps


def load_lesions(path: Path | str) -> LesionList:
    """Read ``lesions.json``."""
    try:
        return LesionList.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValidationError) as err:
        raise DatasetError(f"{path}: cannot read lesion boxes: {err}") from err


def write_case(case: SynthCase, case_dir: Path, *, manifest_root: Path, split: Split) -> CaseEntry:
    """Write one case's series, label map and lesion boxes under ``case_dir``; returns its manifest entry."""
    case_dir.mkdir(parents=True, exist_ok=True)
    written = write_image_series(
        case.image, case.affine, case.header, case_dir / "dicom", encoding=case.site.transfer_syntax
    )
    label_path = case_dir / "labels.nii.gz"
    nib.save(label_map_nifti(case.labels, case.affine), str(label_path))
    boxes = LesionList(
        case_id=case.case_id,
        lesions=tuple(
            LesionBox(
                index=les.index,
                organ=les.organ.display_name,
                kind=les.kind.value,
                center_lps=_round3(les.center_lps),
                min_corner_lps=_round3(les.min_corner_lps),
                max_corner_lps=_round3(les.max_corner_lps),
                diameter_mm=round(les.diameter_mm, 3),
                voxel_count=les.voxel_count,
            )
            for les in case.lesions
        ),
    )
    lesion_path = case_dir / "lesions.json"
    lesion_path.write_text(boxes.model_dump_json(indent=2) + "\n", encoding="utf-8")
    spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
    k, r, c = case.image.shape
    return CaseEntry(
        case_id=case.case_id,
        site=case.site.name,
        split=split,
        modality=case.site.modality,
        case_seed=case.case_seed,
        image_dir=(case_dir / "dicom").relative_to(manifest_root).as_posix(),
        label_map=label_path.relative_to(manifest_root).as_posix(),
        lesions=lesion_path.relative_to(manifest_root).as_posix(),
        shape=(k, r, c),
        spacing_mm=(round(float(spacing[0]), 4), round(float(spacing[1]), 4), round(float(spacing[2]), 4)),
        patient_position=case.position,
        contrast_phase=case.phase,
        transfer_syntax_uid=written.transfer_syntax_uid,
        study_instance_uid=case.header.study_instance_uid,
        series_instance_uid=case.header.series_instance_uid,
        lesion_count=len(case.lesions),
    )


def _round3(v: tuple[float, float, float]) -> tuple[float, float, float]:
    return (round(v[0], 3), round(v[1], 3), round(v[2], 3))


def assign_splits(n: int, seed: int, site: str, fractions: tuple[float, float, float]) -> tuple[Split, ...]:
    """Shuffle a site's cases (seeded) into train/val/test; from 3 cases on, val and test are not empty."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    n_val = round(n * fractions[1])
    n_test = round(n * fractions[2])
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_test = min(n_test, n)
    n_val = min(n_val, n - n_test)
    order = np.random.default_rng([seed, zlib.crc32(site.encode()), 0x5917]).permutation(n)
    splits = [Split.TRAIN] * n
    for rank, i in enumerate(order):
        if rank < n_test:
            splits[i] = Split.TEST
        elif rank < n_test + n_val:
            splits[i] = Split.VAL
    return tuple(splits)


def generate_dataset(
    output_dir: Path | str,
    sites: Sequence[SiteProfile],
    cases_per_site: int,
    *,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    matrix: int | None = None,
    slices: int | None = None,
    progress: ProgressCallback | None = None,
) -> SynthDataset:
    """Generate ``cases_per_site`` cases for each site under ``output_dir`` and write ``manifest.json``.

    ``matrix`` caps the in-plane matrix (``min(site matrix, matrix)``) and ``slices`` overrides the slice
    count, for quick tries. Existing case folders are overwritten.
    """
    if cases_per_site < 1:
        raise ValueError(f"cases_per_site must be at least 1, got {cases_per_site}")
    if not sites:
        raise ValueError("no sites given; pass at least one SiteProfile (see medseg.synth.list_sites())")
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names}")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    total = cases_per_site * len(sites)
    entries: list[CaseEntry] = []
    done = 0
    for site in sites:
        splits = assign_splits(cases_per_site, seed, site.name, split_fractions)
        n = min(site.acquisition.matrix, matrix) if matrix else None
        for index in range(cases_per_site):
            case = synthesize_case(site, seed, index, matrix=n, slices=slices)
            entries.append(
                write_case(case, root / site.name / case.case_id, manifest_root=root, split=splits[index])
            )
            done += 1
            log.info("generated %s (%d/%d)", case.case_id, done, total)
            if progress is not None:
                progress(done, total)
    manifest = DatasetManifest(
        seed=seed,
        labels={label.display_name: int(label) for label in Label},
        sites=tuple(names),
        cases=tuple(entries),
    )
    path = root / MANIFEST_NAME
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return SynthDataset(path, manifest)


def load_dataset(manifest_path: Path | str) -> SynthDataset:
    """Read and validate a dataset manifest (a file, or the folder holding ``manifest.json``)."""
    path = Path(manifest_path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DatasetError(
            f"{path}: cannot read manifest: {err.strerror}; run 'medseg synth -o DIR' first"
        ) from err
    try:
        manifest = DatasetManifest.model_validate_json(text)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5])
        raise DatasetError(f"{path}: invalid manifest: {problems}") from err
    return SynthDataset(path.resolve(), manifest)
