"""The command line as a user runs it: one clear message and a non-zero exit on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib

from medseg.cli import main


def test_inspect_json_lists_volumes_exclusions_and_skipped_files(shared_data: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["inspect", "--json", str(shared_data / "dcm_qa_ct/In")]) == 0
    report = json.loads(capsys.readouterr().out)
    statuses = {v["status"] for s in report["series"] for v in s["volumes"]}
    assert statuses == {"read", "refused"}
    reasons = [x["reason"] for s in report["series"] for x in s["excluded"]]
    assert any("localizer" in r for r in reasons) and any("secondary capture" in r for r in reasons)
    assert any(f["reason"] == "DICOMDIR index file, not an image" for f in report["skipped_files"])


def test_convert_writes_nifti_sidecar_and_refusals(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--quiet", "convert", str(shared_data / "dcm_qa_ct/In"), "-o", str(out)]) == 0
    [nifti] = sorted(out.glob("*.nii.gz"))
    assert nib.load(str(nifti)).shape == (512, 512, 28)
    sidecar = json.loads(nifti.with_name(nifti.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Resampled"] == [] and sidecar["Units"] == "HU"
    refused = json.loads((out / "refused.json").read_text())
    assert "gantry tilt of 18.50°" in refused[0]["reason"]


def test_convert_resamples_only_when_asked_and_records_it(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--quiet", "convert", str(shared_data / "dcm_qa_ct/In/GE"), "-o", str(out)]
    assert main([*args, "--resample-tilt", "--resample-spacing"]) == 0
    [sidecar] = [json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "refused.json"]
    assert any("gantry tilt 18.50° removed" in r for r in sidecar["Resampled"])


def test_domain_error_is_one_message_not_a_traceback(tmp_path: Path) -> None:
    empty = tmp_path / "nothing-here"
    proc = subprocess.run(
        [sys.executable, "-m", "medseg.cli", "convert", str(empty), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
