"""Lesion detection: box geometry, clustering of Monte-Carlo samples, seeded detection, save/load, errors."""

from __future__ import annotations

import shlex
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from dicom_io.ai_result import LesionFinding
from dicom_io.reader import read_volume
from dicom_io.volume import GeometryReport, ImageVolume, IntensityUnit, Modality, SeriesContext
from medseg.cli import main
from medseg.detection import (
    DetectionCase,
    DetectionError,
    DetectionSpec,
    boxes_lps_to_voxel,
    boxes_voxel_to_lps,
    build_detector,
    cluster_detections,
    detect,
    detection_train_step,
    guide_support,
    load_detector,
    parameter_count,
    save_detector,
    train_detector,
    with_guide,
)
from medseg.inference import detector_findings, infer, inside_body_only
from medseg.model import load_model
from medseg.model_spec import MODELS_DIR, ModelSpec, ModelSpecError, parse_spec
from medseg.preprocess import ModelInput, plan_grid, to_model
from medseg.synth import load_site, synthesize_case
from medseg.synth.dataset import load_dataset
from tests.medseg.tiny_model import train_tiny_model


def _model_spec_12mm() -> ModelSpec:
    data = yaml.safe_load((MODELS_DIR / "default_ct.yaml").read_text())
    data["preprocessing"]["spacing_mm"] = [12.0, 12.0, 12.0]
    return parse_spec(data, "test")


# A tiny network on a coarse 12 mm grid so that everything runs in seconds.
CHANNELS = _model_spec_12mm().preprocessing.input_channels  # the detector reads what to_model makes
TINY: dict[str, Any] = {
    "backbone_channels": (4, 8, 8, 8),
    "fpn_channels": 8,
    "patch_size": (24, 24, 24),
    "spacing_mm": (12.0, 12.0, 12.0),
    "samples": 3,
    "input_channels": CHANNELS,
}


def _model_input() -> ModelInput:
    case = synthesize_case(load_site("site_a"), 3, 0, matrix=64, slices=24)
    volume = ImageVolume(
        array=case.image,
        affine=case.affine,
        modality=Modality.CT,
        unit=IntensityUnit.HOUNSFIELD,
        series=SeriesContext("1.2.3", "1.2.3.4", None, 1, "synthetic", "test", "p"),
        frames=(),
        geometry=GeometryReport(24, 1.0, 1.0, 1.0, 0.0, ()),
    )
    return to_model(volume, _model_spec_12mm())


def _flipped_affine() -> np.ndarray:
    """A model grid whose axes are permuted and flipped relative to LPS, with 3 mm voxels."""
    affine = np.zeros((4, 4))
    affine[:3, :3] = [[0.0, 0.0, -3.0], [3.0, 0.0, 0.0], [0.0, -3.0, 0.0]]
    affine[:3, 3] = (12.0, -40.0, 100.0)
    affine[3, 3] = 1.0
    return affine


def test_lps_voxel_round_trip_on_a_flipped_permuted_grid() -> None:
    rng = np.random.default_rng(0)
    lo = rng.uniform(-100, 100, size=(5, 3))
    hi = lo + rng.uniform(5, 40, size=(5, 3))
    affine = _flipped_affine()
    voxels = boxes_lps_to_voxel(lo, hi, affine)
    assert voxels.shape == (5, 6) and np.all(voxels[:, :3] < voxels[:, 3:])  # sorted per axis
    back_lo, back_hi = boxes_voxel_to_lps(voxels, affine)
    np.testing.assert_allclose(back_lo, lo, atol=1e-9)
    np.testing.assert_allclose(back_hi, hi, atol=1e-9)


def test_lps_to_voxel_matches_the_grid_affine() -> None:
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = (-30.0, -60.0, 9.0)
    voxels = boxes_lps_to_voxel([(-30.0, -60.0, 9.0)], [(-24.0, -48.0, 18.0)], affine)
    np.testing.assert_allclose(voxels, [[0, 0, 0, 2, 4, 3]])
    assert boxes_lps_to_voxel(np.zeros((0, 3)), np.zeros((0, 3)), affine).shape == (0, 6)


def test_clustering_merges_samples_with_rate_score_and_spread() -> None:
    spec = DetectionSpec(min_detection_rate=0.2, review_detection_rate=0.7, review_score_spread=0.3)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    a = np.array([10.0, 10.0, 10.0, 16.0, 16.0, 16.0])
    shifts = [-1.0, 1.0, -1.0, 1.0]  # x jitter of one voxel (3 mm): corners x0 and x1 have std 3 mm
    boxes = [a + np.array([s, 0, 0, s, 0, 0]) for s in shifts]
    boxes.append(np.array([40.0, 40.0, 40.0, 44.0, 44.0, 44.0]))  # a second lesion, one sample only
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    samples = [0, 1, 2, 3, 2]
    findings = cluster_detections(np.array(boxes), scores, samples, 4, affine, spec)
    assert len(findings) == 2 and all(isinstance(f, LesionFinding) for f in findings)
    first, second = findings
    assert (first.index, second.index) == (1, 2)
    assert first.detection_rate == 1.0 and second.detection_rate == 0.25
    assert first.score == pytest.approx(0.75) and first.score_spread == pytest.approx(np.std(scores[:4]))
    assert second.score == pytest.approx(0.125)  # missed samples count as score 0
    assert second.score_spread == pytest.approx(np.std([0.5, 0, 0, 0]))
    assert first.box_spread_mm == pytest.approx(3.0 * 2 / 6)  # two of six corners vary by 3 mm
    np.testing.assert_allclose(first.centre_lps, (39.0, 39.0, 39.0))
    np.testing.assert_allclose(first.box_min_lps, (30.0, 30.0, 30.0))
    assert not first.needs_review and second.needs_review


def test_clustering_keeps_one_box_per_sample_and_drops_rare_clusters() -> None:
    affine = np.eye(4)
    box = np.array([0.0, 0.0, 0.0, 10.0, 10.0, 10.0])
    # sample 0 reports two overlapping boxes: the second may not join the first's cluster, and as its
    # centre lies inside the first finding's box it is the same lesion twice, not a second finding
    boxes, scores, samples = np.stack([box, box + 1, box]), [0.9, 0.8, 0.7], [0, 0, 1]
    kept = cluster_detections(boxes, scores, samples, 2, affine, DetectionSpec(min_detection_rate=0.5))
    assert [(f.detection_rate, f.score) for f in kept] == [(1.0, pytest.approx(0.8))]
    apart = np.stack([box, box + 12, box])  # the second box beside the first: a second lesion
    kept = cluster_detections(apart, scores, samples, 2, affine, DetectionSpec(min_detection_rate=0.5))
    assert [(f.index, f.detection_rate, f.score) for f in kept] == [
        (1, 1.0, pytest.approx(0.8)),
        (2, 0.5, 0.4),
    ]
    spec = DetectionSpec(min_detection_rate=0.6, review_detection_rate=0.7)
    findings = cluster_detections(boxes, scores, samples, 2, affine, spec)
    assert [f.detection_rate for f in findings] == [1.0]  # the lone 0.8 box (rate 0.5) is dropped
    assert cluster_detections(np.zeros((0, 6)), [], [], 2, affine, spec) == ()


def test_a_box_overlapping_a_better_one_is_the_same_lesion() -> None:
    """Two findings whose centres lie outside each other's box, as a lesion tiled by a sample's boxes."""
    affine = np.eye(4)
    box = np.array([0.0, 0.0, 0.0, 10.0, 10.0, 10.0])
    beside = box + np.array([6.0, 0, 0, 6.0, 0, 0])  # 4 of its 10 mm along x lie inside the first box
    boxes, scores, samples = np.stack([box, beside]), [0.9, 0.8], [0, 0]
    for overlap, expected in ((0.5, 2), (0.4, 1), (0.3, 1)):
        spec = DetectionSpec(min_detection_rate=0.5, duplicate_overlap=overlap)
        assert len(cluster_detections(boxes, scores, samples, 1, affine, spec)) == expected, overlap


def test_guide_support_is_the_highest_guide_value_inside_each_box() -> None:
    guide = torch.zeros(20, 20, 20)
    guide[5, 5, 5], guide[15, 15, 15] = 0.9, 0.3
    boxes = np.array(
        [
            [3.5, 3.5, 3.5, 7.5, 7.5, 7.5],  # holds the 0.9 voxel
            [12.0, 12.0, 12.0, 18.0, 18.0, 18.0],  # holds the 0.3 voxel
            [8.0, 8.0, 8.0, 11.0, 11.0, 11.0],  # neither
            [5.1, 5.1, 5.1, 5.3, 5.3, 5.3],  # no voxel centre inside: the nearest voxel counts
            [-3.0, -3.0, -3.0, 0.2, 0.2, 0.2],  # beyond the grid: clipped
        ]
    )
    np.testing.assert_allclose(guide_support(guide, boxes), [0.9, 0.3, 0.0, 0.9, 0.0], atol=1e-6)


def test_a_guided_detector_keeps_only_boxes_the_guide_points_at() -> None:
    guided = {**TINY, "input_channels": CHANNELS + 1, "guide_label": 8}
    spec = DetectionSpec(**guided, score_threshold=0.0, candidates_per_level=10, report_score=0.0)
    torch.manual_seed(0)
    detector = build_detector(spec).eval()
    model_input = _model_input()
    nowhere = with_guide(model_input, torch.zeros(model_input.image.shape[1:]))
    everywhere = with_guide(model_input, torch.ones(model_input.image.shape[1:]))
    gated = spec.model_copy(update={"min_guide_probability": 0.5})
    assert detect(detector, everywhere, gated, samples=3, seed=0)
    assert detect(detector, nowhere, gated, samples=3, seed=0) == ()
    ungated = spec.model_copy(update={"min_guide_probability": 0.0})
    assert detect(detector, nowhere, ungated, samples=3, seed=0)


def test_detect_on_a_tiny_volume_is_typed_and_seeded() -> None:
    spec = DetectionSpec(
        **TINY,
        score_threshold=0.0,
        candidates_per_level=10,
        min_detection_rate=0.0,
        max_detections=20,
        max_window=TINY["patch_size"],
        report_score=0.0,
    )
    torch.manual_seed(0)
    detector = build_detector(spec)
    model_input = _model_input()
    assert model_input.image.shape[1] > spec.inference_window(model_input.image.shape[1:])[0]  # windows
    first = detect(detector, model_input, spec, samples=3, seed=7)
    again = detect(detector, model_input, spec, samples=3, seed=7)
    other = detect(detector, model_input, spec, samples=3, seed=8)
    assert first and all(isinstance(f, LesionFinding) for f in first)
    assert first == again and first != other
    assert all(0 < f.detection_rate <= 1 and f.score_spread >= 0 for f in first)
    strict = detect(detector, model_input, spec.model_copy(update={"report_score": 0.5}), samples=3, seed=7)
    assert [f.score for f in strict] == [f.score for f in first if f.score >= 0.5]
    assert [f.index for f in strict] == list(range(1, len(strict) + 1))
    one = detect(detector, model_input, spec, samples=1, seed=7)
    assert all(f.detection_rate == 1.0 and f.score_spread == 0 and f.box_spread_mm == 0 for f in one)


def test_train_step_save_and_load_round_trip(tmp_path: Path) -> None:
    spec = DetectionSpec(**TINY, epochs=1, iterations_per_epoch=2, batch_size=1)
    image = torch.zeros(CHANNELS, 40, 40, 36)
    image[:, 10:14, 10:14, 10:14] = 1.0
    grid = plan_grid((40, 40, 36), np.diag([12.0, 12.0, 12.0, 1.0]), _model_spec_12mm())
    case = DetectionCase("c1", image, torch.tensor([[9.5, 9.5, 9.5, 13.5, 13.5, 13.5]]), grid)
    trained = train_detector([case], spec, seed=3)
    assert trained.provenance.seed == 3 and trained.provenance.iterations == 2
    assert trained.provenance.parameters == parameter_count(trained.detector)
    saved = save_detector(tmp_path / "det", trained)
    loaded = load_detector(tmp_path / "det")
    assert loaded.spec == spec and loaded.provenance == saved.provenance
    for key, value in trained.detector.network.state_dict().items():
        assert torch.equal(value, loaded.detector.network.state_dict()[key])
    optimizer = torch.optim.SGD(loaded.detector.network.parameters(), lr=1e-3)
    targets = [{"boxes": case.boxes, "labels": torch.zeros(1, dtype=torch.long)}]
    assert np.isfinite(
        detection_train_step(loaded.detector, image[None, :, :32, :32, :32], targets, optimizer)
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"patch_size": (60, 64, 64)}, "multiple of 8"),
        ({"feature_map_scales": (1, 2)}, "one scale per pyramid level"),
        ({"anchor_shapes": ((3, 4, 4),)}, "must be even"),
        ({"returned_layers": (2, 1)}, "increasing"),
        ({"review_detection_rate": 0.1}, "every kept finding"),
        ({"unknown": 1}, "Extra inputs"),
    ],
)
def test_bad_spec_names_the_field(change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DetectionSpec(**change)


def test_detect_refuses_bad_inputs() -> None:
    spec = DetectionSpec(**TINY)
    detector = build_detector(spec)
    model_input = _model_input()
    with pytest.raises(DetectionError, match="samples must be >= 1"):
        detect(detector, model_input, spec, samples=0, seed=0)
    with pytest.raises(DetectionError, match=r"spacing .* differs from the detector's"):
        detect(detector, model_input, DetectionSpec(**{**TINY, "spacing_mm": (3.0, 3.0, 3.0)}), 1, 0)
    flat = ModelInput(image=model_input.image[0], grid=model_input.grid)
    with pytest.raises(DetectionError, match=rf"must be \({CHANNELS}, X, Y, Z\)"):
        detect(detector, flat, spec, samples=1, seed=0)


def test_geometry_and_clustering_errors() -> None:
    with pytest.raises(DetectionError, match="swap the corners"):
        boxes_lps_to_voxel([(5.0, 0.0, 0.0)], [(0.0, 1.0, 1.0)], np.eye(4))
    with pytest.raises(DetectionError, match=r"must be \(N, 3\)"):
        boxes_lps_to_voxel([(0.0, 0.0)], [(1.0, 1.0)], np.eye(4))
    with pytest.raises(DetectionError, match=r"shape \(N, 6\)"):
        boxes_voxel_to_lps(np.zeros((2, 4)), np.eye(4))
    with pytest.raises(DetectionError, match="must match"):
        cluster_detections(np.zeros((2, 6)), [0.5], [0, 1], 2, np.eye(4), DetectionSpec())
    with pytest.raises(DetectionError, match=r"outside 0\.\.1"):
        cluster_detections(np.ones((1, 6)), [0.5], [2], 2, np.eye(4), DetectionSpec())
    with pytest.raises(DetectionError, match="no training cases"):
        train_detector([], DetectionSpec(), seed=0)


def test_detector_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DetectionError, match=r"cannot read detector\.json"):
        load_detector(tmp_path / "missing")
    spec = DetectionSpec(**TINY, epochs=1, iterations_per_epoch=1, batch_size=1)
    grid = plan_grid((32, 32, 32), np.diag([12.0, 12.0, 12.0, 1.0]), _model_spec_12mm())
    case = DetectionCase("c", torch.zeros(CHANNELS, 32, 32, 32), torch.zeros(0, 6), grid)
    save_detector(tmp_path / "det", train_detector([case], spec, seed=0))
    weights = tmp_path / "det" / "detector.pt"
    weights.write_bytes(weights.read_bytes() + b"x")
    with pytest.raises(DetectionError, match="SHA-256"):
        load_detector(tmp_path / "det")


def test_a_guided_detector_reads_the_probability_as_its_last_channel() -> None:
    with pytest.raises(ValidationError, match="needs input_channels >= 2"):
        DetectionSpec(guide_label=8, input_channels=1)
    spec = DetectionSpec(**{**TINY, "input_channels": CHANNELS + 1}, guide_label=8)
    assert spec.image_channels == CHANNELS
    model_input = _model_input()
    probability = torch.rand(model_input.image.shape[1:])
    guided = with_guide(model_input, probability)
    assert guided.image.shape[0] == CHANNELS + 1 and guided.grid is model_input.grid
    assert torch.equal(guided.image[-1], probability) and torch.equal(guided.image[:-1], model_input.image)
    with pytest.raises(DetectionError, match="does not cover the model grid"):
        with_guide(model_input, probability[:-1])


def test_cli_gives_a_model_a_guided_detector_whose_findings_infer_reports(tmp_path: Path) -> None:
    dataset, base = train_tiny_model(tmp_path)
    guided = tmp_path / "guided"
    args = ["-q", "train-detector", str(base), str(dataset), "-o", str(guided)]
    args += ["--epochs", "1", "--iterations", "2", "--seed", "3"]
    assert main(args) == 0
    plain, model = load_model(base), load_model(guided)
    assert plain.detector is None and model.detector is not None
    detector = model.detector
    assert detector.spec.guide_label == model.spec.focal_labels[0]
    assert detector.spec.image_channels == model.spec.preprocessing.input_channels
    assert detector.provenance.command == shlex.join(["medseg", *args])
    manifest = load_dataset(dataset)
    assert detector.provenance.cases == sum(c.split in ("train", "val") for c in manifest.manifest.cases)
    assert model.provenance.weights_sha256 == plain.provenance.weights_sha256
    assert model.device_uid != plain.device_uid  # a detector changes what the model reports

    # infer reports the detector's findings (zero thresholds make the untrained one, guided by a tiny
    # model's faint lesion probability, find some)
    assert detector.spec.report_score == 0.5  # only findings more likely lesion than not
    assert detector.spec.min_guide_probability == 0.5  # ... and only where the segmentation points
    zero = {"score_threshold": 0.0, "report_score": 0.0, "min_guide_probability": 0.0}
    loose = replace(detector, spec=detector.spec.model_copy(update=zero))
    model = replace(model, detector=loose)
    volume = read_volume(manifest.image_dir(manifest.manifest.cases[0]))
    prediction = infer(volume, model, samples=2, seed=5)
    guide = inside_body_only(prediction.mean_probabilities, prediction.body)  # as infer feeds it
    expected = detector_findings(loose, to_model(volume, model.spec), guide, samples=2, seed=5)
    assert prediction.lesion_source == "detector" and prediction.lesions
    assert prediction.lesions == expected[: model.spec.review.max_lesion_findings]
    without = infer(volume, plain, samples=2, seed=5)
    assert without.lesion_source == "segmentation" and without.lesions == without.channel_lesions
    assert prediction.channel_lesions == without.channel_lesions  # the same segmentation beside it

    # calibrating keeps the detector; refusals: in place, a model it does not fit
    calibrated = tmp_path / "calibrated"
    assert main(["-q", "calibrate", str(guided), str(dataset), "-o", str(calibrated), "--samples", "2"]) == 0
    assert load_model(calibrated).detector is not None
    assert main([*args[:5], str(base)]) == 2  # never in place
    unfit = tmp_path / "unfit"
    shutil.copytree(guided, unfit)
    spec_data = yaml.safe_load((unfit / "spec.yaml").read_text())
    for label in spec_data["labels"]:
        label["focal"] = False
    (unfit / "spec.yaml").write_text(yaml.safe_dump(spec_data))
    with pytest.raises(ModelSpecError, match=rf"{unfit}.*not a focal label"):
        load_model(unfit)


def test_inference_window_takes_small_volumes_whole_and_caps_large_ones() -> None:
    spec = DetectionSpec()  # pyramid strides up to 8, training patches of 64, windows of at most 160
    assert spec.size_divisible == 8
    assert spec.inference_window((136, 130, 20)) == (136, 136, 64)
    assert spec.inference_window((400, 161, 100)) == (160, 160, 104)
