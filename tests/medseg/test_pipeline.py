"""The main job end to end: DICOM series in, gated SEG + Parametric Map + SR + summary out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from dicom_io.reader import read_volume
from medseg.cli import main
from medseg.model import Model, ModelProvenance, save_model
from medseg.model_spec import parse_spec
from medseg.networks import SegmentationNet
from medseg.pipeline import NothingToAnalyseError, run_pipeline
from medseg.synth import Split, load_site, synthesize_case, write_case
from medseg.training_range import IntensityRange, TrainingRange
from tests.medseg.tiny_model import tiny_spec_data


def _tiny_model(root: Path, training_range: TrainingRange | None = None) -> Model:
    data = tiny_spec_data()
    data["uncertainty"]["samples"] = 3
    spec = parse_spec(data, "tiny")
    torch.manual_seed(0)
    provenance = ModelProvenance(source="test", training_data="none", seed=0, command="", weights_sha256="")
    return save_model(root / "model", spec, SegmentationNet(spec), provenance, training_range=training_range)


def _series(root: Path, site: str = "site_a") -> Path:
    case = synthesize_case(load_site(site), 4, 0, matrix=64, slices=20)
    entry = write_case(case, root / "case", manifest_root=root, split=Split.TEST)
    return root / entry.image_dir


@pytest.mark.slow
def test_run_writes_gated_objects_on_the_source_grid(tmp_path: Path) -> None:
    unlike_any = IntensityRange(median=(5000.0, 5001.0), spread=(0.0, 1.0), cases=1)
    organs = ["Liver", "Spleen", "Left kidney", "Right kidney", "Aorta", "Lung", "Bone"]
    model = _tiny_model(tmp_path, TrainingRange(dict.fromkeys(organs, unlike_any), 1, "no scan like it"))
    series = _series(tmp_path)
    out = tmp_path / "out"
    summary = run_pipeline(series, out, model)
    assert len(summary.series) == 1
    written = summary.series[0]
    assert all(check["passed"] for check in written.gate)
    stored = json.loads((out / "summary.json").read_text())
    assert stored["model"] == "default_ct" and stored["samples"] == 3
    assert [row["name"] for row in stored["series"][0]["structures"]][:2] == ["Liver", "Spleen"]
    seg = hd.seg.segread(written.outputs["seg"])
    assert len(seg.SegmentSequence) == 8  # declared segments are kept even when empty
    volume = read_volume(series)
    assert seg.StudyInstanceUID == volume.series.study_instance_uid
    source_uids = {f.sop_instance_uid for f in volume.frames}
    referenced = {
        ref.ReferencedSOPInstanceUID
        for item in seg.ReferencedSeriesSequence
        for ref in item.ReferencedInstanceSequence
    }
    assert referenced == source_uids
    sr = pydicom.dcmread(written.outputs["sr"])
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # every organ the random network finds is outside its "training data": flagged and said, in a valid SR
    rows = stored["series"][0]["structures"]
    found = [row["name"] for row in rows if row["volume_ml"] > 0 and row["name"] in organs]
    assert found and [row["name"] for row in rows if row["outside_training_data"]] == found
    comments = [e.value for e in sr.iterall() if e.keyword == "TextValue"]
    for name in found:
        said = [c for c in comments if c.startswith(f"{name} needs review")]
        assert said and "outside the training data" in said[0]
    assert any(note.startswith("outside the model's training data: ") for note in written.notes)
    # said once in the SR (a note said it a second time before), and in the summary
    assert sum("NOT FOR CLINICAL USE" in c.upper() for c in comments) == 1
    assert not stored["for_clinical_use"]
    assert (out / "model_spec.yaml").exists()


def test_nothing_to_analyse_names_what_was_found(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path)
    series = _series(tmp_path, site="site_mr")
    with pytest.raises(NothingToAnalyseError, match="modality MR is not handled by model default_ct"):
        run_pipeline(series, tmp_path / "out", model)
    assert not (tmp_path / "out").exists()


def test_missing_source_is_named_with_the_reason(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path)
    missing = tmp_path / "no-such-study"
    with pytest.raises(
        NothingToAnalyseError, match=re.escape(f"no DICOM images: {missing}: no such file or folder")
    ):
        run_pipeline(missing, tmp_path / "out", model)
    assert not (tmp_path / "out").exists()


def test_bad_sample_count_leaves_no_output_folder(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path)
    series = _series(tmp_path)
    with pytest.raises(ValueError, match="samples must be >= 1, got 0"):
        run_pipeline(series, tmp_path / "out", model, samples=0)
    assert not (tmp_path / "out").exists()


def test_cli_run_reports_bad_input_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    model = _tiny_model(tmp_path)
    assert main(["run", str(empty), "-o", str(tmp_path / "out"), "--model", str(model.folder)]) == 2
    err = capsys.readouterr().err
    assert "medseg run: error:" in err and "Traceback" not in err
    assert main(["run", str(empty), "-o", str(tmp_path / "out"), "--model", "nope"]) == 2
    assert "no shipped model of that name" in capsys.readouterr().err


def test_label_map_written_matches_prediction(tmp_path: Path) -> None:
    """The SEG read back by highdicom reproduces the pipeline's label map voxel for voxel."""
    from medseg.inference import infer

    model = _tiny_model(tmp_path)
    series = _series(tmp_path)
    volume = read_volume(series)
    prediction = infer(volume, model)
    out = tmp_path / "out"
    summary = run_pipeline(series, out, model, preview=False)
    seg = hd.seg.segread(summary.series[0].outputs["seg"])
    for number, label in enumerate(model.spec.labels, start=1):
        expected = prediction.label_map == label.value
        if not expected.any():
            continue
        uids = [f.sop_instance_uid for f in volume.frames]
        mask = seg.get_pixels_by_source_instance(
            uids, segment_numbers=[number], ignore_spatial_locations=True
        )
        np.testing.assert_array_equal(mask[..., 0].astype(bool), expected)


TOTALSEG_CT = Path("TotalSegmentator/tests/reference_files/example_ct_dicom")
# TotalSegmentator's own output for that series (a model's, not a hand's: the one real-anatomy reference)
TOTALSEG_REFERENCE = Path("TotalSegmentator/tests/reference_files/example_seg_dicom.nii.gz")


@pytest.mark.slow
def test_real_totalsegmentator_ct_needs_opt_in_uids_then_passes_the_gate(
    shared_data: Path, tmp_path: Path
) -> None:
    """Its exporter blanked Study/Series UIDs: refused by default, written with --assign-missing-uids."""
    from dicom_io.ai_result import ResultError
    from medseg.model import load_model

    model = load_model("default_ct")
    series = shared_data / TOTALSEG_CT
    with pytest.raises(ResultError, match="empty StudyInstanceUID or SeriesInstanceUID"):
        run_pipeline(series, tmp_path / "refused", model, samples=2, preview=False)
    assert not any((tmp_path / "refused").glob("*.dcm"))
    summary = run_pipeline(series, tmp_path / "out", model, samples=4, assign_missing_uids=True)
    written = summary.series[0]
    assert written.repairs and all(check["passed"] or not check["checkable"] for check in written.gate)
    seg = hd.seg.segread(written.outputs["seg"])
    assert seg.StudyInstanceUID == written.repairs[0].rsplit(" ", 1)[-1]
    _agrees_with_totalsegmentator(shared_data, seg, model)


def _agrees_with_totalsegmentator(shared_data: Path, seg: hd.seg.Segmentation, model: Model) -> None:
    """The real scan against TotalSegmentator's segmentation of it: the liver agrees (Dice 0.95 measured
    with 10 samples), and nothing is labelled on the foam mattress or the table under the patient's back
    (default_ct 1.9.1 labelled 140k voxels there lung and 43k bone; 1.9.2's body mask none)."""
    from medseg.evaluation import TOTALSEGMENTATOR_CLASSES, read_reference_labels

    volume = read_volume(shared_data / TOTALSEG_CT)
    theirs = read_reference_labels(shared_data / TOTALSEG_REFERENCE, volume)
    uids = [frame.sop_instance_uid for frame in volume.frames]
    ours = seg.get_pixels_by_source_instance(uids, ignore_spatial_locations=True).astype(bool)
    liver = ours[..., [label.name for label in model.spec.labels].index("Liver")]
    reference_liver = np.isin(theirs, TOTALSEGMENTATOR_CLASSES["Liver"])
    dice = 2 * (liver & reference_liver).sum() / (liver.sum() + reference_liver.sum())
    assert dice >= 0.90, f"liver Dice {dice:.3f} against TotalSegmentator"
    back = int(np.nonzero(theirs.any(axis=(0, 2)))[0].max())  # the last row TotalSegmentator labels
    beyond = back + round(20 / abs(float(volume.affine[1, 1])))  # 20 mm further back: mattress and table
    assert beyond < volume.array.shape[1] and not ours[:, beyond:, :].any()


@pytest.mark.slow
@pytest.mark.parametrize("site", ["site_a", "site_b", "site_c", "site_d"])
def test_default_model_end_to_end_on_every_site(site: str, tmp_path: Path) -> None:
    from medseg.model import load_model

    case = synthesize_case(load_site(site), 21, 0, matrix=256, slices=48)
    entry = write_case(case, tmp_path / "case", manifest_root=tmp_path, split=Split.TEST)
    summary = run_pipeline(tmp_path / entry.image_dir, tmp_path / "out", load_model("default_ct"), samples=4)
    written = summary.series[0]
    assert all(check["passed"] for check in written.gate if check["checkable"])
    assert {"seg", "parametric_map", "sr", "preview"} <= set(written.outputs)
    volumes = {row["name"]: row["volume_ml"] for row in written.structures}
    assert volumes["Liver"] > 100  # a liver is in every synthetic abdomen; far smaller means a broken model
    outside = {row["name"] for row in written.structures if row["outside_training_data"]}
    # the shipped model's training range: site_d's 45 HU noise is unlike any training scan, sites a-c are not
    assert ("Liver" in outside) == (site == "site_d")
