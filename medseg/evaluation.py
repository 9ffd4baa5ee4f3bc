"""Compare a prediction with ground truth: Dice per structure, lesion-level FROC, confidence intervals.

Pure compute on arrays of the source grid and on LPS boxes; the validation script, the detection benchmark
and the tests call it. Lesions are scored as detections, the way detection papers and reader studies do:
a finding hits a ground-truth lesion when its centre lies in the lesion's box or their boxes overlap with
IoU >= 0.1; sweeping the finding score gives sensitivity against false positives per scan (FROC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import nibabel as nib
import numpy as np
import numpy.typing as npt
import torch
from scipy import stats

from dicom_io.ai_result import LesionFinding
from dicom_io.volume import ImageVolume
from medseg.inference import Prediction
from medseg.model_spec import ModelSpec
from medseg.preprocess import align_to_volume, argmax_to_source, labels_to_model, plan_grid

HIT_IOU = 0.1
FloatArray = npt.NDArray[np.float64]


class TruthLesion(Protocol):
    """What lesion scoring needs of a ground-truth lesion (synth ``Lesion`` and ``LesionBox`` have it)."""

    @property
    def min_corner_lps(self) -> tuple[float, float, float]: ...
    @property
    def max_corner_lps(self) -> tuple[float, float, float]: ...
    @property
    def diameter_mm(self) -> float: ...
    @property
    def organ(self) -> object: ...  # synth ``Label`` or its name
    @property
    def kind(self) -> str: ...


def lesion_kind(lesion: TruthLesion) -> str:
    """'liver hypodense', 'lung hyperdense': what a lesion is, for reporting sensitivity by kind."""
    organ = getattr(lesion.organ, "name", lesion.organ)
    return f"{str(organ).lower()} {lesion.kind}"


@dataclass(frozen=True)
class ScanFindings:
    """Findings and ground-truth lesions of one scan, in LPS mm: one scan's share of a FROC."""

    case_id: str
    scores: FloatArray  # (F,)
    finding_boxes: FloatArray  # (F, 6) min xyz, max xyz
    finding_centres: FloatArray  # (F, 3)
    truth_boxes: FloatArray  # (L, 6)
    truth_diameters: FloatArray  # (L,)
    truth_kinds: tuple[str, ...] = ()  # (L,) ``lesion_kind`` of each

    @classmethod
    def of(
        cls, case_id: str, findings: Sequence[LesionFinding], lesions: Sequence[TruthLesion]
    ) -> ScanFindings:
        return cls(
            case_id=case_id,
            scores=np.array([f.score for f in findings], dtype=float),
            finding_boxes=np.array([[*f.box_min_lps, *f.box_max_lps] for f in findings], dtype=float).reshape(
                -1, 6
            ),
            finding_centres=np.array([f.centre_lps for f in findings], dtype=float).reshape(-1, 3),
            truth_boxes=np.array(
                [[*les.min_corner_lps, *les.max_corner_lps] for les in lesions], dtype=float
            ).reshape(-1, 6),
            truth_diameters=np.array([les.diameter_mm for les in lesions], dtype=float),
            truth_kinds=tuple(lesion_kind(les) for les in lesions),
        )

    def hits(self) -> npt.NDArray[np.bool_]:
        """(F, L): finding f hits lesion l (its centre inside the lesion box, or box IoU >= ``HIT_IOU``)."""
        f, t = self.finding_boxes, self.truth_boxes
        if not len(f) or not len(t):
            return np.zeros((len(f), len(t)), dtype=bool)
        c = self.finding_centres[:, None, :]
        inside = np.all((c >= t[None, :, :3]) & (c <= t[None, :, 3:]), axis=2)
        lo = np.maximum(f[:, None, :3], t[None, :, :3])
        hi = np.minimum(f[:, None, 3:], t[None, :, 3:])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
        vol_f = np.prod(f[:, 3:] - f[:, :3], axis=1)[:, None]
        vol_t = np.prod(t[:, 3:] - t[:, :3], axis=1)[None, :]
        iou = inter / np.maximum(vol_f + vol_t - inter, 1e-9)
        return np.asarray(inside | (iou >= HIT_IOU))


class FrocPoint(NamedTuple):
    fp_per_scan: float
    sensitivity: float
    found: int
    threshold: float  # findings scoring at least this are kept


def froc(scans: Sequence[ScanFindings], min_diameter_mm: float) -> tuple[list[FrocPoint], int]:
    """FROC points over all score thresholds, and the number of counted lesions.

    Lesions smaller than ``min_diameter_mm`` are not counted; findings hitting only them are ignored
    (neither hit nor false positive). A second finding on an already found lesion is not a false positive.
    """
    events = []  # (score, scan, lesion ids hit (counted), is false positive)
    total = 0
    for n, scan in enumerate(scans):
        counted = scan.truth_diameters >= min_diameter_mm
        h = scan.hits()
        for f in range(len(scan.scores)):
            hit_counted = np.nonzero(h[f] & counted)[0]
            hit_any = bool(h[f].any())
            if hit_any and not len(hit_counted):
                continue
            events.append((float(scan.scores[f]), n, tuple(int(i) for i in hit_counted), not hit_any))
        total += int(counted.sum())
    events.sort(key=lambda e: -e[0])
    found: set[tuple[int, int]] = set()
    false_positives = 0
    points = [FrocPoint(0.0, 0.0, 0, math.inf)]
    for i, (score, scan_index, lesions, fp) in enumerate(events):
        false_positives += fp
        found.update((scan_index, lesion) for lesion in lesions)
        if i + 1 < len(events) and events[i + 1][0] == score:
            continue  # same threshold: all findings of that score together
        points.append(
            FrocPoint(false_positives / max(len(scans), 1), len(found) / max(total, 1), len(found), score)
        )
    return points, total


def sensitivity_at(points: Sequence[FrocPoint], fp_per_scan: float) -> FrocPoint:
    """The FROC point with the best sensitivity at no more than ``fp_per_scan`` false positives per scan."""
    allowed = (p for p in points if p.fp_per_scan <= fp_per_scan)
    return max(allowed, key=lambda p: (p.sensitivity, p.threshold))


def at_threshold(points: Sequence[FrocPoint], threshold: float) -> FrocPoint:
    """The FROC point of keeping findings scoring at least ``threshold`` (one chosen on other scans)."""
    return min((p for p in points if p.threshold >= threshold), key=lambda p: p.threshold)


def found_by_kind(
    scans: Sequence[ScanFindings], min_diameter_mm: float, threshold: float
) -> dict[str, tuple[int, int]]:
    """Per lesion kind, (found, counted) lesions of at least ``min_diameter_mm`` when findings scoring
    at least ``threshold`` are kept (e.g. the threshold of the 1 FP/scan point): where the misses are."""
    counts: dict[str, list[int]] = {}
    for scan in scans:
        kept = scan.scores >= threshold
        found = np.asarray(scan.hits()[kept].any(axis=0), dtype=bool).reshape(len(scan.truth_diameters))
        for lesion, kind in enumerate(scan.truth_kinds):
            if scan.truth_diameters[lesion] >= min_diameter_mm:
                entry = counts.setdefault(kind, [0, 0])
                entry[0] += int(found[lesion])
                entry[1] += 1
    return {kind: (found, total) for kind, (found, total) in sorted(counts.items())}


def wilson_interval(successes: int, trials: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sensible for small counts, unlike the normal one)."""
    if trials == 0:
        return (float("nan"), float("nan"))
    ci = stats.binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def bootstrap_interval(
    values: Sequence[float], *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean over cases (NaNs dropped; NaN when fewer than 2)."""
    finite = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size < 2:
        return (float("nan"), float("nan"))
    ci = stats.bootstrap(
        (finite,), np.mean, n_resamples=resamples, method="percentile", rng=np.random.default_rng(seed)
    ).confidence_interval
    return (float(ci.low), float(ci.high))


def auroc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Chance that a random positive scores above a random negative, ties counting half (the Mann-Whitney
    U over the number of pairs): how well a score, such as an uncertainty, separates failures from
    successes. NaN when either group is empty."""
    if not positives or not negatives:
        return float("nan")
    u = stats.mannwhitneyu(positives, negatives, alternative="two-sided").statistic
    return float(u) / (len(positives) * len(negatives))


@dataclass(frozen=True)
class CaseEvaluation:
    case_id: str
    site: str
    condition: str  # "clean", an artefact or paired shift ("arterial phase"), or "unseen <site>"
    contrast_phase: str  # the series' contrast phase ("non_contrast", "portal_venous", "arterial")
    dice: dict[str, float]  # structure name -> Dice (NaN when absent from both)
    lesions: ScanFindings  # the reported findings, made by ``lesion_source``
    lesion_source: str  # "detector" or "segmentation" (``Prediction.lesion_source``)
    channel_lesions: ScanFindings  # the segmentation lesion channel's (== lesions without a detector)
    mean_entropy_foreground: float  # voxel mean over the predicted foreground
    mean_mutual_information_foreground: float
    mean_structure_mutual_information: float  # mean over present structures (insensitive to coverage)
    mean_sample_agreement: float  # mean over present structures of the pairwise Dice between samples
    flagged: tuple[str, ...]  # structures the uncertainty thresholds flag for review
    outside_training_data: tuple[str, ...]  # structures flagged as outside the model's training range
    structure_mutual_information: dict[str, float]  # mean MI inside each predicted structure, by name
    structure_agreement: dict[str, float]  # each predicted structure's pairwise Dice between samples
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


def grid_round_trip(
    labels: npt.NDArray[np.integer], affine: npt.NDArray[np.float64], spec: ModelSpec
) -> npt.NDArray[np.uint8]:
    """The truth as the model grid holds it: moved on as training labels are, back as predictions are.

    Its Dice against the truth is about what a network that learned its training labels exactly would
    score, so a report can tell the grid's share of the misses from the network's."""
    grid = plan_grid(labels.shape, affine, spec)
    on_grid = labels_to_model(labels, grid)[0]
    one_hot = torch.nn.functional.one_hot(on_grid, spec.num_classes).permute(3, 0, 1, 2).float()
    return argmax_to_source(one_hot, grid)


def dice_scores(
    prediction: npt.NDArray[np.integer], truth: npt.NDArray[np.integer], spec: ModelSpec
) -> dict[str, float]:
    """Dice per structure name (label values are 1..n in spec order)."""
    scores = dice_per_class(prediction, truth, spec.num_classes)
    return {label.name: scores[label.value - 1] for label in spec.labels}


# TotalSegmentator v2 ("total" task) class numbers of the structures default_ct labels. TotalSegmentator's
# output for its own example CT (in ../shared/data) is the one real-anatomy reference there is: a model's
# segmentation, not a hand's. Bone: sacrum, vertebrae, humeri, scapulae, clavicles, femurs, hips, skull,
# ribs and sternum (costal cartilage is not bone).
TOTALSEGMENTATOR_CLASSES: dict[str, tuple[int, ...]] = {
    "Liver": (5,),
    "Spleen": (1,),
    "Left kidney": (3,),
    "Right kidney": (2,),
    "Aorta": (52,),
    "Lung": (10, 11, 12, 13, 14),
    "Bone": (*range(25, 51), *range(69, 79), *range(91, 117)),
}


def read_reference_labels(path: Path, volume: ImageVolume) -> npt.NDArray[np.integer]:
    """A NIfTI label map (RAS, as TotalSegmentator and dcm2niix write them) on ``volume``'s grid."""
    image = nib.load(path)
    if not isinstance(image, nib.spatialimages.SpatialImage):
        raise ValueError(f"{path}: not a label map with a spatial affine ({type(image).__name__})")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    return align_to_volume(np.asarray(image.dataobj), lps, volume, what=str(path))


def reference_dice(
    label_map: npt.NDArray[np.integer],
    reference: npt.NDArray[np.integer],
    spec: ModelSpec,
    classes: dict[str, tuple[int, ...]] = TOTALSEGMENTATOR_CLASSES,
) -> dict[str, float]:
    """``dice_scores`` against another tool's label map on the same grid, whose class numbers for each
    structure ``classes`` gives; only the structures it names."""
    theirs = np.zeros(reference.shape, dtype=np.uint8)
    compared = [label for label in spec.labels if label.name in classes]
    for label in compared:
        theirs[np.isin(reference, classes[label.name])] = label.value
    scores = dice_scores(label_map, theirs, spec)
    return {label.name: scores[label.name] for label in compared}


def evaluate_prediction(
    prediction: Prediction,
    truth: npt.NDArray[np.integer],
    truth_lesions: Sequence[TruthLesion],
    spec: ModelSpec,
    *,
    case_id: str,
    site: str,
    condition: str,
    contrast_phase: str,
    seconds: float,
) -> CaseEvaluation:
    """Everything the validation report needs from one case."""
    if truth.shape != prediction.label_map.shape:
        raise ValueError(
            f"case {case_id}: truth {truth.shape} is not on the prediction grid {prediction.label_map.shape}"
        )
    foreground = prediction.label_map > 0
    names = {label.value: label.name for label in spec.labels}
    present = [m for m in prediction.structures if m.volume_ml > 0]
    outside = prediction.outside_training_data
    return CaseEvaluation(
        case_id=case_id,
        site=site,
        condition=condition,
        contrast_phase=contrast_phase,
        dice=dice_scores(prediction.label_map, truth, spec),
        lesions=ScanFindings.of(case_id, prediction.lesions, truth_lesions),
        lesion_source=prediction.lesion_source,
        channel_lesions=ScanFindings.of(case_id, prediction.channel_lesions, truth_lesions),
        mean_entropy_foreground=float(prediction.entropy[foreground].mean()) if foreground.any() else 0.0,
        mean_mutual_information_foreground=float(prediction.mutual_information[foreground].mean())
        if foreground.any()
        else 0.0,
        mean_structure_mutual_information=float(np.mean([m.mean_mutual_information for m in present]))
        if present
        else 0.0,
        mean_sample_agreement=float(np.mean([m.sample_agreement for m in present])) if present else 1.0,
        flagged=tuple(
            names[m.label]
            for m in prediction.structures
            if set(m.review_reasons) - set(outside.get(names[m.label], ()))
        ),
        outside_training_data=tuple(outside),
        structure_mutual_information={names[m.label]: m.mean_mutual_information for m in present},
        structure_agreement={names[m.label]: m.sample_agreement for m in present},
        seconds=seconds,
    )
