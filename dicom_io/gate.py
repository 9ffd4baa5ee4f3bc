"""The output gate: nothing leaves until independent tools have checked and read back every object.

Checks (DICOM.md 20), each recorded as a ``GateCheck``:

- every object: ``dciodvfy`` (Debian dicom3tools) reports no error (warnings are allowed). The Debian build
  predates Label Map Segmentation Storage (Supplement 243) and answers "Information Object Not found"
  for it; that check is then recorded as *not checkable* (neither passed nor failed), and the LABELMAP
  SEG rests on the two read-backs below;
- SEG: read back by highdicom and by dcmqi's ``segimage2itkimage`` (what 3D Slicer uses); both must give the
  in-memory segment-number map voxel for voxel, compared in patient coordinates through the affines, and
  every source instance must be referenced;
- Parametric Map: read back by dcmqi's ``paramap2itkimage`` with the same values (float tolerance);
- SR: pixelmed ``DicomSRValidator`` (Debian pixelmed-apps) reports no error, and dcmqi's ``tid1500reader``
  reads back exactly the numbers ``dicom_io.sr.reported_values`` says were written, with the segment
  references.

A missing tool is a failed check that names the tool and how to install it, never a silent pass.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk

from dicom_io.ai_result import AnalysisResult
from dicom_io.derived import tracking_uid
from dicom_io.errors import DicomIOError
from dicom_io.seg import segment_number_map
from dicom_io.sr import reported_values

log = logging.getLogger(__name__)

LABELMAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
# dciodvfy's message for a Referenced Segment Number in a reference to a SOP Class it does not know as SEG
_LABELMAP_REFERENCE_ERROR = " ".join(
    (
        "Shall not be present for Referenced SOP Class that is not segmentation",
        "- attribute <ReferencedSegmentNumber>",
    )
)
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# Current JDKs cap XPath expression sizes below what pixelmed's template validator needs (DICOM.md 20).
JAVA_XPATH_LIMITS = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)
# pixelmed's template validator needs about 1 GB of Java heap for the report's frame (observer, procedure,
# image library) plus about 13 MB per numeric measurement (heap after GC: 1.09 GB for 4 structure groups,
# 1.64 and 2.02 GB with 4 and 6 lesion groups of 14 measurements beside them), so a report of eight
# structures and twenty lesions ran out of the JVM's default heap (a quarter of the machine's memory). A
# large report is therefore validated in parts of at most this many measurements, each under a fixed heap,
# two at a time; a part that still runs out of heap is halved.
PIXELMED_MEASUREMENTS_PER_RUN = 80
PIXELMED_HEAP = "-Xmx3g"
PIXELMED_PARALLEL_RUNS = 2
_IMAGING_MEASUREMENTS = "126010"  # DCM code of the TID 1500 container that holds the measurement groups
_TIMEOUT_S = 600
_INSTALL = {
    "dciodvfy": "install the Debian package dicom3tools (scripts/setup.sh does)",
    "java": "install a Java runtime with the Debian package pixelmed-apps (scripts/setup.sh does)",
    "pixelmed": "install the Debian package pixelmed-apps (scripts/setup.sh does)",
    "segimage2itkimage": "install the Python package dcmqi (a runtime dependency: pip install dcmqi)",
    "paramap2itkimage": "install the Python package dcmqi (a runtime dependency: pip install dcmqi)",
    "tid1500reader": "install the Python package dcmqi (a runtime dependency: pip install dcmqi)",
}


class GateError(DicomIOError):
    """An output object failed the gate; ``report`` holds every check."""

    def __init__(self, report: GateReport) -> None:
        self.report = report
        failed = "; ".join(f"{c.object} {c.check}: {c.detail}" for c in report.failures)
        super().__init__(f"output gate refused the results ({len(report.failures)} failed checks): {failed}")


@dataclass(frozen=True)
class GateCheck:
    """One check of one object. ``checkable`` False: the tool cannot judge this object (not a pass)."""

    object: str
    check: str
    passed: bool
    detail: str
    checkable: bool = True
    seconds: float = 0.0

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else ("NOT CHECKABLE" if not self.checkable else "FAIL")
        return f"{verdict:13} {self.object:4} {self.check} ({self.seconds:.1f} s): {self.detail}"


@dataclass(frozen=True)
class GateReport:
    """Every check that ran; the results may leave only when ``ok``."""

    checks: tuple[GateCheck, ...]

    @property
    def failures(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if c.checkable and not c.passed)

    @property
    def not_checkable(self) -> tuple[GateCheck, ...]:
        return tuple(c for c in self.checks if not c.checkable)

    @property
    def ok(self) -> bool:
        return not self.failures and bool(self.checks)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise GateError(self)

    def __str__(self) -> str:
        return "\n".join(str(c) for c in self.checks)


def _which(name: str) -> Path | None:
    """A tool next to this interpreter (the venv's bin) first, then on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    return Path(found) if found else None


@dataclass(frozen=True)
class GateTools:
    """Where the gate's tools are; ``None`` for a tool that is not installed (its checks then fail)."""

    dciodvfy: Path | None
    java: Path | None
    pixelmed_jar: Path | None
    segimage2itkimage: Path | None
    paramap2itkimage: Path | None
    tid1500reader: Path | None

    @classmethod
    def discover(cls) -> GateTools:
        return cls(
            dciodvfy=_which("dciodvfy"),
            java=_which("java"),
            pixelmed_jar=PIXELMED_JAR if PIXELMED_JAR.is_file() else None,
            segimage2itkimage=_which("segimage2itkimage"),
            paramap2itkimage=_which("paramap2itkimage"),
            tid1500reader=_which("tid1500reader"),
        )


class _ToolMissing(Exception):
    pass


def _tool(path: Path | None, name: str) -> Path:
    if path is None or not path.exists():
        where = f" (looked for {path})" if path is not None else f" next to {sys.executable} or on PATH"
        raise _ToolMissing(f"{name} not found{where}; {_INSTALL[name]}")
    return path


def _run(command: Sequence[str | Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
    )


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------- geometry of read-backs (pure compute)


def load_itk_lps(path: Path) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Read an ITK image (NRRD, NIfTI...) as a (slice, row, column) array with its LPS affine.

    ITK works in LPS and indexes (x, y, z) = (column, row, slice); ``GetArrayFromImage`` already returns
    (slice, row, column), so only the affine columns are reordered.
    """
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    for ours, theirs in ((0, 2), (1, 1), (2, 0)):
        affine[:3, ours] = direction[:, theirs] * spacing[theirs]
    affine[:3, 3] = image.GetOrigin()
    return array, affine


def onto_grid(
    array: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    grid_affine: npt.NDArray[np.float64],
    grid_shape: tuple[int, int, int],
    tolerance: float = 1e-3,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
    """Place ``array`` (on ``affine``) onto a grid, without interpolation: (values, covered voxels).

    The two grids must share voxel centres (their index axes may be permuted or flipped, as readers
    choose); anything else means the object is not on the source grid and raises ``ValueError``.
    """
    m = np.linalg.inv(grid_affine) @ affine  # their index -> our index
    rot, shift = m[:3, :3], m[:3, 3]
    perm = np.argmax(np.abs(rot), axis=0)  # their axis i -> our axis perm[i]
    signs = np.sign(rot[perm, np.arange(3)])
    expected = np.zeros((3, 3))
    expected[perm, np.arange(3)] = signs
    if sorted(perm.tolist()) != [0, 1, 2] or not np.allclose(rot, expected, atol=tolerance):
        raise ValueError(f"index axes do not map onto the grid axes: {np.round(rot, 4).tolist()}")
    if not np.allclose(shift, np.round(shift), atol=tolerance):
        raise ValueError(f"voxel centres are offset from the grid by {np.round(shift - np.round(shift), 4)}")
    values = np.asarray(array)
    start = np.round(shift).astype(int)
    for axis in range(3):  # flip their axes that run backwards, so every axis increases with ours
        if signs[axis] < 0:
            values = np.flip(values, axis=axis)
            start[perm[axis]] -= values.shape[axis] - 1
    values = np.transpose(values, np.argsort(perm))
    out = np.zeros(grid_shape, dtype=values.dtype)
    covered = np.zeros(grid_shape, dtype=bool)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + values.shape, grid_shape)
    if np.any(hi <= lo):
        raise ValueError(
            f"the image {values.shape} at offset {start.tolist()} lies outside grid {grid_shape}"
        )
    src = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start, strict=True))
    dst = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    outside = values.copy()
    outside[src] = 0
    if np.any(outside):
        raise ValueError(f"{int(np.count_nonzero(outside))} non-zero voxels fall outside the source grid")
    out[dst] = values[src]
    covered[dst] = True
    return out, covered


def compare_labels(
    expected: npt.NDArray[np.integer], got: npt.NDArray[Any], covered: npt.NDArray[np.bool_]
) -> str | None:
    """``None`` when equal voxel for voxel (uncovered voxels must be background), else what differs."""
    diff = (expected != got) & covered
    diff |= (expected != 0) & ~covered
    if not diff.any():
        return None
    first = tuple(int(i) for i in np.argwhere(diff)[0])
    return (
        f"{int(diff.sum())} voxels differ (first at (k, r, c) {first}: expected {int(expected[first])}, "
        f"read {got[first]!r})"
    )


# ---------------------------------------------------------------- the checks


def _dciodvfy(tools: GateTools, name: str, path: Path) -> GateCheck:
    exe = _tool(tools.dciodvfy, "dciodvfy")
    proc = _run([exe, path])
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    sop_class = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
    if sop_class == LABELMAP_SEG and any("Information Object Not found" in e for e in errors):
        return GateCheck(
            name,
            "dciodvfy",
            False,
            "not checkable: this dciodvfy predates Label Map Segmentation Storage (Supplement 243) and "
            "does not know the IOD; the object rests on the highdicom and dcmqi read-backs",
            checkable=False,
        )
    warnings = sum(1 for line in output.splitlines() if line.startswith("Warning"))
    if errors:
        return GateCheck(name, "dciodvfy", False, f"{len(errors)} errors: {' | '.join(errors[:5])}")
    return GateCheck(name, "dciodvfy", True, f"no errors ({warnings} warnings)")


def _dciodvfy_sr(tools: GateTools, path: Path, seg_path: Path) -> list[GateCheck]:
    """dciodvfy on the SR; its rule on references to a LABELMAP SEG is recorded as not checkable.

    Not knowing Label Map Segmentation Storage, this dciodvfy flags every Referenced Segment Number in
    a reference to one as "Shall not be present for Referenced SOP Class that is not segmentation". Only
    those exact messages are set aside (and counted) when the SR references a LABELMAP SEG; any other
    error still fails the check.
    """
    check = _dciodvfy(tools, "SR", path)
    seg_class = str(
        pydicom.dcmread(seg_path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID
    )
    if check.passed or seg_class != LABELMAP_SEG:
        return [check]
    proc = _run([_tool(tools.dciodvfy, "dciodvfy"), path])
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    artefacts = [e for e in errors if _LABELMAP_REFERENCE_ERROR in e]
    others = [e for e in errors if _LABELMAP_REFERENCE_ERROR not in e]
    unknown = GateCheck(
        "SR",
        "dciodvfy on LABELMAP segment references",
        False,
        f"not checkable: {len(artefacts)} references to Label Map Segmentation segments, which this "
        "dciodvfy does not know as a segmentation (pre-Supplement 243)",
        checkable=False,
    )
    if others:
        return [
            GateCheck("SR", "dciodvfy", False, f"{len(others)} errors: {' | '.join(others[:5])}"),
            unknown,
        ]
    warnings = sum(1 for line in lines if line.startswith("Warning"))
    rest = GateCheck(
        "SR", "dciodvfy", True, f"no errors apart from the LABELMAP references ({warnings} warnings)"
    )
    return [rest, unknown]


def _seg_highdicom(result: AnalysisResult, path: Path, expected: npt.NDArray[np.integer]) -> GateCheck:
    seg = hd.seg.segread(path)
    referenced = {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    missing = {f.sop_instance_uid for f in result.source.frames} - referenced
    if missing:
        return GateCheck(
            "SEG", "highdicom read-back", False, f"{len(missing)} source instances not referenced"
        )
    if str(seg.FrameOfReferenceUID) != str(result.source.series.frame_of_reference_uid):
        return GateCheck(
            "SEG", "highdicom read-back", False, f"FrameOfReferenceUID {seg.FrameOfReferenceUID}"
        )
    volume = seg.get_volume(combine_segments=True, relabel=False)
    got, covered = onto_grid(volume.array, volume.affine, result.source.affine, result.source.shape)
    problem = compare_labels(expected, got, covered)
    if problem:
        return GateCheck("SEG", "highdicom read-back", False, problem)
    segments = sum(1 for s in seg.SegmentSequence if s.SegmentNumber > 0)
    return GateCheck(
        "SEG",
        "highdicom read-back",
        True,
        f"{segments} segments, label map identical on {result.source.shape} source grid, "
        f"{len(referenced)} source instances referenced",
    )


def _seg_dcmqi(
    tools: GateTools, result: AnalysisResult, path: Path, expected: npt.NDArray[np.integer]
) -> GateCheck:
    exe = _tool(tools.segimage2itkimage, "segimage2itkimage")
    with tempfile.TemporaryDirectory(prefix="gate-seg-") as tmp:
        proc = _run(
            [
                exe,
                "--inputDICOM",
                path,
                "--outputDirectory",
                tmp,
                "-t",
                "nrrd",
                "--mergeSegments",
                "-p",
                "seg",
            ]
        )
        images = sorted(Path(tmp).glob("seg-*.nrrd"))
        if proc.returncode != 0 or len(images) != 1:
            return GateCheck(
                "SEG",
                "dcmqi segimage2itkimage",
                False,
                f"exit {proc.returncode}, {len(images)} label images (expected 1): "
                + _tail(proc.stdout + proc.stderr),
            )
        array, affine = load_itk_lps(images[0])
    got, covered = onto_grid(array, affine, result.source.affine, result.source.shape)
    problem = compare_labels(expected, got, covered)
    if problem:
        return GateCheck("SEG", "dcmqi segimage2itkimage", False, problem)
    return GateCheck(
        "SEG", "dcmqi segimage2itkimage", True, f"label map identical on {result.source.shape} grid"
    )


def _pm_dcmqi(tools: GateTools, result: AnalysisResult, path: Path) -> GateCheck:
    exe = _tool(tools.paramap2itkimage, "paramap2itkimage")
    with tempfile.TemporaryDirectory(prefix="gate-pm-") as tmp:
        proc = _run([exe, "--inputDICOM", path, "--outputDirectory", tmp, "-t", "nrrd"])
        image = Path(tmp) / "pmap.nrrd"
        if proc.returncode != 0 or not image.is_file():
            return GateCheck(
                "PM",
                "dcmqi paramap2itkimage",
                False,
                f"exit {proc.returncode}: {_tail(proc.stdout + proc.stderr)}",
            )
        array, affine = load_itk_lps(image)
        meta = json.loads((Path(tmp) / "meta.json").read_text())
    got, covered = onto_grid(array, affine, result.source.affine, result.source.shape)
    if not covered.all():
        return GateCheck(
            "PM", "dcmqi paramap2itkimage", False, f"covers {int(covered.sum())} of {covered.size} voxels"
        )
    expected = result.uncertainty_map
    if not np.allclose(got, expected, rtol=1e-6, atol=1e-6):
        worst = float(np.max(np.abs(got.astype(np.float64) - expected)))
        return GateCheck("PM", "dcmqi paramap2itkimage", False, f"values differ by up to {worst:.3g}")
    unit = meta.get("MeasurementUnitsCode", {}).get("CodeValue", "?")
    return GateCheck(
        "PM", "dcmqi paramap2itkimage", True, f"values identical on the source grid (unit {unit})"
    )


def _count_numeric(items: Sequence[pydicom.Dataset]) -> int:
    return sum((item.ValueType == "NUM") + _count_numeric(item.get("ContentSequence", [])) for item in items)


def _measurement_groups(sr: pydicom.Dataset) -> tuple[int, list[pydicom.Dataset]] | None:
    """Where the Imaging Measurements container sits in the root content, and its groups."""
    for i, item in enumerate(sr.ContentSequence):
        if (
            item.ValueType == "CONTAINER"
            and item.ConceptNameCodeSequence[0].CodeValue == _IMAGING_MEASUREMENTS
            and "ContentSequence" in item
        ):
            return i, list(item.ContentSequence)
    return None


def _with_groups(sr: pydicom.Dataset, groups: Sequence[pydicom.Dataset]) -> pydicom.Dataset:
    found = _measurement_groups(sr)
    assert found is not None, "only a report with measurement groups is split"
    part = copy.deepcopy(sr)
    part.ContentSequence[found[0]].ContentSequence = list(groups)
    return part


def sr_validation_parts(sr: pydicom.Dataset, measurements_per_part: int) -> list[pydicom.Dataset]:
    """Copies of ``sr`` that each keep every item but a share of the measurement groups, in order.

    Together the parts hold each measurement group exactly once (a group is never split), and each part
    holds all the rest of the report (observer context, procedure, image library, qualitative
    evaluations), so pixelmed checks every content item of the report in at least one part. A report
    whose groups hold at most ``measurements_per_part`` numeric items is its own single part.

    Item-level errors (a NUM without its value) are found in whichever part holds the item. pixelmed checks
    a template's required rows across the groups it attributes to that template rather than group by
    group (measured: a TID 1410 group without its image region passes beside other lesion groups, in a
    whole report too, and fails beside structure groups), which no split can make exact; a part never
    holds a lone group, where it found nothing at all.
    """
    found = _measurement_groups(sr)
    if found is None:
        return [sr]
    shares: list[list[pydicom.Dataset]] = [[]]
    used = 0
    for group in found[1]:
        n = _count_numeric([group])
        if len(shares[-1]) >= 2 and used + n > measurements_per_part:
            shares.append([])
            used = 0
        shares[-1].append(group)
        used += n
    if len(shares) > 1 and len(shares[-1]) == 1:
        lone = shares.pop()
        shares[-1] += lone
    return [sr] if len(shares) == 1 else [_with_groups(sr, share) for share in shares]


@dataclass(frozen=True)
class _PixelmedRun:
    """What validator runs said: the first failure (None when all passed) and how many warnings."""

    failure: str | None
    warnings: int
    out_of_memory: bool = False


def _pixelmed_once(java: Path, jar: Path, path: Path) -> _PixelmedRun:
    proc = _run(
        [java, PIXELMED_HEAP, *JAVA_XPATH_LIMITS, "-cp", jar, "com.pixelmed.validate.DicomSRValidator", path]
    )
    output = proc.stdout + proc.stderr
    lines = output.splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    complete = "Root Template Validation Complete" in output and "IOD validation complete" in output
    warnings = sum(1 for line in lines if line.startswith("Warning"))
    if proc.returncode == 0 and not errors and complete:
        return _PixelmedRun(None, warnings)
    shown = " | ".join(errors[:5]) or _tail(output)
    return _PixelmedRun(f"exit {proc.returncode}: {shown}", warnings, "OutOfMemoryError" in output)


def _pixelmed_part(
    java: Path, jar: Path, part: pydicom.Dataset, written: Path | None, scratch: Path, name: str
) -> _PixelmedRun:
    """Validate one part (the file ``written``, or saved as ``name`` in ``scratch``); when pixelmed runs
    out of heap on it, validate each half of its groups instead (saved in ``scratch`` too)."""
    path = written or scratch / f"{name}.dcm"
    if written is None:
        part.save_as(path, enforce_file_format=True)
    run = _pixelmed_once(java, jar, path)
    found = _measurement_groups(part)
    if not run.out_of_memory or found is None or len(found[1]) < 4:  # halves of two groups or more
        return run
    groups, half = found[1], len(found[1]) // 2
    log.info(
        "gate: pixelmed ran out of heap on %s; validating its %d groups in two halves", name, len(groups)
    )
    halves = [
        _pixelmed_part(java, jar, _with_groups(part, share), None, scratch, f"{name}-{n}")
        for n, share in enumerate((groups[:half], groups[half:]))
    ]
    failed = next((r for r in halves if r.failure), None)
    return failed or _PixelmedRun(None, sum(r.warnings for r in halves))


def _sr_pixelmed(tools: GateTools, path: Path) -> GateCheck:
    java = _tool(tools.java, "java")
    jar = _tool(tools.pixelmed_jar, "pixelmed")
    parts = sr_validation_parts(pydicom.dcmread(path), PIXELMED_MEASUREMENTS_PER_RUN)
    with (
        tempfile.TemporaryDirectory(prefix="gate-sr-parts-") as tmp,
        ThreadPoolExecutor(PIXELMED_PARALLEL_RUNS) as pool,
    ):
        written = path if len(parts) == 1 else None  # a single part is the written file itself
        runs = list(
            pool.map(
                lambda n: _pixelmed_part(java, jar, parts[n], written, Path(tmp), f"part{n + 1}"),
                range(len(parts)),
            )
        )
    for n, run in enumerate(runs, start=1):
        if run.failure:
            where = f"part {n} of {len(runs)}, " if len(runs) > 1 else ""
            return GateCheck("SR", "pixelmed DicomSRValidator", False, where + run.failure)
    warnings = sum(r.warnings for r in runs)
    how = (
        f" over {len(runs)} parts of at most {PIXELMED_MEASUREMENTS_PER_RUN} measurements"
        if len(runs) > 1
        else ""
    )
    return GateCheck(
        "SR", "pixelmed DicomSRValidator", True, f"TID 1500 valid, no errors ({warnings} warnings{how})"
    )


def _sr_dcmqi(tools: GateTools, result: AnalysisResult, path: Path, seg_path: Path) -> GateCheck:
    exe = _tool(tools.tid1500reader, "tid1500reader")
    with tempfile.TemporaryDirectory(prefix="gate-sr-") as tmp:
        out = Path(tmp) / "sr.json"
        proc = _run([exe, "--inputDICOM", path, "--outputMetadata", out])
        if proc.returncode != 0 or not out.is_file():
            return GateCheck(
                "SR",
                "dcmqi tid1500reader",
                False,
                f"exit {proc.returncode}: {_tail(proc.stdout + proc.stderr)}",
            )
        document = json.loads(out.read_text())
    seg_uid = str(
        pydicom.dcmread(seg_path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
    )
    expected = {v.key: v for v in reported_values(result)}
    found: dict[tuple[str, str, str, str], float] = {}
    problems: list[str] = []
    numbers = {tracking_uid(result, f"segment {s.label}"): n for n, s in enumerate(result.segments, start=1)}
    referencing = 0
    for group in document.get("Measurements", []):
        uid = str(group.get("TrackingUniqueIdentifier", ""))
        if "ReferencedSegment" in group:
            referencing += 1
            tid = str(group.get("TrackingIdentifier", ""))
            segment, of = group["ReferencedSegment"], group.get("segmentationSOPInstanceUID")
            if of != seg_uid or segment != numbers.get(uid):
                problems.append(f"group {tid!r} references segment {segment} of SEG {of}")
        for item in group.get("measurementItems", []):
            q, d = item.get("quantity", {}), item.get("derivationModifier", {})
            key = (
                uid,
                str(q.get("CodeValue")),
                str(q.get("CodingSchemeDesignator")),
                str(d.get("CodeValue", "")),
            )
            found[key] = float(item["value"])
    for key, value in expected.items():
        if key not in found:
            problems.append(f"{value.tracking_id} {value.name.meaning} missing")
        elif not math.isclose(found[key], value.value, rel_tol=1e-6, abs_tol=1e-9):
            problems.append(
                f"{value.tracking_id} {value.name.meaning}: read {found[key]}, wrote {value.value}"
            )
    problems += [f"unexpected measurement {key}" for key in found.keys() - expected.keys()]
    present = len({v.tracking_uid for v in expected.values() if v.tracking_uid in numbers})
    if referencing != present:
        problems.append(
            f"{referencing} groups reference a SEG segment, expected {present} (one per structure)"
        )
    if problems:
        return GateCheck("SR", "dcmqi tid1500reader", False, "; ".join(problems[:5]))
    return GateCheck(
        "SR", "dcmqi tid1500reader", True, f"{len(expected)} measurement values read back identical"
    )


def _guarded(name: str, check: str, run: Callable[[], GateCheck | list[GateCheck]]) -> list[GateCheck]:
    """Run one check and time it; any exception fails the check (the gate fails closed)."""
    t = time.perf_counter()
    try:
        out = run()
        checks = out if isinstance(out, list) else [out]
    except _ToolMissing as err:
        checks = [GateCheck(name, check, False, str(err))]
    except subprocess.TimeoutExpired as err:
        checks = [GateCheck(name, check, False, f"timed out after {err.timeout} s")]
    except Exception as err:  # a reader crashing on our object is a failed check, never a pass
        checks = [GateCheck(name, check, False, f"{type(err).__name__}: {err}")]
    checks[0] = replace(checks[0], seconds=time.perf_counter() - t)
    return checks


def check_seg(result: AnalysisResult, path: Path, tools: GateTools | None = None) -> tuple[GateCheck, ...]:
    """dciodvfy, highdicom and dcmqi read-backs of the SEG written for ``result``."""
    tools = tools or GateTools.discover()
    expected = segment_number_map(result)
    return (
        *_guarded("SEG", "dciodvfy", lambda: _dciodvfy(tools, "SEG", path)),
        *_guarded("SEG", "highdicom read-back", lambda: _seg_highdicom(result, path, expected)),
        *_guarded("SEG", "dcmqi segimage2itkimage", lambda: _seg_dcmqi(tools, result, path, expected)),
    )


def check_parametric_map(
    result: AnalysisResult, path: Path, tools: GateTools | None = None
) -> tuple[GateCheck, ...]:
    """dciodvfy and dcmqi read-back of the Parametric Map written for ``result``."""
    tools = tools or GateTools.discover()
    return (
        *_guarded("PM", "dciodvfy", lambda: _dciodvfy(tools, "PM", path)),
        *_guarded("PM", "dcmqi paramap2itkimage", lambda: _pm_dcmqi(tools, result, path)),
    )


def check_sr(
    result: AnalysisResult, path: Path, seg_path: Path, tools: GateTools | None = None
) -> tuple[GateCheck, ...]:
    """dciodvfy, pixelmed template validation and dcmqi read-back of the SR written for ``result``."""
    tools = tools or GateTools.discover()
    return (
        *_guarded("SR", "dciodvfy", lambda: _dciodvfy_sr(tools, path, seg_path)),
        *_guarded("SR", "pixelmed DicomSRValidator", lambda: _sr_pixelmed(tools, path)),
        *_guarded("SR", "dcmqi tid1500reader", lambda: _sr_dcmqi(tools, result, path, seg_path)),
    )


def check_outputs(
    result: AnalysisResult,
    seg_path: Path,
    pm_path: Path,
    sr_path: Path,
    tools: GateTools | None = None,
) -> GateReport:
    """Run every gate check on the written files of ``result``; never raises for a failed check."""
    tools = tools or GateTools.discover()
    report = GateReport(
        (
            *check_seg(result, seg_path, tools),
            *check_parametric_map(result, pm_path, tools),
            *check_sr(result, sr_path, seg_path, tools),
        )
    )
    for check in report.checks:
        log.log(logging.INFO if check.passed or not check.checkable else logging.WARNING, "gate: %s", check)
    return report
