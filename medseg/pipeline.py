"""The main job: DICOM in -> volumes -> model with uncertainty -> SEG, Parametric Map, SR -> gate -> files.

Each stage takes the previous stage's typed result only (DESIGN.md): ``read_volumes`` gives
``ImageVolume``s, ``infer`` a ``Prediction``, ``analysis_result`` the ``AnalysisResult`` the DICOM writers
take, and ``write_results`` writes only what passed the gate. ``RunSummary`` is what the command prints
and what ``summary.json`` holds for scripts.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dicom_io.ai_result import AnalysisResult, SegmentDescription, UncertaintyQuantity
from dicom_io.reader import ReadResult, read_volumes
from dicom_io.reidentify import assign_missing_uids as reidentify
from dicom_io.result_writer import SegProfile, WrittenResults, write_results
from dicom_io.volume import ImageVolume
from medseg.inference import Prediction, infer
from medseg.model import Model
from medseg.model_spec import save_spec

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
StageCallback = Callable[[str, int, int], None]  # (stage, done, total)


class NothingToAnalyseError(ValueError):
    """The input holds no volume the model can analyse (the message lists what was found and why not)."""


def segment_descriptions(model: Model) -> tuple[SegmentDescription, ...]:
    """The model's labels as coded SEG segments (one per output class, in label order)."""
    return tuple(
        SegmentDescription(
            label=label.value,
            name=label.name,
            category=label.category.code(),
            type=label.type.code(),
            anatomic_region=label.anatomic_region.code() if label.anatomic_region else None,
            colour_rgb=label.colour,
        )
        for label in model.spec.labels
    )


def analysis_result(prediction: Prediction, model: Model) -> AnalysisResult:
    """What the DICOM writers need from a prediction: arrays on the source grid plus coded descriptions."""
    quantity = UncertaintyQuantity(model.spec.uncertainty.map_quantity)
    uncertainty = (
        prediction.mutual_information
        if quantity is UncertaintyQuantity.MUTUAL_INFORMATION
        else prediction.entropy
    )
    # the clinical-use statement is not a note: the writers say it once, from ``algorithm``
    notes = [f"{prediction.samples} Monte-Carlo samples, seed {prediction.seed}", *prediction.notes]
    return AnalysisResult(
        source=prediction.source,
        label_map=prediction.label_map,
        segments=segment_descriptions(model),
        uncertainty_map=uncertainty,
        uncertainty_quantity=quantity,
        structures=prediction.structures,
        lesions=prediction.lesions,
        algorithm=model.algorithm_identity(),
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class SeriesSummary:
    """One analysed series: its structures, findings, output files and time per stage."""

    series_instance_uid: str
    series_description: str
    shape: tuple[int, int, int]
    structures: list[dict[str, Any]]
    lesions: list[dict[str, Any]]
    outputs: dict[str, str]
    output_bytes: dict[str, int]
    gate: list[dict[str, Any]]
    repairs: list[str]  # opt-in changes made to the source's identity before writing
    notes: list[str]  # what the reader of the results should know (``AnalysisResult.notes``)
    seconds: dict[str, float]


@dataclass(frozen=True)
class RunSummary:
    """Everything ``medseg run`` reports: analysed series, refused ones, model and settings."""

    input: str
    output: str
    model: str
    model_version: str
    device_uid: str
    samples: int
    seed: int
    profile: str
    for_clinical_use: bool
    series: list[SeriesSummary]
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def _structure_rows(prediction: Prediction, model: Model) -> list[dict[str, Any]]:
    names = {label.value: label.name for label in model.spec.labels}
    return [
        {
            "label": m.label,
            "name": names[m.label],
            "volume_ml": round(m.volume_ml, 2),
            "mean_intensity": None if m.mean_intensity is None else round(m.mean_intensity, 1),
            "unit": str(prediction.source.unit),
            "mean_entropy": round(m.mean_entropy, 4),
            "boundary_entropy": round(m.boundary_entropy, 4),
            "mean_mutual_information": round(m.mean_mutual_information, 4),
            "volume_spread_ml": round(m.volume_spread_ml, 2),
            "sample_agreement": round(m.sample_agreement, 4),
            "needs_review": m.needs_review,
            "review_reasons": list(m.review_reasons),
            # the review reasons that come from the training range (empty: inside it, or none recorded)
            "outside_training_data": list(prediction.outside_training_data.get(names[m.label], ())),
        }
        for m in prediction.structures
    ]


def _output_folder(out_dir: Path, volume: ImageVolume, count: int) -> Path:
    if count == 1:
        return out_dir
    number = volume.series.series_number
    return out_dir / f"series-{number if number is not None else volume.series.series_instance_uid}"


def run_pipeline(
    source: str | Path,
    out_dir: Path,
    model: Model,
    *,
    samples: int | None = None,
    seed: int | None = None,
    profile: SegProfile = SegProfile.BROAD,
    preview: bool = True,
    assign_missing_uids: bool = False,
    stage: StageCallback | None = None,
) -> RunSummary:
    """Analyse every volume in ``source`` that ``model`` handles; write results and ``summary.json``."""
    n = samples if samples is not None else model.spec.uncertainty.samples
    if n < 1:  # before anything is read or written, so a bad argument leaves no output folder behind
        raise ValueError(f"samples must be >= 1, got {n}")
    started = time.perf_counter()
    report = stage or (lambda name, done, total: None)
    report("reading DICOM", 0, 1)
    read: ReadResult = read_volumes(source)
    read_seconds = time.perf_counter() - started
    usable = [v for v in read.volumes if v.modality in model.spec.modalities]
    skipped = [
        {"series": r.series_instance_uid, "description": r.series_description, "reason": r.reason}
        for r in read.refusals
    ] + [
        {
            "series": v.series.series_instance_uid,
            "description": v.series.series_description,
            "reason": f"modality {v.modality} is not handled by model {model.spec.name}",
        }
        for v in read.volumes
        if v not in usable
    ]
    if not usable:
        found = "; ".join(f"{s['series']}: {s['reason']}" for s in skipped) or _no_images(read)
        raise NothingToAnalyseError(f"{source}: nothing model {model.spec.name} can analyse ({found})")
    out_dir.mkdir(parents=True, exist_ok=True)
    series = []
    for index, source_volume in enumerate(usable):
        volume, repairs = reidentify(source_volume) if assign_missing_uids else (source_volume, ())
        t0 = time.perf_counter()

        def inference_stage(name: str, i: int = index) -> None:
            report(f"inference: {name}", i, len(usable))

        prediction = infer(volume, model, samples=n, seed=seed, stage=inference_stage)
        t1 = time.perf_counter()
        report("writing and checking DICOM results", index, len(usable))
        result = analysis_result(prediction, model)
        written: WrittenResults = write_results(
            result,
            _output_folder(out_dir, volume, len(usable)),
            profile=profile,
            preview=preview,
        )
        t2 = time.perf_counter()
        series.append(
            SeriesSummary(
                series_instance_uid=volume.series.series_instance_uid,
                series_description=volume.series.series_description,
                shape=(int(volume.array.shape[0]), int(volume.array.shape[1]), int(volume.array.shape[2])),
                structures=_structure_rows(prediction, model),
                lesions=[asdict(lesion) for lesion in prediction.lesions],
                outputs={
                    kind: str(path)
                    for kind, path in (
                        ("seg", written.seg),
                        ("parametric_map", written.parametric_map),
                        ("sr", written.sr),
                        ("preview", written.preview),
                    )
                    if path is not None
                },
                output_bytes=dict(written.sizes),
                gate=[asdict(check) for check in written.gate.checks],
                repairs=list(repairs),
                notes=list(result.notes),
                seconds={
                    **{f"inference: {k}": round(v, 3) for k, v in prediction.seconds.items()},
                    "inference": round(t1 - t0, 3),
                    **{f"results: {k}": round(v, 3) for k, v in written.seconds.items()},
                    "write + gate": round(t2 - t1, 3),
                },
            )
        )
    save_spec(model.spec, out_dir / "model_spec.yaml")
    summary = RunSummary(
        input=str(source),
        output=str(out_dir),
        model=model.spec.name,
        model_version=model.spec.version,
        device_uid=model.device_uid,
        samples=n,
        seed=model.spec.uncertainty.seed if seed is None else seed,
        profile=str(profile),
        for_clinical_use=model.spec.for_clinical_use,
        series=series,
        skipped=skipped,
        seconds={"read": round(read_seconds, 3), "total": round(time.perf_counter() - started, 3)},
    )
    (out_dir / SUMMARY_FILE).write_text(summary.to_json())
    report("done", 1, 1)
    return summary


def _no_images(read: ReadResult) -> str:
    """Why a source held no image at all: the reader's reasons for the files it skipped (a missing path,
    non-DICOM files), the first few of them."""
    shown = [f"{f.name}: {f.reason}" for f in read.inventory.skipped[:3]]
    more = len(read.inventory.skipped) - len(shown)
    return (
        "no DICOM images"
        + (": " + "; ".join(shown) if shown else "")
        + (f" and {more} more" if more > 0 else "")
    )
