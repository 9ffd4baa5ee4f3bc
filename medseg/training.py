"""Training: a dataset manifest + a spec -> a model folder (best and last checkpoints, resumable).

Cases are read once with dicom_io and brought onto the model grid with the same ``medseg.preprocess``
functions inference uses. Patches are drawn with MONAI transforms (foreground-weighted crops, small
affine jitter, Gaussian noise and intensity drift as scanners differ), the loss is Dice + cross-entropy
(focal optional) and the learning rate follows a cosine schedule. ``train_step`` is a plain function: the
federated client calls the same one.
"""

from __future__ import annotations

import json
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceFocalLoss
from monai.transforms import (
    Compose,
    MapTransform,
    RandAffined,
    RandCropByLabelClassesd,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)
from torch import nn

from dicom_io.reader import read_volume
from dicom_io.volume import ImageVolume, Modality
from medseg.detection import DetectionSpec, load_detection_cases, train_detector
from medseg.evaluation import dice_per_class
from medseg.inference import mean_probabilities
from medseg.model import Model, ModelProvenance, load_model, save_model
from medseg.model_spec import IntensityKind, ModelSpec, TrainingSpec
from medseg.networks import SegmentationNet
from medseg.preprocess import ModelInput, align_to_volume, labels_to_model, to_model
from medseg.synth.dataset import CaseEntry, Split, SynthDataset, load_dataset, load_label_map
from medseg.training_range import ScanSpacing, StructureIntensity, TrainingRange, structure_intensities

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]  # (iterations done, total, status line)
CHECKPOINT = "checkpoints/last.pt"


@dataclass(frozen=True)
class TrainingCase:
    """One case on the model grid: normalized image and labels, each (1, X, Y, Z), with each structure's
    intensity measured on the source grid and the scan's spacing (what the model's training range is
    made of)."""

    case_id: str
    site: str
    image: torch.Tensor
    labels: torch.Tensor
    intensities: dict[str, StructureIntensity]
    spacing: ScanSpacing


def read_labelled_case(
    dataset: SynthDataset, entry: CaseEntry
) -> tuple[ImageVolume, npt.NDArray[np.integer]]:
    """A dataset case's volume (read by dicom_io) and its label map on the volume's grid."""
    volume = read_volume(dataset.image_dir(entry))
    stored, label_affine = load_label_map(dataset.label_map(entry))
    return volume, align_to_volume(stored, label_affine, volume, what=f"case {entry.case_id}")


def load_cases(
    dataset: SynthDataset, spec: ModelSpec, split: Split, *, sites: Sequence[str] = ()
) -> list[TrainingCase]:
    """Read the cases of one split (optionally only some sites) onto the model grid."""
    cases = []
    for entry in dataset.split_entries(split, sites):
        volume, labels = read_labelled_case(dataset, entry)
        model_input = to_model(volume, spec)
        cases.append(
            TrainingCase(
                entry.case_id,
                entry.site,
                model_input.image,
                labels_to_model(labels, model_input.grid),
                structure_intensities(volume, labels, spec),
                ScanSpacing.of(volume),
            )
        )
    return cases


def _training_data(dataset: SynthDataset, sites: Sequence[str]) -> str:
    """How provenance names a dataset a model learnt from."""
    return f"{dataset.manifest_path} (seed {dataset.manifest.seed}, sites {', '.join(sites) or 'all'})"


def record_training_range(
    model: Model,
    dataset_path: Path | str,
    output: Path,
    *,
    sites: Sequence[str] = (),
    command: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> Model:
    """Save ``model`` to ``output`` with the training range of a dataset's train split (for a model
    trained before ``train`` recorded one; the weights and the Device UID stay the same)."""
    if output.resolve() == model.folder.resolve():
        raise ValueError(f"output {output} is the model's own folder; write the new model elsewhere")
    dataset = load_dataset(dataset_path)
    entries = dataset.split_entries(Split.TRAIN, sites)
    intensities, spacings = [], []
    for i, entry in enumerate(entries):
        volume, labels = read_labelled_case(dataset, entry)
        intensities.append(structure_intensities(volume, labels, model.spec))
        spacings.append(ScanSpacing.of(volume))
        if progress:
            progress(i + 1, len(entries))
    found = TrainingRange.of(
        intensities,
        spacings=spacings,
        training_data=f"train split of {_training_data(dataset, sites)}",
        command=command,
    )
    return save_model(output, model.spec, model.network, model.provenance, model.detector, found)


class RandShortScand(Randomizable, MapTransform):
    """Keep a random slab of the patch along z and make the rest air with background labels.

    A short series (a few centimetres of abdomen) reaches the network padded with air above and below
    (``preprocess.pad_to_roi``); patches cut from whole abdomens never show organs ending at such a wall,
    and a model trained only on them loses most of the liver there. MONAI's coarse dropout fills holes in
    the image only, so the label side is done here.
    """

    def __init__(self, image_key: str, label_key: str, *, prob: float, min_fraction: float) -> None:
        MapTransform.__init__(self, (image_key, label_key))
        self.image_key, self.label_key = image_key, label_key
        self.prob, self.min_fraction = prob, min_fraction
        self._slab: tuple[int, int] | None = None

    def randomize(self, depth: int) -> None:
        self._slab = None
        if self.R.random_sample() >= self.prob:
            return
        length = int(self.R.randint(max(1, round(self.min_fraction * depth)), depth + 1))
        start = int(self.R.randint(0, depth - length + 1))
        self._slab = (start, start + length)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        image, label = out[self.image_key], out[self.label_key]
        self.randomize(int(image.shape[-1]))
        if self._slab is None:
            return out
        start, stop = self._slab
        air = image.amin(dim=tuple(range(1, image.ndim)), keepdim=True)  # each input channel's own
        image, label = image.clone(), label.clone()
        image[..., :start] = air
        image[..., stop:] = air
        label[..., :start] = 0
        label[..., stop:] = 0
        out[self.image_key], out[self.label_key] = image, label
        return out


class RandScannerHUd(Randomizable, MapTransform):
    """Scanner noise, calibration offset and gain in HU, applied through each CT window channel.

    A window channel ``x = 2 (HU - low) / (high - low) - 1`` is taken back to HU, changed to
    ``gain * HU + offset + noise`` and windowed again. Voxels a window clipped are left clipped (their HU
    is not known there: air in the soft-tissue window stays air). Noise added after normalization would
    reach the narrow window scaled down by the ratio of the window widths (3.5x for 1400 vs 400 HU).
    """

    def __init__(
        self,
        key: str,
        windows: Sequence[tuple[float, float]],
        *,
        prob: float,
        noise_hu: float,
        offset_hu: float,
        gain: float,
    ) -> None:
        MapTransform.__init__(self, (key,))
        self.key, self.windows, self.prob = key, tuple(windows), prob
        self.noise_hu, self.offset_hu, self.gain = noise_hu, offset_hu, gain
        self._change: tuple[float, float, float, int] | None = None

    def randomize(self, data: Any = None) -> None:
        self._change = None
        if self.R.random_sample() >= self.prob:
            return
        self._change = (
            float(self.R.uniform(0.0, self.noise_hu)),
            float(self.R.uniform(-self.offset_hu, self.offset_hu)),
            float(self.R.uniform(1.0 - self.gain, 1.0 + self.gain)),
            int(self.R.randint(0, 2**31 - 1)),
        )

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        image = torch.as_tensor(out[self.key])
        if image.shape[0] != len(self.windows):
            raise ValueError(f"{image.shape[0]} input channels but {len(self.windows)} CT windows")
        self.randomize()
        if self._change is None:
            return out
        sigma, offset, gain, seed = self._change
        noise = sigma * torch.randn(image.shape[1:], generator=torch.Generator().manual_seed(seed))
        channels = []
        for x, (low, high) in zip(image, self.windows, strict=True):
            width = high - low
            hu = low + (x + 1.0) * width / 2.0
            changed = (2.0 * (gain * hu + offset + noise - low) / width - 1.0).clamp(-1.0, 1.0)
            channels.append(torch.where(x.abs() < 1.0, changed.to(x.dtype), x))
        out[self.key] = torch.stack(channels)
        return out


def ct_windows(spec: ModelSpec) -> tuple[tuple[float, float], ...] | None:
    """(low, high) HU of each CT input channel when every one is a window, else None."""
    transforms = spec.preprocessing.intensity.get(Modality.CT, ())
    if not transforms or any(t.kind is not IntensityKind.WINDOW for t in transforms):
        return None
    return tuple(
        (float(t.low), float(t.high)) for t in transforms if t.low is not None and t.high is not None
    )


def crop_ratios(training: TrainingSpec, num_classes: int, focal_labels: Sequence[int]) -> list[float]:
    """How often a patch is centred on each class (background first), for ``RandCropByLabelClassesd``.

    Structures share ``foreground_ratio`` equally (small organs such as the kidneys and the aorta are
    otherwise almost never seen next to the lungs and the liver), unless ``focal_crop_share`` of it goes
    to the focal labels.
    """
    structures = list(range(1, num_classes))
    focal = [c for c in structures if c in focal_labels]
    share = training.foreground_ratio
    ratios = [1.0 - share] + [share / len(structures)] * len(structures)
    if focal and training.focal_crop_share is not None and len(focal) < len(structures):
        per_focal = share * training.focal_crop_share / len(focal)
        per_other = share * (1.0 - training.focal_crop_share) / (len(structures) - len(focal))
        ratios = [1.0 - share] + [per_focal if c in focal else per_other for c in structures]
    return ratios


def augmentation(
    training: TrainingSpec,
    num_classes: int,
    seed: int,
    focal_labels: Sequence[int] = (),
    windows: Sequence[tuple[float, float]] | None = None,
) -> Compose:
    """Class-balanced random patch (``crop_ratios``) + geometry jitter + scanner-like intensity changes.

    ``windows``: the (low, high) HU of each CT input channel (``ct_windows``), which the HU scanner
    changes need; they apply to every case, so they are for models trained on CT only."""
    scanner: list[Any] = []
    if training.ct_noise_hu or training.ct_offset_hu or training.ct_gain:
        if windows is None:
            raise ValueError(
                "ct_noise_hu, ct_offset_hu and ct_gain need a model whose CT channels are windows"
            )
        scanner = [
            RandScannerHUd(
                "image",
                windows,
                prob=0.5,
                noise_hu=training.ct_noise_hu,
                offset_hu=training.ct_offset_hu,
                gain=training.ct_gain,
            )
        ]
    transform = Compose(
        [
            SpatialPadd(
                keys=("image", "label"), spatial_size=training.patch_size, mode=("minimum", "constant")
            ),
            RandCropByLabelClassesd(
                keys=("image", "label"),
                label_key="label",
                spatial_size=training.patch_size,
                num_classes=num_classes,
                ratios=crop_ratios(training, num_classes, focal_labels),
                num_samples=1,
                warn=False,
            ),
            RandAffined(
                keys=("image", "label"),
                prob=0.3,
                rotate_range=(0.0, 0.0, 0.15),
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            *scanner,
            RandGaussianNoised(keys="image", prob=0.5, std=training.noise_std),
            RandShiftIntensityd(keys="image", prob=0.5, offsets=training.intensity_drift),
            RandScaleIntensityd(keys="image", prob=0.5, factors=training.intensity_drift),
            RandShortScand(
                "image",
                "label",
                prob=training.short_scan_probability,
                min_fraction=training.short_scan_min_fraction,
            ),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


def batches(
    cases: Sequence[TrainingCase],
    training: TrainingSpec,
    num_classes: int,
    seed: int,
    focal_labels: Sequence[int] = (),
    windows: Sequence[tuple[float, float]] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (image, label) batches of random patches from random cases, each case drawn with its
    site's ``site_weights`` (uniformly, with the draws of earlier versions, when no site here is weighted)."""
    # a spec outlives its dataset (a hospital fine-tuning the shipped config on its own sites, one
    # federated site's cases): a weighted site with no case here is said, not an error
    unknown = sorted(set(training.site_weights) - {case.site for case in cases})
    if unknown:
        log.warning("training.site_weights: no training case from site %s; ignored", ", ".join(unknown))
    rng = random.Random(seed)
    weights = [training.site_weights.get(case.site, 1.0) for case in cases]
    weighted = any(case.site in training.site_weights for case in cases)
    transform = augmentation(training, num_classes, seed, focal_labels, windows)
    while True:
        images, labels = [], []
        for _ in range(training.batch_size):
            case = rng.choices(cases, weights)[0] if weighted else cases[rng.randrange(len(cases))]
            patch = transform({"image": case.image, "label": case.labels})[0]
            images.append(torch.as_tensor(patch["image"]))
            labels.append(torch.as_tensor(patch["label"]))
        yield torch.stack(images).float(), torch.stack(labels).long()


def make_loss(training: TrainingSpec, num_classes: int, focal_labels: Sequence[int] = ()) -> nn.Module:
    """Dice + cross-entropy (or focal), focal labels weighted by ``focal_class_weight`` in both terms."""
    weight = torch.ones(num_classes)
    weight[list(focal_labels)] = training.focal_class_weight
    if training.loss == "dice_focal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True, batch=training.dice_over_batch, weight=weight)
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=training.dice_over_batch, weight=weight)


def train_step(
    network: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
) -> float:
    """One optimisation step on one batch; returns the loss. Shared with the federated client."""
    network.train()
    images, labels = batch[0].to(device), batch[1].to(device)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(network(images), labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@dataclass(frozen=True)
class ValidationScore:
    """Validation Dice on the model grid: the mean over cases of each case's mean foreground Dice (what
    selects the best checkpoint), and the mean per structure name (NaN where no case has it), so that a
    channel that never learned (a dead lesion channel) shows instead of hiding in the mean."""

    mean: float
    per_structure: dict[str, float]


@torch.inference_mode()
def evaluate(
    network: SegmentationNet, cases: Sequence[TrainingCase], spec: ModelSpec, device: torch.device
) -> ValidationScore:
    """Dice of a deterministic sliding-window pass over each validation case (validation each epoch)."""
    network.eval()
    per_case = []
    for case in cases:
        logits = sliding_window_inference(
            case.image[None].to(device), spec.inference.roi_size, 1, network, overlap=spec.inference.overlap
        )
        assert isinstance(logits, torch.Tensor)
        per_case.append(dice_per_class(logits.argmax(1).cpu(), case.labels[0][None], spec.num_classes))
    scores = np.array(per_case, dtype=float)  # (cases, structures)
    with warnings.catch_warnings():  # a structure no validation case has is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        by_structure = np.nanmean(scores, axis=0)
    return ValidationScore(
        mean=float(np.mean(np.nanmean(scores, axis=1))),
        per_structure={label.name: float(by_structure[label.value - 1]) for label in spec.labels},
    )


def initial_weights(network: SegmentationNet, spec: ModelSpec, init: Model) -> dict[str, torch.Tensor]:
    """``init``'s weights for ``network``, widened when ``spec`` adds input channels after ``init``'s own.

    A model that reads one CT window can start a model that reads that window plus others: the input
    layer's weights for the new channels start at zero, so training starts from exactly ``init``'s
    predictions and the new channels only count once they help.
    """
    old = init.spec.preprocessing.intensity
    new = spec.preprocessing.intensity
    old_n, new_n = init.spec.preprocessing.input_channels, spec.preprocessing.input_channels
    source = init.network.state_dict()
    if old_n == new_n:
        return source
    if new_n < old_n or any(new.get(m, ())[:old_n] != channels for m, channels in old.items()):
        raise ValueError(
            f"--init {init.spec.name}: it reads input channels {_channel_names(old)}, the spec reads "
            f"{_channel_names(new)}; a model can only start one that keeps its channels first"
        )
    target = network.state_dict()
    widened = {}
    for key, value in source.items():
        wanted = target[key].shape
        if value.shape != wanted and value.ndim > 1 and value.shape[1] == old_n and wanted[1] == new_n:
            value = torch.cat([value, value.new_zeros(value.shape[0], new_n - old_n, *value.shape[2:])], 1)
        widened[key] = value
    return widened


def _channel_names(intensity: dict[Any, tuple[Any, ...]]) -> str:
    return "; ".join(
        f"{m}: "
        + ", ".join(f"{c.kind} {c.low:g}..{c.high:g}" if c.low is not None else str(c.kind) for c in t)
        for m, t in intensity.items()
    )


def freeze_encoder(network: SegmentationNet) -> int:
    """Freeze every trunk parameter whose module sits on the contracting path; returns how many were frozen.

    Fine-tuning with few labelled cases keeps the encoder and adapts decoder and head. For MONAI's UNet the
    encoder is the first half of the nested model; generically, the first half of the trunk's parameters
    in registration order (encoders are built first in all four supported networks).
    """
    params = list(network.trunk.parameters())
    frozen = params[: len(params) // 2]
    for p in frozen:
        p.requires_grad_(False)
    return len(frozen)


@dataclass(frozen=True)
class TrainingResult:
    model: Model
    best_dice: float
    epochs: int
    seconds: float
    history: tuple[dict[str, float], ...]


def train(
    spec: ModelSpec,
    dataset_path: Path | str,
    output: Path,
    *,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    seed: int = 0,
    init: str | Path | None = None,
    freeze: bool = False,
    resume: bool = False,
    sites: Sequence[str] = (),
    device: torch.device | None = None,
    command: str = "",
    progress: ProgressCallback | None = None,
) -> TrainingResult:
    """Train ``spec`` on a manifest's train split, validating on its val split after each epoch."""
    training = spec.training
    if epochs is not None or iterations_per_epoch is not None:
        training = training.model_copy(
            update={
                "epochs": epochs or training.epochs,
                "iterations_per_epoch": iterations_per_epoch or training.iterations_per_epoch,
            }
        )
    spec = spec.model_copy(update={"training": training})
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    dataset = load_dataset(dataset_path)
    checkpoint_path = output / CHECKPOINT
    if resume and not checkpoint_path.exists():
        raise FileNotFoundError(f"{checkpoint_path}: no checkpoint to resume from")
    # the start weights before the cases: a wrong --init fails in seconds, not after minutes of loading
    network = SegmentationNet(spec)
    start = load_model(init) if init is not None else None
    if start is not None:
        network.load_state_dict(initial_weights(network, spec, start))
    if freeze:
        log.info("froze %d encoder parameter tensors", freeze_encoder(network))
    train_cases = load_cases(dataset, spec, Split.TRAIN, sites=sites)
    val_cases = load_cases(dataset, spec, Split.VAL, sites=sites)
    log.info("training on %d cases, validating on %d", len(train_cases), len(val_cases))
    network.to(device)
    optimizer = torch.optim.AdamW(
        [p for p in network.parameters() if p.requires_grad],
        lr=training.learning_rate,
        weight_decay=training.weight_decay,
    )
    total = training.epochs * training.iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    loss_fn = make_loss(training, spec.num_classes, spec.focal_labels).to(device)
    start_epoch, best, history = 0, -1.0, []
    if resume:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        log.info("resumed from %s at epoch %d", checkpoint_path, start_epoch)

    provenance = ModelProvenance(
        source="trained",
        training_data=_training_data(dataset, sites),
        seed=seed,
        command=command,
        weights_sha256="",
        init_from=str(init) if init else None,
    )
    training_range = TrainingRange.of(
        [case.intensities for case in train_cases],
        spacings=[case.spacing for case in train_cases],
        training_data=f"train split of {provenance.training_data}",
        command=command,
    )
    if start is not None and start.training_range is not None:  # fine-tuned: it has seen both
        training_range = start.training_range.merged(training_range)
    batch_iter = batches(
        train_cases, training, spec.num_classes, seed + start_epoch, spec.focal_labels, ct_windows(spec)
    )
    started = time.perf_counter()
    model: Model | None = None
    for epoch in range(start_epoch, training.epochs):
        losses = []
        for i in range(training.iterations_per_epoch):
            losses.append(train_step(network, next(batch_iter), optimizer, loss_fn, device))
            scheduler.step()
            if progress:
                done = epoch * training.iterations_per_epoch + i + 1
                progress(
                    done,
                    total,
                    f"epoch {epoch + 1}/{training.epochs} loss {np.mean(losses):.3f} best {best:.3f}",
                )
        score = evaluate(network, val_cases, spec, device)
        dice = score.mean
        history.append(
            {
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)),
                "val_dice": dice,
                **{f"val_dice {name}": value for name, value in score.per_structure.items()},
            }
        )
        log.info(
            "epoch %d: loss %.4f, validation Dice %.4f (%s)",
            epoch + 1,
            np.mean(losses),
            dice,
            ", ".join(f"{name} {value:.3f}" for name, value in score.per_structure.items()),
        )
        if dice > best:
            best = dice
            model = save_model(
                output,
                spec,
                network,
                ModelProvenance(**{**asdict(provenance), "epochs": epoch + 1, "metrics": {"val_dice": dice}}),
                training_range=training_range,
            )
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "network": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "best": best,
                "history": history,
                "seed": seed,
            },
            checkpoint_path,
        )
        (output / "training_log.json").write_text(json.dumps(history, indent=1) + "\n")
    if model is None:
        model = load_model(output)
    return TrainingResult(
        model=model,
        best_dice=best,
        epochs=training.epochs,
        seconds=time.perf_counter() - started,
        history=tuple(history),
    )


def train_lesion_detector(
    model: Model,
    dataset_path: Path | str,
    output: Path,
    *,
    epochs: int | None = None,
    iterations_per_epoch: int | None = None,
    seed: int = 0,
    sites: Sequence[str] = (),
    device: torch.device | None = None,
    command: str = "",
    progress: ProgressCallback | None = None,
) -> Model:
    """Train a RetinaNet lesion detector guided by ``model``'s focal label and save ``model`` with it.

    The detector reads the model's input channels plus the model's Monte-Carlo mean probability of its one
    focal label (``mean_probabilities``, exactly as ``infer`` makes them), on the train and val cases (no
    epoch is selected on val, so both can teach it). ``progress`` sees the cases loaded, then the steps.
    """
    if output.resolve() == model.folder.resolve():
        raise ValueError(
            f"output {output} is the model's own folder; write the model with its detector to another"
        )
    focal = model.spec.focal_labels
    if len(focal) != 1:
        raise ValueError(
            f"model {model.spec.name} has {len(focal)} focal labels ({list(focal)}); a lesion detector is "
            "guided by exactly one"
        )
    defaults = DetectionSpec()
    spec = DetectionSpec(
        input_channels=model.spec.preprocessing.input_channels + 1,
        guide_label=focal[0],
        spacing_mm=model.spec.preprocessing.spacing_mm,
        samples=model.spec.uncertainty.samples,
        seed=model.spec.uncertainty.seed,
        epochs=epochs or defaults.epochs,
        iterations_per_epoch=iterations_per_epoch or defaults.iterations_per_epoch,
    )
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = load_dataset(dataset_path)
    for split in (Split.TRAIN, Split.VAL):
        dataset.split_entries(split, sites)  # refuse a missing split before minutes of loading

    def guide(volume: ImageVolume, model_input: ModelInput) -> torch.Tensor:
        """As ``infer`` feeds the detector: the segmentation's probability, inside the body."""
        probabilities = mean_probabilities(
            model, volume, model_input, samples=spec.samples, seed=spec.seed, device=device
        )
        return probabilities[focal[0]]

    cases = [
        case
        for split in (Split.TRAIN, Split.VAL)
        for case in load_detection_cases(
            dataset,
            model.spec,
            split,
            sites=sites,
            guide=guide,
            progress=progress,
        )
    ]
    log.info(
        "training a lesion detector on %d cases (%d lesions)", len(cases), sum(len(c.boxes) for c in cases)
    )
    trained = train_detector(
        cases,
        spec,
        seed,
        progress,
        model_spec=model.spec,
        training_data=f"train and val of {_training_data(dataset, sites)}",
        command=command,
    )
    return save_model(output, model.spec, model.network, model.provenance, trained, model.training_range)
