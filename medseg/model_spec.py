"""Models as configuration: a YAML spec (``configs/models/*.yaml``) validated once into frozen objects.

A spec says which MONAI network to build and with which arguments, how to bring a volume onto the
network's grid (spacing, orientation, intensity transform per modality), how to tile it (ROI, overlap),
what each output channel means (label value, name, SNOMED CT codes, colour), how Monte-Carlo sampling is
done and when a structure needs review. Hyperparameters are fields, never subclasses; the network is
chosen from a closed list, never looked up by a class name from the file (STYLE.md 8).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.sr.coding import Code

from dicom_io.volume import Modality

MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"

Positive = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]


class ModelSpecError(ValueError):
    """A model spec is missing or invalid (the message names the file, the field and the bad value)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Architecture(StrEnum):
    """The MONAI networks a spec may name (``monai.networks.nets``)."""

    UNET = "unet"
    SEGRESNET = "segresnet"
    DYNUNET = "dynunet"
    SWINUNETR = "swinunetr"
    BUNDLE = "bundle"  # an imported MONAI bundle's own network (medseg.bundle), logits out, no extra head


class NetworkSpec(_Frozen):
    """The trunk network and its constructor arguments, plus the width of the features it hands the head.

    The trunk is built with ``out_channels = features``; a small head (activation, dropout, 1x1x1
    convolution to one channel per class) turns features into logits. Keeping dropout in the head lets
    Monte-Carlo sampling run the trunk once per window (see ``UncertaintySpec.stochastic``).
    """

    architecture: Architecture
    arguments: dict[str, Any] = Field(default_factory=dict)
    features: int = Field(default=16, ge=1, le=512)
    bundle_network: dict[str, Any] | None = (
        None  # ``network_def`` of an imported bundle (architecture bundle)
    )

    @model_validator(mode="after")
    def _no_reserved_arguments(self) -> NetworkSpec:
        reserved = {"spatial_dims", "in_channels", "out_channels"} & set(self.arguments)
        if reserved and self.architecture is not Architecture.BUNDLE:
            raise ValueError(f"network.arguments must not set {sorted(reserved)}: the spec derives them")
        if (self.architecture is Architecture.BUNDLE) != (self.bundle_network is not None):
            raise ValueError(
                "bundle_network is set exactly when architecture is bundle (medseg import-bundle)"
            )
        return self


class IntensityKind(StrEnum):
    WINDOW = "window"  # clip to [low, high] then map to [-1, 1]: physical units (HU) are comparable
    PERCENTILE = "percentile"  # per-volume percentiles to [0, 1]: MR has no absolute scale
    ZSCORE = "zscore"  # per-volume mean/std over voxels above the 1st percentile


class IntensitySpec(_Frozen):
    """Network normalization for one modality (physical units come from dicom_io; this is the model's)."""

    kind: IntensityKind
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> IntensitySpec:
        if self.kind in (IntensityKind.WINDOW, IntensityKind.PERCENTILE):
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"{self.kind} needs low < high, got low={self.low} high={self.high}")
            if self.kind is IntensityKind.PERCENTILE and not (self.low >= 0 and self.high <= 100):
                raise ValueError(f"percentiles must lie in [0, 100], got {self.low}, {self.high}")
        return self


class Orientation(StrEnum):
    LPS = "LPS"  # axes permuted/flipped so that indices grow to patient left, posterior, superior
    SOURCE = "source"  # keep the source's slice/row/column axes


class PreprocessingSpec(_Frozen):
    """Grid and intensity transform. Each modality's transform is one or more input channels (e.g. a
    wide CT window for lung and bone beside a soft-tissue one, as radiologists read CT); a single
    mapping in YAML is one channel."""

    spacing_mm: tuple[Positive, Positive, Positive]
    orientation: Orientation = Orientation.LPS
    intensity: dict[Modality, tuple[IntensitySpec, ...]]
    # Gaussian-smooth each axis that shrinks before sampling it (``medseg.preprocess``); off for models
    # trained on point-sampled inputs (default_ct 1.5.0), whose validation was measured that way.
    smooth_before_shrinking: bool = False

    @field_validator("intensity", mode="before")
    @classmethod
    def _one_channel_as_list(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, dict) else v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _same_channels_per_modality(self) -> PreprocessingSpec:
        counts = {str(m): len(t) for m, t in self.intensity.items()}  # none at all: ModelSpec says so
        if counts and (min(counts.values()) < 1 or len(set(counts.values())) != 1):
            raise ValueError(f"every modality needs the same number (>= 1) of input channels, got {counts}")
        return self

    @property
    def input_channels(self) -> int:
        """Network input channels (the same for every modality)."""
        return len(next(iter(self.intensity.values()), (None,)))


class InferenceSpec(_Frozen):
    roi_size: tuple[int, int, int]
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.25
    sw_batch_size: int = Field(default=1, ge=1)
    # CT: voxels outside the patient's body get no label (``medseg.preprocess.body_mask``: tissue above
    # this HU, the table opened away, lungs and bowel gas filled). None: any voxel may be labelled.
    body_threshold_hu: float | None = Field(default=None, ge=-1000, le=0)

    @model_validator(mode="after")
    def _roi_divisible(self) -> InferenceSpec:
        if any(s < 16 or s % 16 for s in self.roi_size):
            raise ValueError(f"roi_size {self.roi_size}: every side must be a multiple of 16 (>= 16)")
        return self


class CodeSpec(_Frozen):
    """A coded concept (PS3.3 8.8): value, scheme designator and meaning, e.g. SNOMED CT ``SCT``."""

    value: str = Field(min_length=1)
    scheme: str = Field(min_length=1)
    meaning: str = Field(min_length=1)

    def code(self) -> Code:
        return Code(self.value, self.scheme, self.meaning)


class BorderIntensitySpec(_Frozen):
    """Where a class's border lies finer than the model grid can draw it, the voxel's own value decides.

    On the source grid, in the strip where this class and its rival both score at least ``band`` (the
    interpolation between model voxels either side of a border: about one model voxel wide), a voxel is
    this class when its value lies in [``min_hu``, ``max_hu``] and the rival when not. Bone is the case:
    a 3 mm grid cannot draw a rib's cortex, the CT value can (the masked threshold of 3D Slicer's
    Segment Editor). Deeper inside or outside the strip the network decides alone. The rival is
    background or one of the labels named in ``rivals``: against an organ that can be as bright (a
    kidney's cortex, the aorta in the arterial phase) HU proves nothing. CT only (values in HU), and
    only on a scan at least as fine as the model grid along every axis (not on 5 mm slices, which
    average bone with what lies above and below it).
    """

    min_hu: float | None = None
    max_hu: float | None = None
    band: Annotated[float, Field(gt=0, lt=0.5)] = 0.05
    rivals: tuple[str, ...] = ()  # label names, besides background

    @model_validator(mode="after")
    def _a_range(self) -> BorderIntensitySpec:
        if self.min_hu is None and self.max_hu is None:
            raise ValueError("border_intensity needs min_hu, max_hu or both")
        if self.min_hu is not None and self.max_hu is not None and not self.min_hu < self.max_hu:
            raise ValueError(f"border_intensity needs min_hu < max_hu, got {self.min_hu} and {self.max_hu}")
        return self


class LabelSpec(_Frozen):
    """One output class: its value in the label map and how it is coded in SEG and SR."""

    value: int = Field(ge=1, le=255)
    name: str = Field(min_length=1)
    category: CodeSpec
    type: CodeSpec
    anatomic_region: CodeSpec | None = None
    colour: tuple[int, int, int]
    focal: bool = False  # lesion-like: reported as findings (connected components) too
    # one connected organ: predicted parts apart from its largest go to the next most probable class
    single_component: bool = False
    # factor on this class's mean probability when the label map's argmax is taken (the probabilities,
    # entropy and MI reported stay the network's); fitted by ``medseg calibrate`` (medseg.calibration)
    decision_weight: Positive = 1.0
    border_intensity: BorderIntensitySpec | None = None  # CT: its border decided by HU where unsure


class Stochastic(StrEnum):
    HEAD = "head"  # dropout only in the head: the trunk runs once per window, samples share its features
    ALL = "all"  # every dropout layer of the trunk too: samples run the whole network (costs samples x)


class UncertaintySpec(_Frozen):
    samples: int = Field(default=10, ge=1, le=100)
    dropout: Probability = 0.2
    stochastic: Stochastic = Stochastic.HEAD
    seed: int = 0
    map_quantity: Literal["entropy", "mutual_information"] = "mutual_information"


class ReviewSpec(_Frozen):
    """A structure is flagged for review when any of these is passed (all measured on the source grid)."""

    max_mean_entropy: Positive = 0.25  # nats, inside the structure
    max_boundary_entropy: Positive = 0.6  # nats, on its one-voxel boundary shell
    max_mean_mutual_information: Positive = 0.05  # nats
    min_sample_agreement: Probability = 0.9  # mean pairwise Dice between Monte-Carlo samples
    max_volume_cv: Positive = 0.1  # volume spread / volume
    min_lesion_detection_rate: Probability = 0.7  # share of samples that found the lesion
    max_lesion_score_spread: Positive = 0.15  # standard deviation of its score over samples
    max_lesion_findings: int = Field(default=20, ge=1)  # highest scores reported; the rest counted in notes
    # outside the training data (``medseg.training_range``): how far a structure's median HU may leave the
    # training cases' range, and by what share of the highest training spread its spread may pass it
    training_range_margin_hu: float = Field(default=15.0, ge=0)
    training_range_margin_spread: float = Field(default=0.25, ge=0)
    # ... and by what share a scan's slice or pixel spacing may pass the coarsest training scan's
    training_range_margin_spacing: float = Field(default=0.25, ge=0)


class TrainingSpec(_Frozen):
    """Defaults for ``medseg train`` (each can be overridden on the command line and is recorded)."""

    epochs: int = Field(default=40, ge=1)
    iterations_per_epoch: int = Field(default=40, ge=1)
    batch_size: int = Field(default=2, ge=1)
    patch_size: tuple[int, int, int] = (96, 96, 96)
    learning_rate: Positive = 3e-3
    weight_decay: float = Field(default=1e-5, ge=0)
    loss: Literal["dice_ce", "dice_focal"] = "dice_ce"
    foreground_ratio: Probability = 0.9  # share of patches centred on a structure (split equally among them)
    noise_std: float = Field(default=0.03, ge=0)  # in normalized units
    intensity_drift: float = Field(default=0.05, ge=0)  # shift and scale, normalized units
    # CT scanners differ in physical units: noise (low-dose protocols reach 45 HU), calibration offset and
    # gain. Drawn in HU and applied to every window channel alike (the same noise field), so the narrow
    # soft-tissue window sees the noise a scanner gives it and not a fraction of it (0: off).
    ct_noise_hu: float = Field(default=0.0, ge=0)  # noise sigma drawn uniformly up to this
    ct_offset_hu: float = Field(default=0.0, ge=0)  # offset drawn uniformly in +-this
    ct_gain: float = Field(default=0.0, ge=0, lt=1)  # gain drawn uniformly in 1 +- this
    # share of patches cut to a short scan along z (air above and below, as inference pads a short series)
    short_scan_probability: Probability = 0.0
    short_scan_min_fraction: float = Field(default=0.15, gt=0, le=1)  # shortest kept slab / patch depth
    # Focal labels (lesions) are a few voxels on the model grid and absent from most patches: without help
    # their channel never learns. Share of the structure-centred patches centred on a focal label (split
    # equally among them; None: the same share as any structure), their weight in the loss (Dice and
    # cross-entropy, relative to 1 for every other class), and Dice over the whole batch rather than per
    # patch (so a patch without a lesion does not count as a perfect lesion score).
    focal_crop_share: Probability | None = None
    focal_class_weight: Positive = 1.0
    dice_over_batch: bool = False
    # How often each site's cases are drawn, relative to 1 for a site not named: a site whose scans are
    # the hardest (site c's unenhanced 5 mm series) or rarest gets more of the patches than its share
    site_weights: dict[str, Positive] = Field(default_factory=dict)


class ModelSpec(_Frozen):
    """Everything needed to build, feed and interpret a segmentation network (weights live beside it)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    version: str = Field(min_length=1)
    description: str = ""
    modalities: tuple[Modality, ...]
    network: NetworkSpec
    preprocessing: PreprocessingSpec
    inference: InferenceSpec
    labels: tuple[LabelSpec, ...]
    uncertainty: UncertaintySpec = UncertaintySpec()
    review: ReviewSpec = ReviewSpec()
    training: TrainingSpec = TrainingSpec()
    for_clinical_use: bool = False

    @property
    def single_component_labels(self) -> tuple[int, ...]:
        """Values of the labels whose label map keeps only the largest connected part."""
        return tuple(label.value for label in self.labels if label.single_component)

    @property
    def decision_weights(self) -> tuple[float, ...]:
        """Per output channel (background first, always 1) the factor applied before the argmax."""
        return (1.0, *(label.decision_weight for label in self.labels))

    def label_value(self, name: str) -> int:
        """The value of the label called ``name``."""
        for label in self.labels:
            if label.name == name:
                return label.value
        raise KeyError(f"no label {name!r} (labels: {', '.join(label.name for label in self.labels)})")

    @property
    def border_rules(self) -> dict[int, BorderIntensitySpec]:
        """Per label value, the rule that decides its border by HU (``medseg.inference``)."""
        return {label.value: label.border_intensity for label in self.labels if label.border_intensity}

    @property
    def focal_labels(self) -> tuple[int, ...]:
        """Values of the lesion-like labels (reported as findings too, weighted in training)."""
        return tuple(label.value for label in self.labels if label.focal)

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        values = [label.value for label in self.labels]
        if not values:
            raise ValueError("labels must list at least one structure")
        if values != list(range(1, len(values) + 1)):
            raise ValueError(f"label values must be 1..n in order (output channel = value), got {values}")
        if (
            self.network.architecture is Architecture.BUNDLE
            and self.uncertainty.stochastic is Stochastic.HEAD
        ):
            raise ValueError(
                "uncertainty.stochastic must be 'all' for an imported bundle: its network has no medseg head,"
                " Monte-Carlo samples come from its own dropout layers"
            )
        both = [label.name for label in self.labels if label.focal and label.single_component]
        if both:
            raise ValueError(f"labels {both} are focal (many findings) and single_component (one organ)")
        names = {label.name for label in self.labels}
        for label in self.labels:
            unknown = set(label.border_intensity.rivals if label.border_intensity else ()) - names
            if unknown:
                raise ValueError(
                    f"labels {label.name}: border_intensity.rivals {sorted(unknown)} are not labels"
                )
        if self.border_rules and Modality.CT not in self.modalities:
            raise ValueError("labels[].border_intensity is in HU: the spec's modalities must include CT")
        missing = set(self.modalities) - set(self.preprocessing.intensity)
        if missing:
            raise ValueError(f"preprocessing.intensity has no transform for modalities {sorted(missing)}")
        return self

    @property
    def num_classes(self) -> int:
        """Output channels including background."""
        return len(self.labels) + 1


def parse_spec(data: object, source: str) -> ModelSpec:
    """Validate a mapping into a ``ModelSpec``; errors name ``source`` and every bad field."""
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']} (got {e.get('input')!r})"[:300]
            for e in err.errors()
        )
        raise ModelSpecError(f"model spec {source}: {problems}") from err


def load_spec(path: Path | str) -> ModelSpec:
    """Read and validate one spec file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ModelSpecError(f"model spec {path}: file not found") from err
    except yaml.YAMLError as err:
        raise ModelSpecError(f"model spec {path}: not valid YAML ({err})") from err
    return parse_spec(data, str(path))


def save_spec(spec: ModelSpec, path: Path) -> None:
    """Write a spec back as YAML (saved next to every trained model and every output)."""
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
