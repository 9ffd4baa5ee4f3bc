"""A model is a spec, a weights file and provenance, kept together in one folder.

Folder layout (written by ``medseg train`` and ``medseg import-bundle``)::

    spec.yaml         the validated ModelSpec
    weights.pt        state dict of SegmentationNet
    provenance.json   training data, seed, command, metrics, weights SHA-256
    detector.pt/json  optional: a lesion detector (``medseg.detection``, ``medseg train-detector``) that
                      reports the focal findings instead of the segmentation's lesion channel
    training_range.json  optional: each structure's intensities and the scans' spacing over the
                      training cases (``medseg.training_range``), which inference flags a scan outside of

The Device UID (IHE AI Results) is derived from the weights' SHA-256, the spec's decision weights
(``medseg.calibration``) and the detector's weights, so it changes exactly when what the model outputs
changes: a retrained, recalibrated or federated model gets a new one without anyone remembering to bump it.
Shipped models live in ``medseg/shipped_models/<name>/``; any other folder can be given by path.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dicom_io.ai_result import AlgorithmIdentity
from dicom_io.image_writer import deterministic_uid
from medseg import __version__
from medseg.detection import SPEC_FILE as DETECTOR_FILE
from medseg.detection import DetectionError, TrainedDetector, load_detector, save_detector
from medseg.model_spec import ModelSpec, ModelSpecError, load_spec, save_spec
from medseg.networks import SegmentationNet
from medseg.training_range import RANGE_FILE, TrainingRange, TrainingRangeError, load_training_range

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped_models"
DEFAULT_MODEL = "default_ct"
SPEC_FILE, WEIGHTS_FILE, PROVENANCE_FILE = "spec.yaml", "weights.pt", "provenance.json"


@dataclass(frozen=True)
class ModelProvenance:
    """Where the weights came from; saved as JSON beside them and copied into every output."""

    source: str  # "trained" or "bundle:<folder>"
    training_data: str
    seed: int
    command: str
    weights_sha256: str
    medseg_version: str = __version__
    epochs: int = 0
    init_from: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    calibrated_by: str = ""  # the ``medseg calibrate`` command that fitted the decision weights, if any


@dataclass(frozen=True)
class Model:
    """A ready network (eval mode) with the spec that feeds it and its provenance."""

    spec: ModelSpec
    network: SegmentationNet
    provenance: ModelProvenance
    folder: Path
    detector: TrainedDetector | None = None
    training_range: TrainingRange | None = None

    @property
    def device_uid(self) -> str:
        """From the weights' SHA-256, the decision weights where any is not 1, the border rules where
        there are any and the detector's weights where there is one (a model without any of these keeps
        the UID it always had): whatever changes the label map for the same image changes the UID."""
        weights = self.spec.decision_weights
        parts = [self.provenance.weights_sha256]
        if any(w != 1.0 for w in weights):
            parts.append(f"decision weights {weights}")
        rules = self.spec.border_rules
        if rules:
            parts.append(f"border rules {[(v, r.model_dump_json()) for v, r in rules.items()]}")
        if self.detector is not None:
            parts.append(f"detector {self.detector.provenance.weights_sha256}")
        return deterministic_uid("medseg-model-weights", *parts)

    def algorithm_identity(self) -> AlgorithmIdentity:
        return AlgorithmIdentity(
            name=self.spec.name,
            version=self.spec.version,
            device_uid=self.device_uid,
            software_version=f"medseg {__version__}",
            for_clinical_use=self.spec.for_clinical_use,
        )

    def __repr__(self) -> str:
        detector = ", lesion detector" if self.detector is not None else ""
        return (
            f"Model({self.spec.name} {self.spec.version}, {self.spec.network.architecture}, "
            f"{self.spec.num_classes - 1} labels{detector}, device_uid={self.device_uid})"
        )


def weights_bytes(network: SegmentationNet) -> bytes:
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    return buffer.getvalue()


def save_model(
    folder: Path,
    spec: ModelSpec,
    network: SegmentationNet,
    provenance: ModelProvenance,
    detector: TrainedDetector | None = None,
    training_range: TrainingRange | None = None,
) -> Model:
    """Write spec, weights, provenance, and the detector and training range if given (the SHA-256s are
    recomputed from the bytes written)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = weights_bytes(network)
    sha = hashlib.sha256(data).hexdigest()
    provenance = ModelProvenance(**{**asdict(provenance), "weights_sha256": sha})
    save_spec(spec, folder / SPEC_FILE)
    (folder / WEIGHTS_FILE).write_bytes(data)
    (folder / PROVENANCE_FILE).write_text(json.dumps(asdict(provenance), indent=2) + "\n")
    if detector is not None:
        detector = save_detector(folder, detector)
    if training_range is not None:
        training_range.save(folder)
    else:  # a range left from an earlier model in this folder would describe other training data
        (folder / RANGE_FILE).unlink(missing_ok=True)
    return Model(
        spec=spec,
        network=network.eval(),
        provenance=provenance,
        folder=folder,
        detector=detector,
        training_range=training_range,
    )


def resolve_model_folder(name_or_path: str | Path) -> Path:
    """A shipped model's name, or a model folder's path."""
    candidate = Path(name_or_path)
    if candidate.is_dir():
        return candidate
    shipped = SHIPPED_DIR / str(name_or_path)
    if shipped.is_dir():
        return shipped
    available = sorted(p.name for p in SHIPPED_DIR.glob("*") if (p / SPEC_FILE).exists())
    raise ModelSpecError(
        f"model {name_or_path!r}: no such folder and no shipped model of that name "
        f"(shipped: {', '.join(available) or 'none'})"
    )


def load_model(name_or_path: str | Path = DEFAULT_MODEL, *, device: torch.device | None = None) -> Model:
    """Load a model folder; checks that the weights are the ones the provenance names."""
    folder = resolve_model_folder(name_or_path)
    spec = load_spec(folder / SPEC_FILE)
    weights_path = folder / WEIGHTS_FILE
    try:
        data = weights_path.read_bytes()
        provenance = ModelProvenance(**json.loads((folder / PROVENANCE_FILE).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError) as err:
        raise ModelSpecError(f"model folder {folder}: incomplete or invalid ({err})") from err
    sha = hashlib.sha256(data).hexdigest()
    if sha != provenance.weights_sha256:
        raise ModelSpecError(
            f"model folder {folder}: {WEIGHTS_FILE} has SHA-256 {sha[:12]}..., provenance says "
            f"{provenance.weights_sha256[:12]}...; the weights were changed without retraining records"
        )
    network = SegmentationNet(spec)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        raise ModelSpecError(f"model folder {folder}: weights do not fit the spec's network: {err}") from err
    if device is not None:
        network.to(device)
    detector = None
    if (folder / DETECTOR_FILE).exists():
        try:
            detector = load_detector(folder)
            detector.check_fits(spec)
        except DetectionError as err:
            raise ModelSpecError(f"model folder {folder}: {err}") from err
    try:
        training_range = load_training_range(folder)
    except TrainingRangeError as err:
        raise ModelSpecError(f"model folder {folder}: {err}") from err
    return Model(
        spec=spec,
        network=network.eval(),
        provenance=provenance,
        folder=folder,
        detector=detector,
        training_range=training_range,
    )


def choose_device(requested: str | None = None) -> torch.device:
    """``cuda`` when available unless asked otherwise."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
