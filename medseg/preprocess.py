"""Bring an ``ImageVolume`` onto a model's grid, and model outputs back onto the source grid.

The model grid covers exactly the source field of view: axes permuted/flipped to the spec's orientation
(a lossless reindexing, nibabel's ``io_orientation``) then resampled trilinearly so that the spacing is as
close to the spec's as a whole number of voxels allows. Voxel centres follow the ``align_corners=False``
convention both ways, so ``to_source(to_model(x))`` lands on the same world positions. Training and
inference call the same functions: no train/inference skew.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from nibabel import orientations

from dicom_io.volume import ImageVolume, Modality
from medseg.model_spec import IntensityKind, IntensitySpec, ModelSpec, ModelSpecError, Orientation

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelGrid:
    """Where the model grid sits relative to the source grid (everything needed to map back)."""

    source_shape: tuple[int, int, int]
    ornt: npt.NDArray[np.float64]  # nibabel orientation: source axis -> (model axis, flip)
    oriented_shape: tuple[int, int, int]
    shape: tuple[int, int, int]
    affine: npt.NDArray[np.float64]  # model index (i, j, k, 1) -> LPS mm

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def plan_grid(
    volume_shape: tuple[int, int, int], affine: npt.NDArray[np.float64], spec: ModelSpec
) -> ModelGrid:
    """Decide the model grid for a source grid (pure geometry, no voxels touched)."""
    if spec.preprocessing.orientation is Orientation.LPS:
        ornt = orientations.io_orientation(affine)
    else:
        ornt = np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)
    oriented_affine = affine @ orientations.inv_ornt_aff(ornt, volume_shape)
    oriented_shape = tuple(int(volume_shape[int(np.where(ornt[:, 0] == a)[0][0])]) for a in range(3))
    spacing = np.linalg.norm(oriented_affine[:3, :3], axis=0)
    target = np.asarray(spec.preprocessing.spacing_mm)
    shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(oriented_shape, spacing, target, strict=True))
    scale = np.asarray(oriented_shape, dtype=np.float64) / np.asarray(shape, dtype=np.float64)
    step = np.diag(np.append(scale, 1.0))
    step[:3, 3] = 0.5 * scale - 0.5  # align_corners=False: centre of model voxel i is source index (i+.5)s-.5
    return ModelGrid(
        source_shape=(int(volume_shape[0]), int(volume_shape[1]), int(volume_shape[2])),
        ornt=ornt,
        oriented_shape=(oriented_shape[0], oriented_shape[1], oriented_shape[2]),
        shape=(shape[0], shape[1], shape[2]),
        affine=oriented_affine @ step,
    )


def _orient(array: npt.NDArray[np.generic], ornt: npt.NDArray[np.float64]) -> npt.NDArray[np.generic]:
    return np.ascontiguousarray(orientations.apply_orientation(array, ornt))


def _source_order_shape(grid: ModelGrid) -> tuple[int, int, int]:
    """The model grid's shape with its axes in source (slice, row, column) order."""
    a, b, c = (grid.shape[int(grid.ornt[axis, 0])] for axis in range(3))
    return (a, b, c)


def _orient_tensor(tensor: torch.Tensor, ornt: npt.NDArray[np.float64]) -> torch.Tensor:
    """``_orient`` on the last three axes of a tensor (source order in, model order out), as a view."""
    lead = tensor.ndim - 3
    flips = [lead + a for a in range(3) if ornt[a, 1] < 0]
    flipped = tensor.flip(flips) if flips else tensor
    order = [lead + int(np.where(ornt[:, 0] == m)[0][0]) for m in range(3)]
    return flipped.permute(*range(lead), *order)


def _unorient_tensor(tensor: torch.Tensor, grid: ModelGrid) -> torch.Tensor:
    """Undo ``_orient_tensor``: model axes (last three) back to source order and direction."""
    lead = tensor.ndim - 3
    permuted = tensor.permute(*range(lead), *(lead + int(grid.ornt[a, 0]) for a in range(3)))
    flips = [lead + a for a in range(3) if grid.ornt[a, 1] < 0]
    return permuted.flip(flips) if flips else permuted


def _resize(tensor: torch.Tensor, shape: tuple[int, int, int], *, labels: bool = False) -> torch.Tensor:
    """Resample a (C, X, Y, Z) tensor; trilinear for intensities, nearest-exact for label values."""
    if tuple(tensor.shape[1:]) == shape:
        return tensor
    mode = "nearest-exact" if labels else "trilinear"
    kwargs = {} if labels else {"align_corners": False}
    return F.interpolate(tensor[None], size=shape, mode=mode, **kwargs)[0]


def normalize(array: FloatArray, modality: Modality, spec: ModelSpec) -> FloatArray:
    """The spec's intensity transform for this modality (physical units in, network units out)."""
    try:
        intensity: IntensitySpec = spec.preprocessing.intensity[modality]
    except KeyError:
        raise ModelSpecError(
            f"model {spec.name} has no intensity transform for modality {modality} "
            f"(it handles {', '.join(spec.preprocessing.intensity)}); choose a model made for {modality}"
        ) from None
    out = np.asarray(array, dtype=np.float32)
    if intensity.kind is IntensityKind.WINDOW:
        assert intensity.low is not None and intensity.high is not None
        centre = (intensity.low + intensity.high) / 2
        half = (intensity.high - intensity.low) / 2
        return ((np.clip(out, intensity.low, intensity.high) - centre) / half).astype(np.float32)
    if intensity.kind is IntensityKind.PERCENTILE:
        assert intensity.low is not None and intensity.high is not None
        lo, hi = np.percentile(out, [intensity.low, intensity.high])
        return ((np.clip(out, lo, hi) - lo) / max(float(hi - lo), 1e-6)).astype(np.float32)
    body = out[out > np.percentile(out, 1)]
    mean, std = (float(body.mean()), float(body.std())) if body.size else (0.0, 1.0)
    return ((out - mean) / max(std, 1e-6)).astype(np.float32)


@dataclass(frozen=True)
class ModelInput:
    """A normalized volume on the model grid, shape (1, X, Y, Z), with the grid it lives on."""

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
    # Resampling before reorienting gives the same grid (both are per-axis and flip-symmetric with
    # align_corners=False) and reorients the small array instead of the source-sized one.
    with warnings.catch_warnings():  # the read-only source array is only read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        source = torch.from_numpy(volume.array)[None]
    resampled = _orient_tensor(_resize(source, _source_order_shape(grid)), grid.ornt).contiguous()
    image = torch.from_numpy(normalize(resampled.numpy(), volume.modality, spec))
    return ModelInput(image=image, grid=grid)


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

    The padding value is the image's minimum (air, after a CT window): padding with 0 would put a slab of
    -300 HU "tissue" around a short scan, and the network then calls the enclosed air lung.
    """
    pads: list[int] = []
    crop: list[slice] = []
    for size, r in zip(reversed(image.shape[2:]), reversed(list(roi)), strict=True):
        diff = max(r - size, 0)
        pads += [diff // 2, diff - diff // 2]
    for size, r in zip(image.shape[2:], roi, strict=True):
        diff = max(r - size, 0)
        crop.append(slice(diff // 2, diff // 2 + size))
    return (F.pad(image, pads, value=float(image.min())) if any(pads) else image), crop


def labels_to_model(labels: npt.NDArray[np.integer], grid: ModelGrid) -> torch.Tensor:
    """A label map on the source grid moved onto the model grid (nearest), shape (1, X, Y, Z), int64."""
    oriented = _orient(labels.astype(np.int16), grid.ornt)
    resampled = _resize(torch.from_numpy(oriented)[None].float(), grid.shape, labels=True)
    return resampled.round().long()


def map_to_source(tensor: torch.Tensor, grid: ModelGrid) -> FloatArray:
    """One (X, Y, Z) float map on the model grid back onto the source grid (trilinear), float32 numpy.

    Reoriented on the model grid first (small), then resampled straight onto the source grid."""
    source_order = _unorient_tensor(tensor.float(), grid).contiguous()
    return _resize(source_order[None], grid.source_shape)[0].numpy()


def argmax_to_source(probabilities: torch.Tensor, grid: ModelGrid) -> npt.NDArray[np.uint8]:
    """Label map on the source grid from (C, X, Y, Z) class probabilities on the model grid.

    Each class channel is interpolated onto the source grid in turn and a running maximum kept, so
    memory is three source-sized arrays however many classes there are (not C of them).
    """
    source_order = _unorient_tensor(probabilities.float(), grid)
    best = torch.full(grid.source_shape, -1.0)
    label = torch.zeros(grid.source_shape, dtype=torch.uint8)
    for c in range(probabilities.shape[0]):
        channel = _resize(source_order[c : c + 1].contiguous(), grid.source_shape)[0]
        better = channel > best
        torch.maximum(best, channel, out=best)
        label.masked_fill_(better, c)
    return label.numpy()
