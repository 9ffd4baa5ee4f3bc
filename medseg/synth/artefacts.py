"""Image artefacts injected into synthetic CT, to check that the model's uncertainty rises where it should.

Pure functions of an HU array (slices, rows, columns), a seed and a strength; nothing here changes the
ground truth, so a model that is confidently wrong on these images is caught by the validation report.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import numpy.typing as npt
from scipy import ndimage

FloatArray = npt.NDArray[np.float32]


class Artefact(StrEnum):
    METAL = "metal"  # bright streaks radiating from a dense implant, with dark bands between them
    NOISE = "noise"  # a very low-dose acquisition: noise four times the usual
    MOTION = "motion"  # breathing: a shifted, faded ghost of the anatomy added to every slice


def inject(image: FloatArray, artefact: Artefact, seed: int) -> FloatArray:
    """A copy of ``image`` with ``artefact`` added (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    out = image.astype(np.float32, copy=True)
    if artefact is Artefact.NOISE:
        noise = rng.normal(0.0, 60.0, size=out.shape).astype(np.float32)
        return out + ndimage.gaussian_filter(noise, sigma=(0, 0.7, 0.7)).astype(np.float32) * 1.6
    if artefact is Artefact.MOTION:
        ghost = np.roll(out, shift=(0, int(out.shape[1] * 0.04), 0), axis=(0, 1, 2))
        return (0.65 * out + 0.35 * ghost).astype(np.float32)
    _, rows, cols = out.shape
    centre_r, centre_c = rows * rng.uniform(0.45, 0.6), cols * rng.uniform(0.4, 0.6)
    r, c = np.mgrid[0:rows, 0:cols].astype(np.float32)
    angle = np.arctan2(r - centre_r, c - centre_c)
    distance = np.hypot(r - centre_r, c - centre_c) + 1.0
    streaks = np.cos(angle * 9.0 + rng.uniform(0, np.pi)) * 900.0 * np.exp(-distance / (0.25 * rows))
    implant = distance < rows * 0.015
    slices = slice(out.shape[0] // 3, 2 * out.shape[0] // 3)
    out[slices] += streaks.astype(np.float32)
    out[slices, implant] = 3000.0
    return out
