"""Slice geometry: sort frames along the slice normal, check that they form a regular grid, build the LPS
affine, and (only when asked) resample tilted or unevenly spaced stacks onto a regular grid.

Pure compute on headers and arrays. The rules come from DICOM.md 2-4: sort by projection of
ImagePositionPatient on the normal of ImageOrientationPatient (PS3.3 C.7.6.2.1.1), never by InstanceNumber;
refuse duplicate positions, missing slices, uneven spacing and gantry tilt by default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicom_io.errors import GeometryError
from dicom_io.series import FrameHeader
from dicom_io.volume import GeometryReport

DUPLICATE_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class GeometryOptions:
    """How strict the grid checks are, and what the caller allows the reader to resample.

    Resampling is opt-in (STYLE.md 5) and recorded in ``GeometryReport.resampled``.
    """

    spacing_tolerance: float = 0.01  # relative deviation of a slice gap from the median gap
    tilt_tolerance_degrees: float = 0.1
    resample_tilt: bool = False
    resample_spacing: bool = False


@dataclass(frozen=True)
class ResamplePlan:
    """Target grid for a tilted or unevenly spaced stack (see ``resample_stack``)."""

    target_affine: npt.NDArray[np.float64]
    target_shape: tuple[int, int, int]
    source_distances: npt.NDArray[np.float64]  # each sorted source slice, along the normal, from slice 0
    source_offsets_px: npt.NDArray[
        np.float64
    ]  # (n, 2) in-plane (row, col) shift of each slice onto the target


@dataclass(frozen=True)
class GeometryPlan:
    """How to stack a candidate's frames: their order, the affine, and what was checked."""

    order: tuple[int, ...]
    affine: npt.NDArray[np.float64]
    report: GeometryReport
    resample: ResamplePlan | None


def _unit(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(v / np.linalg.norm(v))


def _orientation(frame: FrameHeader, series: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    if frame.orientation is None or len(frame.orientation) != 6:
        raise GeometryError(f"{series}: {frame.name} has no ImageOrientationPatient (0020,0037)")
    row_dir = np.array(frame.orientation[:3], dtype=np.float64)
    col_dir = np.array(frame.orientation[3:], dtype=np.float64)
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3:
        raise GeometryError(
            f"{series}: ImageOrientationPatient {frame.orientation} is not made of unit vectors"
        )
    if abs(float(np.dot(row_dir, col_dir))) > 1e-3:
        raise GeometryError(f"{series}: ImageOrientationPatient {frame.orientation} is not orthogonal")
    return _unit(row_dir), _unit(col_dir)


def plan_geometry(frames: Sequence[FrameHeader], options: GeometryOptions, series: str) -> GeometryPlan:
    """Sort and check the frames of one candidate volume; raise ``GeometryError`` naming what is wrong."""
    first = frames[0]
    if first.pixel_spacing is None:
        raise GeometryError(f"{series}: {first.name} has no PixelSpacing (0028,0030)")
    row_spacing, col_spacing = first.pixel_spacing
    if first.position is None or first.orientation is None:
        return _projection_plan(frames, row_spacing, col_spacing, series)
    row_dir, col_dir = _orientation(first, series)
    normal = np.cross(row_dir, col_dir)
    missing = [f.name for f in frames if f.position is None]
    if missing:
        raise GeometryError(f"{series}: {missing[0]} has no ImagePositionPatient (0020,0032)")
    positions = np.array([f.position for f in frames], dtype=np.float64)
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    positions, distances = positions[order], distances[order]
    checks = [
        f"sorted {len(frames)} frames by position along the slice normal {np.round(normal, 4).tolist()}"
    ]

    in_plane = np.zeros((3, 3))
    in_plane[:, 1] = col_dir * row_spacing
    in_plane[:, 2] = row_dir * col_spacing
    if len(frames) == 1:
        thickness = first.slice_thickness or 1.0
        affine = _affine(positions[0], normal * thickness, in_plane)
        report = GeometryReport(1, thickness, thickness, thickness, 0.0, (*checks, "single slice"))
        return GeometryPlan(tuple(int(i) for i in order), affine, report, None)

    gaps = np.diff(distances)
    dup = np.flatnonzero(gaps < DUPLICATE_TOLERANCE_MM)
    if dup.size:
        a, b = frames[int(order[dup[0]])], frames[int(order[dup[0] + 1])]
        raise GeometryError(
            f"{series}: {dup.size} duplicate slice position(s), e.g. {a.name} and {b.name} both at "
            f"{distances[dup[0]]:.2f} mm along the normal; remove the duplicate or select another series"
        )
    tilt = _tilt_degrees(positions, normal)
    checks.append(f"no duplicate positions (tolerance {DUPLICATE_TOLERANCE_MM} mm)")
    median_gap = float(np.median(gaps))
    deviation = np.abs(gaps - median_gap) / median_gap
    uneven = bool(np.any(deviation > options.spacing_tolerance))
    tilted = tilt > options.tilt_tolerance_degrees
    problems = []
    if uneven and not options.resample_spacing:
        problems.append(_spacing_message(frames, order, gaps, median_gap, options))
    if tilted and not options.resample_tilt:
        problems.append(
            f"gantry tilt of {tilt:.2f}° (slice positions shear off the slice normal; "
            f"GantryDetectorTilt (0018,1120) = {first.instance.header.get('GantryDetectorTilt', 'absent')}); "
            "a stacked volume would be distorted. Pass resample_tilt=True (--resample-tilt) to resample onto "
            "an orthogonal grid, or select another series"
        )
    if problems:
        raise GeometryError(f"{series}: " + "; and ".join(problems))
    checks.append(
        f"slice gaps {gaps.min():.4g}-{gaps.max():.4g} mm"
        + ("" if uneven else f" within {options.spacing_tolerance:.0%} of {median_gap:.4g} mm")
    )
    checks.append(f"gantry tilt {tilt:.3f}° (tolerance {options.tilt_tolerance_degrees}°)")
    if not uneven and not tilted:
        step = (positions[-1] - positions[0]) / (len(frames) - 1)
        affine = _affine(positions[0], step, in_plane)
        report = _report(len(frames), float(np.linalg.norm(step)), gaps, tilt, checks, [])
        return GeometryPlan(tuple(int(i) for i in order), affine, report, None)

    plan, actions = _resample_plan(
        positions, distances, normal, row_dir, col_dir, row_spacing, col_spacing, first
    )
    report = _report(
        len(frames), float(np.linalg.norm(plan.target_affine[:3, 0])), gaps, tilt, checks, actions
    )
    return GeometryPlan(tuple(int(i) for i in order), plan.target_affine, report, plan)


def _report(
    count: int,
    spacing: float,
    gaps: npt.NDArray[np.float64],
    tilt: float,
    checks: list[str],
    actions: list[str],
) -> GeometryReport:
    return GeometryReport(
        slice_count=count,
        slice_spacing_mm=spacing,
        spacing_min_mm=float(gaps.min()),
        spacing_max_mm=float(gaps.max()),
        tilt_degrees=tilt,
        checks=tuple(checks),
        resampled=tuple(actions),
    )


def _affine(
    origin: npt.NDArray[np.float64], slice_step: npt.NDArray[np.float64], in_plane: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    affine = np.eye(4)
    affine[:3, :3] = in_plane
    affine[:3, 0] = slice_step
    affine[:3, 3] = origin
    return affine


def _tilt_degrees(positions: npt.NDArray[np.float64], normal: npt.NDArray[np.float64]) -> float:
    """Angle between the slice-stacking direction and the slice normal (0 for an orthogonal stack)."""
    step = positions[-1] - positions[0]
    along = float(np.dot(step, normal))
    across = float(np.linalg.norm(step - along * normal))
    return math.degrees(math.atan2(across, abs(along)))


def _spacing_message(
    frames: Sequence[FrameHeader],
    order: npt.NDArray[np.intp],
    gaps: npt.NDArray[np.float64],
    median_gap: float,
    options: GeometryOptions,
) -> str:
    fix = (
        "pass resample_spacing=True (--resample-spacing) to resample to uniform spacing, "
        "or select another series"
    )
    multiples = gaps / median_gap
    holes = np.flatnonzero(
        (np.abs(multiples - np.round(multiples)) < options.spacing_tolerance) & (multiples > 1.5)
    )
    if holes.size and np.all(
        (np.abs(multiples - 1) <= options.spacing_tolerance) | np.isin(np.arange(gaps.size), holes)
    ):
        i = int(holes[0])
        total = int(np.sum(np.round(multiples[holes]) - 1))
        before, after = frames[int(order[i])].name, frames[int(order[i + 1])].name
        return (
            f"{total} missing slice(s): a gap of {gaps[i]:.3g} mm between {before} and {after} "
            f"where {median_gap:.3g} mm is expected ({round(multiples[i]) - 1} slice(s) missing there); {fix}"
        )
    return (
        f"slice spacing varies {gaps.min():.3g}-{gaps.max():.3g} mm "
        f"(median {median_gap:.3g} mm, tolerance {options.spacing_tolerance:.0%}); {fix}"
    )


def _projection_plan(
    frames: Sequence[FrameHeader], row_spacing: float, col_spacing: float, series: str
) -> GeometryPlan:
    """CR/DX and other projection images: no patient geometry, only pixel spacing (one slice)."""
    if len(frames) != 1:
        raise GeometryError(
            f"{series}: {len(frames)} frames without ImagePositionPatient cannot form a volume"
        )
    affine = np.diag([1.0, row_spacing, col_spacing, 1.0])
    report = GeometryReport(
        1, 1.0, 1.0, 1.0, 0.0, ("projection image: no patient position; affine holds pixel spacing only",)
    )
    return GeometryPlan((0,), affine, report, None)


def _resample_plan(
    positions: npt.NDArray[np.float64],
    distances: npt.NDArray[np.float64],
    normal: npt.NDArray[np.float64],
    row_dir: npt.NDArray[np.float64],
    col_dir: npt.NDArray[np.float64],
    row_spacing: float,
    col_spacing: float,
    first: FrameHeader,
) -> tuple[ResamplePlan, list[str]]:
    """Orthogonal, evenly spaced target grid that holds every source voxel.

    The target slice spacing follows dcm2niix's equalisation rule (the smallest gap, unless that would more
    than double the slice count), so that outputs are comparable with it.
    """
    rel = distances - distances[0]
    gaps = np.diff(rel)
    actions = []
    if np.allclose(gaps, gaps[0], rtol=0.01):
        spacing, count = float(np.mean(gaps)), len(rel)
    else:
        spacing = float(gaps.min())
        count = math.ceil((rel[-1] - 0.5 * (rel[-1] - rel[-2])) / spacing)
        if count > 2 * len(rel):
            count = 2 * len(rel)
            spacing = float(rel[-1] / (count - 1))
        count = max(count, 2)
        actions.append(
            f"slice spacing {gaps.min():.4g}-{gaps.max():.4g} mm resampled to uniform {spacing:.4g} mm "
            f"({len(rel)} -> {count} slices, linear interpolation along the normal)"
        )
    # in-plane shift of each slice relative to slice 0, in pixels (row, col)
    shifts_mm = positions - positions[0]
    offsets = np.stack([shifts_mm @ col_dir / row_spacing, shifts_mm @ row_dir / col_spacing], axis=1)
    lo = np.floor(offsets.min(axis=0) + 1e-6)
    hi = np.ceil(offsets.max(axis=0) - 1e-6)
    extra = (hi - lo).astype(int)
    if np.any(np.abs(offsets) > 1e-3):
        tilt = _tilt_degrees(positions, normal)
        actions.append(
            f"gantry tilt {tilt:.2f}° removed: each slice shifted in-plane (linear interpolation) onto an "
            f"orthogonal grid of {first.rows + extra[0]}x{first.columns + extra[1]} pixels"
        )
    origin = positions[0] + lo[0] * row_spacing * col_dir + lo[1] * col_spacing * row_dir
    in_plane = np.zeros((3, 3))
    in_plane[:, 1] = col_dir * row_spacing
    in_plane[:, 2] = row_dir * col_spacing
    affine = _affine(origin, normal * spacing, in_plane)
    plan = ResamplePlan(
        target_affine=affine,
        target_shape=(count, first.rows + int(extra[0]), first.columns + int(extra[1])),
        source_distances=rel,
        source_offsets_px=offsets - lo,
    )
    return plan, actions


def resample_stack(
    stack: npt.NDArray[np.float32], plan: ResamplePlan, fill_value: float
) -> npt.NDArray[np.float32]:
    """Put sorted source slices onto the plan's orthogonal, evenly spaced grid (linear interpolation)."""
    out = np.full(plan.target_shape, fill_value, dtype=np.float32)
    n_rows, n_cols = stack.shape[1:]
    cache: dict[int, npt.NDArray[np.float32]] = {}

    def shifted(i: int) -> npt.NDArray[np.float32]:
        if i not in cache:
            canvas = np.full(plan.target_shape[1:], fill_value, dtype=np.float32)
            canvas[:n_rows, :n_cols] = stack[i]
            dr, dc = plan.source_offsets_px[i]
            cache[i] = np.asarray(
                ndimage.shift(canvas, (dr, dc), order=1, mode="constant", cval=fill_value), dtype=np.float32
            )
        return cache[i]

    spacing = float(np.linalg.norm(plan.target_affine[:3, 0]))
    d = plan.source_distances
    for k in range(plan.target_shape[0]):
        z = k * spacing
        hi = int(np.searchsorted(d, z, side="left"))
        if hi == 0:
            out[k] = shifted(0)
        elif hi >= len(d):
            out[k] = shifted(len(d) - 1)
        else:
            lo = hi - 1
            w = (z - d[lo]) / (d[hi] - d[lo])
            out[k] = (1 - w) * shifted(lo) + w * shifted(hi)
        for stale in [i for i in cache if i < hi - 1]:
            del cache[stale]
    return out
