"""Compare a prediction with ground truth: Dice per structure, lesion hits, uncertainty summaries.

Pure compute on arrays of the source grid; the validation script and the tests call it. Lesions are
matched as connected components of the focal label: a ground-truth lesion is found when a predicted
component overlaps it, and a predicted component that overlaps no ground-truth lesion is a false positive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage

from medseg.inference import Prediction
from medseg.model_spec import ModelSpec


@dataclass(frozen=True)
class LesionMatch:
    """Lesion-level result of one case for lesions at least ``min_diameter_mm`` across."""

    min_diameter_mm: float
    found: int
    total: int
    false_positives: int


@dataclass(frozen=True)
class CaseEvaluation:
    case_id: str
    site: str
    condition: str  # "clean", an artefact name, or "unseen site"
    dice: dict[str, float]  # structure name -> Dice (NaN when absent from both)
    lesions: tuple[LesionMatch, ...]
    mean_entropy_foreground: float
    mean_mutual_information_foreground: float
    flagged: tuple[str, ...]  # structures whose review flag is set
    seconds: float


LabelArray = npt.NDArray[np.integer] | torch.Tensor


def dice_per_class(prediction: LabelArray, truth: LabelArray, num_classes: int) -> list[float]:
    """Dice of each foreground class 1..num_classes-1 (NaN where both are empty); numpy or torch."""
    out = []
    for c in range(1, num_classes):
        p, t = prediction == c, truth == c
        denominator = int(p.sum()) + int(t.sum())
        out.append(2.0 * int((p & t).sum()) / denominator if denominator else float("nan"))
    return out


def dice_scores(
    prediction: npt.NDArray[np.integer], truth: npt.NDArray[np.integer], spec: ModelSpec
) -> dict[str, float]:
    """Dice per structure name (label values are 1..n in spec order)."""
    scores = dice_per_class(prediction, truth, spec.num_classes)
    return {label.name: scores[label.value - 1] for label in spec.labels}


def match_lesions(
    prediction: npt.NDArray[np.integer],
    truth: npt.NDArray[np.integer],
    focal_label: int,
    truth_diameters_mm: dict[int, float],
    min_diameters_mm: Sequence[float] = (0.0, 10.0),
) -> tuple[LesionMatch, ...]:
    """Component-wise lesion matching; ``truth_diameters_mm`` maps ground-truth component id -> diameter."""
    truth_components, _ = ndimage.label(truth == focal_label)
    predicted_components, n_predicted = ndimage.label(prediction == focal_label)
    hit_truth = set(np.unique(truth_components[predicted_components > 0]).tolist()) - {0}
    overlapping = set(np.unique(predicted_components[truth_components > 0]).tolist()) - {0}
    false_positives = n_predicted - len(overlapping)
    out = []
    for minimum in min_diameters_mm:
        eligible = [i for i, d in truth_diameters_mm.items() if d >= minimum]
        out.append(
            LesionMatch(
                min_diameter_mm=minimum,
                found=sum(1 for i in eligible if i in hit_truth),
                total=len(eligible),
                false_positives=false_positives,
            )
        )
    return tuple(out)


def truth_lesion_diameters(
    truth: npt.NDArray[np.integer], focal_label: int, affine: npt.NDArray[np.float64]
) -> dict[int, float]:
    """Largest world extent (mm) of each ground-truth lesion component."""
    components, _ = ndimage.label(truth == focal_label)
    out = {}
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        voxels = np.argwhere(components[box] == index) + [s.start for s in box]
        world = voxels @ affine[:3, :3].T
        out[index] = float((world.max(0) - world.min(0)).max() + np.linalg.norm(affine[:3, :3], axis=0).min())
    return out


def evaluate_prediction(
    prediction: Prediction,
    truth: npt.NDArray[np.integer],
    spec: ModelSpec,
    *,
    case_id: str,
    site: str,
    condition: str,
    seconds: float,
) -> CaseEvaluation:
    """Everything the validation report needs from one case."""
    if truth.shape != prediction.label_map.shape:
        raise ValueError(
            f"case {case_id}: truth {truth.shape} is not on the prediction grid {prediction.label_map.shape}"
        )
    foreground = prediction.label_map > 0
    focal = [label.value for label in spec.labels if label.focal]
    lesions: tuple[LesionMatch, ...] = ()
    if focal:
        diameters = truth_lesion_diameters(truth, focal[0], prediction.source.affine)
        lesions = match_lesions(prediction.label_map, truth, focal[0], diameters)
    names = {label.value: label.name for label in spec.labels}
    return CaseEvaluation(
        case_id=case_id,
        site=site,
        condition=condition,
        dice=dice_scores(prediction.label_map, truth, spec),
        lesions=lesions,
        mean_entropy_foreground=float(prediction.entropy[foreground].mean()) if foreground.any() else 0.0,
        mean_mutual_information_foreground=float(prediction.mutual_information[foreground].mean())
        if foreground.any()
        else 0.0,
        flagged=tuple(names[m.label] for m in prediction.structures if m.needs_review),
        seconds=seconds,
    )
