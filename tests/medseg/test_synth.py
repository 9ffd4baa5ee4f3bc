"""The synthetic study generator: ground truth aligned with the image, determinism, sites, outputs, CLI."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy import ndimage

from dicom_io.volume import Modality
from medseg.synth import (
    ContrastPhase,
    Label,
    PatientPosition,
    SiteConfigError,
    SiteProfile,
    Split,
    SynthCase,
    expected_hu_range,
    generate_dataset,
    list_sites,
    load_dataset,
    load_label_map,
    load_lesions,
    load_site,
    synthesize_case,
)
from medseg.synth import command as synth_command
from medseg.synth.anatomy import Tissue, build_phantom
from medseg.synth.dataset import case_grid

MATRIX, SLICES = 128, 40
ORGANS = (Label.LIVER, Label.SPLEEN, Label.KIDNEY_LEFT, Label.KIDNEY_RIGHT, Label.AORTA, Label.LUNG)


@cache
def _case(site: str, index: int = 0, seed: int = 7, phase: ContrastPhase | None = None) -> SynthCase:
    return synthesize_case(load_site(site), seed, index, matrix=MATRIX, slices=SLICES, phase=phase)


def _ct_sites() -> tuple[SiteProfile, ...]:
    return list_sites(modality=Modality.CT)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_label_values_are_fixed() -> None:
    assert [int(v) for v in Label] == list(range(9))
    assert Label.LESION.display_name == "lesion" and Label.KIDNEY_LEFT.display_name == "kidney_left"


def test_shipped_sites_are_distinct() -> None:
    ct = _ct_sites()
    assert len(ct) >= 3
    assert list_sites(modality=Modality.MR), "an MR site must be shipped"
    assert len({s.transfer_syntax for s in ct}) == 3
    assert len({s.reconstruction.noise_sigma for s in ct}) == len(ct)
    assert len({s.acquisition.slice_thickness_mm for s in ct}) == len(ct)
    assert any(PatientPosition.HFP in s.acquisition.positions for s in ct)


def test_invalid_site_file_names_file_and_field(tmp_path: Path) -> None:
    text = load_site("site_a").model_dump(mode="json")
    text["acquisition"]["matrix"] = -5
    bad = tmp_path / "bad_site.yaml"
    bad.write_text(json.dumps(text))  # JSON is YAML
    with pytest.raises(SiteConfigError, match=r"bad_site\.yaml.*acquisition\.matrix"):
        load_site(bad)
    text["acquisition"]["matrix"] = 256
    text["colour"] = "blue"
    bad.write_text(json.dumps(text))
    with pytest.raises(SiteConfigError, match="colour"):
        load_site(bad)
    with pytest.raises(SiteConfigError, match=r"known sites: .*site_a"):
        load_site("no_such_site")
    with pytest.raises(SiteConfigError, match="positions probabilities must sum to 1"):
        text.pop("colour")
        text["acquisition"]["positions"] = {"HFS": 0.5}
        bad.write_text(json.dumps(text))
        load_site(bad)
    with pytest.raises(SiteConfigError, match="contrast_phase is the phase of the enhanced scans"):
        text["acquisition"]["positions"] = {"HFS": 1.0}
        text["acquisition"]["contrast_phase"] = "non_contrast"
        bad.write_text(json.dumps(text))
        load_site(bad)
    with pytest.raises(SiteConfigError, match="'mr' section is required"):
        text["acquisition"]["contrast_phase"] = "arterial"
        text["modality"] = "MR"
        bad.write_text(json.dumps(text))
        load_site(bad)


@pytest.mark.parametrize(
    ("site", "phase"),
    [("site_a", None), ("site_b", None), ("site_c", None), ("site_c", ContrastPhase.ARTERIAL)],
)
def test_organ_intensities_match_labels(site: str, phase: ContrastPhase | None) -> None:
    """Voxel-for-voxel alignment: the mean inside each (eroded) organ is that organ's HU after drift."""
    case = _case(site, phase=phase)
    assert phase is None or case.phase is phase
    rec = case.site.reconstruction
    assert case.image.shape == case.labels.shape == (SLICES, MATRIX, MATRIX)
    checked = 0
    for label in ORGANS:
        core = ndimage.binary_erosion(case.labels == label, iterations=2)
        if core.sum() < 50:
            continue
        lo, hi = expected_hu_range(label, case.phase)
        lo, hi = (v * rec.hu_scale + rec.hu_offset for v in (lo, hi))
        tol = 25.0 if label is Label.LUNG else 10.0  # texture and residual partial volume
        mean = float(case.image[core].mean())
        assert lo - tol <= mean <= hi + tol, (
            f"{site} {label.name}: mean {mean:.1f} outside {lo:.0f}..{hi:.0f}"
        )
        checked += 1
    assert checked >= 4
    bone = ndimage.binary_erosion(case.labels == Label.BONE)
    assert float(case.image[bone].mean()) > 250.0
    assert float(case.image[0, 0, 0]) < -900.0  # air outside the body


def test_lesion_boxes_match_label_map() -> None:
    site = load_site("site_b")
    case = next(
        c for i in range(10) if (c := synthesize_case(site, 3, i, matrix=MATRIX, slices=SLICES)).lesions
    )
    lesion_voxels = np.argwhere(case.labels == Label.LESION)
    assert sum(les.voxel_count for les in case.lesions) >= len(lesion_voxels) > 0
    lps = lesion_voxels @ case.affine[:3, :3].T + case.affine[:3, 3]
    inside_any = np.zeros(len(lps), dtype=bool)
    for les in case.lesions:
        assert 5.0 <= les.diameter_mm <= 30.0 and les.organ in (Label.LIVER, Label.LUNG)
        lo, hi = np.array(les.min_corner_lps), np.array(les.max_corner_lps)
        in_box = np.all((lps >= lo - 1e-3) & (lps <= hi + 1e-3), axis=1)
        assert in_box.any(), f"lesion {les.index} ({les.voxel_count} voxels painted) has no label voxel"
        inside_any |= in_box
    assert inside_any.all()


@pytest.mark.parametrize("index", range(3))
def test_kidneys_and_aorta_sit_in_fat(index: int) -> None:
    """In-plane, bowel never touches a kidney or the aorta, nor liver or spleen a kidney: unenhanced
    they differ by 10-25 HU, and a real retroperitoneum parts them with fat (the wall of an unenhanced
    aorta inside bowel was invisible, and the network guessed its size)."""
    rng = np.random.default_rng(index)
    # the site's own 1.7 mm pixels: the thinnest fat (2-3 mm) is a pixel wide there
    grid = case_grid(load_site("site_c"), rng, PatientPosition.HFS, matrix=256, slices=SLICES)
    tissue = build_phantom(grid, rng).tissue
    edge_neighbours = ndimage.generate_binary_structure(2, 1)[None]  # in-plane, 4-connected

    def touching(a: tuple[Tissue, ...], b: tuple[Tissue, ...]) -> int:
        near_b = ndimage.binary_dilation(np.isin(tissue, b), structure=edge_neighbours)
        return int((near_b & np.isin(tissue, a)).sum())

    kidneys = (Tissue.KIDNEY_LEFT, Tissue.KIDNEY_RIGHT)
    assert np.isin(tissue, kidneys).any() and (tissue == Tissue.AORTA).any()
    assert touching((Tissue.BOWEL,), (*kidneys, Tissue.AORTA)) == 0
    assert touching((Tissue.LIVER, Tissue.SPLEEN), kidneys) == 0


def test_different_seeds_give_different_anatomy() -> None:
    a, b = _case("site_c", seed=1), _case("site_c", seed=2)
    assert not np.array_equal(a.labels, b.labels)
    assert a.header.study_instance_uid != b.header.study_instance_uid


def _liver_noise(image: np.ndarray, labels: np.ndarray) -> float:
    """Standard deviation of the in-plane high-pass residual inside the liver (away from its edge)."""
    core = ndimage.binary_erosion(labels == Label.LIVER, iterations=2)
    return float((image - ndimage.uniform_filter(image, size=(1, 5, 5)))[core].std())


def test_sites_have_different_intensity_statistics() -> None:
    """Non-IID: liver noise and level differ between sites (the federation must see it)."""
    stats = {}
    for name in ("site_b", "site_c"):
        case = _case(name)
        stats[name] = (_liver_noise(case.image, case.labels), case.affine[2, 0])
    assert stats["site_b"][0] > 1.5 * stats["site_c"][0]
    assert abs(stats["site_b"][1]) != abs(stats["site_c"][1])


def test_rescan_on_another_scanner_keeps_the_patient() -> None:
    """The paired scanner shift: same anatomy, phase and grid; the other scanner's noise and calibration."""
    own = _case("site_c")
    rescanned = synthesize_case(
        load_site("site_c"), 7, 0, matrix=MATRIX, slices=SLICES, scanner=load_site("site_d")
    )
    assert np.array_equal(own.labels, rescanned.labels) and np.array_equal(own.affine, rescanned.affine)
    assert own.phase is rescanned.phase and own.lesions == rescanned.lesions
    # site_d: sigma 45 HU, site_c: 7 HU
    assert _liver_noise(rescanned.image, own.labels) > 2 * _liver_noise(own.image, own.labels)
    assert rescanned.header.manufacturer == load_site("site_d").equipment.manufacturer
    assert rescanned.header.series_instance_uid != own.header.series_instance_uid
    with pytest.raises(ValueError, match="site_mr"):
        synthesize_case(load_site("site_c"), 7, 0, matrix=MATRIX, slices=SLICES, scanner=load_site("site_mr"))


def test_arterial_phase_keeps_the_patient() -> None:
    """The paired protocol shift: same anatomy, lesions and grid, a new series with arterial enhancement."""
    own = _case("site_c")
    arterial = _case("site_c", phase=ContrastPhase.ARTERIAL)
    assert own.phase is not ContrastPhase.ARTERIAL
    assert np.array_equal(own.labels, arterial.labels) and np.array_equal(own.affine, arterial.affine)
    assert own.lesions == arterial.lesions
    assert arterial.header.series_instance_uid != own.header.series_instance_uid
    assert arterial.header.series_description == "CT arterial"

    def mean_hu(label: Label) -> float:
        return float(arterial.image[ndimage.binary_erosion(arterial.labels == label)].mean())

    assert mean_hu(Label.AORTA) > mean_hu(Label.LIVER) + 150  # the aorta far brighter than the liver
    assert mean_hu(Label.KIDNEY_LEFT) > mean_hu(Label.LIVER) + 60


def test_held_out_site_e_enhances_in_the_arterial_phase() -> None:
    site = load_site("site_e")
    assert site.acquisition.contrast_phase is ContrastPhase.ARTERIAL
    phases = {synthesize_case(site, 7, i, matrix=64, slices=8).phase for i in range(6)}
    assert ContrastPhase.ARTERIAL in phases and ContrastPhase.PORTAL_VENOUS not in phases


def test_mr_site_has_bias_field_and_t1_contrast() -> None:
    case = _case("site_mr")
    assert case.site.modality is Modality.MR and case.image.min() >= 0
    fat_like = case.image[case.labels == Label.LIVER].mean() > case.image[case.labels == Label.SPLEEN].mean()
    assert fat_like or case.phase is ContrastPhase.PORTAL_VENOUS


def _read_sitk(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize("site", ["site_a", "site_b", "site_c"])
def test_dataset_reads_back_on_the_same_grid(tmp_path: Path, site: str) -> None:
    profile = load_site(site)
    prone = profile.model_copy(
        update={
            "acquisition": profile.acquisition.model_copy(update={"positions": {PatientPosition.HFP: 1.0}})
        }
    )
    ds = generate_dataset(
        tmp_path, [prone if site == "site_b" else profile], 1, seed=5, matrix=MATRIX, slices=SLICES
    )
    entry = ds.manifest.cases[0]
    case = synthesize_case(prone if site == "site_b" else profile, 5, 0, matrix=MATRIX, slices=SLICES)
    img = _read_sitk(ds.image_dir(entry))
    direction = np.array(img.GetDirection()).reshape(3, 3)
    spacing = np.array(img.GetSpacing())
    np.testing.assert_allclose(direction[:, 0] * spacing[0], case.affine[:3, 2], atol=1e-4)
    np.testing.assert_allclose(direction[:, 1] * spacing[1], case.affine[:3, 1], atol=1e-4)
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    expected = case.image
    if not np.allclose(
        direction[:, 2] * spacing[2], case.affine[:3, 0], atol=1e-4
    ):  # ITK sorted the other way
        np.testing.assert_allclose(direction[:, 2] * spacing[2], -case.affine[:3, 0], atol=1e-4)
        expected = expected[::-1]
    np.testing.assert_allclose(
        img.TransformIndexToPhysicalPoint((0, 0, 0)), _first_voxel(case, expected is case.image), atol=1e-3
    )
    np.testing.assert_array_equal(arr, expected)
    if site == "site_b":
        assert pydicom.dcmread(next(ds.image_dir(entry).iterdir())).PatientPosition == "HFP"
        assert np.allclose(direction[:, 0], (-1, 0, 0))

    labels, affine = load_label_map(ds.label_map(entry))
    np.testing.assert_array_equal(labels, case.labels)
    np.testing.assert_allclose(affine, case.affine, atol=1e-4)
    nii = nib.load(ds.label_map(entry))
    assert isinstance(nii, nib.Nifti1Image)
    ras_origin = np.diag([-1.0, -1.0, 1.0]) @ case.affine[:3, 3]
    np.testing.assert_allclose(nii.affine[:3, 3], ras_origin, atol=1e-3)  # voxel (0,0,0) in RAS
    boxes = load_lesions(ds.lesions(entry))
    assert len(boxes.lesions) == entry.lesion_count == len(case.lesions)


def _first_voxel(case: SynthCase, same_order: bool) -> np.ndarray:
    k = 0 if same_order else case.image.shape[0] - 1
    return case.affine[:3, 3] + k * case.affine[:3, 0]


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    sites = [load_site("site_b"), load_site("site_c")]
    generate_dataset(tmp_path / "one", sites, 2, seed=11, matrix=64, slices=12)
    generate_dataset(tmp_path / "two", sites, 2, seed=11, matrix=64, slices=12)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 20
    assert all(one[k] == two[k] for k in one), [k for k in one if one[k] != two[k]][:3]


def test_manifest_splits_and_loader(tmp_path: Path) -> None:
    ds = generate_dataset(tmp_path, [load_site("site_c")], 4, seed=1, matrix=64, slices=8)
    loaded = load_dataset(tmp_path)
    assert loaded.manifest == ds.manifest
    splits = [c.split for c in loaded.manifest.cases]
    assert splits.count(Split.VAL) == 1 and splits.count(Split.TEST) == 1
    assert loaded.manifest.labels["lesion"] == Label.LESION
    for case in loaded.manifest.select(split="train", site="site_c"):
        assert loaded.image_dir(case).is_dir() and loaded.label_map(case).is_file()
        assert not Path(case.image_dir).is_absolute()
    (tmp_path / "manifest.json").write_text('{"format_version": 2}')
    with pytest.raises(ValueError, match=r"manifest\.json: invalid manifest"):
        load_dataset(tmp_path)
    with pytest.raises(ValueError, match="run 'medseg synth"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="cases_per_site must be at least 1"):
        generate_dataset(tmp_path, [load_site("site_c")], 0)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed")
@pytest.mark.parametrize("site", [s.name for s in list_sites()])
def test_dciodvfy_reports_no_errors_per_site(tmp_path: Path, site: str) -> None:
    ds = generate_dataset(tmp_path, [load_site(site)], 1, seed=2, matrix=64, slices=3)
    first = sorted(ds.image_dir(ds.manifest.cases[0]).iterdir())[0]
    out = subprocess.run(["dciodvfy", str(first)], capture_output=True, text=True, check=False)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]
    assert not errors, errors


def test_command_generates_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quiet", action="store_true")
    synth_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "synth",
            "-o",
            str(tmp_path),
            "--site",
            "site_c,site_mr",
            "--cases",
            "1",
            "--slices",
            "4",
            "--size",
            "small",
        ]
    )
    assert args.func(args) == 0
    assert "site_mr" in capsys.readouterr().out
    assert {c.site for c in load_dataset(tmp_path).manifest.cases} == {"site_c", "site_mr"}
    args = parser.parse_args(
        ["--quiet", "synth", "-o", str(tmp_path), "--site", "site_mr", "--modality", "CT"]
    )
    with pytest.raises(ValueError, match="not CT"):
        args.func(args)


def test_generated_series_reads_back_with_the_project_reader(tmp_path: Path) -> None:
    """The product's own reader sees exactly the synthesized image on exactly its grid."""
    from dicom_io import read_volume
    from medseg.synth.dataset import synthesize_case, write_case
    from medseg.synth.sites import load_site

    case = synthesize_case(load_site("site_c"), seed=4, index=0, slices=12)
    write_case(case, tmp_path / "case", manifest_root=tmp_path, split=Split.TRAIN)
    from tests.conftest import reorient_like

    volume = read_volume(tmp_path / "case" / "dicom")  # sorted along the normal: may run the other way
    array, affine = reorient_like(case.affine, volume.array, volume.affine)
    np.testing.assert_allclose(affine, case.affine, atol=1e-3)
    np.testing.assert_allclose(array, case.image, atol=0.5)
