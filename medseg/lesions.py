"""Focal lesion findings from the segmentation's lesion channel and its Monte-Carlo samples.

Each finding is one connected region of the model grid that at least one sample labelled as lesion.
From the per-voxel vote fraction (share of samples choosing the lesion label) and the running mean and
variance of the lesion probability come: the score (peak mean probability), its spread (standard deviation
over samples at that voxel), the detection rate (vote fraction at the most agreed voxel: how many samples
found it), and the box spread (how far the union of all samples' lesion voxels reaches beyond the majority
outline, mean over the six box faces, in mm). Regions found by fewer than ``min_rate`` of the samples are
dropped as noise.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from dicom_io.ai_result import LesionFinding
from medseg.model_spec import ReviewSpec
from medseg.preprocess import ModelGrid

MIN_RATE = 0.2


def _box_lps(
    lo: npt.NDArray[np.float64], hi: npt.NDArray[np.float64], affine: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """World box of the voxel index box [lo, hi] (voxel edges, half a voxel beyond the centres)."""
    corners = np.array(
        [
            [x, y, z]
            for x in (lo[0] - 0.5, hi[0] + 0.5)
            for y in (lo[1] - 0.5, hi[1] + 0.5)
            for z in (lo[2] - 0.5, hi[2] + 0.5)
        ]
    )
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def lesion_findings(
    probability: torch.Tensor,
    variance: torch.Tensor,
    votes: torch.Tensor,
    grid: ModelGrid,
    review: ReviewSpec,
    *,
    min_rate: float = MIN_RATE,
) -> tuple[LesionFinding, ...]:
    """Findings for one focal label; all inputs are (X, Y, Z) on the model grid."""
    p = probability.numpy()
    spread = np.sqrt(np.clip(variance.numpy(), 0, None))
    vote = votes.numpy()
    components, _ = ndimage.label(vote > 0)
    findings = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        region = components[box] == index
        rate = float(vote[box][region].max())
        if rate < min_rate:
            continue
        offset = np.array([s.start for s in box])
        majority = region & (vote[box] >= 0.5)
        if not majority.any():  # no voxel has a majority: the most agreed voxels stand for the outline
            majority = region & (vote[box] >= rate - 1e-6)
        peak = np.unravel_index(np.argmax(np.where(region, p[box], -1.0)), region.shape)
        union_idx = np.argwhere(region) + offset
        major_idx = np.argwhere(majority) + offset
        weights = p[box][majority]
        centre_idx = (major_idx * weights[:, None]).sum(0) / max(float(weights.sum()), 1e-9)
        # a region in the grid's overhang past the last source slice is centred on the scanned volume
        centre_idx = np.clip(centre_idx, 0.0, grid.last_source_index)
        centre = grid.affine[:3, :3] @ centre_idx + grid.affine[:3, 3]
        lo, hi = _box_lps(major_idx.min(0).astype(float), major_idx.max(0).astype(float), grid.affine)
        ulo, uhi = _box_lps(union_idx.min(0).astype(float), union_idx.max(0).astype(float), grid.affine)
        box_spread = float(np.mean(np.concatenate([lo - ulo, uhi - hi])))
        score = float(p[box][peak])
        score_spread = float(spread[box][peak])
        findings.append(
            LesionFinding(
                index=0,
                centre_lps=(float(centre[0]), float(centre[1]), float(centre[2])),
                box_min_lps=(float(lo[0]), float(lo[1]), float(lo[2])),
                box_max_lps=(float(hi[0]), float(hi[1]), float(hi[2])),
                score=min(max(score, 0.0), 1.0),
                score_spread=score_spread,
                detection_rate=rate,
                box_spread_mm=box_spread,
                needs_review=rate < review.min_lesion_detection_rate
                or score_spread > review.max_lesion_score_spread,
            )
        )
    ranked = sorted(findings, key=lambda f: -f.score)
    return tuple(replace(f, index=i) for i, f in enumerate(ranked, start=1))
