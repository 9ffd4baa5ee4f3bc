"""Bring an ``ImageVolume`` onto a model's grid, and model outputs back onto the source grid.

The model grid is MONAI's (``Orientation`` then ``Spacing``): axes permuted/flipped to the spec's
orientation (a lossless reindexing, nibabel's ``io_orientation``), the first voxel centre kept, the spacing
exactly the spec's. Values move between the grids by linear interpolation at each voxel centre's world
position (``border`` padding), so ``map_to_source(to_model(x))`` lands on the same world positions and a
model run through the MONAI recipe sees the same voxels. With ``preprocessing.smooth_before_shrinking``
images are smoothed along each axis that shrinks before it is sampled (MONAI's ``GaussianSmooth``
kernel, sigma ``(step - 1) / 2``), so the model grid keeps the source's signal rather than one voxel's
noise in four. Training and inference call the same functions: no train/inference skew.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from monai.networks.layers import gaussian_1d
from nibabel import orientations
from scipy import ndimage

from dicom_io.volume import ImageVolume, IntensityUnit, Modality
from medseg.model_spec import IntensityKind, IntensitySpec, ModelSpec, ModelSpecError, Orientation

FloatArray = npt.NDArray[np.float32]
# ``enclosed_body``: every piece of a patient (an arm, a hand) is this thick somewhere in an axial plane;
# the table's carbon shell and a blanket's fold are not (on TotalSegmentator's example CT a 9 mm criterion,
# three 3 mm model voxels, kept part of the table; 15 mm leaves it out and keeps both arms)
BODY_MIN_THICKNESS_MM = 15.0


@dataclass(frozen=True)
class ModelGrid:
    """Where the model grid sits relative to the source grid (everything needed to map back)."""

    source_shape: tuple[int, int, int]
    ornt: npt.NDArray[np.float64]  # nibabel orientation: source axis -> (model axis, flip)
    oriented_shape: tuple[int, int, int]
    shape: tuple[int, int, int]
    affine: npt.NDArray[np.float64]  # model index (i, j, k, 1) -> LPS mm
    index_step: tuple[float, float, float]  # oriented source voxels per model voxel, per model axis

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def source_at_least_as_fine(self) -> bool:
        """Whether a source voxel is no longer than a model voxel along every axis (the source holds
        detail the model grid cannot draw, and no axis of it averages more than a model voxel does)."""
        return all(step >= 1.0 - 1e-6 for step in self.index_step)

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    @property
    def last_source_index(self) -> npt.NDArray[np.float64]:
        """Per model axis, the model index of the source's last voxel centre.

        ``plan_grid`` rounds the extent to whole model voxels, so the grid may reach up to half a model
        voxel past it: what lies there was never scanned (sampling repeats the end slice)."""
        return (np.asarray(self.oriented_shape, dtype=np.float64) - 1) / np.asarray(self.index_step)


def plan_grid(
    volume_shape: tuple[int, int, int], affine: npt.NDArray[np.float64], spec: ModelSpec
) -> ModelGrid:
    """Decide the model grid for a source grid (pure geometry, no voxels touched).

    MONAI ``Spacing``'s grid (``compute_shape_offset``, ``scale_extent=False``): the first voxel centre
    stays where it is, the spacing is exactly the spec's, and the grid spans the source's voxel centres
    rounded to a whole number of voxels. Sharing it with the MONAI recipe means sharing its voxels.
    """
    if spec.preprocessing.orientation is Orientation.LPS:
        ornt = orientations.io_orientation(affine)
    else:
        ornt = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)
    oriented_affine = affine @ orientations.inv_ornt_aff(ornt, volume_shape)
    oriented_shape = tuple(int(volume_shape[int(np.where(ornt[:, 0] == a)[0][0])]) for a in range(3))
    spacing = np.linalg.norm(oriented_affine[:3, :3], axis=0)
    step = np.asarray(spec.preprocessing.spacing_mm, dtype=np.float64) / spacing
    shape = tuple(max(1, round((n - 1) / d + 1)) for n, d in zip(oriented_shape, step, strict=True))
    return ModelGrid(
        source_shape=(int(volume_shape[0]), int(volume_shape[1]), int(volume_shape[2])),
        ornt=ornt,
        oriented_shape=(oriented_shape[0], oriented_shape[1], oriented_shape[2]),
        shape=(shape[0], shape[1], shape[2]),
        affine=oriented_affine @ np.diag(np.append(step, 1.0)),
        index_step=(float(step[0]), float(step[1]), float(step[2])),
    )


def _model_axis_order(tensor: torch.Tensor, ornt: npt.NDArray[np.float64]) -> torch.Tensor:
    """The last three axes permuted from source to model order (a view; flips are the sampler's)."""
    lead = tensor.ndim - 3
    order = [lead + int(np.where(ornt[:, 0] == m)[0][0]) for m in range(3)]
    return tensor.permute(*range(lead), *order)


def _source_axis_order(tensor: torch.Tensor, ornt: npt.NDArray[np.float64]) -> torch.Tensor:
    """The last three axes permuted from model to source order (a view)."""
    lead = tensor.ndim - 3
    return tensor.permute(*range(lead), *(lead + int(ornt[a, 0]) for a in range(3)))


def _linear_taps(coords: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For fractional indices into an axis of ``n`` voxels: the lower and upper neighbour and the
    weight of the upper one, positions past either end taken from the end voxel (``border`` padding)."""
    clamped = coords.clamp(0, n - 1)
    low = clamped.floor().long().clamp(max=max(n - 2, 0))
    high = (low + 1).clamp(max=n - 1)
    return low, high, clamped - low


def _smoothed_sampling(n: int, coords: torch.Tensor, sigma: float) -> torch.Tensor:
    """The (len(coords), n) matrix that smooths an axis of ``n`` voxels with MONAI's ``GaussianSmooth``
    kernel (edge values padding it) and then samples it linearly at ``coords``: both steps are linear,
    so one matrix product does them on the already shrunk output."""
    kernel = gaussian_1d(torch.tensor(sigma), truncated=4.0).double()
    radius = (len(kernel) - 1) // 2
    smooth = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n)
    for offset, weight in zip(range(-radius, radius + 1), kernel, strict=True):
        smooth.index_put_((rows, (rows + offset).clamp(0, n - 1)), weight.expand(n), accumulate=True)
    low, high, upper = _linear_taps(coords, n)
    sample = torch.zeros(len(coords), n, dtype=torch.float64)
    out = torch.arange(len(coords))
    sample.index_put_((out, low), 1 - upper, accumulate=True)
    sample.index_put_((out, high), upper, accumulate=True)
    return sample @ smooth


def _sample_axis(
    tensor: torch.Tensor, axis: int, coords: torch.Tensor, *, nearest: bool, antialias: bool = False
) -> torch.Tensor:
    """Values of ``tensor`` at fractional indices ``coords`` along one axis: linear (or nearest), with
    positions past either end taken from the end voxel (MONAI's ``border`` padding).

    ``antialias``: where the step between ``coords`` is over one voxel (a shrinking axis), the axis is
    first smoothed with a Gaussian of sigma ``(step - 1) / 2`` voxels (scikit-image's ``resize`` rule).
    Point sampling a 0.7 mm scan at 3 mm otherwise keeps one voxel in four along each axis and with it
    the full per-voxel noise (15 HU left inside organs instead of 3-4), which buries the 10-20 HU
    between unenhanced organs.
    """
    n = tensor.shape[axis]
    if nearest:
        return tensor.index_select(axis, coords.clamp(0, n - 1).round().long())
    step = float((coords[-1] - coords[0]).abs()) / (len(coords) - 1) if len(coords) > 1 else 1.0
    if antialias and step > 1:
        matrix = _smoothed_sampling(n, coords, (step - 1) / 2).to(tensor.dtype)
        return torch.tensordot(matrix, tensor, dims=([1], [axis])).movedim(0, axis)
    low, high, upper = _linear_taps(coords, n)
    weight = upper.to(tensor.dtype).view([-1 if a == axis else 1 for a in range(tensor.ndim)])
    return tensor.index_select(axis, low).lerp_(tensor.index_select(axis, high), weight)


def _sample_axes(
    tensor: torch.Tensor, coords: Sequence[torch.Tensor], *, nearest: bool = False, antialias: bool = False
) -> torch.Tensor:
    """``_sample_axis`` on each of the last three axes: the grids here are axis-aligned, so trilinear
    interpolation is three 1-D ones. Axes that shrink go first, outermost first; axes that grow go
    last, innermost first, so the largest pass copies whole planes (and each smoothing pass runs on
    what the passes before it already shrank)."""
    lead = tensor.ndim - 3
    ratios = [len(c) / tensor.shape[lead + a] for a, c in enumerate(coords)]
    shrinking = [a for a in range(3) if ratios[a] <= 1]
    growing = [a for a in reversed(range(3)) if ratios[a] > 1]
    for axis in shrinking + growing:
        tensor = _sample_axis(tensor, lead + axis, coords[axis], nearest=nearest, antialias=antialias)
    return tensor


def _model_positions(grid: ModelGrid) -> list[torch.Tensor]:
    """For each source axis, the source index of each model voxel along it (in model direction)."""
    positions = []
    for axis in range(3):
        model_axis, flip = int(grid.ornt[axis, 0]), grid.ornt[axis, 1] < 0
        oriented = torch.arange(grid.shape[model_axis], dtype=torch.float64) * grid.index_step[model_axis]
        positions.append(grid.source_shape[axis] - 1 - oriented if flip else oriented)
    return positions


def _source_positions(grid: ModelGrid) -> list[torch.Tensor]:
    """For each source axis, the model index of each source voxel along it."""
    positions = []
    for axis in range(3):
        model_axis, flip = int(grid.ornt[axis, 0]), grid.ornt[axis, 1] < 0
        index = torch.arange(grid.source_shape[axis], dtype=torch.float64)
        oriented = grid.source_shape[axis] - 1 - index if flip else index
        positions.append(oriented / grid.index_step[model_axis])
    return positions


def _normalize_channel(array: FloatArray, intensity: IntensitySpec) -> FloatArray:
    """One input channel from physical units (HU, or MR stored values)."""
    if intensity.kind is IntensityKind.WINDOW:
        assert intensity.low is not None and intensity.high is not None
        centre = (intensity.low + intensity.high) / 2
        half = (intensity.high - intensity.low) / 2
        return ((np.clip(array, intensity.low, intensity.high) - centre) / half).astype(np.float32)
    if intensity.kind is IntensityKind.PERCENTILE:
        assert intensity.low is not None and intensity.high is not None
        lo, hi = np.percentile(array, [intensity.low, intensity.high])
        return ((np.clip(array, lo, hi) - lo) / max(float(hi - lo), 1e-6)).astype(np.float32)
    body = array[array > np.percentile(array, 1)]
    mean, std = (float(body.mean()), float(body.std())) if body.size else (0.0, 1.0)
    return ((array - mean) / max(std, 1e-6)).astype(np.float32)


def intensity_channels(modality: Modality, spec: ModelSpec) -> tuple[IntensitySpec, ...]:
    """The spec's input channels for this modality, or an error naming the model and the modality."""
    try:
        return spec.preprocessing.intensity[modality]
    except KeyError:
        raise ModelSpecError(
            f"model {spec.name} has no intensity transform for modality {modality} "
            f"(it handles {', '.join(spec.preprocessing.intensity)}); choose a model made for {modality}"
        ) from None


@dataclass(frozen=True)
class ModelInput:
    """A normalized volume on the model grid, shape (C, X, Y, Z) (C input channels), with its grid."""

    image: torch.Tensor
    grid: ModelGrid


def to_model(volume: ImageVolume, spec: ModelSpec) -> ModelInput:
    """Orient, resample and normalize a source volume for ``spec``'s network."""
    if volume.modality not in spec.modalities:
        raise ModelSpecError(
            f"series {volume.series.series_instance_uid}: modality {volume.modality} is not handled by model "
            f"{spec.name} (it handles {', '.join(spec.modalities)})"
        )
    grid = plan_grid(volume.array.shape, volume.affine, spec)
    # Normalized on the source grid (a window clips before interpolating, as MONAI's ScaleIntensityRange
    # before Spacing does), one channel at a time; sampled in source axis order (flips folded into the
    # positions) and then permuted, so the source-sized array is never transposed.
    source = np.asarray(volume.array, dtype=np.float32)
    positions = _model_positions(grid)
    channels = [
        _sample_axes(
            torch.from_numpy(_normalize_channel(source, intensity))[None],
            positions,
            antialias=spec.preprocessing.smooth_before_shrinking,
        )
        for intensity in intensity_channels(volume.modality, spec)
    ]
    image = _model_axis_order(torch.cat(channels), grid.ornt).contiguous()
    return ModelInput(image=image, grid=grid)


def body_mask(volume: ImageVolume, grid: ModelGrid, threshold_hu: float, *, antialias: bool) -> torch.Tensor:
    """Where the patient is, as an (X, Y, Z) bool tensor on the model grid; all True for a volume not in HU.

    Tissue is what lies above ``threshold_hu``; in each axial plane of the model grid, pieces nowhere
    15 mm thick (the table's shell, a blanket's fold) are left out and enclosed holes (lungs, bowel
    gas) filled (``enclosed_body``). Real scans put foam mattresses and blankets (-950 to -800 HU) and
    carbon-fibre table shells beside the patient, which the synthetic training studies never have: a
    network calls the foam lung and the table bone. Planes, not 3-D: a lung cut by the scan's first or
    last slice is still enclosed in its axial plane, and an airway open to the room is not a hole in 3-D."""
    if volume.unit is not IntensityUnit.HOUNSFIELD:
        return torch.ones(grid.shape, dtype=torch.bool)
    tissue = torch.from_numpy(np.asarray(volume.array) > threshold_hu).to(torch.float32)[None]
    sampled = _sample_axes(tissue, _model_positions(grid), antialias=antialias)
    on_grid = (_model_axis_order(sampled, grid.ornt)[0] >= 0.5).numpy()
    axial = int(np.argmax(np.abs(grid.affine[2, :3])))  # the model axis closest to the patient's S-I axis
    in_plane = min(s for a, s in enumerate(grid.spacing_mm) if a != axial)
    return enclosed_body(on_grid, axial, in_plane)


def enclosed_body(tissue: npt.NDArray[np.bool_], axial: int, in_plane_mm: float) -> torch.Tensor:
    """``body_mask``'s shape step on a grid's tissue voxels (``in_plane_mm`` apart), in each plane normal
    to ``axial``: the connected pieces of tissue that are ``BODY_MIN_THICKNESS_MM`` thick somewhere
    (opening by reconstruction: a thin chest wall stays whole where a plain opening would break it and
    let the lung out), with their enclosed holes filled."""
    plane = _in_plane_square(axial)
    steps = max(1, math.ceil((BODY_MIN_THICKNESS_MM / in_plane_mm - 1) / 2))  # a square 2 * steps + 1 wide
    pieces, _ = ndimage.label(tissue, structure=plane)
    thick = np.unique(pieces[ndimage.binary_opening(tissue, structure=plane, iterations=steps)])
    kept = np.isin(pieces, thick[thick > 0])
    return torch.from_numpy(ndimage.binary_fill_holes(kept, structure=plane))


def _in_plane_square(axis: int) -> npt.NDArray[np.bool_]:
    """A 3x3x3 structuring element that is the full 3x3 square in the plane normal to ``axis``."""
    element = np.zeros((3, 3, 3), dtype=bool)
    element[tuple(1 if a == axis else slice(None) for a in range(3))] = True
    return element


def align_to_volume(
    array: npt.NDArray[np.integer], affine: npt.NDArray[np.float64], volume: ImageVolume, *, what: str
) -> npt.NDArray[np.integer]:
    """Reindex a label map given with its own LPS affine onto ``volume``'s (slice, row, column) grid.

    Label files store their own index order (a series written head to feet is read back sorted along the
    slice normal, so the two can run in opposite directions); only permutations and flips are allowed, and
    the result must then share the volume's affine, or this is an error naming ``what``.
    """
    transform = orientations.ornt_transform(
        orientations.io_orientation(affine), orientations.io_orientation(volume.affine)
    )
    aligned = np.ascontiguousarray(orientations.apply_orientation(array, transform))
    aligned_affine = affine @ orientations.inv_ornt_aff(transform, array.shape)
    if aligned.shape != volume.array.shape or not np.allclose(aligned_affine, volume.affine, atol=1e-2):
        raise ValueError(
            f"{what}: label map grid {array.shape} does not lie on series "
            f"{volume.series.series_instance_uid} {volume.array.shape} (affines differ by more than a "
            "permutation/flip); resample it first"
        )
    return aligned


def pad_to_roi(image: torch.Tensor, roi: Sequence[int]) -> tuple[torch.Tensor, list[slice]]:
    """Pad (B, C, X, Y, Z) symmetrically to at least ``roi`` so window coordinates are unpadded ones.

    Each channel is padded with its own minimum (air, after a CT window): padding with 0 would put a
    slab of -300 HU "tissue" around a short scan, and the network then calls the enclosed air lung.
    """
    pads: list[int] = []
    crop: list[slice] = []
    for size, r in zip(reversed(image.shape[2:]), reversed(list(roi)), strict=True):
        diff = max(r - size, 0)
        pads += [diff // 2, diff - diff // 2]
    for size, r in zip(image.shape[2:], roi, strict=True):
        diff = max(r - size, 0)
        crop.append(slice(diff // 2, diff // 2 + size))
    return (pad_with_air(image, pads) if any(pads) else image), crop


def pad_with_air(image: torch.Tensor, pads: Sequence[int]) -> torch.Tensor:
    """``F.pad`` of (..., C, X, Y, Z) with each channel's own minimum (air, in every window)."""
    air = image.amin(dim=(-3, -2, -1), keepdim=True)
    return F.pad(image - air, list(pads)) + air


def labels_to_model(labels: npt.NDArray[np.integer], grid: ModelGrid) -> torch.Tensor:
    """A label map on the source grid moved onto the model grid (nearest), shape (1, X, Y, Z), int64."""
    sampled = _sample_axes(
        torch.from_numpy(labels.astype(np.int64))[None], _model_positions(grid), nearest=True
    )
    return _model_axis_order(sampled, grid.ornt).contiguous()


def map_to_source(tensor: torch.Tensor, grid: ModelGrid) -> FloatArray:
    """One (X, Y, Z) float map on the model grid back onto the source grid (trilinear), float32 numpy.

    Permuted to source axis order on the model grid (small), then sampled straight onto the source grid."""
    source_order = _source_axis_order(tensor.float()[None], grid.ornt).contiguous()
    return _sample_axes(source_order, _source_positions(grid))[0].numpy()


def _channels_on_source(probabilities: torch.Tensor, grid: ModelGrid) -> Iterator[torch.Tensor]:
    """Each class channel of (C, X, Y, Z) model-grid probabilities interpolated onto the source grid in
    turn (one source-sized channel at a time)."""
    source_order = _source_axis_order(probabilities.float(), grid.ornt)
    positions = _source_positions(grid)
    for c in range(probabilities.shape[0]):
        yield _sample_axes(source_order[c : c + 1].contiguous(), positions)[0]


def argmax_to_source(probabilities: torch.Tensor, grid: ModelGrid) -> npt.NDArray[np.uint8]:
    """Label map on the source grid from (C, X, Y, Z) class probabilities on the model grid.

    Each class channel is interpolated onto the source grid in turn and a running maximum kept, so
    memory is three source-sized arrays however many classes there are (not C of them).
    """
    return ruled_scores_to_source(probabilities, grid, ()).other


@dataclass(frozen=True)
class RuledScores:
    """Decision scores for labels whose border a rule may decide (``ruled``: each one's score), beside
    the best of all other classes (``other``) and its score: what ``medseg.inference.borders_by_intensity``
    needs, for one source-sized array per ruled label on top of an argmax's two."""

    other: npt.NDArray[np.uint8]
    other_score: FloatArray
    ruled: dict[int, FloatArray]

    @classmethod
    def of(cls, scores: torch.Tensor, ruled: Sequence[int]) -> RuledScores:
        """From (C, ...) scores already on the grid wanted."""
        rest = scores.float().clone()
        rest[list(ruled)] = -1.0
        other_score, other = rest.max(dim=0)
        return cls(
            other=other.to(torch.uint8).numpy(),
            other_score=other_score.numpy(),
            ruled={value: scores[value].float().numpy() for value in ruled},
        )


def ruled_scores_to_source(probabilities: torch.Tensor, grid: ModelGrid, ruled: Sequence[int]) -> RuledScores:
    """``RuledScores`` on the source grid from (C, X, Y, Z) scores on the model grid: each channel
    interpolated in turn, the ``ruled`` ones kept and a running maximum over the rest (with none ruled,
    ``other`` is the argmax)."""
    best = torch.full(grid.source_shape, -1.0)
    label = torch.zeros(grid.source_shape, dtype=torch.uint8)
    kept: dict[int, FloatArray] = {}
    for c, channel in enumerate(_channels_on_source(probabilities, grid)):
        if c in ruled:
            kept[c] = channel.numpy()
            continue
        better = channel > best
        torch.maximum(best, channel, out=best)
        label.masked_fill_(better, c)
    return RuledScores(other=label.numpy(), other_score=best.numpy(), ruled=kept)
