"""The reader on every real series in ../shared/data, checked against dcm2niix run by the tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io import GeometryError, GeometryOptions, ImageVolume, ReadOptions, read_volume, read_volumes, scan
from dicom_io.nifti import load_nifti_lps
from tests.conftest import reorient_like, run_dcm2niix

RESAMPLE_ALL = ReadOptions(geometry=GeometryOptions(resample_tilt=True, resample_spacing=True))


def assert_matches_nifti(volume: ImageVolume, nifti: Path, *, value_tol: float = 1e-3) -> None:
    array, affine = load_nifti_lps(nifti)
    array, affine = reorient_like(volume.affine, array, affine)
    assert array.shape == volume.shape
    np.testing.assert_allclose(affine, volume.affine, atol=1e-3)
    np.testing.assert_allclose(np.asarray(array, dtype=np.float32), volume.array, atol=value_tol)


def test_totalsegmentator_ct_j2k_matches_dcm2niix(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "TotalSegmentator/tests/reference_files/example_ct_dicom"
    volume = read_volume(folder)  # JPEG 2000 lossless; SOP UIDs only in the file meta: tolerant reading
    assert volume.shape == (20, 512, 512)
    assert volume.unit.value == "HU"
    assert volume.array.min() >= -1024
    [nifti] = run_dcm2niix(folder, tmp_path)
    assert_matches_nifti(volume, nifti)
    assert_matches_nifti(volume, shared_data / "reference_dcm2niix/TotalSegmentator/example_ct_dicom.nii.gz")
    assert all(f.sop_instance_uid for f in volume.frames)


def test_philips_folder_excludes_localizer_secondary_capture_and_dicomdir(shared_data: Path) -> None:
    inventory = scan(shared_data / "dcm_qa_ct/In/Philips")
    reasons = {x.reason for s in inventory.series for x in s.exclusions}
    assert any(r.startswith("localizer") for r in reasons)
    assert any(r.startswith("secondary capture") for r in reasons)
    skipped = {Path(s.name).name: s.reason for s in inventory.skipped}
    assert skipped["DICOMDIR"] == "DICOMDIR index file, not an image"
    assert skipped["DIRFILE"] == "DICOMDIR index file, not an image"
    [candidate] = inventory.candidates
    assert len(candidate.frames) == 28


def test_philips_axial_series_matches_dcm2niix(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "dcm_qa_ct/In/Philips"
    volume = read_volume(folder)
    [nifti] = run_dcm2niix(folder / "S21570/S2010", tmp_path)
    assert_matches_nifti(volume, nifti)


def test_dicomdir_given_directly_is_followed(shared_data: Path) -> None:
    inventory = scan(shared_data / "dcm_qa_ct/In/Philips/DICOMDIR")
    numbers = sorted(s.series_number or 0 for s in inventory.series)
    assert numbers == [100, 201, 401]
    assert any(s.reason.startswith("referenced by") and "S21610" in s.name for s in inventory.skipped)
    assert sum(len(c.frames) for c in inventory.candidates) == 28


def test_ge_gantry_tilt_refused_by_default(shared_data: Path) -> None:
    with pytest.raises(GeometryError, match=r"gantry tilt of 18\.50°.*--resample-tilt"):
        read_volume(shared_data / "dcm_qa_ct/In/GE", ReadOptions(GeometryOptions(resample_spacing=True)))
    with pytest.raises(GeometryError, match=r"slice spacing varies 1\.08-7 mm.*--resample-spacing"):
        read_volume(shared_data / "dcm_qa_ct/In/GE")


@pytest.mark.slow
def test_ge_tilt_resampled_matches_dcm2niix_tilt_corrected(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "dcm_qa_ct/In/GE"
    volume = read_volume(folder, RESAMPLE_ALL)
    assert any("gantry tilt 18.50° removed" in r for r in volume.geometry.resampled)
    assert any("resampled to uniform" in r for r in volume.geometry.resampled)
    [reference] = [p for p in run_dcm2niix(folder, tmp_path) if "Tilt_Eq" in p.name]
    array, affine = reorient_like(volume.affine, *load_nifti_lps(reference))
    assert array.shape == volume.shape
    np.testing.assert_allclose(affine, volume.affine, atol=1e-3)
    # dcm2niix rounds to int16 and pads differently outside the field of view: compare inside the head
    inside = (volume.array > -500) & (array > -500)
    assert inside.mean() > 0.2
    diff = np.abs(array[inside] - volume.array[inside])
    assert float(np.median(diff)) <= 1.0, np.median(diff)
    assert float(np.percentile(diff, 99)) <= 60.0


def test_enhanced_philips_splits_magnitude_and_fieldmap(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "dcm_qa_enh/In/Philips"
    result = read_volumes(folder)
    assert len(result.volumes) == 2
    references = {p.name: p for p in run_dcm2niix(folder, tmp_path, "-p", "n")}
    labels = [c.split_label for c in result.inventory.candidates]
    assert any("MAGNITUDE" in s for s in labels) and any("FIELD_MAP" in s for s in labels)
    for volume, label in zip(result.volumes, labels, strict=True):
        name = next(n for n in references if ("fieldmap" in n) == ("FIELD_MAP" in label))
        assert_matches_nifti(volume, references[name], value_tol=0.01)
    assert all(f.frame_number is not None for v in result.volumes for f in v.frames)


def test_enhanced_siemens_four_timepoints_match_dcm2niix_4d(shared_data: Path) -> None:
    result = read_volumes(shared_data / "dcm_qa_enh/In/Siemens/XA10")
    assert [v.shape for v in result.volumes] == [(6, 64, 64)] * 4
    ref = shared_data / "dcm_qa_enh/Ref/Siemens_REST1_w_SMS_PF7-8_6.nii"
    import nibabel as nib

    img = nib.load(str(ref))
    data = np.asarray(img.get_fdata())
    from dicom_io.nifti import _SWAP, LPS_TO_RAS

    affine = LPS_TO_RAS @ img.affine @ _SWAP
    for t, volume in enumerate(result.volumes):
        array, aff = reorient_like(volume.affine, np.transpose(data[..., t], (2, 1, 0)), affine)
        np.testing.assert_allclose(aff, volume.affine, atol=1e-3)
        np.testing.assert_allclose(array, volume.array, atol=1e-3)


def test_transfer_syntaxes_decode_to_identical_pixels(shared_data: Path) -> None:
    files = sorted((shared_data / "dcm_qa_ts/In").glob("*.dcm"))
    syntaxes = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in files}
    expected = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5"]
    expected += ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"]
    assert syntaxes == set(expected)  # implicit/explicit/big endian, RLE, JPEG lossless, JPEG-LS, J2K
    arrays = [pydicom.dcmread(f).pixel_array for f in files]
    for f, a in zip(files[1:], arrays[1:], strict=True):
        np.testing.assert_array_equal(a, arrays[0], err_msg=str(f))
    # a mosaic is not a volume: excluded with its reason rather than stacked wrongly
    [entry] = scan(files).series
    assert entry.exclusions[0].reason.startswith("Siemens mosaic")


def test_ct_uncompressed_and_j2k_give_the_same_hounsfield_volume(shared_data: Path) -> None:
    base = shared_data / "pydicom-data/data_store/data"
    plain, j2k = read_volume(base / "693_UNCR.dcm"), read_volume(base / "693_J2KR.dcm")
    np.testing.assert_array_equal(plain.array, j2k.array)
    np.testing.assert_array_equal(plain.affine, j2k.affine)


def test_sparse_monai_series_refused_as_missing_slices(shared_data: Path) -> None:
    with pytest.raises(GeometryError, match=r"missing slice\(s\): a gap of 202 mm between .*7106 and .*7136"):
        read_volume(shared_data / "MONAI/tests/testing_data/CT_DICOM")


def test_reading_modifies_nothing_on_disk(shared_data: Path) -> None:
    folder = shared_data / "dcm_qa_ct/In/Philips"

    def digest() -> str:
        h = hashlib.sha256()
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h.update(p.read_bytes())
        return h.hexdigest()

    before = digest()
    read_volumes(folder, RESAMPLE_ALL)
    assert digest() == before
