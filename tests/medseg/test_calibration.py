"""Decision weights: the contested-voxel Dice, the fit on a biased prediction, the spec, the UID, the CLI."""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_io.image_writer import deterministic_uid
from medseg.calibration import ContestedVoxels, candidate_ratio, fit_decision_weights
from medseg.cli import main
from medseg.evaluation import dice_per_class
from medseg.inference import decision_scores
from medseg.model import SHIPPED_DIR, load_model
from medseg.model_spec import ModelSpecError, parse_spec
from tests.medseg.tiny_model import tiny_spec_data, train_tiny_model

SPEC = parse_spec(tiny_spec_data(), "tiny")  # 8 labels, lesion (8) focal


def _too_wide(seed: int, margin: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two spheres (labels 1 and 2) whose predicted probability reaches ``margin`` voxels past their
    true border, as a soft-Dice network draws them; every other class near zero."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(24.0),) * 3, indexing="ij")
    truth = np.zeros((24, 24, 24), dtype=np.int64)
    probabilities = np.full((SPEC.num_classes, 24, 24, 24), 1e-3)
    for label, centre in ((1, (7, 12, 12)), (2, (17, 12, 12))):
        radius = rng.uniform(3.5, 5.0)
        distance = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
        truth[distance <= radius] = label
        probabilities[label] = 1 / (1 + np.exp((distance - radius - margin) / 0.8))
    probabilities[0] = np.clip(1 - probabilities[1:].sum(axis=0), 1e-3, None)
    probabilities /= probabilities.sum(axis=0, keepdims=True)
    return torch.from_numpy(probabilities).float(), torch.from_numpy(truth)


def _contested(seed: int, margin: float = 1.5) -> ContestedVoxels:
    return ContestedVoxels.from_case(*_too_wide(seed, margin), max_ratio=candidate_ratio(SPEC))


def test_contested_voxels_give_the_dice_of_the_whole_volume() -> None:
    probabilities, truth = _too_wide(0)
    contested = ContestedVoxels.from_case(probabilities, truth, max_ratio=candidate_ratio(SPEC))
    assert candidate_ratio(SPEC) == pytest.approx(1.5 / 0.35)
    assert contested.truth.numel() < truth.numel() / 4  # only borders are kept
    labels = list(range(1, SPEC.num_classes))
    for weights in ([1.0] * 9, [1.0, 0.35, 1.5, 1, 1, 1, 1, 1, 1], [1.0, 1.5, 0.35, 1, 1, 1, 1, 1, 1]):
        w = torch.tensor(weights)
        whole = dice_per_class((probabilities * w[:, None, None, None]).argmax(0), truth, SPEC.num_classes)
        np.testing.assert_allclose(contested.dice(w, labels), whole)


def test_fit_moves_the_border_of_a_structure_drawn_too_wide_inwards() -> None:
    calibration = fit_decision_weights([_contested(seed) for seed in range(4)], SPEC)
    assert calibration.weights["Liver"] < 1 and calibration.weights["Spleen"] < 1
    assert calibration.weights["Lung"] == 1.0  # absent everywhere: nothing to gain
    assert "Lesion" not in calibration.weights  # focal labels keep 1
    assert calibration.dice_after["Spleen"] > calibration.dice_before["Spleen"] + 0.03
    assert calibration.mean_after > calibration.mean_before
    spec = calibration.apply(SPEC)
    assert spec.decision_weights[2] == calibration.weights["Spleen"] and spec.decision_weights[8] == 1.0
    # applied at inference: the label map's argmax moves, the probabilities handed in stay as they were
    probabilities, truth = _too_wide(0)
    before = probabilities.clone()
    decided = decision_scores(probabilities, spec).argmax(0)
    assert torch.equal(probabilities, before)
    assert (decided == 2).sum() < (probabilities.argmax(0) == 2).sum()
    assert dice_per_class(decided, truth, 3)[1] > dice_per_class(probabilities.argmax(0), truth, 3)[1]


def test_a_well_drawn_structure_keeps_weight_one() -> None:
    calibration = fit_decision_weights([_contested(seed, margin=0.0) for seed in range(4)], SPEC)
    assert calibration.weights["Liver"] == 1.0 and calibration.weights["Spleen"] == 1.0


def test_bad_calibration_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one case"):
        fit_decision_weights([], SPEC)
    with pytest.raises(ValueError, match="must be positive and include 1"):
        fit_decision_weights([_contested(0)], SPEC, candidates=(0.5, 0.8))
    data = tiny_spec_data()
    data["labels"][1]["decision_weight"] = 0
    with pytest.raises(ModelSpecError, match=r"labels\.1\.decision_weight"):
        parse_spec(data, "bad")


@pytest.mark.slow
def test_cli_calibrates_a_trained_model_with_a_new_device_uid(tmp_path: Path) -> None:
    dataset, base = train_tiny_model(tmp_path)
    calibrated = tmp_path / "calibrated"
    args = ["-q", "calibrate", str(base), str(dataset), "-o", str(calibrated), "--samples", "2"]
    assert main(args) == 0
    before, after = load_model(base), load_model(calibrated)
    assert after.provenance.weights_sha256 == before.provenance.weights_sha256
    assert after.provenance.calibrated_by == shlex.join(["medseg", *args])  # what was run, not pytest's argv
    assert (
        after.provenance.metrics["val_dice_calibrated"]
        >= after.provenance.metrics["val_dice_before_calibration"]
    )
    assert before.training_range is not None and after.training_range == before.training_range
    changed = any(w != 1.0 for w in after.spec.decision_weights)
    assert (after.device_uid != before.device_uid) == changed
    assert main(["-q", "calibrate", str(base), str(dataset), "-o", str(base)]) == 2  # never in place
    assert main(["-q", "calibrate", str(base), str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2


def test_device_uid_changes_with_the_decision_weights_and_border_rules_only() -> None:
    model = load_model(SHIPPED_DIR / "default_ct")
    assert model.device_uid == load_model(SHIPPED_DIR / "default_ct").device_uid
    bare = replace(model, detector=None)  # without a lesion detector, whose weights the UID covers too
    if model.detector is not None:
        assert bare.device_uid != model.device_uid
    if all(w == 1.0 for w in model.spec.decision_weights):  # an uncalibrated model keeps its old UID
        expected = deterministic_uid("medseg-model-weights", model.provenance.weights_sha256)
        assert bare.device_uid == expected
    labels = list(model.spec.labels)
    labels[1] = labels[1].model_copy(update={"decision_weight": labels[1].decision_weight * 0.9})
    recalibrated = replace(model, spec=model.spec.model_copy(update={"labels": tuple(labels)}))
    assert recalibrated.device_uid != model.device_uid
    assert model.spec.border_rules  # bone's border decided by HU (default_ct 1.10.1)
    unruled = [label.model_copy(update={"border_intensity": None}) for label in model.spec.labels]
    assert replace(model, spec=model.spec.model_copy(update={"labels": tuple(unruled)})).device_uid != (
        model.device_uid
    )
