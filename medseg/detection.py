"""Focal lesion detection: a small MONAI RetinaNet on the model grid, with Monte-Carlo dropout findings.

A model folder may hold one (``medseg train-detector``, ``medseg.model``); ``infer`` then reports its
findings instead of those of the segmentation's lesion channel (``medseg.lesions``). Trained alone on the
image, 1,600 CPU iterations on the synthetic dataset did not separate lesions from background
(sensitivity 0 at 1 false positive per scan). A guided detector (``DetectionSpec.guide_label``) also reads
the segmentation's Monte-Carlo mean probability of the lesion label as its last input channel: Retina
U-Net's idea (Jaeger et al. 2018), the segmentation's voxel-level supervision carrying the detector, which
learns to box and score what it points at, with the image for context. ``benchmarks/eval_detection.py``
and the validation report score both sources on the same scans. Measured on default_ct 1.9.0 (README):
the guided detector finds as many lesions >= 10 mm at 1 false positive per scan as the lesion channel,
but far more false findings at its report score, so the shipped model has no detector.

The detector sees exactly what the segmentation network sees (``medseg.preprocess.to_model``: 3 mm LPS
grid, CT windows), so one ``ModelInput`` feeds both. Boxes live in model voxel index space (``StandardMode``
``[x0, y0, z0, x1, y1, z1]``, voxel centres at integer indices, ``grid.affine`` maps them to LPS mm).

Uncertainty: channel dropout sits on every feature-pyramid level, between the trunk and MONAI's two heads.
At test time the trunk runs once per window and ``samples`` seeded dropout masks are applied to its
features as one batch (norms stay in eval mode; the masks are drawn once per call and shared by all
windows, so sample ``s`` is the same network everywhere). The boxes of all samples are then clustered into
findings: a finding's detection rate is the fraction of samples that found it, its score spread and box
spread say how much the samples disagree.

Folder layout of a trained detector (it can sit beside ``weights.pt`` in a model folder)::

    detector.pt     state dict of the RetinaNet (``detector.network``)
    detector.json   the DetectionSpec and provenance (seed, data, iterations, weights SHA-256)
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
import numpy.typing as npt
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.data.box_utils import box_iou
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from dicom_io.ai_result import LesionFinding
from dicom_io.reader import read_volume
from dicom_io.volume import ImageVolume
from medseg.model_spec import ModelSpec, PreprocessingSpec
from medseg.preprocess import ModelGrid, ModelInput, pad_with_air, to_model
from medseg.synth.dataset import Split, SynthDataset, load_lesions

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
ProgressCallback = Callable[[int, int, str], None]  # (iterations done, total, status line)
WEIGHTS_FILE, SPEC_FILE = "detector.pt", "detector.json"

Probability = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]
Shape3 = tuple[int, int, int]


class DetectionError(ValueError):
    """Bad detector input, spec or folder (the message names the thing, the bad value and the fix)."""


class DetectionSpec(BaseModel):
    """Every hyperparameter of the detector: network, anchors, box selection, sampling, review, training.

    Sizes are in model voxels (``spacing_mm`` each). Defaults suit the 3 mm grid and lesions of 5-40 mm
    (2-13 voxels): a stride-2 stem without max pooling gives pyramid levels at strides 2, 4 and 8, whose
    anchors (4 and 6 voxels, times 1, 2, 4) span 12-72 mm.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # network: a resnet10-like MONAI ResNet (basic blocks), of which only the returned layers are kept
    backbone_channels: tuple[int, int, int, int] = (8, 16, 32, 64)
    backbone_blocks: tuple[int, int, int, int] = (1, 1, 1, 1)
    stem_stride: int = Field(default=2, ge=1, le=2)
    returned_layers: tuple[int, ...] = (1, 2)
    fpn_channels: int = Field(default=16, ge=8, multiple_of=8)  # the heads' GroupNorm uses 8 groups
    anchor_shapes: tuple[Shape3, ...] = ((4, 4, 4), (6, 6, 6))
    feature_map_scales: tuple[int, ...] = (1, 2, 4)
    spacing_mm: tuple[Positive, Positive, Positive] = (3.0, 3.0, 3.0)
    input_channels: int = Field(default=1, ge=1)  # the segmentation spec's intensity channels it reads ...
    # ... plus, when set, the segmentation's Monte-Carlo mean probability of this (focal) label as the last
    # channel (Retina U-Net's idea: the segmentation's pixel-level supervision guides the box detector)
    guide_label: int | None = Field(default=None, ge=1)
    # inference: per-sample box selection (MONAI BoxSelector) and sliding windows (``inference_window``)
    score_threshold: Probability = 0.05
    nms_threshold: Probability = 0.2
    # best-scoring boxes per level and window before NMS: a window holds a few lesions, and MONAI's NMS
    # over 1,000 boxes per level and sample took 8 of a volume's 22 s of detection on 2 CPU cores
    candidates_per_level: int = Field(default=100, ge=1)
    detections_per_window: int = Field(default=50, ge=1)
    max_detections: int = Field(default=50, ge=1)  # per sample and volume, after merging windows
    window_overlap: Annotated[float, Field(ge=0, lt=0.9)] = 0.25
    # the network is fully convolutional: inference windows grow up to this (whole small volumes in one),
    # because 27 overlapping training-sized windows over a 136-voxel cube cost 2.8x its voxels
    max_window: Shape3 = (160, 160, 160)
    # Monte-Carlo dropout and clustering of the samples' boxes into findings
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    samples: int = Field(default=10, ge=1, le=100)
    seed: int = 0
    cluster_iou: Probability = 0.2
    cluster_distance_mm: float = Field(default=6.0, ge=0)
    min_detection_rate: Probability = 0.2  # clusters found by fewer samples are not findings
    # findings whose score (mean over the samples, a miss counting 0) is below this are not reported:
    # more likely a lesion than not. Fixed beforehand, not tuned on the validation cases; without it the
    # guided detector listed 20 findings on every scan (the report's cap), mostly of low score
    report_score: Probability = 0.5
    # a guided detector's box counts only where the segmentation points at it: the guide's highest
    # probability at the voxels inside the box must reach this (0: off). Without it the guided detector
    # scored lung texture where the segmentation saw no lesion at all at 0.9 (README: lesion findings)
    min_guide_probability: Probability = 0.5
    # two findings are one lesion when this share of the smaller box lies inside the better one's box
    # (besides a centre inside it): a sample can tile one lesion with boxes that overlap too little for NMS
    duplicate_overlap: Probability = 0.5
    review_detection_rate: Probability = 0.7  # findings below this need review
    review_score_spread: float = Field(default=0.15, ge=0)  # ... and so do those whose score varies more
    # training
    patch_size: Shape3 = (64, 64, 64)
    batch_size: int = Field(default=2, ge=1)
    epochs: int = Field(default=32, ge=1)
    iterations_per_epoch: int = Field(default=50, ge=1)
    learning_rate: Positive = 3e-3
    weight_decay: float = Field(default=1e-5, ge=0)
    positive_patch_fraction: Probability = 0.7  # share of patches placed around a lesion
    atss_candidates: int = Field(default=8, ge=1)  # per level; more positives per small lesion
    sampler_anchors: int = Field(default=64, ge=2)  # anchors per image for the classification loss
    sampler_positive_fraction: Probability = 0.3
    # negatives are drawn from the pool_size x n highest-scoring ones; MONAI's 20 (only the hardest, i.e. the
    # neighbours of each lesion) made the classifier collapse to a constant on this data, 1000 learns
    sampler_pool_size: float = Field(default=1000, ge=1)
    noise_std: float = Field(default=0.03, ge=0)  # normalized units
    intensity_drift: float = Field(default=0.05, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> DetectionSpec:
        layers = self.returned_layers
        if not layers or list(layers) != sorted(set(layers)) or not set(layers) <= {1, 2, 3, 4}:
            raise ValueError(f"returned_layers must be increasing values in 1..4, got {layers}")
        if len(self.feature_map_scales) != len(layers) + 1:
            raise ValueError(
                f"feature_map_scales {self.feature_map_scales} needs one scale per pyramid level: "
                f"{len(layers) + 1} (returned_layers {layers} plus the extra pooled level)"
            )
        if not self.anchor_shapes or any(s < 2 or s % 2 for shape in self.anchor_shapes for s in shape):
            raise ValueError(
                f"anchor_shapes {self.anchor_shapes}: sides must be even and >= 2 voxels "
                "(MONAI rounds half-sides to whole voxels)"
            )
        d = self.size_divisible
        if any(p < d or p % d for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size}: every side must be a multiple of {d}")
        if self.guide_label is not None and self.input_channels < 2:
            raise ValueError(
                f"guide_label {self.guide_label} needs input_channels >= 2 (the image channels and the "
                f"segmentation's probability), got {self.input_channels}"
            )
        if self.review_detection_rate < self.min_detection_rate:
            raise ValueError(
                f"review_detection_rate {self.review_detection_rate} < min_detection_rate "
                f"{self.min_detection_rate}: every kept finding would pass review"
            )
        return self

    @property
    def image_channels(self) -> int:
        """Input channels that come from the image (``to_model``), without the segmentation's guide."""
        return self.input_channels - (self.guide_label is not None)

    def inference_window(self, volume: Sequence[int]) -> Shape3:
        """The window ``detect`` slides: the volume rounded up to ``size_divisible``, at least
        ``patch_size`` and at most ``max_window`` (rounded down to ``size_divisible``) per axis."""
        d = self.size_divisible
        sides = [
            max(p, min(d * math.ceil(n / d), d * (m // d)))
            for n, p, m in zip(volume, self.patch_size, self.max_window, strict=True)
        ]
        return (sides[0], sides[1], sides[2])

    @property
    def size_divisible(self) -> int:
        """Input sides must be multiples of the coarsest pyramid stride."""
        return self.stem_stride * 2 ** max(self.returned_layers)


# ---------------------------------------------------------------------------------------------- network


class PyramidFeatures(nn.Module):
    """ResNet stem and layers (MONAI ``ResNet``), a feature pyramid (MONAI FPN) and channel dropout.

    Written here rather than with ``resnet_fpn_feature_extractor`` because that needs torchvision
    (``IntermediateLayerGetter``), which the project does not depend on; every layer is MONAI's. No max
    pooling after the stem: the finest level stays at stride 2 for 2-voxel lesions.
    ``masks`` (one ``(samples, channels)`` tensor per level, set by ``detect``) switches to Monte-Carlo
    mode: the batch holds copies of one window, the trunk runs on the first and the masks make the samples.
    """

    def __init__(self, spec: DetectionSpec) -> None:
        super().__init__()
        resnet = ResNet(
            block="basic",
            layers=list(spec.backbone_blocks),
            block_inplanes=list(spec.backbone_channels),
            spatial_dims=3,
            n_input_channels=spec.input_channels,
            conv1_t_size=7,
            conv1_t_stride=spec.stem_stride,
            no_max_pool=True,
            feed_forward=False,
        )
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.act)
        depth = max(spec.returned_layers)
        self.layers = nn.ModuleList([getattr(resnet, f"layer{i}") for i in range(1, depth + 1)])
        self.returned = tuple(spec.returned_layers)
        self.fpn = FeaturePyramidNetwork(
            spatial_dims=3,
            in_channels_list=[spec.backbone_channels[i - 1] for i in self.returned],
            out_channels=spec.fpn_channels,
            extra_blocks=LastLevelMaxPool(3),
        )
        self.out_channels = spec.fpn_channels
        self.levels = len(self.returned) + 1
        self.dropout = nn.Dropout3d(spec.dropout)
        self.masks: list[torch.Tensor] | None = None

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """FPN feature maps, finest first."""
        x = self.stem(x)
        picked: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x)
            if i in self.returned:
                picked[f"layer{i}"] = x
        return list(self.fpn(picked).values())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.masks is None:
            return [self.dropout(f) for f in self.pyramid(x)]
        n = self.masks[0].shape[0]
        if x.shape[0] != n:
            raise DetectionError(f"Monte-Carlo batch holds {x.shape[0]} windows for {n} dropout masks")
        shared = self.pyramid(x[:1])
        return [
            f.expand(n, *f.shape[1:]) * m.to(f.dtype)[:, :, None, None, None]
            for f, m in zip(shared, self.masks, strict=True)
        ]


class _ATSSRetinaNetDetector(RetinaNetDetector):
    """MONAI's RetinaNetDetector with anchor matching that calls its ATSS matcher directly.

    MONAI's method first tests for torchvision's ``Matcher``, which raises without torchvision (not a
    project dependency); MONAI documents overriding this method for other matchers. Same result otherwise.
    """

    def compute_anchor_matched_idxs(
        self,
        anchors: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        num_anchor_locs_per_level: Sequence[int],
    ) -> list[torch.Tensor]:
        matched = []
        for anchors_per_image, target in zip(anchors, targets, strict=True):
            truth = target[self.target_box_key].to(anchors_per_image.device)
            if truth.numel() == 0:
                matched.append(torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64))
                continue
            _, idx = self.proposal_matcher(
                truth, anchors_per_image, num_anchor_locs_per_level, self.num_anchors_per_loc
            )
            matched.append(idx)
        return matched


def build_detector(spec: DetectionSpec) -> RetinaNetDetector:
    """A MONAI RetinaNetDetector (one class: lesion) set up for training and inference from ``spec``.

    ATSS matching (no fixed IoU thresholds: suits anchors much larger than a 2-voxel lesion) and hard
    negative sampling are MONAI's; both avoid the torchvision-only matcher and sampler.
    """
    features = PyramidFeatures(spec)
    network = RetinaNet(
        spatial_dims=3,
        num_classes=1,
        num_anchors=len(spec.anchor_shapes),
        feature_extractor=features,
        size_divisible=spec.size_divisible,
    )
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=spec.feature_map_scales, base_anchor_shapes=spec.anchor_shapes
    )
    detector = _ATSSRetinaNetDetector(network, anchors)
    detector.set_atss_matcher(num_candidates=spec.atss_candidates, center_in_gt=False)
    detector.set_hard_negative_sampler(
        batch_size_per_image=spec.sampler_anchors,
        positive_fraction=spec.sampler_positive_fraction,
        min_neg=min(16, spec.sampler_anchors // 2),
        pool_size=spec.sampler_pool_size,
    )
    _set_box_selection(detector, spec)
    return detector


def _set_box_selection(detector: RetinaNetDetector, spec: DetectionSpec) -> None:
    detector.set_box_selector_parameters(
        score_thresh=spec.score_threshold,
        topk_candidates_per_level=spec.candidates_per_level,
        nms_thresh=spec.nms_threshold,
        detections_per_img=spec.detections_per_window,
        apply_sigmoid=True,
    )


def _features(detector: RetinaNetDetector) -> PyramidFeatures:
    features = getattr(detector.network, "feature_extractor", None)
    if not isinstance(features, PyramidFeatures):
        raise DetectionError(
            f"detector network has feature extractor {type(features).__name__}, not PyramidFeatures; "
            "build it with medseg.detection.build_detector"
        )
    return features


def parameter_count(detector: RetinaNetDetector) -> int:
    """Trainable parameters of the detector's network."""
    return sum(p.numel() for p in detector.network.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------- box geometry


def _corners(lo: FloatArray, hi: FloatArray) -> FloatArray:
    """(N, 8, 3) corners of axis-aligned boxes given by (N, 3) min and max."""
    pick = np.array(list(itertools.product((0, 1), repeat=3)), dtype=bool)  # (8, 3)
    return np.where(pick[None], hi[:, None, :], lo[:, None, :])


def _transform_boxes(lo: FloatArray, hi: FloatArray, matrix: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Axis-aligned bounds of boxes moved by a 4x4 matrix (all eight corners, sorted per axis)."""
    corners = _corners(lo, hi)
    moved = corners @ matrix[:3, :3].T + matrix[:3, 3]
    return moved.min(axis=1), moved.max(axis=1)


def _check_corners(lo: npt.ArrayLike, hi: npt.ArrayLike, what: str) -> tuple[FloatArray, FloatArray]:
    lo_a, hi_a = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    if lo_a.size % 3 or lo_a.shape != hi_a.shape:
        raise DetectionError(f"{what}: min corners {lo_a.shape} and max corners {hi_a.shape} must be (N, 3)")
    lo_a, hi_a = lo_a.reshape(-1, 3), hi_a.reshape(-1, 3)
    if np.any(lo_a > hi_a):
        bad = int(np.argmax(np.any(lo_a > hi_a, axis=1)))
        raise DetectionError(f"{what}: box {bad} has min {lo_a[bad]} > max {hi_a[bad]}; swap the corners")
    return lo_a, hi_a


def boxes_lps_to_voxel(min_lps: npt.ArrayLike, max_lps: npt.ArrayLike, affine: FloatArray) -> FloatArray:
    """LPS boxes (mm) to (N, 6) ``[x0, y0, z0, x1, y1, z1]`` boxes in the voxel index space of ``affine``."""
    lo, hi = _check_corners(min_lps, max_lps, "LPS boxes")
    vlo, vhi = _transform_boxes(lo, hi, np.asarray(np.linalg.inv(affine), dtype=np.float64))
    return np.concatenate([vlo, vhi], axis=1)


def boxes_voxel_to_lps(boxes: npt.ArrayLike, affine: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(N, 6) voxel boxes to their LPS bounds (mm): (N, 3) min and (N, 3) max corners."""
    b = np.asarray(boxes, dtype=np.float64)
    if b.ndim != 2 or b.shape[1] != 6:
        raise DetectionError(f"voxel boxes must have shape (N, 6) [x0, y0, z0, x1, y1, z1], got {b.shape}")
    lo, hi = _check_corners(b[:, :3], b[:, 3:], "voxel boxes")
    return _transform_boxes(lo, hi, affine)


# ------------------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class DetectionCase:
    """One training case on the model grid: normalized image (C, X, Y, Z), lesion boxes (N, 6) in voxels."""

    case_id: str
    image: torch.Tensor
    boxes: torch.Tensor
    grid: ModelGrid

    def __post_init__(self) -> None:
        if self.image.ndim != 4:
            raise DetectionError(
                f"case {self.case_id}: image must be (C, X, Y, Z), got {tuple(self.image.shape)}"
            )
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 6:
            raise DetectionError(f"case {self.case_id}: boxes must be (N, 6), got {tuple(self.boxes.shape)}")

    def __repr__(self) -> str:
        return (
            f"DetectionCase({self.case_id}, shape={tuple(self.image.shape[1:])}, lesions={len(self.boxes)})"
        )


# a volume and its model input -> the segmentation's (X, Y, Z) probability on the model grid
Guide = Callable[[ImageVolume, ModelInput], torch.Tensor]


def with_guide(model_input: ModelInput, probability: torch.Tensor) -> ModelInput:
    """A guided detector's input: the model input with the segmentation's probability as the last channel."""
    if tuple(probability.shape) != tuple(model_input.image.shape[1:]):
        raise DetectionError(
            f"guide probability {tuple(probability.shape)} does not cover the model grid "
            f"{tuple(model_input.image.shape[1:])}; compute it on the same ModelInput"
        )
    image = torch.cat([model_input.image, probability[None].to(model_input.image.dtype)])
    return ModelInput(image=image, grid=model_input.grid)


def load_detection_cases(
    dataset: SynthDataset,
    model_spec: ModelSpec,
    split: Split | str,
    *,
    sites: Sequence[str] = (),
    guide: Guide | None = None,
    progress: ProgressCallback | None = None,
) -> list[DetectionCase]:
    """Read one split onto the model grid (``to_model``, as inference does), lesions as voxel boxes;
    with ``guide``, its probability is appended as the last channel (``with_guide``)."""
    entries = dataset.split_entries(Split(split), sites)
    cases = []
    for n, entry in enumerate(entries, start=1):
        volume = read_volume(dataset.image_dir(entry))
        model_input = to_model(volume, model_spec)
        if guide is not None:
            model_input = with_guide(model_input, guide(volume, model_input))
        lesions = load_lesions(dataset.lesions(entry)).lesions
        boxes = boxes_lps_to_voxel(
            [les.min_corner_lps for les in lesions],
            [les.max_corner_lps for les in lesions],
            model_input.grid.affine,
        )
        cases.append(
            DetectionCase(
                entry.case_id,
                model_input.image,
                torch.as_tensor(boxes, dtype=torch.float32),
                model_input.grid,
            )
        )
        if progress is not None:
            progress(n, len(entries), f"loading {Split(split)} case {entry.case_id}")
    return cases


def _pad_to(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Pad (C, X, Y, Z) at the far end up to at least ``shape`` with air (each channel's minimum)."""
    pad = [max(0, int(s) - n) for s, n in zip(shape, image.shape[1:], strict=True)]
    if not any(pad):
        return image
    return pad_with_air(image, (0, pad[2], 0, pad[1], 0, pad[0]))


def _sample_patch(
    case: DetectionCase, spec: DetectionSpec, rng: np.random.Generator, noise: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented patch (C, P, P, P) and its boxes: placed around a lesion or anywhere, flipped, noised."""
    patch = np.asarray(spec.patch_size)
    image = _pad_to(case.image, spec.patch_size)
    size = np.asarray(image.shape[1:])
    boxes = case.boxes.numpy().astype(np.float64)
    if len(boxes) and rng.uniform() < spec.positive_patch_fraction:
        box = boxes[rng.integers(len(boxes))]
        centre = (box[:3] + box[3:]) / 2
        margin = np.minimum(8, patch // 4)
        lo = np.clip(np.ceil(centre - patch + margin), 0, size - patch).astype(int)
        hi = np.clip(np.floor(centre - margin), 0, size - patch).astype(int)
        start = np.array([rng.integers(a, max(a, b) + 1) for a, b in zip(lo, hi, strict=True)])
    else:
        start = np.array([rng.integers(0, s - p + 1) for s, p in zip(size, patch, strict=True)])
    x0, y0, z0 = (int(v) for v in start)
    out = image[:, x0 : x0 + patch[0], y0 : y0 + patch[1], z0 : z0 + patch[2]].clone()
    shifted = boxes - np.concatenate([start, start])
    for axis in range(3):
        if rng.uniform() < 0.5:
            out = out.flip(axis + 1)
            top = patch[axis] - 1  # voxel i -> P-1-i, so a box [a, b] -> [P-1-b, P-1-a]
            shifted[:, [axis, axis + 3]] = top - shifted[:, [axis + 3, axis]]
    centres = (shifted[:, :3] + shifted[:, 3:]) / 2
    inside = np.all((centres >= 0) & (centres < patch), axis=1)
    kept = shifted[inside]
    kept[:, :3] = np.clip(kept[:, :3], 0, patch)
    kept[:, 3:] = np.clip(kept[:, 3:], 0, patch)
    if spec.noise_std > 0:
        out = out + spec.noise_std * torch.randn(out.shape, generator=noise)
    drift = spec.intensity_drift
    out = out * (1 + rng.uniform(-drift, drift)) + rng.uniform(-drift, drift)
    return out.float(), torch.as_tensor(kept, dtype=torch.float32)


def detection_train_step(
    detector: RetinaNetDetector,
    images: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
) -> float:
    """One optimisation step (classification + box regression loss); returns the loss.

    A plain function, like ``medseg.training.train_step``, so a federated client can call the same one.
    ``targets`` holds per image ``detector.target_box_key`` (N, 6) voxel boxes and label 0 per box.
    """
    detector.train()
    optimizer.zero_grad(set_to_none=True)
    losses = detector(images, targets)
    if not isinstance(losses, dict):  # pragma: no cover - MONAI returns a dict in training mode
        raise DetectionError("detector did not return losses; is it in training mode?")
    loss = losses[detector.cls_key] + losses[detector.box_reg_key]
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class DetectorProvenance(BaseModel):
    """How a detector was trained (saved in ``detector.json``; seeds make the run replayable)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int
    training_data: str = ""
    command: str = ""  # the command line that trained it (``medseg train-detector ...``)
    cases: int = 0
    lesions: int = 0
    iterations: int = 0
    seconds: float = 0.0
    loss_history: tuple[float, ...] = ()  # mean loss per epoch
    parameters: int = 0
    preprocessing_model: str | None = None  # the ModelSpec whose to_model made the training cases
    preprocessing: PreprocessingSpec | None = None
    weights_sha256: str = ""


@dataclass(frozen=True)
class TrainedDetector:
    """A detector (eval mode) with its spec and provenance."""

    detector: RetinaNetDetector
    spec: DetectionSpec
    provenance: DetectorProvenance

    def __repr__(self) -> str:
        p = self.provenance
        return (
            f"TrainedDetector({p.parameters} parameters, {p.iterations} iterations on {p.cases} cases, "
            f"seed {p.seed}, final loss {p.loss_history[-1] if p.loss_history else float('nan'):.3f})"
        )

    def check_fits(self, model_spec: ModelSpec) -> None:
        """Refuse to pair this detector with a segmentation model whose inputs differ from its training
        cases' (grid, intensities, channel count) or that has no such focal label to guide it."""
        recorded = self.provenance.preprocessing
        if recorded is not None and recorded != model_spec.preprocessing:
            raise DetectionError(
                f"detector was trained on inputs of model {self.provenance.preprocessing_model} "
                f"({recorded}), not of model {model_spec.name} ({model_spec.preprocessing}); "
                "feed it to_model() output made with that spec"
            )
        if self.spec.image_channels != model_spec.preprocessing.input_channels:
            raise DetectionError(
                f"detector reads {self.spec.image_channels} image channels, model {model_spec.name} makes "
                f"{model_spec.preprocessing.input_channels}"
            )
        guide = self.spec.guide_label
        if guide is not None and guide not in model_spec.focal_labels:
            raise DetectionError(
                f"detector is guided by label {guide}, which is not a focal label of model "
                f"{model_spec.name} (focal: {list(model_spec.focal_labels) or 'none'})"
            )


def train_detector(
    cases: Sequence[DetectionCase],
    spec: DetectionSpec,
    seed: int,
    progress: ProgressCallback | None = None,
    *,
    model_spec: ModelSpec | None = None,
    training_data: str = "",
    command: str = "",
) -> TrainedDetector:
    """Train a fresh detector on random patches of ``cases`` (AdamW, cosine schedule).

    ``seed`` fixes the initial weights, the patch positions, flips and noise; ``model_spec`` (the spec whose
    ``to_model`` made the cases) is recorded so inference can check it gets the same preprocessing.
    """
    if not cases:
        raise DetectionError("no training cases; load some with load_detection_cases(dataset, spec, 'train')")
    for case in cases:
        if case.image.shape[0] != spec.input_channels:
            raise DetectionError(
                f"case {case.case_id}: {case.image.shape[0]} input channels, the detector spec reads "
                f"{spec.input_channels} (DetectionSpec.input_channels)"
            )
    torch.manual_seed(seed)
    detector = build_detector(spec)
    optimizer = torch.optim.AdamW(
        detector.network.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    total = spec.epochs * spec.iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    rng = np.random.default_rng(seed)
    noise = torch.Generator().manual_seed(seed)
    history: list[float] = []
    started = time.perf_counter()
    for epoch in range(spec.epochs):
        losses = []
        for i in range(spec.iterations_per_epoch):
            images, targets = _batch(cases, spec, rng, noise, detector)
            losses.append(detection_train_step(detector, images, targets, optimizer))
            scheduler.step()
            if progress is not None:
                done = epoch * spec.iterations_per_epoch + i + 1
                progress(done, total, f"epoch {epoch + 1}/{spec.epochs} loss {np.mean(losses):.3f}")
        history.append(float(np.mean(losses)))
        log.info("detector epoch %d/%d: loss %.4f", epoch + 1, spec.epochs, history[-1])
    detector.eval()
    provenance = DetectorProvenance(
        seed=seed,
        training_data=training_data,
        command=command,
        cases=len(cases),
        lesions=sum(len(c.boxes) for c in cases),
        iterations=total,
        seconds=round(time.perf_counter() - started, 1),
        loss_history=tuple(round(v, 5) for v in history),
        parameters=parameter_count(detector),
        preprocessing_model=model_spec.name if model_spec else None,
        preprocessing=model_spec.preprocessing if model_spec else None,
    )
    return TrainedDetector(detector=detector, spec=spec, provenance=provenance)


def _batch(
    cases: Sequence[DetectionCase],
    spec: DetectionSpec,
    rng: np.random.Generator,
    noise: torch.Generator,
    detector: RetinaNetDetector,
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    images, targets = [], []
    for _ in range(spec.batch_size):
        image, boxes = _sample_patch(cases[int(rng.integers(len(cases)))], spec, rng, noise)
        images.append(image)
        targets.append(
            {
                detector.target_box_key: boxes,
                detector.target_label_key: torch.zeros(len(boxes), dtype=torch.long),
            }
        )
    return torch.stack(images), targets


# ------------------------------------------------------------------------------------------ save / load


def _weights_bytes(detector: RetinaNetDetector) -> bytes:
    buffer = io.BytesIO()
    torch.save(detector.network.state_dict(), buffer)
    return buffer.getvalue()


def save_detector(folder: Path | str, trained: TrainedDetector) -> TrainedDetector:
    """Write ``detector.pt`` and ``detector.json`` into ``folder``; returns it with the weights' SHA-256."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = _weights_bytes(trained.detector)
    provenance = trained.provenance.model_copy(update={"weights_sha256": hashlib.sha256(data).hexdigest()})
    (folder / WEIGHTS_FILE).write_bytes(data)
    record = {"spec": trained.spec.model_dump(mode="json"), "provenance": provenance.model_dump(mode="json")}
    (folder / SPEC_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return TrainedDetector(detector=trained.detector, spec=trained.spec, provenance=provenance)


def load_detector(folder: Path | str) -> TrainedDetector:
    """Read a folder written by ``save_detector``; checks the weights are the ones the record names."""
    folder = Path(folder)
    try:
        record = json.loads((folder / SPEC_FILE).read_text())
        data = (folder / WEIGHTS_FILE).read_bytes()
    except (OSError, json.JSONDecodeError) as err:
        raise DetectionError(
            f"detector folder {folder}: cannot read {SPEC_FILE} and {WEIGHTS_FILE} ({err}); "
            "train one with train_detector and save_detector"
        ) from err
    try:
        spec = DetectionSpec.model_validate(record["spec"])
        provenance = DetectorProvenance.model_validate(record["provenance"])
    except (KeyError, TypeError, ValidationError) as err:
        raise DetectionError(f"detector folder {folder}: {SPEC_FILE} is invalid: {err}") from err
    sha = hashlib.sha256(data).hexdigest()
    if provenance.weights_sha256 and sha != provenance.weights_sha256:
        raise DetectionError(
            f"detector folder {folder}: {WEIGHTS_FILE} has SHA-256 {sha[:12]}..., {SPEC_FILE} says "
            f"{provenance.weights_sha256[:12]}...; the weights changed without a training record"
        )
    detector = build_detector(spec)
    try:
        detector.network.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    except RuntimeError as err:
        raise DetectionError(
            f"detector folder {folder}: weights do not fit the spec's network: {err}"
        ) from err
    return TrainedDetector(detector=detector.eval(), spec=spec, provenance=provenance)


# ------------------------------------------------------------------------------------------ inference


def dropout_masks(channels: int, levels: int, samples: int, p: float, seed: int) -> list[torch.Tensor]:
    """Per pyramid level a (samples, channels) inverted-dropout mask; all ones for a single sample."""
    if samples == 1 or p == 0:
        return [torch.ones(samples, channels) for _ in range(levels)]
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(samples, channels, generator=generator) >= p).float() / (1.0 - p) for _ in range(levels)
    ]


@contextmanager
def _sampling(features: PyramidFeatures, masks: list[torch.Tensor]) -> Iterator[None]:
    features.masks = masks
    try:
        yield
    finally:
        features.masks = None


def _windows(
    size: Sequence[int], patch: Sequence[int], overlap: float
) -> list[tuple[FloatArray, FloatArray, FloatArray]]:
    """Window starts over a (padded) volume, each with its core: the part of the volume it reports for.

    Cores tile the volume without overlap (boundaries at the middle of each overlap), so a lesion seen by
    two windows is reported by exactly one, by the window that sees it whole if it is at most half the
    overlap across.
    """
    axes = []
    for n, p in zip(size, patch, strict=True):
        step = max(1, int(p * (1 - overlap)))
        count = math.ceil((n - p) / step) + 1 if n > p else 1
        starts = [round(i * (n - p) / (count - 1)) for i in range(count)] if count > 1 else [0]
        bounds = [-math.inf] + [(starts[i] + starts[i - 1] + p) / 2 for i in range(1, count)] + [math.inf]
        axes.append([(s, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)])
    out = []
    for combo in itertools.product(*axes):
        out.append(
            (
                np.array([c[0] for c in combo], dtype=np.float64),
                np.array([c[1] for c in combo], dtype=np.float64),
                np.array([c[2] for c in combo], dtype=np.float64),
            )
        )
    return out


def detect(
    detector: RetinaNetDetector, model_input: ModelInput, spec: DetectionSpec, samples: int, seed: int
) -> tuple[LesionFinding, ...]:
    """Monte-Carlo lesion findings in LPS mm for one volume on the model grid.

    Windows of ``spec.inference_window`` (the whole volume up to ``max_window``) slide over it; per
    window the trunk runs once and all ``samples`` dropout masks (seeded by ``seed``, shared by every
    window) run as one batch through the heads. Each sample's boxes are kept where their centre lies in
    the window's core, then the boxes of all samples are clustered (``cluster_detections``).
    Deterministic for a given seed. The spec's box-selection settings (score and NMS thresholds) are
    applied to ``detector`` first.
    """
    if samples < 1:
        raise DetectionError(f"samples must be >= 1, got {samples}; use 1 for a single deterministic pass")
    image, grid = model_input.image, model_input.grid
    if image.ndim != 4 or image.shape[0] != spec.input_channels:
        raise DetectionError(
            f"model input image must be ({spec.input_channels}, X, Y, Z), got {tuple(image.shape)}; "
            "make it with to_model() of the spec the detector was trained on"
        )
    spacing = np.asarray(grid.spacing_mm)
    if np.any(np.abs(spacing / np.asarray(spec.spacing_mm) - 1) > 0.1):
        raise DetectionError(
            f"model grid spacing {tuple(round(float(s), 2) for s in spacing)} mm differs from the detector's "
            f"{spec.spacing_mm} mm; preprocess with a model spec of that spacing"
        )
    features = _features(detector)
    detector.eval()
    _set_box_selection(detector, spec)
    masks = dropout_masks(features.out_channels, features.levels, samples, spec.dropout, seed)
    volume = np.asarray(image.shape[1:], dtype=np.float64)
    patch = spec.inference_window(image.shape[1:])
    padded = _pad_to(image.float(), patch)
    gated = spec.guide_label is not None and spec.min_guide_probability > 0
    guide = image[-1].float().cpu().numpy() if gated else None  # once, not per sample
    found: list[list[tuple[FloatArray, FloatArray]]] = [[] for _ in range(samples)]
    with torch.inference_mode(), _sampling(features, masks):
        for start, core_lo, core_hi in _windows(padded.shape[1:], patch, spec.window_overlap):
            x0, y0, z0 = (int(v) for v in start)
            window = padded[None, :, x0 : x0 + patch[0], y0 : y0 + patch[1], z0 : z0 + patch[2]]
            results = detector(window.expand(samples, -1, -1, -1, -1), use_inferer=False)
            assert isinstance(results, list)
            for s, result in enumerate(results):
                boxes = result[detector.target_box_key].double().numpy() + np.concatenate([start, start])
                scores = result[detector.pred_score_key].double().numpy()
                centres = (boxes[:, :3] + boxes[:, 3:]) / 2
                keep = np.all((centres >= core_lo) & (centres < core_hi) & (centres < volume - 0.5), axis=1)
                found[s].append((boxes[keep], scores[keep]))
    all_boxes, all_scores, sample_index = [], [], []
    for s, parts in enumerate(found):
        boxes = np.concatenate([b for b, _ in parts]) if parts else np.zeros((0, 6))
        scores = np.concatenate([c for _, c in parts]) if parts else np.zeros(0)
        top = np.argsort(-scores, kind="stable")[: spec.max_detections]
        boxes, scores = boxes[top], scores[top]
        boxes[:, :3] = np.clip(boxes[:, :3], -0.5, volume - 0.5)
        boxes[:, 3:] = np.clip(boxes[:, 3:], boxes[:, :3], volume - 0.5)
        if guide is not None:
            supported = guide_support(guide, boxes) >= spec.min_guide_probability
            boxes, scores = boxes[supported], scores[supported]
        all_boxes.append(boxes)
        all_scores.append(scores)
        sample_index.append(np.full(len(boxes), s))
    clustered = cluster_detections(
        np.concatenate(all_boxes),
        np.concatenate(all_scores),
        np.concatenate(sample_index),
        samples,
        grid.affine,
        spec,
    )
    findings = tuple(
        replace(f, index=n)
        for n, f in enumerate((f for f in clustered if f.score >= spec.report_score), start=1)
    )
    log.info("detect: %d findings from %d samples (seed %d)", len(findings), samples, seed)
    return findings


def guide_support(guide: npt.ArrayLike, boxes: FloatArray) -> FloatArray:
    """Per voxel box (N, 6), the guide's highest value at the voxel centres inside it (the voxel nearest
    the box centre when none is): how strongly the segmentation points at what the detector boxed."""
    values = np.asarray(guide, dtype=np.float32)
    last = np.asarray(values.shape) - 1
    out = np.zeros(len(boxes))
    for n, box in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 6)):
        centre = np.clip(np.round((box[:3] + box[3:]) / 2), 0, last).astype(int)
        lo = np.minimum(np.clip(np.ceil(box[:3]), 0, last).astype(int), centre)
        hi = np.maximum(np.clip(np.floor(box[3:]), 0, last).astype(int), centre)
        out[n] = values[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1].max()
    return out


def _overlap_of_smaller(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Share of the smaller of two boxes (min xyz, max xyz) that lies inside the other."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    inside = np.prod(np.clip(np.minimum(a[3:], b[3:]) - np.maximum(a[:3], b[:3]), 0, None))
    smaller = min(np.prod(a[3:] - a[:3]), np.prod(b[3:] - b[:3]))
    return float(inside / smaller) if smaller > 0 else 0.0


def cluster_detections(
    boxes: npt.ArrayLike,
    scores: npt.ArrayLike,
    sample_index: npt.ArrayLike,
    samples: int,
    affine: FloatArray,
    spec: DetectionSpec,
) -> tuple[LesionFinding, ...]:
    """Merge the boxes of all Monte-Carlo samples into findings, best score first.

    Greedy, in descending score: a box joins the first (highest-scoring) cluster whose leading box it
    overlaps with IoU >= ``spec.cluster_iou`` or whose centre lies within ``spec.cluster_distance_mm``,
    unless that cluster already holds a box of the same sample; otherwise it starts a cluster.
    A sample that did not find a cluster counts as score 0 there (the detector scored it below
    ``score_threshold``), so ``score`` is the mean over all samples and ``score_spread`` the standard
    deviation (population) over all samples: both fall when samples disagree. ``box_spread_mm`` is the mean
    over the six LPS corner coordinates of their standard deviation over the samples that found it.
    Clusters found by fewer than ``spec.min_detection_rate`` of the samples are dropped, and so is a
    cluster whose centre lies inside the box of a better-scoring finding, or whose box shares
    ``spec.duplicate_overlap`` of the smaller box with it: the same lesion, boxed twice by a sample with
    boxes that overlap too little for its NMS (a radiologist would see one lesion twice).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    sc = np.asarray(scores, dtype=np.float64).reshape(-1)
    si = np.asarray(sample_index, dtype=np.int64).reshape(-1)
    if not len(b) == len(sc) == len(si):
        raise DetectionError(f"{len(b)} boxes, {len(sc)} scores and {len(si)} sample indices must match")
    if len(si) and (si.min() < 0 or si.max() >= samples):
        raise DetectionError(f"sample indices {si.min()}..{si.max()} lie outside 0..{samples - 1}")
    if len(b) == 0:
        return ()
    lo_lps, hi_lps = boxes_voxel_to_lps(b, affine)
    centres = (lo_lps + hi_lps) / 2
    iou = np.asarray(box_iou(torch.as_tensor(b), torch.as_tensor(b)))
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=2)
    close = (iou >= spec.cluster_iou) | (distance <= spec.cluster_distance_mm)
    clusters: list[list[int]] = []
    for i in np.argsort(-sc, kind="stable"):
        for members in clusters:
            if close[members[0], i] and si[i] not in {si[m] for m in members}:
                members.append(int(i))
                break
        else:
            clusters.append([int(i)])
    findings = []
    for members in clusters:
        rate = len(members) / samples
        if rate < spec.min_detection_rate:
            continue
        per_sample = np.zeros(samples)
        per_sample[si[members]] = sc[members]
        corners = np.concatenate([lo_lps[members], hi_lps[members]], axis=1)
        lo, hi = corners[:, :3].mean(axis=0), corners[:, 3:].mean(axis=0)
        score, spread = float(np.clip(per_sample.mean(), 0, 1)), float(per_sample.std())
        findings.append(
            LesionFinding(
                index=0,
                centre_lps=_triple((lo + hi) / 2),
                box_min_lps=_triple(lo),
                box_max_lps=_triple(hi),
                score=score,
                score_spread=spread,
                detection_rate=rate,
                box_spread_mm=float(corners.std(axis=0).mean()),
                needs_review=rate < spec.review_detection_rate or spread > spec.review_score_spread,
            )
        )
    findings.sort(key=lambda f: -f.score)
    kept: list[LesionFinding] = []
    for finding in findings:
        centre, box = np.asarray(finding.centre_lps), (*finding.box_min_lps, *finding.box_max_lps)
        if not any(
            np.all((centre >= k.box_min_lps) & (centre <= k.box_max_lps))
            or _overlap_of_smaller(box, (*k.box_min_lps, *k.box_max_lps)) >= spec.duplicate_overlap
            for k in kept
        ):
            kept.append(finding)
    return tuple(replace(f, index=n) for n, f in enumerate(kept, start=1))


def _triple(v: FloatArray) -> tuple[float, float, float]:
    return (float(v[0]), float(v[1]), float(v[2]))
