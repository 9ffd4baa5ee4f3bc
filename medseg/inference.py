"""Segmentation with Monte-Carlo uncertainty: ImageVolume + Model -> Prediction on the source grid.

Resample to the model grid, tile with MONAI's ``sliding_window_inference`` using a Monte-Carlo predictor
(``medseg.uncertainty``), resample probabilities and uncertainty back onto the source grid, and measure
each structure there. Device chosen automatically; mixed precision on CUDA.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from dicom_io.ai_result import LesionFinding, StructureMeasurements
from dicom_io.volume import ImageVolume, IntensityUnit
from medseg.detection import TrainedDetector, detect, with_guide
from medseg.lesions import lesion_findings
from medseg.model import Model
from medseg.model_spec import ModelSpec, ReviewSpec
from medseg.networks import set_dropout_sampling
from medseg.preprocess import (
    ModelGrid,
    ModelInput,
    RuledScores,
    argmax_to_source,
    body_mask,
    map_to_source,
    pad_to_roi,
    ruled_scores_to_source,
    to_model,
)
from medseg.training_range import ScanSpacing, structure_intensities
from medseg.uncertainty import MonteCarloSampler, SampleStructureStats, entropy

log = logging.getLogger(__name__)

StageCallback = Callable[[str], None]


@dataclass(frozen=True)
class Prediction:
    """What the model says about one volume, on the source grid, with its uncertainty.

    ``label_map``, ``entropy`` (predictive, nats) and ``mutual_information`` (epistemic, nats) are on
    the source grid; ``mean_probabilities`` (C, X, Y, Z) stays on the model grid ``grid`` (a source-sized
    copy per class would cost C times the volume). ``seed`` replays the dropout masks.
    """

    source: ImageVolume
    label_map: npt.NDArray[np.uint8]
    entropy: npt.NDArray[np.float32]
    mutual_information: npt.NDArray[np.float32]
    mean_probabilities: torch.Tensor
    grid: ModelGrid
    structures: tuple[StructureMeasurements, ...]
    lesions: tuple[LesionFinding, ...]
    samples: int
    seed: int
    model_name: str
    model_version: str
    device: str
    seconds: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    lesion_source: str = "segmentation"  # "detector" when the model's lesion detector made ``lesions``
    channel_lesions: tuple[LesionFinding, ...] = ()  # the lesion channel's findings, reported or not
    # structures (by name) whose intensity lies outside the model's training range, with the reasons
    outside_training_data: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # (X, Y, Z) bool on ``grid``: where labels may be (the patient's body); None where the spec sets none
    body: torch.Tensor | None = None

    def __repr__(self) -> str:
        flagged = [m.label for m in self.structures if m.needs_review]
        return (
            f"Prediction({self.model_name} {self.model_version} on {self.source.array.shape}, "
            f"{self.samples} samples, {len(self.structures)} structures, review {flagged}, "
            f"{len(self.lesions)} lesions by {self.lesion_source})"
        )


def _window_weights(shape: Sequence[int], spec: ModelSpec) -> torch.Tensor:
    """1 / number of windows covering each voxel, from the windows MONAI will visit."""
    count = torch.zeros(tuple(shape), dtype=torch.float32)
    roi = spec.inference.roi_size

    def record(window: torch.Tensor, locations: Sequence[Sequence[slice]]) -> torch.Tensor:
        for location in locations:
            count[tuple(location[2:])] += 1
        return torch.zeros((window.shape[0], 1, *roi))

    sliding_window_inference(
        torch.zeros((1, 1, *shape)), roi, 1, record, overlap=spec.inference.overlap, with_coord=True
    )
    return 1.0 / count.clamp_min(1.0)


def _boundary(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    return mask & ~ndimage.binary_erosion(mask)


def measure_structures(
    source: ImageVolume,
    label_map: npt.NDArray[np.uint8],
    entropy_map: npt.NDArray[np.float32],
    mi_map: npt.NDArray[np.float32],
    samples: SampleStructureStats,
    model_voxel_ml: float,
    spec: ModelSpec,
    outside_training_data: Mapping[str, tuple[str, ...]] | None = None,
) -> tuple[StructureMeasurements, ...]:
    """Per-structure volume, intensity and uncertainty on the source grid, with review flags (also set by
    ``outside_training_data``: reasons by structure name, see ``outside_training_range``)."""
    outside = outside_training_data or {}
    voxel_ml = float(abs(np.linalg.det(source.affine[:3, :3]))) / 1000.0
    objects = ndimage.find_objects(label_map, max_label=spec.num_classes - 1)
    out = []
    for label in spec.labels:
        box = objects[label.value - 1]
        sample_volumes = samples.volumes[:, label.value].numpy() * model_voxel_ml
        spread = float(sample_volumes.std()) if len(sample_volumes) > 1 else 0.0
        agreement = float(samples.agreement[label.value])
        if box is None:
            out.append(
                StructureMeasurements(
                    label=label.value,
                    volume_ml=0.0,
                    mean_intensity=None,
                    mean_entropy=0.0,
                    mean_mutual_information=0.0,
                    boundary_entropy=0.0,
                    volume_spread_ml=spread,
                    sample_agreement=agreement,
                    needs_review=False,
                )
            )
            continue
        mask = label_map[box] == label.value
        volume_ml = float(mask.sum()) * voxel_ml
        shell = _boundary(mask)
        mean_entropy = float(entropy_map[box][mask].mean())
        mean_mi = float(mi_map[box][mask].mean())
        boundary_entropy = float(entropy_map[box][shell].mean()) if shell.any() else mean_entropy
        intensity = (
            float(source.array[box][mask].mean()) if source.unit is not IntensityUnit.MR_STORED else None
        )
        reasons = _review_reasons(
            spec.review, mean_entropy, boundary_entropy, mean_mi, agreement, spread, volume_ml
        ) + outside.get(label.name, ())
        out.append(
            StructureMeasurements(
                label=label.value,
                volume_ml=volume_ml,
                mean_intensity=intensity,
                mean_entropy=mean_entropy,
                mean_mutual_information=mean_mi,
                boundary_entropy=boundary_entropy,
                volume_spread_ml=spread,
                sample_agreement=agreement,
                needs_review=bool(reasons),
                review_reasons=reasons,
            )
        )
    return tuple(out)


def _review_reasons(
    review: ReviewSpec,
    mean_entropy: float,
    boundary_entropy: float,
    mean_mi: float,
    agreement: float,
    spread_ml: float,
    volume_ml: float,
) -> tuple[str, ...]:
    checks = (
        (
            mean_entropy > review.max_mean_entropy,
            f"mean entropy {mean_entropy:.3f} > {review.max_mean_entropy}",
        ),
        (
            boundary_entropy > review.max_boundary_entropy,
            f"boundary entropy {boundary_entropy:.3f} > {review.max_boundary_entropy}",
        ),
        (
            mean_mi > review.max_mean_mutual_information,
            f"mutual information {mean_mi:.3f} > {review.max_mean_mutual_information}",
        ),
        (
            agreement < review.min_sample_agreement,
            f"sample agreement {agreement:.3f} < {review.min_sample_agreement}",
        ),
        (
            volume_ml > 0 and spread_ml / volume_ml > review.max_volume_cv,
            f"volume spread {spread_ml:.1f}/{volume_ml:.1f} mL > {review.max_volume_cv:.0%}",
        ),
    )
    return tuple(reason for failed, reason in checks if failed)


def outside_training_range(
    volume: ImageVolume, label_map: npt.NDArray[np.uint8], model: Model
) -> dict[str, tuple[str, ...]]:
    """The predicted structures whose intensity lies outside the model's training range, with the reasons
    (``medseg.training_range``); empty for a model that records none or a volume not in HU."""
    known = model.training_range
    if known is None:
        return {}
    return known.check(structure_intensities(volume, label_map, model.spec), model.spec.review)


def largest_components_only(probabilities: torch.Tensor, labels: Sequence[int]) -> torch.Tensor:
    """(C, X, Y, Z) probabilities with each of ``labels`` zeroed outside the largest connected part of
    its argmax region on the model grid, so those voxels go to the next most probable class.

    The usual post-processing for organs that are one piece (nnU-Net, TotalSegmentator): a detached
    island of "spleen" far from the spleen is a false positive whatever its probability. Done on the
    model grid (small) before the label map is interpolated, and on a copy: the reported mean
    probabilities stay the network's. (MONAI's KeepLargestConnectedComponent works on a label map, so
    it can only send the island to background, and it needs scikit-image.)"""
    if not labels:
        return probabilities
    winner = probabilities.argmax(dim=0).numpy()
    kept = probabilities.clone()
    for label in labels:
        parts, count = ndimage.label(winner == label)
        if count <= 1:
            continue
        sizes = np.bincount(parts.ravel(), minlength=count + 1)
        sizes[0] = 0
        stray = torch.from_numpy((parts != 0) & (parts != int(sizes.argmax())))
        kept[label].masked_fill_(stray, 0.0)
    return kept


def inside_body_only(probabilities: torch.Tensor, body: torch.Tensor | None) -> torch.Tensor:
    """(C, X, Y, Z) probabilities with every label but background zeroed outside ``body`` (a copy;
    unchanged without a body mask), so nothing is labelled or found where the patient is not."""
    if body is None:
        return probabilities
    kept = probabilities.clone()
    kept[1:].masked_fill_(~body, 0.0)
    return kept


def decision_scores(
    probabilities: torch.Tensor, spec: ModelSpec, body: torch.Tensor | None = None
) -> torch.Tensor:
    """What the label map's argmax is taken over: the (C, X, Y, Z) mean probabilities inside the body
    (``inside_body_only``) times each label's ``decision_weight`` (``medseg.calibration``), then
    ``largest_components_only`` for one-piece organs. A new tensor where anything changes; the reported
    probabilities stay the network's."""
    probabilities = inside_body_only(probabilities, body)
    weights = spec.decision_weights
    if any(w != 1.0 for w in weights):
        probabilities = probabilities * torch.tensor(weights, dtype=probabilities.dtype).view(-1, 1, 1, 1)
    return largest_components_only(probabilities, spec.single_component_labels)


def borders_by_intensity(
    scores: RuledScores, intensity: npt.NDArray[np.float32], spec: ModelSpec
) -> npt.NDArray[np.uint8]:
    """The label map (argmax) of ``scores`` with the border of each label that has a
    ``border_intensity`` rule decided by ``intensity`` (HU, same grid): where the label and the best
    class without a rule both score at least the rule's band, one of the two wins and that class is
    background or one of the rule's rivals, the label inside the rule's range and that class outside."""
    label = scores.other.copy()
    best = scores.other_score.copy()
    for value, score in scores.ruled.items():
        label[score > best] = value
        np.maximum(best, score, out=best)
    rules = spec.border_rules
    flat_label, other = label.reshape(-1), scores.other.reshape(-1)
    for value, score in scores.ruled.items():
        rule = rules[value]
        rivals = [0, *(spec.label_value(name) for name in rule.rivals)]
        where = np.flatnonzero(score.reshape(-1) >= rule.band)  # a few per cent: the rest stays as it is
        unsure = scores.other_score.reshape(-1)[where] >= rule.band
        unsure &= np.isin(other[where], rivals)
        unsure &= (flat_label[where] == value) | (flat_label[where] == other[where])
        where = where[unsure]
        hu = intensity.reshape(-1)[where]
        inside = np.ones(hu.shape, dtype=bool)
        if rule.min_hu is not None:
            inside &= hu >= rule.min_hu
        if rule.max_hu is not None:
            inside &= hu <= rule.max_hu
        flat_label[where] = np.where(inside, value, other[where])
    return label


def label_map_on_source(
    scores: torch.Tensor, grid: ModelGrid, volume: ImageVolume, spec: ModelSpec
) -> npt.NDArray[np.uint8]:
    """The label map on ``volume``'s grid from decision scores on the model grid: their argmax, with
    the spec's ``border_intensity`` rules applied where the volume is in HU and at least as fine as the
    model grid along every axis. A thicker slice averages bone with what lies above and below it (site c's
    5 mm slices: with the rule, bone fell on 4 of its 5 held-out cases), so there the network decides."""
    if (
        not spec.border_rules
        or volume.unit is not IntensityUnit.HOUNSFIELD
        or not grid.source_at_least_as_fine
    ):
        return argmax_to_source(scores, grid)
    ruled = ruled_scores_to_source(scores, grid, list(spec.border_rules))
    return borders_by_intensity(ruled, volume.array, spec)


def body_on_grid(volume: ImageVolume, grid: ModelGrid, spec: ModelSpec) -> torch.Tensor | None:
    """The spec's body mask of ``volume`` on the model grid, or None where the spec sets no threshold."""
    threshold = spec.inference.body_threshold_hu
    if threshold is None:
        return None
    return body_mask(volume, grid, threshold, antialias=spec.preprocessing.smooth_before_shrinking)


def sample_on_grid(
    image: torch.Tensor,
    model: Model,
    *,
    samples: int,
    seed: int,
    device: torch.device,
    body: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MonteCarloSampler]:
    """Monte-Carlo statistics of a (channels, X, Y, Z) image on the model grid: the blended window
    output (its channels laid out as ``sampler.channels`` says, on the CPU) and the sampler, which holds
    the per-structure sample statistics (counted inside ``body`` only, where one is given, as the label
    map is). ``infer`` and the calibration (``medseg.calibration``) share it, so that decision weights
    are fitted on exactly the probabilities inference takes its argmax of."""
    spec = model.spec
    padded, crop = pad_to_roi(image[None], spec.inference.roi_size)
    net = model.network.to(device)
    set_dropout_sampling(net, enabled=samples > 1)  # eval mode; dropout sampling only for several samples
    weights = _window_weights(padded.shape[2:], spec)
    if body is not None:
        inside = torch.zeros(padded.shape[2:], dtype=torch.bool)
        inside[tuple(crop)] = body
        weights = weights * inside
    weights = weights.to(device)
    sampler = MonteCarloSampler(
        net,
        samples=samples,
        stochastic=spec.uncertainty.stochastic,
        num_classes=spec.num_classes,
        weights=weights,
        generator=torch.Generator().manual_seed(seed),
        focal_labels=spec.focal_labels,
    )
    torch.manual_seed(seed)  # dropout inside the trunk (stochastic: all) draws from the global generator
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else nullcontext()
    with torch.inference_mode(), autocast:
        out = sliding_window_inference(
            padded.to(device),
            spec.inference.roi_size,
            spec.inference.sw_batch_size,
            sampler,
            overlap=spec.inference.overlap,
            mode="constant",
            with_coord=True,
        )
    assert isinstance(out, torch.Tensor)
    window: tuple[Any, ...] = (0, slice(None), *crop)
    return out[window].float().cpu(), sampler


def mean_probabilities(
    model: Model,
    volume: ImageVolume,
    model_input: ModelInput,
    *,
    samples: int,
    seed: int,
    device: torch.device,
) -> torch.Tensor:
    """The (C, X, Y, Z) Monte-Carlo mean class probabilities of ``volume`` (``model_input`` on the model
    grid) inside the body, as ``infer`` decides on them: what calibration fits on and what a guided
    detector reads beside the image."""
    body = body_on_grid(volume, model_input.grid, model.spec)
    out, sampler = sample_on_grid(
        model_input.image, model, samples=samples, seed=seed, device=device, body=body
    )
    return inside_body_only(sampler.channels.mean(out), body)


def detector_findings(
    detector: TrainedDetector,
    model_input: ModelInput,
    mean_probabilities: torch.Tensor,
    *,
    samples: int,
    seed: int,
) -> tuple[LesionFinding, ...]:
    """Lesion findings of a model's detector, fed the segmentation's probability when it is guided."""
    guide = detector.spec.guide_label
    if guide is not None:
        model_input = with_guide(model_input, mean_probabilities[guide])
    return detect(detector.detector, model_input, detector.spec, samples, seed)


def infer(
    volume: ImageVolume,
    model: Model,
    *,
    samples: int | None = None,
    seed: int | None = None,
    device: torch.device | None = None,
    stage: StageCallback | None = None,
) -> Prediction:
    """Segment ``volume`` with Monte-Carlo dropout (``samples`` = 1 gives one deterministic pass)."""
    spec = model.spec
    n = spec.uncertainty.samples if samples is None else samples
    if n < 1:
        raise ValueError(f"samples must be >= 1, got {n}")
    seed = spec.uncertainty.seed if seed is None else seed
    device = device or next(model.network.parameters()).device
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        seconds[name] = now - t0
        t0 = now
        if stage:
            stage(name)

    model_input = to_model(volume, spec)
    body = body_on_grid(volume, model_input.grid, spec)
    mark("resample to model grid")
    out, sampler = sample_on_grid(model_input.image, model, samples=n, seed=seed, device=device, body=body)
    channels = sampler.channels
    mean_p = channels.mean(out)
    predictive = entropy(mean_p, dim=0)
    mutual = channels.mutual_information(out).clamp_min(0.0)
    channel_lesions = tuple(
        finding
        for i, label in enumerate(sampler.focal_labels)
        for finding in lesion_findings(
            mean_p[label],
            channels.focal_variance(out, i),
            channels.votes(out, i) if body is None else channels.votes(out, i) * body,
            model_input.grid,
            spec.review,
        )
    )
    mark("network")
    candidates = channel_lesions
    if model.detector is not None:
        candidates = detector_findings(
            model.detector, model_input, inside_body_only(mean_p, body), samples=n, seed=seed
        )
        mark("lesion detector")
    limit = spec.review.max_lesion_findings
    lesions = candidates[:limit]
    notes: tuple[str, ...] = ()
    if len(candidates) > limit:
        notes = (
            f"{len(candidates) - limit} more lesion candidates below the {limit} highest scores not listed",
        )
        log.warning("%s", notes[0])

    label_map = label_map_on_source(decision_scores(mean_p, spec, body), model_input.grid, volume, spec)
    entropy_map = map_to_source(predictive, model_input.grid)
    mi_map = map_to_source(mutual, model_input.grid)
    np.maximum(entropy_map, 0, out=entropy_map)
    np.maximum(mi_map, 0, out=mi_map)
    mark("resample to source grid")

    outside = outside_training_range(volume, label_map, model)
    if outside:
        notes = (*notes, f"outside the model's training data: {', '.join(outside)} (see review reasons)")
    if model.training_range is not None:
        notes = (*notes, *model.training_range.scan_reasons(ScanSpacing.of(volume), spec.review))
    structures = measure_structures(
        volume,
        label_map,
        entropy_map,
        mi_map,
        sampler.structure_stats(),
        model_input.grid.voxel_volume_ml,
        spec,
        outside,
    )
    mark("measure structures")
    return Prediction(
        source=volume,
        label_map=label_map,
        entropy=entropy_map,
        mutual_information=mi_map,
        mean_probabilities=mean_p,
        grid=model_input.grid,
        structures=structures,
        lesions=lesions,
        samples=n,
        seed=seed,
        model_name=spec.name,
        model_version=spec.version,
        device=str(device),
        seconds=seconds,
        notes=notes,
        lesion_source="segmentation" if model.detector is None else "detector",
        channel_lesions=channel_lesions[:limit],
        outside_training_data=outside,
        body=body,
    )
