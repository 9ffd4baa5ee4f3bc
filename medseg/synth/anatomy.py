"""Anatomy-like torso phantoms with exactly known ground truth: geometry, tissue intensities, scanner effects.

Pure compute (numpy/scipy, float32), no I/O. Shapes are implicit functions (ellipsoids, elliptic
cylinders, tubes) of LPS millimetres (x to the patient's left, y posterior, z superior; z = 0 is about the
level of the diaphragm), evaluated in coordinates warped by a smooth random displacement field so that no
two cases share a shape. Bowel loops and mesenteric fat fill the abdomen around the organs; the
retroperitoneal ones (kidneys, aorta) sit in fat that keeps bowel off them. Organ geometry is evaluated
on a coarse grid (about 1.6 mm in-plane, 2.5 mm through-plane) and replicated onto the target grid;
lesions are painted at full resolution. Intensities come from per-tissue lookup tables plus
low-frequency texture; the scanner simulation then blurs (partial volume: thick slices are rendered as
sub-slices and averaged), sharpens, drifts and adds noise.

Because the image is rendered from the label map, the ground truth is exact on the image grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum, StrEnum

import numpy as np
import numpy.typing as npt
from scipy import ndimage

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]


class Label(IntEnum):
    """Values of the ground-truth label map (one integer per structure, 0 = everything else).

    The single source of these numbers for the generator, the default model's training and its SEG
    segments. Lungs are one label (both sides); bone is the spine (vertebral bodies and posterior
    elements) and the ribs. Lesions carry their own label, overriding the organ that holds them, and are
    also listed one by one with their boxes.
    """

    BACKGROUND = 0
    LIVER = 1
    SPLEEN = 2
    KIDNEY_LEFT = 3
    KIDNEY_RIGHT = 4
    AORTA = 5
    LUNG = 6
    BONE = 7
    LESION = 8

    @property
    def display_name(self) -> str:
        """Lower-case name used in manifests and reports (``kidney_left``)."""
        return self.name.lower()


class Tissue(IntEnum):
    """What a voxel is made of; finer than ``Label`` (fat and muscle are tissue but not labelled)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    BOWEL = 3
    LUNG = 4
    BONE = 5
    DISC = 6
    HEART = 7
    LIVER = 8
    SPLEEN = 9
    KIDNEY_LEFT = 10
    KIDNEY_RIGHT = 11
    AORTA = 12


LESION_CODE_BASE = 32  # tissue code of lesion i is LESION_CODE_BASE + i
MAX_LESIONS = 255 - LESION_CODE_BASE

_TISSUE_LABEL = {
    Tissue.LIVER: Label.LIVER,
    Tissue.SPLEEN: Label.SPLEEN,
    Tissue.KIDNEY_LEFT: Label.KIDNEY_LEFT,
    Tissue.KIDNEY_RIGHT: Label.KIDNEY_RIGHT,
    Tissue.AORTA: Label.AORTA,
    Tissue.LUNG: Label.LUNG,
    Tissue.BONE: Label.BONE,
}


class ContrastPhase(StrEnum):
    """Whether iodinated contrast was given (CT) or gadolinium (MR), and when."""

    NON_CONTRAST = "non_contrast"
    ARTERIAL = "arterial"  # late arterial (~35 s): bright aorta and kidneys, liver barely enhanced
    PORTAL_VENOUS = "portal_venous"


class LesionKind(StrEnum):
    """Lesion density relative to the organ that holds it."""

    HYPODENSE = "hypodense"
    HYPERDENSE = "hyperdense"


# CT attenuation per tissue: (mean HU, case-to-case half range) for each phase. Sources: typical adult
# values (liver 55-65 HU unenhanced, ~110 portal venous; aorta ~40 unenhanced, 150-250 enhanced).
_CT_HU: dict[ContrastPhase, dict[Tissue, tuple[float, float]]] = {
    ContrastPhase.NON_CONTRAST: {
        Tissue.AIR: (-1000.0, 0.0),
        Tissue.FAT: (-100.0, 8.0),
        Tissue.MUSCLE: (45.0, 5.0),
        Tissue.BOWEL: (25.0, 8.0),
        Tissue.LUNG: (-850.0, 25.0),
        Tissue.BONE: (600.0, 150.0),
        Tissue.DISC: (80.0, 10.0),
        Tissue.HEART: (40.0, 5.0),
        Tissue.LIVER: (60.0, 6.0),
        Tissue.SPLEEN: (50.0, 5.0),
        Tissue.KIDNEY_LEFT: (35.0, 5.0),
        Tissue.KIDNEY_RIGHT: (35.0, 5.0),
        Tissue.AORTA: (40.0, 5.0),
    },
    ContrastPhase.PORTAL_VENOUS: {
        Tissue.AIR: (-1000.0, 0.0),
        Tissue.FAT: (-100.0, 8.0),
        Tissue.MUSCLE: (55.0, 5.0),
        Tissue.BOWEL: (60.0, 10.0),
        Tissue.LUNG: (-850.0, 25.0),
        Tissue.BONE: (620.0, 150.0),
        Tissue.DISC: (90.0, 10.0),
        Tissue.HEART: (160.0, 20.0),
        Tissue.LIVER: (110.0, 10.0),
        Tissue.SPLEEN: (120.0, 10.0),
        Tissue.KIDNEY_LEFT: (170.0, 20.0),
        Tissue.KIDNEY_RIGHT: (170.0, 20.0),
        Tissue.AORTA: (200.0, 25.0),
    },
    ContrastPhase.ARTERIAL: {  # late arterial at 120 kVp: no training site scans in this phase
        Tissue.AIR: (-1000.0, 0.0),
        Tissue.FAT: (-100.0, 8.0),
        Tissue.MUSCLE: (50.0, 5.0),
        Tissue.BOWEL: (45.0, 10.0),
        Tissue.LUNG: (-850.0, 25.0),
        Tissue.BONE: (610.0, 150.0),
        Tissue.DISC: (85.0, 10.0),
        Tissue.HEART: (260.0, 40.0),
        Tissue.LIVER: (75.0, 8.0),
        Tissue.SPLEEN: (115.0, 15.0),
        Tissue.KIDNEY_LEFT: (200.0, 30.0),
        Tissue.KIDNEY_RIGHT: (200.0, 30.0),
        Tissue.AORTA: (320.0, 50.0),
    },
}
# Low-frequency texture amplitude (HU standard deviation) per tissue.
_CT_TEXTURE = {
    Tissue.FAT: 8.0,
    Tissue.MUSCLE: 6.0,
    Tissue.BOWEL: 25.0,
    Tissue.LUNG: 35.0,
    Tissue.BONE: 90.0,
    Tissue.LIVER: 5.0,
    Tissue.SPLEEN: 4.0,
    Tissue.KIDNEY_LEFT: 6.0,
    Tissue.KIDNEY_RIGHT: 6.0,
}
# Phases that change a tissue's texture: the spleen enhances unevenly in the arterial phase (arciform
# pattern), a classic mimic of splenic lesions.
_CT_TEXTURE_BY_PHASE: dict[ContrastPhase, dict[Tissue, float]] = {
    ContrastPhase.ARTERIAL: {Tissue.SPLEEN: 25.0},
}
# T1-weighted signal (arbitrary units, fat bright, flowing blood dark unless enhanced).
_MR_T1: dict[ContrastPhase, dict[Tissue, float]] = {
    ContrastPhase.NON_CONTRAST: {
        Tissue.AIR: 0.0,
        Tissue.FAT: 900.0,
        Tissue.MUSCLE: 320.0,
        Tissue.BOWEL: 380.0,
        Tissue.LUNG: 30.0,
        Tissue.BONE: 550.0,
        Tissue.DISC: 280.0,
        Tissue.HEART: 250.0,
        Tissue.LIVER: 520.0,
        Tissue.SPLEEN: 380.0,
        Tissue.KIDNEY_LEFT: 330.0,
        Tissue.KIDNEY_RIGHT: 330.0,
        Tissue.AORTA: 60.0,
    },
}
_MR_T1[ContrastPhase.PORTAL_VENOUS] = {
    **_MR_T1[ContrastPhase.NON_CONTRAST],
    Tissue.LIVER: 700.0,
    Tissue.SPLEEN: 650.0,
    Tissue.KIDNEY_LEFT: 750.0,
    Tissue.KIDNEY_RIGHT: 750.0,
    Tissue.AORTA: 800.0,
    Tissue.HEART: 700.0,
}
_MR_T1[ContrastPhase.ARTERIAL] = {
    **_MR_T1[ContrastPhase.NON_CONTRAST],
    Tissue.LIVER: 600.0,
    Tissue.SPLEEN: 700.0,
    Tissue.KIDNEY_LEFT: 850.0,
    Tissue.KIDNEY_RIGHT: 850.0,
    Tissue.AORTA: 950.0,
    Tissue.HEART: 800.0,
}


def expected_hu_range(label: Label, phase: ContrastPhase) -> tuple[float, float]:
    """Range of a case's mean attenuation inside ``label`` before scanner drift (CT only).

    Used by tests and by anyone checking that a generated series still looks like its ground truth.
    """
    tissues = [t for t, lab in _TISSUE_LABEL.items() if lab is label]
    if not tissues:
        raise ValueError(
            f"label {label.name} has no single tissue; expected one of {list(_TISSUE_LABEL.values())}"
        )
    mean, half = _CT_HU[phase][tissues[0]]
    return mean - half, mean + half


@dataclass(frozen=True)
class Grid:
    """An axis-aligned image grid: ``shape`` (slices, rows, columns) and the LPS ``affine`` of index space.

    The phantom needs slices along z, rows along y and columns along x (either sign: supine and prone,
    head-to-feet and feet-to-head); oblique grids are refused.
    """

    shape: tuple[int, int, int]
    affine: npt.NDArray[np.float64]

    def __post_init__(self) -> None:
        a = np.asarray(self.affine, dtype=np.float64)
        if a.shape != (4, 4):
            raise ValueError(f"grid affine must be 4x4, got {a.shape}")
        steps = a[:3, :3]
        expected = np.zeros((3, 3), dtype=bool)
        expected[2, 0] = expected[1, 1] = expected[0, 2] = True  # slice->z, row->y, column->x
        if np.abs(steps[~expected]).max() > 1e-6 or np.abs(steps[expected]).min() < 1e-6:
            raise ValueError(
                "phantom grids must be axis-aligned with slices along z, rows along y and columns along x; "
                f"got affine steps {steps.round(4).tolist()}"
            )
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"grid shape must be 3 positive sizes (slices, rows, columns), got {self.shape}")

    def axis_coordinates(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """LPS z of each slice, y of each row and x of each column (mm)."""
        a = self.affine
        nk, nr, nc = self.shape
        z = a[2, 3] + np.arange(nk) * a[2, 0]
        y = a[1, 3] + np.arange(nr) * a[1, 1]
        x = a[0, 3] + np.arange(nc) * a[0, 2]
        return z.astype(np.float32), y.astype(np.float32), x.astype(np.float32)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (slice step, row step, column step) in mm."""
        n = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(n[0]), float(n[1]), float(n[2])


@dataclass(frozen=True)
class Lesion:
    """One focal lesion: an axis-aligned ellipsoid in LPS mm, inside ``organ``."""

    index: int  # 1-based, in painting order
    organ: Label
    kind: LesionKind
    center_lps: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    voxel_count: int

    @property
    def diameter_mm(self) -> float:
        """Longest diameter (what a radiologist would measure)."""
        return 2.0 * max(self.radii_mm)

    @property
    def min_corner_lps(self) -> tuple[float, float, float]:
        c, r = self.center_lps, self.radii_mm
        return (c[0] - r[0], c[1] - r[1], c[2] - r[2])

    @property
    def max_corner_lps(self) -> tuple[float, float, float]:
        c, r = self.center_lps, self.radii_mm
        return (c[0] + r[0], c[1] + r[1], c[2] + r[2])


@dataclass(frozen=True)
class LesionPlan:
    """How many lesions a case gets: Poisson means per organ and the chance of a lesion-free case."""

    liver_mean: float = 1.5
    lung_mean: float = 0.8
    none_probability: float = 0.25
    min_diameter_mm: float = 5.0
    max_diameter_mm: float = 30.0


@dataclass(frozen=True, repr=False)
class Phantom:
    """Tissue codes on a render grid, and the lesions painted into it.

    ``tissue`` has ``subslices`` rendered sub-slices per image slice (partial-volume sampling of thick
    slices); the label map is taken from the middle sub-slice, i.e. at the slice position.
    """

    grid: Grid
    tissue: ByteArray  # (slices * subslices, rows, columns)
    subslices: int
    lesions: tuple[Lesion, ...]

    @property
    def labels(self) -> ByteArray:
        """Ground-truth label map (``Label`` values, uint8) on ``grid``."""
        lut = np.zeros(256, dtype=np.uint8)
        for tissue, label in _TISSUE_LABEL.items():
            lut[tissue] = label
        for lesion in self.lesions:  # painted with code LESION_CODE_BASE + index, index from 1
            lut[LESION_CODE_BASE + lesion.index] = Label.LESION
        nk, nr, nc = self.grid.shape
        centre = self.tissue.reshape(nk, self.subslices, nr, nc)[:, self.subslices // 2]
        return np.asarray(lut[centre])

    def __repr__(self) -> str:
        return f"Phantom(shape={self.grid.shape}, subslices={self.subslices}, lesions={len(self.lesions)})"


# --- geometry -------------------------------------------------------------------------------------------


def _block_coordinates(coords: FloatArray, factor: int) -> FloatArray:
    """Coordinates of coarse samples, each the mean of ``factor`` consecutive fine samples."""
    n = len(coords)
    nb = -(-n // factor)
    padded = np.concatenate([coords, np.repeat(coords[-1:], nb * factor - n)])
    return padded.reshape(nb, factor).mean(axis=1).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], lattice: int) -> FloatArray:
    """Unit-variance low-frequency noise: Gaussian values on a coarse lattice, linearly upsampled."""
    small = tuple(max(2, -(-s // lattice) + 1) for s in shape)
    field = rng.standard_normal(small).astype(np.float32)
    zoom = [s / m for s, m in zip(shape, small, strict=True)]
    out = ndimage.zoom(field, zoom, order=1, grid_mode=True, mode="nearest")
    return np.asarray(out[tuple(slice(0, s) for s in shape)], dtype=np.float32)


def _smooth_field(
    rng: np.random.Generator, coords: tuple[FloatArray, ...], *, control_mm: float, sample_mm: float
) -> FloatArray:
    """Unit-variance noise with ``control_mm`` correlation on the grid of ``coords``.

    Interpolated on a ``sample_mm`` grid and replicated to the full grid (nearest), which is an order of
    magnitude faster than interpolating every voxel.
    """
    steps = [abs(float(c[-1] - c[0])) / max(len(c) - 1, 1) or 1.0 for c in coords]
    reps = [max(1, int(sample_mm / s)) for s in steps]
    shape = tuple(-(-len(c) // r) for c, r in zip(coords, reps, strict=True))
    lattice = max(2, round(control_mm / sample_mm))
    small = _smooth_noise(rng, shape, lattice)
    idx = [np.arange(len(c)) // r for c, r in zip(coords, reps, strict=True)]
    return np.asarray(small[idx[0]][:, idx[1]][:, :, idx[2]])


class _Canvas:
    """The coarse tissue grid plus its warped coordinates; paints shapes inside bounding boxes."""

    def __init__(self, z: FloatArray, y: FloatArray, x: FloatArray, rng: np.random.Generator, warp_mm: float):
        self.z, self.y, self.x = z, y, x
        self.shape = (len(z), len(y), len(x))
        self.tissue = np.zeros(self.shape, dtype=np.uint8)
        # Displacement (dz, dy, dx) with ~60 mm control points, evaluated every ~5 mm and replicated:
        # the steps this leaves (< 0.5 mm) are below the coarse resolution.
        self.disp = [
            warp_mm * _smooth_field(rng, (z, y, x), control_mm=60.0, sample_mm=5.0) for _ in range(3)
        ]
        self.margin = 3.0 * warp_mm

    def spacing(self) -> tuple[float, float, float]:
        """Coarse voxel size (z, y, x) in mm, before the warp."""
        z, y, x = (float(abs(c[1] - c[0])) if len(c) > 1 else 1.0 for c in (self.z, self.y, self.x))
        return z, y, x

    def region(
        self, lo: tuple[float, float, float], hi: tuple[float, float, float]
    ) -> tuple[tuple[slice, slice, slice], FloatArray, FloatArray, FloatArray] | None:
        """Index box covering LPS box [lo, hi] (z, y, x) plus the warp margin, and warped coordinates."""
        sl = []
        for coords, a, b in zip((self.z, self.y, self.x), lo, hi, strict=True):
            inside = np.nonzero((coords >= a - self.margin) & (coords <= b + self.margin))[0]
            if inside.size == 0:
                return None
            sl.append(slice(int(inside[0]), int(inside[-1]) + 1))
        box = (sl[0], sl[1], sl[2])
        zz = self.z[box[0], None, None] + self.disp[0][box]
        yy = self.y[None, box[1], None] + self.disp[1][box]
        xx = self.x[None, None, box[2]] + self.disp[2][box]
        return box, zz, yy, xx

    def paint(
        self,
        box: tuple[slice, slice, slice],
        mask: npt.NDArray[np.bool_],
        tissue: Tissue,
        *,
        over: tuple[Tissue, ...] = (),
    ) -> None:
        """Set ``tissue`` inside ``mask``; with ``over``, only where the canvas holds one of those."""
        if over:
            mask = mask & np.isin(self.tissue[box], over)
        self.tissue[box][mask] = tissue


def _ellipsoid_bounds(
    c: tuple[float, float, float], r: tuple[float, float, float]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(z, y, x) bounds of an ellipsoid centred at LPS ``c`` (x, y, z) with radii ``r`` (x, y, z)."""
    m = max(r)
    return (c[2] - m, c[1] - m, c[0] - m), (c[2] + m, c[1] + m, c[0] + m)


def _ellipsoid(
    zz: FloatArray,
    yy: FloatArray,
    xx: FloatArray,
    c: tuple[float, float, float],
    r: tuple[float, float, float],
    rot_deg: float = 0.0,
) -> npt.NDArray[np.bool_]:
    """Inside test for an ellipsoid rotated by ``rot_deg`` about the z axis (axial plane)."""
    t = math.radians(rot_deg)
    cos, sin = np.float32(math.cos(t)), np.float32(math.sin(t))
    dx = xx - np.float32(c[0])
    dy = yy - np.float32(c[1])
    q = zz - np.float32(c[2])
    q *= np.float32(1.0 / r[2])
    np.square(q, out=q)
    if rot_deg:
        dx, dy = cos * dx + sin * dy, cos * dy - sin * dx
    dx *= np.float32(1.0 / r[0])
    dy *= np.float32(1.0 / r[1])
    q += np.square(dx, out=dx)
    q += np.square(dy, out=dy)
    return np.asarray(q <= 1.0)


@dataclass(frozen=True)
class _Body:
    cy: float
    ax: float
    ay: float
    fat: float
    wall: float

    def metric(self, yy: FloatArray, xx: FloatArray, zz: FloatArray, inset: float) -> FloatArray:
        """Elliptic radius (< 1 inside) of the torso cross-section shrunk by ``inset`` mm."""
        # the torso widens by 0.04 % per mm towards the chest
        inv_taper = 1.0 / (1.0 + np.float32(0.0004) * np.clip(zz, -250.0, 250.0))
        a = np.square(xx * inv_taper * np.float32(1.0 / (self.ax - inset)))
        b = yy - np.float32(self.cy)
        b *= inv_taper
        b *= np.float32(1.0 / (self.ay - inset))
        a += np.square(b, out=b)
        return np.sqrt(a, out=a)


def build_phantom(
    grid: Grid,
    rng: np.random.Generator,
    *,
    lesions: LesionPlan | None = None,
    slice_thickness_mm: float | None = None,
    coarse_spacing_mm: tuple[float, float] = (2.5, 1.6),
) -> Phantom:
    """Draw one torso phantom on ``grid``.

    Parameters
    ----------
    grid
        Target image grid (axis-aligned, any orientation sign).
    rng
        Source of every random choice; the same generator state gives the same phantom.
    lesions
        Lesion counts and sizes; ``None`` uses ``LesionPlan()``.
    slice_thickness_mm
        Nominal reconstructed thickness; slices thicker than 2.5 mm are rendered as 3 sub-slices across
        the thickness so that partial volume along z is simulated (blur then sample).
    coarse_spacing_mm
        Resolution (through-plane, in-plane) at which organ shapes are evaluated before replication.
    """
    plan = lesions or LesionPlan()
    zs, ys, xs = grid.axis_coordinates()
    dz = grid.spacing[0]
    thickness = slice_thickness_mm if slice_thickness_mm is not None else dz
    sub = 3 if thickness > 2.5 else 1
    if sub > 1:
        offsets = (np.arange(sub, dtype=np.float32) - (sub - 1) / 2) * np.float32(thickness / sub)
        zs_render = (zs[:, None] + offsets[None, :]).reshape(-1).astype(np.float32)
    else:
        zs_render = zs
    fz = max(1, int(coarse_spacing_mm[0] / (thickness / sub if sub > 1 else dz)))
    fr = max(1, int(coarse_spacing_mm[1] / grid.spacing[1]))
    fc = max(1, int(coarse_spacing_mm[1] / grid.spacing[2]))
    canvas = _Canvas(
        _block_coordinates(zs_render, fz),
        _block_coordinates(ys, fr),
        _block_coordinates(xs, fc),
        rng,
        warp_mm=float(rng.uniform(4.0, 8.0)),
    )
    _paint_organs(canvas, rng)

    nr, nc = len(ys), len(xs)
    iz = np.arange(len(zs_render)) // fz
    tissue = canvas.tissue[iz][:, np.arange(nr) // fr][:, :, np.arange(nc) // fc]
    placed = _paint_lesions(tissue, canvas, zs_render, ys, xs, rng, plan)
    return Phantom(grid=grid, tissue=np.ascontiguousarray(tissue), subslices=sub, lesions=placed)


def _paint_organs(cv: _Canvas, rng: np.random.Generator) -> None:
    """Paint the torso, back to front: later structures overwrite earlier ones."""
    u = rng.uniform
    body = _Body(
        cy=u(-10.0, 10.0), ax=u(150.0, 185.0), ay=u(105.0, 130.0), fat=u(8.0, 30.0), wall=u(8.0, 15.0)
    )
    inner = body.fat + body.wall
    dome_r = u(10.0, 25.0)
    dome_l = dome_r - u(5.0, 15.0)
    post = body.cy + body.ay - inner  # inner posterior wall
    spine_y = post - u(45.0, 55.0)
    spine_r = u(16.0, 21.0)

    full = cv.region((-1e4, -1e4, -1e4), (1e4, 1e4, 1e4))
    assert full is not None  # the whole grid always intersects itself
    box, zz, yy, xx = full
    cv.paint(box, body.metric(yy, xx, zz, 0.0) <= 1.0, Tissue.FAT)
    cv.paint(box, body.metric(yy, xx, zz, body.fat) <= 1.0, Tissue.MUSCLE)
    visceral = body.metric(yy, xx, zz, inner) <= 1.0
    # diaphragm: two domes, lower laterally and posteriorly (costophrenic recesses)
    back = 0.15 * np.clip(yy - body.cy, 0, None)
    dome_x = np.where(xx < 0, xx + 70.0, xx - 70.0)
    z_dia = np.where(xx < 0, dome_r, dome_l) - 0.007 * (dome_x**2 + (yy - body.cy) ** 2) - back
    above = zz > z_dia
    del back, dome_x, z_dia
    bowel = _smooth_field(rng, (cv.z, cv.y, cv.x), control_mm=25.0, sample_mm=2.5) > u(-0.3, 0.3)
    cv.paint(box, visceral, Tissue.FAT)  # mediastinal and mesenteric fat
    cv.paint(box, visceral & bowel & ~above, Tissue.BOWEL)
    del bowel

    def organ(
        tissue: Tissue,
        c: tuple[float, float, float],
        r: tuple[float, float, float],
        rot: float = 0.0,
        *,
        where: npt.NDArray[np.bool_] | None = None,
        union: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None,
        fat_capsule: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """Paint an ellipsoid (optionally united with a second one) restricted to ``where``.

        ``fat_capsule`` (mm) is the fat a retroperitoneal organ sits in: bowel is cleared from a shell
        that thick around it, and liver and spleen from a thinner one (the fat plane between them)."""
        cleared_by_shell = ((Tissue.BOWEL,), (Tissue.LIVER, Tissue.SPLEEN))
        for margin, cleared in zip(fat_capsule, cleared_by_shell, strict=True):
            if margin:
                shell = (r[0] + margin, r[1] + margin, r[2] + margin)
                reg = cv.region(*_ellipsoid_bounds(c, shell))
                if reg is not None:
                    b, rz, ry, rx = reg
                    cv.paint(b, _ellipsoid(rz, ry, rx, c, shell, rot), Tissue.FAT, over=cleared)
        lo, hi = _ellipsoid_bounds(c, r)
        if union is not None:
            lo2, hi2 = _ellipsoid_bounds(*union)
            lo = (min(lo[0], lo2[0]), min(lo[1], lo2[1]), min(lo[2], lo2[2]))
            hi = (max(hi[0], hi2[0]), max(hi[1], hi2[1]), max(hi[2], hi2[2]))
        reg = cv.region(lo, hi)
        if reg is None:
            return
        b, rz, ry, rx = reg
        mask = _ellipsoid(rz, ry, rx, c, r, rot)
        if union is not None:
            mask |= _ellipsoid(rz, ry, rx, *union)
        if where is not None:
            mask &= where[b]
        cv.paint(b, mask, tissue)

    for side in (-1.0, 1.0):  # paraspinal muscles
        organ(Tissue.MUSCLE, (side * 38.0, post - 20.0, 0.0), (28.0, 24.0, 1e4))
    chest = visceral & above
    for side in (-1.0, 1.0):  # lungs: ellipsoids above the diaphragm, inside the chest wall
        c = (side * u(75.0, 90.0), body.cy + u(0.0, 10.0), (dome_r + dome_l) / 2 + u(100.0, 130.0))
        organ(Tissue.LUNG, c, (u(60.0, 72.0), u(80.0, 95.0), u(150.0, 175.0)), where=chest)
    organ(
        Tissue.HEART,
        (u(10.0, 30.0), body.cy - u(30.0, 45.0), dome_l + u(45.0, 60.0)),
        (60, 50, 55),
        where=above,
    )
    abdomen = visceral & ~above
    del chest, above, visceral
    organ(  # liver: right lobe united with the left lobe, below the right dome
        Tissue.LIVER,
        (-u(55.0, 75.0), body.cy - u(0.0, 10.0), dome_r - u(60.0, 75.0)),
        (u(70.0, 90.0), u(75.0, 95.0), u(65.0, 85.0)),
        u(-15.0, 15.0),
        where=abdomen,
        union=((u(-20.0, 0.0), body.cy - u(40.0, 55.0), dome_r - u(40.0, 50.0)), (u(50.0, 65.0), 40.0, 45.0)),
    )
    organ(
        Tissue.SPLEEN,
        (u(85.0, 100.0), body.cy + u(30.0, 45.0), dome_l - u(40.0, 60.0)),
        (u(25.0, 35.0), u(45.0, 60.0), u(40.0, 55.0)),
        u(20.0, 40.0),
        where=abdomen,
    )
    z_kid = -u(95.0, 120.0)
    y_kid = spine_y + u(-5.0, 10.0)
    kid_r = (u(25.0, 32.0), u(22.0, 28.0), u(45.0, 60.0))
    perirenal = (u(5.0, 12.0), u(2.0, 4.0))  # perirenal fat: bowel, liver and spleen never touch a kidney
    organ(
        Tissue.KIDNEY_RIGHT,
        (-u(65.0, 80.0), y_kid, z_kid),
        kid_r,
        -u(15.0, 30.0),
        where=abdomen,
        fat_capsule=perirenal,
    )
    organ(
        Tissue.KIDNEY_LEFT,
        (u(65.0, 80.0), y_kid, z_kid + u(10.0, 25.0)),
        kid_r,
        u(15.0, 30.0),
        where=abdomen,
        fat_capsule=perirenal,
    )
    del abdomen
    _trim_spleen(cv)

    # aorta: a tube left of the midline, anterior to the spine, drifting slightly with z, in a sleeve of
    # mediastinal and retroperitoneal fat that keeps heart, liver and bowel off its wall (unenhanced, blood
    # differs from them by 0-20 HU; the descending aorta lies behind the pericardium, not in the heart)
    ax0, ar = u(10.0, 25.0), u(9.0, 14.0)
    ay0 = spine_y - spine_r - ar - u(3.0, 8.0)
    sleeve = ar + u(3.0, 8.0)
    reg = cv.region((-1e4, ay0 - sleeve, -1e4), (1e4, ay0 + sleeve, 1e4))
    if reg is not None:
        b, rz, ry, rx = reg
        r2 = (rx - ax0 - 0.03 * rz) ** 2 + (ry - ay0) ** 2
        cv.paint(b, r2 <= sleeve**2, Tissue.FAT, over=(Tissue.BOWEL, Tissue.HEART, Tissue.LIVER))
        cv.paint(b, r2 <= ar**2, Tissue.AORTA)
    reg = cv.region((-1e4, ay0 - sleeve, -1e4), (1e4, 1e4, 1e4))
    if reg is not None:  # posterior mediastinum: the heart stays in front of the aorta
        b, rz, ry, rx = reg
        cv.paint(b, ry > ay0 - sleeve, Tissue.FAT, over=(Tissue.HEART,))

    # spine: vertebral bodies separated by discs, with posterior elements
    level, disc, phase = u(28.0, 34.0), u(6.0, 8.0), u(0.0, 30.0)
    canal_y = spine_y + spine_r + 9.0
    reg = cv.region((-1e4, spine_y - spine_r, -1.2 * spine_r), (1e4, canal_y + 40.0, 1.2 * spine_r))
    if reg is not None:
        b, rz, ry, rx = reg
        in_disc = np.mod(rz - phase, level) < disc
        vert = (rx / (1.15 * spine_r)) ** 2 + ((ry - spine_y) / spine_r) ** 2 <= 1.0
        cv.paint(b, vert & in_disc, Tissue.DISC)
        cv.paint(b, vert & ~in_disc, Tissue.BONE)
        arch = (np.abs(rx) < 14.0) & (ry > canal_y - 10.0) & (ry < canal_y + 14.0)
        arch &= rx**2 + (ry - canal_y) ** 2 > 64.0  # spinal canal, 8 mm radius, stays soft tissue
        spinous = (np.abs(rx) < 4.0) & (ry >= canal_y + 14.0) & (ry < canal_y + 40.0)
        cv.paint(b, (arch | spinous) & ~in_disc & (cv.tissue[b] != Tissue.AIR), Tissue.BONE)

    # ribs: tubes along the inner chest wall, sloping down anteriorly, open at the front midline
    rib_r = u(4.0, 6.0)
    z_rib0 = dome_r - u(90.0, 110.0)
    reg = cv.region((z_rib0 - 10.0, -1e4, -1e4), (1e4, 1e4, 1e4))
    if reg is not None:
        b, rz, ry, rx = reg
        ring = body.metric(ry, rx, rz, body.fat + body.wall / 2)
        near = np.abs(ring - 1.0) * (body.ay - inner) < rib_r
        del ring
        front = np.clip(-(ry - body.cy) / (body.ay - inner), -1.0, 1.0)
        pitch = u(24.0, 28.0)
        z_rel = rz - z_rib0 + 40.0 * (front + 1.0) / 2.0
        on_rib = (np.abs(z_rel - pitch * np.round(z_rel / pitch)) < rib_r) & (z_rel > -rib_r)
        gap = (np.abs(rx) < 25.0) & (ry < body.cy)
        cv.paint(b, near & on_rib & ~gap, Tissue.BONE)


SPLEEN_MIN_THICKNESS_MM = 8.0


def _trim_spleen(cv: _Canvas) -> None:
    """Turn spleen thinner than ``SPLEEN_MIN_THICKNESS_MM`` into fat (a morphological opening).

    The kidney and its fat capsule are painted over the spleen ellipsoid; where they overlap they leave a
    sub-voxel shell of spleen wrapped around the kidney, which real anatomy does not have (the lower
    pole sits anterolateral to the kidney) and no model grid of a few mm can resolve."""
    spleen = cv.tissue == Tissue.SPLEEN
    if not spleen.any():
        return
    lo = np.argwhere(spleen).min(axis=0)
    hi = np.argwhere(spleen).max(axis=0) + 1
    radius = SPLEEN_MIN_THICKNESS_MM / 2
    sampling = cv.spacing()
    sl = [
        slice(max(0, int(a) - p), min(n, int(b) + p))
        for a, b, p, n in zip(lo, hi, (math.ceil(radius / v) + 1 for v in sampling), cv.shape, strict=True)
    ]
    box = (sl[0], sl[1], sl[2])
    organ = spleen[box]
    core = ndimage.distance_transform_edt(organ, sampling=sampling) > radius
    kept = organ & (ndimage.distance_transform_edt(~core, sampling=sampling) <= radius)
    cv.paint(box, organ & ~kept, Tissue.FAT)


def _paint_lesions(
    tissue: ByteArray,
    cv: _Canvas,
    zs: FloatArray,
    ys: FloatArray,
    xs: FloatArray,
    rng: np.random.Generator,
    plan: LesionPlan,
) -> tuple[Lesion, ...]:
    """Place lesions fully inside their organ (checked on the coarse grid) and paint them at full res."""
    if rng.uniform() < plan.none_probability:
        return ()
    counts = [
        (Label.LIVER, Tissue.LIVER, rng.poisson(plan.liver_mean)),
        (Label.LUNG, Tissue.LUNG, rng.poisson(plan.lung_mean)),
    ]
    placed: list[Lesion] = []
    for organ, organ_tissue, n in counts:
        candidates = np.argwhere(cv.tissue == organ_tissue)
        if candidates.size == 0:
            continue
        for _ in range(int(n)):
            if len(placed) >= MAX_LESIONS:
                break
            d = float(rng.uniform(plan.min_diameter_mm, plan.max_diameter_mm))
            radii = tuple(float(d / 2 * f) for f in (1.0, rng.uniform(0.8, 1.0), rng.uniform(0.8, 1.0)))
            kind = (
                LesionKind.HYPODENSE
                if organ is Label.LIVER and rng.uniform() < 0.7
                else LesionKind.HYPERDENSE
            )
            for _attempt in range(20):
                k, r, c = candidates[rng.integers(len(candidates))]
                centre = (float(cv.x[c]), float(cv.y[r]), float(cv.z[k]))
                if _fits(cv, centre, radii, organ_tissue) and not _overlaps(centre, radii, placed):
                    count = _paint_ellipsoid(
                        tissue, zs, ys, xs, centre, radii, organ_tissue, LESION_CODE_BASE + len(placed) + 1
                    )
                    if count:
                        placed.append(Lesion(len(placed) + 1, organ, kind, centre, radii, count))  # type: ignore[arg-type]
                    break
    return tuple(placed)


def _fits(cv: _Canvas, centre: tuple[float, float, float], radii: tuple[float, ...], organ: Tissue) -> bool:
    """True when every coarse voxel of the (1 mm enlarged) ellipsoid is organ tissue."""
    r = tuple(v + 1.0 for v in radii)
    sel = [
        np.nonzero(np.abs(coords - centre[i]) <= r[i])[0] for coords, i in ((cv.z, 2), (cv.y, 1), (cv.x, 0))
    ]
    if any(s.size == 0 for s in sel):
        return False
    sub = cv.tissue[np.ix_(*sel)]
    zz, yy, xx = np.ix_(cv.z[sel[0]], cv.y[sel[1]], cv.x[sel[2]])
    inside = ((xx - centre[0]) / r[0]) ** 2 + ((yy - centre[1]) / r[1]) ** 2 + (
        (zz - centre[2]) / r[2]
    ) ** 2 <= 1.0
    return bool(np.all(sub[inside] == organ))


def _overlaps(centre: tuple[float, float, float], radii: tuple[float, ...], placed: list[Lesion]) -> bool:
    return any(
        math.dist(centre, other.center_lps) < max(radii) + max(other.radii_mm) + 2.0 for other in placed
    )


def _paint_ellipsoid(
    tissue: ByteArray,
    zs: FloatArray,
    ys: FloatArray,
    xs: FloatArray,
    centre: tuple[float, float, float],
    radii: tuple[float, ...],
    host: Tissue,
    code: int,
) -> int:
    """Paint host-organ voxels whose centre lies inside the ellipsoid; returns how many were painted."""
    sel = [np.nonzero(np.abs(coords - centre[i]) <= radii[i])[0] for coords, i in ((zs, 2), (ys, 1), (xs, 0))]
    if any(s.size == 0 for s in sel):
        return 0
    box = tuple(slice(int(s[0]), int(s[-1]) + 1) for s in sel)
    zz, yy, xx = np.ix_(zs[box[0]], ys[box[1]], xs[box[2]])
    inside = ((xx - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + (
        (zz - centre[2]) / radii[2]
    ) ** 2 <= 1.0
    view = tissue[box]
    mask = inside & (view == host)
    view[mask] = code
    return int(mask.sum())


# --- intensities and scanner ----------------------------------------------------------------------------


def render_ct(phantom: Phantom, rng: np.random.Generator, phase: ContrastPhase) -> FloatArray:
    """Noise-free attenuation (HU) of every rendered voxel: per-case tissue means plus smooth texture."""
    table = _CT_HU[phase]
    texture = {**_CT_TEXTURE, **_CT_TEXTURE_BY_PHASE.get(phase, {})}
    lut = np.full(256, -1000.0, dtype=np.float32)
    amp = np.zeros(256, dtype=np.float32)
    for t, (mean, half) in table.items():
        lut[t] = mean + rng.uniform(-half, half)
        amp[t] = texture.get(t, 0.0)
    for lesion in phantom.lesions:
        code = LESION_CODE_BASE + lesion.index
        if lesion.organ is Label.LUNG:
            lut[code] = rng.uniform(-60.0, 60.0)  # solid nodule
        else:
            host = float(lut[Tissue.LIVER])
            delta = rng.uniform(30.0, 70.0)
            lut[code] = host - delta if lesion.kind is LesionKind.HYPODENSE else host + delta
        amp[code] = 4.0
    return _render(phantom, rng, lut, amp)


def render_mr(phantom: Phantom, rng: np.random.Generator, phase: ContrastPhase) -> FloatArray:
    """Noise-free T1-like signal (arbitrary units) before bias field and noise."""
    lut = np.zeros(256, dtype=np.float32)
    amp = np.zeros(256, dtype=np.float32)
    for t, mean in _MR_T1[phase].items():
        lut[t] = mean * rng.uniform(0.92, 1.08)
        amp[t] = 0.04 * mean
    for lesion in phantom.lesions:
        code = LESION_CODE_BASE + lesion.index
        host = float(lut[Tissue.LIVER]) if lesion.organ is Label.LIVER else 300.0
        factor = rng.uniform(0.4, 0.7) if lesion.kind is LesionKind.HYPODENSE else rng.uniform(1.3, 1.7)
        lut[code] = host * (factor if lesion.organ is Label.LIVER else 1.0)
        amp[code] = 0.03 * lut[code]
    return _render(phantom, rng, lut, amp)


def _render(phantom: Phantom, rng: np.random.Generator, lut: FloatArray, amp: FloatArray) -> FloatArray:
    shape = phantom.tissue.shape
    lattice = 8
    small = _smooth_noise(rng, (shape[0], -(-shape[1] // 4), -(-shape[2] // 4)), lattice)
    texture = small[:, np.arange(shape[1]) // 4][:, :, np.arange(shape[2]) // 4]
    out = lut[phantom.tissue]
    out += amp[phantom.tissue] * texture
    return out


@dataclass(frozen=True)
class ScannerModel:
    """Image formation of one scanner/protocol: resolution, sharpening, noise and calibration drift."""

    blur_sigma_mm: float = 0.6  # in-plane system resolution (reconstruction kernel)
    sharpen: float = 0.0  # unsharp-mask amount of an edge-enhancing kernel
    noise_sigma: float = 10.0  # HU for CT, signal units for MR (before Rician magnitude)
    hu_scale: float = 1.0  # CT calibration drift: measured = true * scale + offset (water moves by offset)
    hu_offset: float = 0.0
    bias_field_strength: float = 0.0  # MR: log-amplitude of the smooth multiplicative field


def simulate_scanner(
    image: FloatArray,
    phantom: Phantom,
    rng: np.random.Generator,
    scanner: ScannerModel,
    *,
    slice_thickness_mm: float,
    magnitude: bool = False,
) -> FloatArray:
    """Blur (partial volume), average sub-slices, sharpen, drift/bias and add noise; returns the image grid.

    ``image`` is on the phantom's render grid (slices x sub-slices); the result is on ``phantom.grid``.
    ``magnitude=True`` adds complex Gaussian noise and takes the magnitude (Rician, as in MR).
    """
    dz, dr, dc = phantom.grid.spacing
    sigma_z = 0.0 if phantom.subslices > 1 else slice_thickness_mm / 2.355 / dz
    sigmas = (sigma_z if sigma_z >= 0.5 else 0.0, scanner.blur_sigma_mm / dr, scanner.blur_sigma_mm / dc)
    out = ndimage.gaussian_filter(image, sigmas, mode="nearest", truncate=3.0) if max(sigmas) > 0 else image
    nk, nr, nc = phantom.grid.shape
    if phantom.subslices > 1:
        out = out.reshape(nk, phantom.subslices, nr, nc).mean(axis=1, dtype=np.float32)
    if scanner.sharpen > 0:
        smooth = ndimage.gaussian_filter(out, (0.0, 1.0, 1.0), mode="nearest", truncate=3.0)
        out = out + np.float32(scanner.sharpen) * (out - smooth)
    if scanner.bias_field_strength > 0:
        # linear interpolation at full resolution (not replicated blocks: a bias field has no edges)
        bias = np.exp(
            np.float32(scanner.bias_field_strength) * _smooth_noise(rng, (nk, nr, nc), max(nr // 3, 2))
        )
        out = out * bias
    if scanner.hu_scale != 1.0 or scanner.hu_offset != 0.0:
        out = out * np.float32(scanner.hu_scale) + np.float32(scanner.hu_offset)
    noise = rng.standard_normal(out.shape, dtype=np.float32)
    noise *= np.float32(scanner.noise_sigma)
    if magnitude:
        imag = rng.standard_normal(out.shape, dtype=np.float32)
        imag *= np.float32(scanner.noise_sigma)
        out = np.sqrt((out + noise) ** 2 + imag**2)
    else:
        out = out + noise
    return np.asarray(out, dtype=np.float32)
