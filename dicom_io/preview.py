"""A PNG montage for a quick look at a result: key slices with the label overlay and the uncertainty.

Not a DICOM object and not for diagnosis: a picture for logs, tickets and dashboards. ``render_preview``
is pure compute (arrays in, RGB array out); ``write_png`` is the only part that touches a file.
Top row: the key slices (each structure's largest cross-section, smallest first) in the source window
with each segment in its display colour; bottom row: the same slices with the uncertainty map as a heat
map (black-red-yellow-white, 0 to the map's maximum).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from dicom_io.ai_result import AnalysisResult
from dicom_io.volume import IntensityUnit

_HEAT = np.array([[0, 0, 0], [180, 20, 20], [255, 140, 0], [255, 240, 60], [255, 255, 255]], dtype=np.float64)


def key_slices(label_map: npt.NDArray[np.integer], count: int = 4) -> list[int]:
    """``count`` slices, in slice order, that between them show every structure they can.

    Each structure's largest cross-section is a candidate, smallest structures first (a lesion's slice
    before the lungs'), so a small finding is in the picture instead of four slices of the fullest
    region; slots left over go to the slices with the most labelled voxels (evenly spaced when empty).
    """
    flat = label_map.reshape(label_map.shape[0], -1)
    per_slice = np.count_nonzero(flat, axis=1)
    n = min(count, label_map.shape[0])
    if not per_slice.any():
        return sorted({round(float(x)) for x in np.linspace(0, label_map.shape[0] - 1, n)})
    values = [int(v) for v in np.unique(flat) if v > 0]
    area = {v: np.count_nonzero(flat == v, axis=1) for v in values}
    chosen: list[int] = []
    for v in sorted(values, key=lambda v: (int(area[v].sum()), v)):
        k = int(np.argmax(area[v]))
        if len(chosen) < n and k not in chosen:
            chosen.append(k)
    for k in np.argsort(-per_slice, kind="stable"):
        if len(chosen) < n and per_slice[k] > 0 and int(k) not in chosen:
            chosen.append(int(k))
    return sorted(chosen)


def _grey(result: AnalysisResult, k: int) -> npt.NDArray[np.float64]:
    plane = result.source.array[k].astype(np.float64)
    if result.source.unit is IntensityUnit.HOUNSFIELD:
        lo, hi = 40.0 - 200.0, 40.0 + 200.0  # soft-tissue window (centre 40, width 400 HU)
    else:
        lo, hi = (float(v) for v in np.percentile(result.source.array, [1, 99]))
    return np.clip((plane - lo) / max(hi - lo, 1e-6), 0.0, 1.0)


def _heat(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    x = np.clip(values, 0.0, 1.0) * (len(_HEAT) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_HEAT) - 2)
    f = (x - i)[..., None]
    return np.asarray((1 - f) * _HEAT[i] + f * _HEAT[i + 1])


def render_preview(result: AnalysisResult, count: int = 4, max_tile: int = 384) -> npt.NDArray[np.uint8]:
    """RGB montage (2 rows x key slices) of ``result``; tiles larger than ``max_tile`` are subsampled."""
    slices = key_slices(result.label_map, count)
    step = max(1, int(np.ceil(max(result.source.shape[1:]) / max_tile)))
    colours = np.zeros((int(result.label_map.max(initial=0)) + 1, 3))
    for segment in result.segments:
        if segment.label < len(colours):
            colours[segment.label] = segment.colour_rgb
    top_peak = float(result.uncertainty_map.max()) or 1.0
    rows: list[list[npt.NDArray[np.float64]]] = [[], []]
    for k in slices:
        grey = _grey(result, k)[::step, ::step, None] * 255.0
        labels = result.label_map[k, ::step, ::step]
        overlay = np.where(labels[..., None] > 0, 0.5 * grey + 0.5 * colours[labels], grey)
        heat = _heat(result.uncertainty_map[k, ::step, ::step].astype(np.float64) / top_peak)
        rows[0].append(overlay)
        rows[1].append(0.35 * np.repeat(grey, 3, axis=2) + 0.65 * heat)
    gap = np.full((rows[0][0].shape[0], 2, 3), 255.0)
    lines = [np.concatenate([x for tile in row for x in (tile, gap)][:-1], axis=1) for row in rows]
    montage = np.concatenate([lines[0], np.full((2, lines[0].shape[1], 3), 255.0), lines[1]], axis=0)
    return np.clip(np.rint(montage), 0, 255).astype(np.uint8)


def write_png(rgb: npt.NDArray[np.uint8], path: Path | str) -> Path:
    """Write an RGB array as PNG (Pillow)."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(rgb, mode="RGB").save(path, format="PNG", optimize=True)
    return path
