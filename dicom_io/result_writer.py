"""Write an analysis result as SEG + Parametric Map + SR (+ PNG preview), and only after the gate passes.

The objects are built in memory, written into a staging folder inside ``out_dir``, checked by
``dicom_io.gate`` and only then moved into place (a rename on the same file system, so a reader of
``out_dir`` never sees a half-written or unchecked object). When the gate refuses, nothing is moved, the
staging folder is deleted, or, with ``keep_rejected=True``, renamed to ``REJECTED-<series UID>`` for
debugging, and ``GateError`` says which object failed which check.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from dicom_io.ai_result import AnalysisResult
from dicom_io.gate import GateError, GateReport, GateTools, check_outputs
from dicom_io.parametric_map import build_parametric_map
from dicom_io.seg import SegProfile, build_seg
from dicom_io.sr import build_sr

log = logging.getLogger(__name__)

SEG_FILE = "seg.dcm"
PM_FILE = "uncertainty_pm.dcm"
SR_FILE = "report_sr.dcm"
PREVIEW_FILE = "preview.png"


@dataclass(frozen=True)
class WrittenResults:
    """What left the gate: final paths, the gate's report, file sizes (bytes) and seconds per step."""

    seg: Path
    parametric_map: Path
    sr: Path
    preview: Path | None
    profile: SegProfile
    gate: GateReport
    sizes: Mapping[str, int]
    seconds: Mapping[str, float]

    def __repr__(self) -> str:
        size = ", ".join(f"{k}={v / 1e6:.2f} MB" for k, v in self.sizes.items())
        return (
            f"WrittenResults(dir={self.seg.parent}, profile={self.profile.value}, {size}, "
            f"total={sum(self.seconds.values()):.1f} s)"
        )


def write_results(
    result: AnalysisResult,
    out_dir: Path | str,
    profile: SegProfile = SegProfile.BROAD,
    preview: bool = True,
    *,
    tools: GateTools | None = None,
    keep_rejected: bool = False,
) -> WrittenResults:
    """Build, write, gate and publish the result objects of ``result`` in ``out_dir``.

    Existing files of the same names are replaced only after the new ones passed the gate.

    Raises
    ------
    dicom_io.ai_result.ResultError
        The result cannot be encoded (see the builders).
    dicom_io.gate.GateError
        An object failed a gate check; ``out_dir`` is left as it was.
    """
    profile = SegProfile(profile)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(step: str, start: float) -> None:
        seconds[step] = time.perf_counter() - start

    t = time.perf_counter()
    seg = build_seg(result, profile)
    timed("build_seg", t)
    t = time.perf_counter()
    pm = build_parametric_map(result)
    timed("build_pm", t)
    t = time.perf_counter()
    sr = build_sr(result, seg)
    timed("build_sr", t)
    png = None
    if preview:
        from dicom_io.preview import render_preview  # Pillow and the montage only when asked for

        t = time.perf_counter()
        png = render_preview(result)
        timed("build_preview", t)

    staging = out / f".staging-{result.source.series.series_instance_uid}-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        t = time.perf_counter()
        files = {"seg": staging / SEG_FILE, "pm": staging / PM_FILE, "sr": staging / SR_FILE}
        seg.save_as(files["seg"], enforce_file_format=True)
        pm.save_as(files["pm"], enforce_file_format=True)
        sr.save_as(files["sr"], enforce_file_format=True)
        if png is not None:
            from dicom_io.preview import write_png

            files["preview"] = write_png(png, staging / PREVIEW_FILE)
        timed("write", t)
        t = time.perf_counter()
        report = check_outputs(result, files["seg"], files["pm"], files["sr"], tools=tools)
        timed("gate", t)
        if not report.ok:
            raise GateError(report)
        t = time.perf_counter()
        final = {key: out / path.name for key, path in files.items()}
        sizes = {key: path.stat().st_size for key, path in files.items()}
        for key, path in files.items():
            os.replace(path, final[key])
        if png is None and (out / PREVIEW_FILE).exists():  # never leave an older run's picture beside
            (out / PREVIEW_FILE).unlink()
        staging.rmdir()
        timed("publish", t)
    except BaseException:
        if staging.exists():
            if keep_rejected:
                rejected = out / f"REJECTED-{result.source.series.series_instance_uid}"
                if rejected.exists():
                    shutil.rmtree(rejected)
                staging.rename(rejected)
                log.warning("gate refused the results; kept for debugging in %s", rejected)
            else:
                shutil.rmtree(staging)
        raise
    log.info(
        "wrote %s results of series %s to %s (%.1f s)",
        profile.value,
        result.source.series.series_instance_uid,
        out,
        sum(seconds.values()),
    )
    return WrittenResults(
        seg=final["seg"],
        parametric_map=final["pm"],
        sr=final["sr"],
        preview=final.get("preview"),
        profile=profile,
        gate=report,
        sizes=MappingProxyType(sizes),
        seconds=MappingProxyType(seconds),
    )
