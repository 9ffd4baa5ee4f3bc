"""Decision weights: one factor per label on the mean probabilities before the label map's argmax.

A network trained with soft Dice draws structures too large where it is unsure: soft-Dice optimisation
is volume-biased, cross-entropy is not (Bertels et al., "Theoretical analysis and experimental validation
of volume bias of soft Dice optimized segmentation maps", IPMI 2019). The shipped model drew the spleen
about one source pixel too wide. Scaling a label's probability down before the argmax moves its border
inwards; the factors are fitted on the validation split of the training data (never on a report's cases)
and stored in the spec as ``labels[].decision_weight``, which ``medseg.inference.decision_scores`` applies.
The probabilities, entropy and mutual information reported stay the network's.

The fit is coordinate ascent over a fixed grid of factors, maximising the mean over cases of each case's
mean Dice over the non-focal structures on the source grid, with the Monte-Carlo mean probabilities
inference uses (``medseg.inference.mean_probabilities``) interpolated there as the label map is. (A first
version fitted on the model grid against nearest-neighbour labels: on the val split that moved every
organ inwards, and on held-out cases it lowered liver and kidneys on the source grid.) Lesion-like (focal)
labels keep 1: their findings come from the probabilities, and their Dice on a few voxels would make the
fit noisy. Only the voxels whose winner some factor on the grid could change are kept per case (a few
per cent: borders), so a fit over dozens of cases takes seconds. The one-piece step
(``largest_components_only``) is left out of the fit; it removes islands, which the factors hardly move.
So are the border rules (``labels[].border_intensity``): they re-decide by HU the strip whose winner a
factor would move, after the argmax.
The body mask (``inference.body_threshold_hu``) is applied as inference applies it: outside the patient
no factor can change the winner.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from medseg.inference import mean_probabilities
from medseg.model import Model, save_model
from medseg.model_spec import ModelSpec
from medseg.preprocess import map_to_source, to_model
from medseg.synth.dataset import Split, SynthDataset, load_dataset
from medseg.training import read_labelled_case

log = logging.getLogger(__name__)

CANDIDATE_WEIGHTS = (0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 1.0, 1.15, 1.3, 1.5)
MIN_GAIN = 1e-4  # a factor moves away from 1 (or from its last value) only for more than this mean Dice
ProgressCallback = Callable[[int, int], None]  # (cases done, total)


@dataclass(frozen=True)
class ContestedVoxels:
    """One case reduced to what the decision weights can change.

    ``probabilities`` (C, K) and ``truth`` (K,) at the K voxels where some weight on the grid could
    change the winner; per class, the counts at all other voxels (whose winner is fixed): predicted,
    true, and both."""

    probabilities: torch.Tensor
    truth: torch.Tensor
    fixed_predicted: npt.NDArray[np.int64]
    fixed_true: npt.NDArray[np.int64]
    fixed_both: npt.NDArray[np.int64]

    @classmethod
    def from_case(cls, probabilities: torch.Tensor, truth: torch.Tensor, max_ratio: float) -> ContestedVoxels:
        """``probabilities`` (C, ...) and ``truth`` (...) on one grid; ``max_ratio`` the
        largest ratio of two candidate weights."""
        num_classes = probabilities.shape[0]
        flat = probabilities.reshape(num_classes, -1).float()
        labels = truth.reshape(-1).long()
        top2 = flat.topk(2, dim=0).values
        contested = top2[1] * max_ratio > top2[0]
        winner = flat.argmax(dim=0)[~contested]
        fixed_truth = labels[~contested]

        def counts(values: torch.Tensor) -> npt.NDArray[np.int64]:
            return torch.bincount(values, minlength=num_classes).numpy().astype(np.int64)

        return cls(
            probabilities=flat[:, contested].clone(),
            truth=labels[contested].clone(),
            fixed_predicted=counts(winner),
            fixed_true=counts(fixed_truth),
            fixed_both=counts(winner[winner == fixed_truth]),
        )

    def dice(self, weights: torch.Tensor, labels: Sequence[int]) -> list[float]:
        """Dice of each of ``labels`` with ``weights`` (C,) applied before the argmax (NaN: absent)."""
        winner = (self.probabilities * weights[:, None]).argmax(dim=0)
        num_classes = self.probabilities.shape[0]
        predicted = self.fixed_predicted + torch.bincount(winner, minlength=num_classes).numpy()
        true = self.fixed_true + torch.bincount(self.truth, minlength=num_classes).numpy()
        both = self.fixed_both + torch.bincount(winner[winner == self.truth], minlength=num_classes).numpy()
        out = []
        for c in labels:
            denominator = int(predicted[c] + true[c])
            out.append(2.0 * int(both[c]) / denominator if denominator else math.nan)
        return out


@dataclass(frozen=True)
class Calibration:
    """Fitted decision weights and the validation Dice (source grid) before and after, per structure."""

    weights: dict[str, float]
    cases: int
    mean_before: float
    mean_after: float
    dice_before: dict[str, float]
    dice_after: dict[str, float]

    def apply(self, spec: ModelSpec) -> ModelSpec:
        """``spec`` with each label's ``decision_weight`` set to the fitted one."""
        return with_decision_weights(spec, self.weights)


def with_decision_weights(spec: ModelSpec, weights: Mapping[str, float]) -> ModelSpec:
    """``spec`` with the ``decision_weight`` of each label named in ``weights`` replaced."""
    labels = tuple(
        label.model_copy(update={"decision_weight": weights.get(label.name, label.decision_weight)})
        for label in spec.labels
    )
    return spec.model_copy(update={"labels": labels})


def _objective(cases: Sequence[ContestedVoxels], weights: torch.Tensor, labels: Sequence[int]) -> float:
    per_case = [np.nanmean(d) for d in (c.dice(weights, labels) for c in cases) if not np.all(np.isnan(d))]
    return float(np.mean(per_case)) if per_case else math.nan


def _per_structure(
    cases: Sequence[ContestedVoxels], weights: torch.Tensor, labels: Sequence[int], spec: ModelSpec
) -> dict[str, float]:
    scores = np.array([c.dice(weights, labels) for c in cases], dtype=float)
    return {
        spec.labels[label - 1].name: float(np.nanmean(scores[:, i]))
        if np.isfinite(scores[:, i]).any()
        else math.nan
        for i, label in enumerate(labels)
    }


def candidate_ratio(spec: ModelSpec, candidates: Sequence[float] = CANDIDATE_WEIGHTS) -> float:
    """The largest ratio of two weights the fit can try (``ContestedVoxels.from_case``'s ``max_ratio``)."""
    if any(w <= 0 for w in candidates) or 1.0 not in candidates:
        raise ValueError(f"candidate weights {tuple(candidates)} must be positive and include 1")
    weights = (*candidates, *spec.decision_weights)
    return max(weights) / min(weights)


def fit_decision_weights(
    cases: Sequence[ContestedVoxels],
    spec: ModelSpec,
    *,
    candidates: Sequence[float] = CANDIDATE_WEIGHTS,
    rounds: int = 2,
) -> Calibration:
    """Fit each non-focal label's decision weight on ``cases`` (made with ``candidate_ratio(spec,
    candidates)``). Starts from the weights ``spec`` has."""
    if not cases:
        raise ValueError("calibration needs at least one case with ground truth")
    candidate_ratio(spec, candidates)
    labels = [label.value for label in spec.labels if not label.focal]
    current = list(spec.decision_weights)
    start = torch.tensor(current)
    best = _objective(cases, start, labels)
    before = best
    for _ in range(rounds):
        changed = False
        for label in labels:
            for w in candidates:
                trial = list(current)
                trial[label] = w
                score = _objective(cases, torch.tensor(trial), labels)
                if score > best + MIN_GAIN:
                    best, current, changed = score, trial, True
        if not changed:
            break
    fitted = torch.tensor(current)
    log.info("decision weights fitted on %d cases: mean Dice %.4f -> %.4f", len(cases), before, best)
    return Calibration(
        weights={spec.labels[c - 1].name: float(current[c]) for c in labels},
        cases=len(cases),
        mean_before=before,
        mean_after=best,
        dice_before=_per_structure(cases, start, labels, spec),
        dice_after=_per_structure(cases, fitted, labels, spec),
    )


def calibration_cases(
    model: Model,
    dataset: SynthDataset,
    *,
    sites: Sequence[str] = (),
    samples: int | None = None,
    device: torch.device | None = None,
    candidates: Sequence[float] = CANDIDATE_WEIGHTS,
    progress: ProgressCallback | None = None,
) -> list[ContestedVoxels]:
    """The val split's cases reduced to their contested voxels on the source grid: ``model``'s
    Monte-Carlo mean probabilities (as ``infer`` computes them, with the spec's sampling seed), each class
    interpolated onto the source grid as the label map is, beside the case's labels."""
    spec = model.spec
    n = spec.uncertainty.samples if samples is None else samples
    device = device or next(model.network.parameters()).device
    ratio = candidate_ratio(spec, candidates)
    entries = dataset.split_entries(Split.VAL, sites)
    out = []
    for i, entry in enumerate(entries):
        volume, labels = read_labelled_case(dataset, entry)
        model_input = to_model(volume, spec)
        mean_p = mean_probabilities(
            model, volume, model_input, samples=n, seed=spec.uncertainty.seed, device=device
        )
        on_source = torch.stack(
            [torch.from_numpy(map_to_source(channel, model_input.grid)) for channel in mean_p]
        )
        out.append(ContestedVoxels.from_case(on_source, torch.from_numpy(labels.astype(np.int64)), ratio))
        if progress:
            progress(i + 1, len(entries))
    return out


def calibrate(
    model: Model,
    dataset_path: Path | str,
    output: Path,
    *,
    samples: int | None = None,
    sites: Sequence[str] = (),
    device: torch.device | None = None,
    command: str = "",
    progress: ProgressCallback | None = None,
) -> tuple[Model, Calibration]:
    """Fit ``model``'s decision weights on a dataset's val split and save the calibrated model to
    ``output`` (same weights, spec with the fitted ``decision_weight``s, provenance naming the command
    and the validation Dice before and after; its Device UID is new)."""
    if output.resolve() == model.folder.resolve():
        raise ValueError(f"output {output} is the model's own folder; write the calibrated model to another")
    cases = calibration_cases(
        model, load_dataset(dataset_path), sites=sites, samples=samples, device=device, progress=progress
    )
    calibration = fit_decision_weights(cases, model.spec)
    metrics = {
        **model.provenance.metrics,
        "val_dice_before_calibration": calibration.mean_before,
        "val_dice_calibrated": calibration.mean_after,
    }
    provenance = replace(model.provenance, calibrated_by=command, metrics=metrics)
    # a detector stays valid: the focal labels' weights are always 1, so its guide is unchanged
    saved = save_model(
        output,
        calibration.apply(model.spec),
        model.network,
        provenance,
        model.detector,
        model.training_range,
    )
    return saved, calibration
