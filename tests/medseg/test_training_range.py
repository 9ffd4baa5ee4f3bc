"""The training range: what a model's training scans looked like, and the flag on a scan outside it."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from dicom_io.volume import GeometryReport, ImageVolume, IntensityUnit, Modality, SeriesContext
from medseg.cli import main
from medseg.inference import infer, outside_training_range
from medseg.model import ModelProvenance, load_model, save_model
from medseg.model_spec import ModelSpecError, parse_spec
from medseg.networks import SegmentationNet
from medseg.synth import ContrastPhase, load_site, synthesize_case
from medseg.synth.dataset import Split, load_dataset
from medseg.training_range import (
    RANGE_FILE,
    IntensityRange,
    ScanSpacing,
    SpacingRange,
    StructureIntensity,
    TrainingRange,
    structure_intensities,
)
from tests.medseg.tiny_model import tiny_spec_data, train_tiny_model

SPEC = parse_spec(tiny_spec_data(), "tiny")
REVIEW = SPEC.review  # margins 15 HU and 25 %


def _volume(array: np.ndarray, unit: IntensityUnit = IntensityUnit.HOUNSFIELD) -> ImageVolume:
    return ImageVolume(
        array=array.astype(np.float32),
        affine=np.diag([1.0, 1.0, 2.0, 1.0]),
        modality=Modality.CT if unit is IntensityUnit.HOUNSFIELD else Modality.MR,
        unit=unit,
        series=SeriesContext("1.2.3", "1.2.3.4", None, 1, "synthetic", "test", "p"),
        frames=(),
        geometry=GeometryReport(array.shape[2], 1.0, 1.0, 2.0, 0.0, ()),
    )


def test_intensity_is_measured_in_the_core_without_the_border() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 40, 20), np.uint8)
    labels[5:35, 5:35, 3:17] = 1  # "Liver"
    array = np.full(labels.shape, -1000.0)
    array[labels == 1] = 60.0 + rng.normal(0.0, 10.0, int((labels == 1).sum()))
    border = (labels == 1) & ~np.pad(np.ones((28, 28, 12), bool), ((6, 6), (6, 6), (4, 4)))
    array[border] = 400.0  # partial volume with bone at the border: not the organ's intensity
    found = structure_intensities(_volume(array), labels, SPEC)
    assert set(found) == {"Liver"}
    assert found["Liver"].median == pytest.approx(60.0, abs=1.0)
    assert found["Liver"].spread == pytest.approx(10.0, rel=0.1)  # 1.4826 MAD of normal noise is its std
    assert structure_intensities(_volume(array, IntensityUnit.MR_STORED), labels, SPEC) == {}
    with pytest.raises(ValueError, match="not on the volume's grid"):
        structure_intensities(_volume(array), labels[:-1], SPEC)


def test_only_what_lies_outside_the_range_by_more_than_the_margin_is_flagged() -> None:
    cases = [
        {"Aorta": StructureIntensity(40.0, 10.0), "Liver": StructureIntensity(55.0, 12.0)},
        {"Aorta": StructureIntensity(180.0, 20.0)},
    ]
    known = TrainingRange.of(cases, training_data="two scans")
    assert known.structures["Aorta"] == IntensityRange(median=(40.0, 180.0), spread=(10.0, 20.0), cases=2)
    assert known.structures["Liver"].cases == 1 and known.cases == 2
    inside = {
        "Aorta": StructureIntensity(190.0, 24.0),  # within 15 HU and 25 % of the highest spread
        "Liver": StructureIntensity(45.0, 3.0),  # quieter than any training scan: no reason to distrust
        "Bone": StructureIntensity(5000.0, 500.0),  # never recorded: nothing to compare with
    }
    assert known.check(inside, REVIEW) == {}
    outside = known.check(
        {"Aorta": StructureIntensity(330.0, 12.0), "Liver": StructureIntensity(30.0, 40.0)}, REVIEW
    )
    assert outside["Aorta"] == ("outside the training data: median 330 HU, training 40 to 180 HU (2 cases)",)
    assert len(outside["Liver"]) == 2 and "spread 40 HU, training at most 12 HU" in outside["Liver"][1]


def test_a_fine_tuned_model_keeps_the_range_of_both_trainings() -> None:
    first = TrainingRange.of([{"Aorta": StructureIntensity(40.0, 10.0)}], training_data="site a")
    later = TrainingRange.of(
        [{"Aorta": StructureIntensity(300.0, 8.0), "Liver": StructureIntensity(60.0, 12.0)}] * 2,
        training_data="site e",
    )
    both = first.merged(later)
    assert both.structures["Aorta"] == IntensityRange(median=(40.0, 300.0), spread=(8.0, 10.0), cases=3)
    assert both.structures["Liver"] == later.structures["Liver"] and both.cases == 3
    assert both.training_data == "site e, after site a"
    assert later.merged(later) == later  # the same data again counts once


def test_a_scan_much_coarser_than_any_in_training_is_named() -> None:
    spacings = [ScanSpacing(slice_mm=2.0, pixel_mm=0.7), ScanSpacing(slice_mm=5.0, pixel_mm=0.9)]
    known = TrainingRange.of([{}, {}], spacings=spacings, training_data="two scans")
    assert known.spacing == SpacingRange(slice_mm=(2.0, 5.0), pixel_mm=(0.7, 0.9))
    assert known.scan_reasons(ScanSpacing(6.0, 1.1), REVIEW) == ()  # within the 25 % margin
    assert known.scan_reasons(ScanSpacing(0.5, 0.3), REVIEW) == ()  # finer: sampled onto the model grid
    (thick,) = known.scan_reasons(ScanSpacing(8.0, 0.8), REVIEW)
    assert thick == (
        "scan outside the training data: slice spacing 8.00 mm, training at most 5.00 mm (2 cases)"
    )
    both = known.scan_reasons(ScanSpacing(7.0, 1.2), REVIEW)
    assert [r.split(",")[0] for r in both] == [
        "scan outside the training data: slice spacing 7.00 mm",
        "scan outside the training data: pixel spacing 1.20 mm",
    ]
    assert ScanSpacing.of(_volume(np.zeros((4, 4, 4)))) == ScanSpacing(slice_mm=1.0, pixel_mm=2.0)
    unknown = TrainingRange.of([{}], training_data="before spacing was recorded")
    assert unknown.spacing is None and unknown.scan_reasons(ScanSpacing(50.0, 9.0), REVIEW) == ()
    later = TrainingRange.of([{}], spacings=[ScanSpacing(3.0, 1.2)], training_data="more")
    assert known.merged(later).spacing == SpacingRange(slice_mm=(2.0, 5.0), pixel_mm=(0.7, 1.2))
    assert unknown.merged(later).spacing is None  # the earlier scans' geometry is not known


def test_an_arterial_rescan_lies_outside_the_range_of_the_unenhanced_scan() -> None:
    site = load_site("site_a")
    plain = synthesize_case(site, 4, 0, matrix=64, slices=24, phase=ContrastPhase.NON_CONTRAST)
    arterial = synthesize_case(site, 4, 0, matrix=64, slices=24, phase=ContrastPhase.ARTERIAL)
    measured = structure_intensities(_volume(plain.image), plain.labels, SPEC)
    known = TrainingRange.of([measured], training_data="one unenhanced scan")
    assert known.check(measured, REVIEW) == {}
    outside = known.check(structure_intensities(_volume(arterial.image), arterial.labels, SPEC), REVIEW)
    assert {"Aorta", "Left kidney", "Right kidney"} <= set(outside)
    assert "Lung" not in outside and "Bone" not in outside  # contrast does not reach air or bone


def test_inference_flags_the_structures_outside_the_model_range(tmp_path: Path) -> None:
    torch.manual_seed(0)
    provenance = ModelProvenance(source="test", training_data="none", seed=0, command="", weights_sha256="")
    names = [label.name for label in SPEC.labels if not label.focal]
    impossible = TrainingRange(
        structures={n: IntensityRange(median=(5000.0, 5001.0), spread=(0.0, 1.0), cases=1) for n in names},
        cases=1,
        training_data="no scan is like this",
        spacing=SpacingRange(slice_mm=(0.2, 0.5), pixel_mm=(0.5, 2.0)),  # the volume's slices are 1 mm
    )
    saved = save_model(tmp_path / "m", SPEC, SegmentationNet(SPEC), provenance, training_range=impossible)
    model = load_model(saved.folder)
    assert model.training_range == impossible and model.device_uid == saved.device_uid
    case = synthesize_case(load_site("site_a"), 3, 0, matrix=48, slices=16)
    volume = _volume(case.image)
    prediction = infer(volume, model, samples=2)
    present = {SPEC.labels[m.label - 1].name for m in prediction.structures if m.volume_ml > 0}
    present -= {label.name for label in SPEC.labels if label.focal}
    assert present and set(prediction.outside_training_data) == present
    for m in prediction.structures:
        name = SPEC.labels[m.label - 1].name
        if name in present:
            assert m.needs_review and any(r.startswith("outside the training data") for r in m.review_reasons)
    assert any("outside the model's training data" in note for note in prediction.notes)
    assert any(
        note.startswith("scan outside the training data: slice spacing 1.00") for note in prediction.notes
    )
    assert not any("pixel spacing" in note for note in prediction.notes)
    as_mr = _volume(case.image, IntensityUnit.MR_STORED)
    assert outside_training_range(as_mr, prediction.label_map, model) == {}  # no HU, nothing to compare

    (saved.folder / RANGE_FILE).write_text('{"structures": {"Aorta": {"median": [9, 1]}}}')
    with pytest.raises(ModelSpecError, match=RANGE_FILE):
        load_model(saved.folder)
    impossible.save(saved.folder)
    in_mr = (saved.folder / RANGE_FILE).read_text().replace('"unit": "HU"', '"unit": "MR"')
    (saved.folder / RANGE_FILE).write_text(in_mr)
    with pytest.raises(ModelSpecError, match="only ranges in HU are compared"):
        load_model(saved.folder)
    save_model(saved.folder, SPEC, SegmentationNet(SPEC), provenance)  # another model, no range recorded
    assert load_model(saved.folder).training_range is None  # the earlier model's range is not inherited


@pytest.mark.slow
def test_cli_records_the_range_train_records_for_an_older_model(tmp_path: Path) -> None:
    dataset, base = train_tiny_model(tmp_path)
    trained = load_model(base)
    train_split = load_dataset(dataset).split_entries(Split.TRAIN, ())
    assert trained.training_range is not None and trained.training_range.cases == len(train_split)
    assert {"Liver", "Aorta", "Bone"} <= set(trained.training_range.structures)
    (base / RANGE_FILE).unlink()  # as a model trained before ``train`` recorded one
    out = tmp_path / "with-range"
    args = ["-q", "training-range", str(base), str(dataset), "-o", str(out)]
    assert main(args) == 0
    recorded = load_model(out)
    assert recorded.device_uid == trained.device_uid  # same weights, same outputs but for the flag
    assert recorded.training_range is not None
    assert recorded.training_range.structures == trained.training_range.structures
    assert recorded.training_range.spacing == trained.training_range.spacing is not None
    assert recorded.training_range.command == shlex.join(["medseg", *args])
    assert main(["-q", "training-range", str(base), str(dataset), "-o", str(base)]) == 2  # never in place
    assert main(["-q", "training-range", str(base), str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2
