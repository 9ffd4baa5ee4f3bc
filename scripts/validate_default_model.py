"""Validation report of a model on held-out synthetic CT: Dice, lesions, uncertainty under shift, and
whether the model's training range tells the shifted scans apart.

Generates fresh cases (a dataset seed never used for training) from every training site, plus the same
cases with injected artefacts (metal, noise, motion), cut to a short series (a 48 mm slab, as a limited
scan arrives), cases from the held-out sites ``site_d`` (a noisy low-dose scanner) and ``site_e`` (a late
arterial-phase protocol), every clean case rescanned on site_d's scanner (the same patient, anatomy and
grid, with site_d's noise, kernel and HU calibration) and every clean case imaged in the arterial phase
(the same patient, scanner and grid), runs Monte-Carlo inference on each and writes
``validation_reports/<model>.md`` and ``.json``. Last, the one real scan with a real-anatomy reference:
TotalSegmentator's example CT (``../shared/data``) against TotalSegmentator's own segmentation of it.

    .venv/bin/python scripts/validate_default_model.py                 # the shipped default_ct
    .venv/bin/python scripts/validate_default_model.py --model DIR --cases 2 --slices 200

Cases are evaluated in memory (the synthetic image and its exact ground truth on the same grid); the
DICOM round trip is covered by the reader and pipeline tests.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from dicom_io.image_writer import deterministic_uid
from dicom_io.reader import read_volume
from dicom_io.volume import GeometryReport, ImageVolume, IntensityUnit, Modality, SeriesContext
from medseg.calibration import with_decision_weights
from medseg.evaluation import (
    TOTALSEGMENTATOR_CLASSES,
    CaseEvaluation,
    ScanFindings,
    at_threshold,
    auroc,
    bootstrap_interval,
    dice_scores,
    evaluate_prediction,
    found_by_kind,
    froc,
    grid_round_trip,
    read_reference_labels,
    reference_dice,
    sensitivity_at,
    wilson_interval,
)
from medseg.inference import Prediction, decision_scores, infer, label_map_on_source
from medseg.model import Model, load_model
from medseg.preprocess import argmax_to_source
from medseg.synth import ContrastPhase, SynthCase, load_site, synthesize_case
from medseg.synth.artefacts import Artefact, inject
from medseg.training_range import TrainingRange

REPORTS = Path(__file__).resolve().parents[1] / "validation_reports"
TRAINING_SITES = ("site_a", "site_b", "site_c")
UNSEEN_SITES = ("site_d", "site_e")  # never trained on; site_d's shift lies inside the augmentation's ranges
UNSEEN_SITE = UNSEEN_SITES[0]  # whose scanner rescans every clean case
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0)
SHORT_SCAN_MM = 48.0
SHORT_SCAN = "short scan"
UNSEEN_SCANNER = f"{UNSEEN_SITE} scanner"  # a clean case's patient, imaged on the unseen site's scanner
ALTERED = (*(a.value for a in Artefact), SHORT_SCAN)  # conditions made from the first clean case
ARTERIAL_PHASE = "arterial phase"  # a clean case's patient, scanned in a phase no training site uses
PAIRED = (*ALTERED, UNSEEN_SCANNER, ARTERIAL_PHASE)  # conditions with the same case clean to compare against
FAILED_DICE = 0.90  # the organ target of the default model: below it a segmentation has failed
WEIGHTS_ALL_ONE = "decision weights all 1"
BORDERS_BY_NETWORK = "borders by the network alone"
ABLATION_NOTES = {  # the clean cases' rows without one of the model's decision steps, and what they are
    WEIGHTS_ALL_ONE: "Decision weights all 1: the same predictions with the label map taken from the "
    "network's probabilities as they are, without the model's fitted decision weights (`medseg calibrate`).",
    BORDERS_BY_NETWORK: "Borders by the network alone: the same predictions without the spec's "
    "`border_intensity` rules (bone's border decided by HU where the model grid cannot draw it).",
}
REAL_CT = Path(__file__).resolve().parents[2] / "shared/data/TotalSegmentator/tests/reference_files"


def _unseen(site: str) -> str:
    """The condition of a held-out site's own cases."""
    return f"unseen {site}"


def _volume(image: np.ndarray, affine: np.ndarray, case_id: str) -> ImageVolume:
    return ImageVolume(
        array=image.astype(np.float32),
        affine=affine,
        modality=Modality.CT,
        unit=IntensityUnit.HOUNSFIELD,
        series=SeriesContext(
            "2.25.1", deterministic_uid("validation", case_id), None, 1, case_id, "synthetic", case_id
        ),
        frames=(),
        geometry=GeometryReport(image.shape[0], 0.0, 0.0, 0.0, 0.0, ()),
    )


def _short_scan(case: SynthCase) -> SynthCase:
    """The middle ``SHORT_SCAN_MM`` of the case along z (image, labels and affine cut together)."""
    slices = min(case.image.shape[0], max(1, round(SHORT_SCAN_MM / abs(case.affine[2, 0]))))
    start = (case.image.shape[0] - slices) // 2
    affine = case.affine.copy()
    affine[:3, 3] += start * affine[:3, 0]
    window = slice(start, start + slices)
    return replace(case, image=case.image[window], labels=case.labels[window], affine=affine)


def _by_condition(evaluations: list[CaseEvaluation]) -> Iterator[tuple[str, list[CaseEvaluation]]]:
    """Each condition that has cases, in report order (clean, paired shifts, held-out sites), with them."""
    for condition in ["clean", *PAIRED, *map(_unseen, UNSEEN_SITES)]:
        rows = [e for e in evaluations if e.condition == condition]
        if rows:
            yield condition, rows


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default_ct")
    parser.add_argument("--cases", type=int, default=5, help="clean cases per training site")
    parser.add_argument("--seed", type=int, default=1001, help="dataset seed (not a training seed)")
    parser.add_argument("--slices", type=int, default=None, help="override slice count (quick runs)")
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args()
    model = load_model(args.model)
    spec = model.spec
    evaluations: list[CaseEvaluation] = []
    ceilings: dict[str, list[dict[str, float]]] = {site: [] for site in TRAINING_SITES}
    # the clean cases' Dice with every decision weight at 1, when the model has any other (its effect)
    unweighted_spec = with_decision_weights(spec, {label.name: 1.0 for label in spec.labels})
    calibrated = unweighted_spec != spec
    unweighted: dict[str, list[dict[str, float]]] = {site: [] for site in TRAINING_SITES}
    # ... and with every border left to the network, when the spec decides some by HU (their effect)
    unruled: dict[str, list[dict[str, float]]] = {site: [] for site in TRAINING_SITES}

    def run(case: SynthCase, image: np.ndarray, site: str, condition: str) -> Prediction:
        started = time.perf_counter()
        prediction = infer(_volume(image, case.affine, case.case_id), model, samples=args.samples)
        evaluation = evaluate_prediction(
            prediction,
            case.labels,
            case.lesions,
            spec,
            case_id=case.case_id,
            site=site,
            condition=condition,
            contrast_phase=case.phase.value,
            seconds=time.perf_counter() - started,
        )
        evaluations.append(evaluation)
        dice = ", ".join(f"{k} {v:.3f}" for k, v in evaluation.dice.items())
        print(
            f"{case.case_id} {condition}: {dice}; MI {evaluation.mean_mutual_information_foreground:.4f}; "
            f"{len(prediction.lesions)} findings, {len(case.lesions)} lesions",
            flush=True,
        )
        return prediction

    held_out_sites = {site: load_site(site) for site in UNSEEN_SITES}
    unseen = held_out_sites[UNSEEN_SITE]
    for site in TRAINING_SITES:
        profile = load_site(site)
        for index in range(args.cases):
            case = synthesize_case(profile, args.seed, index, slices=args.slices)
            prediction = run(case, case.image, site, "clean")
            if calibrated:
                label_map = label_map_on_source(
                    decision_scores(prediction.mean_probabilities, unweighted_spec, prediction.body),
                    prediction.grid,
                    prediction.source,
                    unweighted_spec,
                )
                unweighted[site].append(dice_scores(label_map, case.labels, spec))
            if spec.border_rules:
                label_map = argmax_to_source(
                    decision_scores(prediction.mean_probabilities, spec, prediction.body), prediction.grid
                )
                unruled[site].append(dice_scores(label_map, case.labels, spec))
            rescanned = synthesize_case(profile, args.seed, index, slices=args.slices, scanner=unseen)
            run(rescanned, rescanned.image, site, UNSEEN_SCANNER)
            arterial = synthesize_case(
                profile, args.seed, index, slices=args.slices, phase=ContrastPhase.ARTERIAL
            )
            run(arterial, arterial.image, site, ARTERIAL_PHASE)
            through_grid = grid_round_trip(case.labels, case.affine, spec)
            ceilings[site].append(dice_scores(through_grid, case.labels, spec))
            if index == 0:
                for artefact in Artefact:
                    image = inject(case.image, artefact, seed=args.seed + index)
                    run(case, image, site, artefact.value)
                short = _short_scan(case)
                run(short, short.image, site, SHORT_SCAN)
    for held_out, profile in held_out_sites.items():
        for index in range(args.cases):
            case = synthesize_case(profile, args.seed, index, slices=args.slices)
            run(case, case.image, held_out, _unseen(held_out))

    real_scan = _real_scan(model, args.samples)
    REPORTS.mkdir(exist_ok=True)
    name = spec.name if args.model == "default_ct" else Path(args.model).name
    (REPORTS / f"{name}.json").write_text(
        json.dumps(
            {
                "model": spec.name,
                "version": spec.version,
                "device_uid": model.device_uid,
                "provenance": asdict(model.provenance),
                "command": "python scripts/validate_default_model.py "
                + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v is not None),
                "cases": [asdict(e) for e in evaluations],
                "grid_ceiling": ceilings,  # per clean case: Dice of the truth through the model grid
                "without_decision_weights": unweighted if calibrated else None,  # per clean case
                "without_border_intensity": unruled if spec.border_rules else None,  # per clean case
                "real_scan": real_scan,
            },
            indent=1,
            default=lambda value: value.tolist(),  # the numpy arrays of each case's lesion findings
        )
        + "\n"
    )
    (REPORTS / f"{name}.md").write_text(
        _markdown(
            model.spec.name,
            model.device_uid,
            evaluations,
            ceilings,
            {WEIGHTS_ALL_ONE: unweighted, BORDERS_BY_NETWORK: unruled},
            [label.name for label in spec.labels if not label.focal],
            model.training_range,
            real_scan,
            args,
        )
    )
    print(f"wrote {REPORTS / (name + '.md')}")


def _markdown(
    name: str,
    device_uid: str,
    evaluations: list[CaseEvaluation],
    ceilings: dict[str, list[dict[str, float]]],
    ablations: dict[str, dict[str, list[dict[str, float]]]],
    organs: list[str],
    training_range: TrainingRange | None,
    real_scan: dict[str, Any] | None,
    args: argparse.Namespace,
) -> str:
    labels = list(evaluations[0].dice)
    lines = [
        f"# Validation of `{name}` on held-out synthetic CT",
        "",
        f"Device UID `{device_uid}`. Dataset seed {args.seed} (never used in training), "
        f"{args.cases} clean cases per training site, artefacts injected into the first case of each "
        f"site and its middle {SHORT_SCAN_MM:g} mm as a short scan, {args.cases} cases from each held-out "
        f"site ({', '.join(f'`{s}`' for s in UNSEEN_SITES)}), every clean case rescanned on "
        f"`{UNSEEN_SITE}`'s scanner (same patient and grid; its noise, kernel and HU calibration) and "
        "every clean case in the late arterial phase (same patient, scanner and grid; a phase no "
        "training site scans in). "
        "Regenerate: `.venv/bin/python scripts/validate_default_model.py`.",
        "",
        "## Dice on clean held-out cases (source grid)",
        "",
        "| site | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for site in TRAINING_SITES:
        rows = [e for e in evaluations if e.site == site and e.condition == "clean"]
        lines.append(
            f"| {site} | " + " | ".join(f"{_nanmean([e.dice[k] for e in rows]):.3f}" for k in labels) + " |"
        )
    clean = [e for e in evaluations if e.condition == "clean"]
    lines.append(
        "| all | " + " | ".join(f"{_nanmean([e.dice[k] for e in clean]):.3f}" for k in labels) + " |"
    )
    lines.append(
        "| all, 95 % CI | "
        + " | ".join("{:.3f}-{:.3f}".format(*bootstrap_interval([e.dice[k] for e in clean])) for k in labels)
        + " |"
    )
    groups = [
        *(
            (
                f"all, {phase.replace('_', ' ')} ({n} case{'s' * (n != 1)})",
                [e for e in clean if e.contrast_phase == phase],
            )
            for phase, n in sorted(Counter(e.contrast_phase for e in clean).items())
        ),
        (
            "all, in the arterial phase (same patients)",
            [e for e in evaluations if e.condition == ARTERIAL_PHASE],
        ),
        *(
            (f"{site} (held out)", [e for e in evaluations if e.condition == _unseen(site)])
            for site in UNSEEN_SITES
        ),
    ]
    for title, rows in groups:
        if rows:
            lines.append(
                f"| {title} | "
                + " | ".join(f"{_nanmean([e.dice[k] for e in rows]):.3f}" for k in labels)
                + " |"
            )
    ablations = {row: dice for row, dice in ablations.items() if any(dice.values())}
    for row, ablated in ablations.items():
        every = [d for site in TRAINING_SITES for d in ablated[site]]
        for site, site_dice in (*((s, ablated[s]) for s in TRAINING_SITES), ("all", every)):
            lines.append(
                f"| {site}, {row} | "
                + " | ".join(f"{_nanmean([d[k] for d in site_dice]):.3f}" for k in labels)
                + " |"
            )
    for site in TRAINING_SITES:
        lines.append(
            f"| {site}, truth through the grid | "
            + " | ".join(f"{_nanmean([c[k] for c in ceilings[site]]):.3f}" for k in labels)
            + " |"
        )
    lines += [
        "",
        "CI: percentile bootstrap over cases (2,000 resamples). Truth through the grid: the ground "
        "truth moved onto the model grid as training labels are and back as predictions are "
        "(`grid_round_trip`); about what a network that learned its training labels exactly would "
        "score, so the gap between a site's row and this one is the network's. A site above it (bone, "
        "lung) gains from the network's soft output, which resolves thin structures that "
        "nearest-neighbour training labels lose. All, by phase: the clean cases grouped by the "
        "contrast phase they were scanned in. In the arterial phase: the same clean patients imaged in "
        "the late arterial phase, which no training site scans in. Held out: each held-out site's own "
        "cases." + "".join(f" {ABLATION_NOTES[row]}" for row in ablations),
    ]
    source = evaluations[0].lesion_source
    sources: list[tuple[str, Callable[[CaseEvaluation], ScanFindings]]] = [(source, lambda e: e.lesions)]
    if source != "segmentation":
        sources.append(("segmentation lesion channel, for comparison", lambda e: e.channel_lesions))
    for name, scans_of in sources:
        lines += _lesion_lines(evaluations, name, scans_of)
    lines += [
        "",
        "## Uncertainty under shift",
        "",
        "Voxel means are over the predicted foreground (they depend on how much lung a scan covers); "
        "structure means average each present structure's own mean, as the report shows them. Sample "
        "agreement: mean pairwise Dice between Monte-Carlo samples (lower = less certain).",
        "",
        "| condition | cases | MI, voxel mean (nats) | MI, structure mean (nats) | entropy, voxel mean "
        "(nats) | sample agreement | mean Dice | structures flagged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for condition, rows in _by_condition(evaluations):
        lines.append(
            f"| {condition} | {len(rows)} | "
            f"{np.mean([e.mean_mutual_information_foreground for e in rows]):.4f} | "
            f"{np.mean([e.mean_structure_mutual_information for e in rows]):.4f} | "
            f"{np.mean([e.mean_entropy_foreground for e in rows]):.4f} | "
            f"{np.mean([e.mean_sample_agreement for e in rows]):.3f} | "
            f"{_nanmean([_nanmean(list(e.dice.values())) for e in rows]):.3f} | "
            f"{np.mean([len(e.flagged) for e in rows]):.1f} |"
        )
    return (
        "\n".join(
            lines
            + _paired_shift_lines(evaluations)
            + _error_tracking_lines(evaluations, organs)
            + _training_range_lines(evaluations, organs, training_range)
            + _real_scan_lines(real_scan)
        )
        + "\n"
    )


def _lesion_lines(
    evaluations: list[CaseEvaluation], source: str, scans_of: Callable[[CaseEvaluation], ScanFindings]
) -> list[str]:
    """FROC of one source of lesion findings on the clean cases and each held-out site."""
    score = (
        "the finding's mean score over the Monte-Carlo samples (a sample that missed it counts 0)"
        if source == "detector"
        else "the finding's peak mean lesion probability"
    )
    what = {
        "detector": "findings of the RetinaNet lesion detector, reported",
        "segmentation": "findings of the Monte-Carlo lesion channel, reported",
    }.get(source, source)
    lines = [
        "",
        f"## Lesion detection ({what}), clean cases",
        "",
        "A finding hits a lesion when its centre lies in the lesion's box or the boxes overlap with "
        f"IoU >= 0.1; the score is {score}. Sensitivity at each "
        "false-positive rate is the best over score thresholds (FROC); CI: Wilson 95 %.",
        "",
        "| scans | lesions | count | "
        + " | ".join(f"sens @ {r:g} FP/scan" for r in FP_RATES)
        + " | 95 % CI @ 1 FP |",
        "|---|---|---|" + "---|" * (len(FP_RATES) + 1),
    ]
    scans = [scans_of(e) for e in evaluations if e.condition == "clean"]
    unseen = {
        site: [scans_of(e) for e in evaluations if e.condition == _unseen(site)] for site in UNSEEN_SITES
    }
    groups = [
        ("clean", scans, ">= 10 mm", 10.0),
        ("clean", scans, "all", 0.0),
        *((site, site_scans, ">= 10 mm", 10.0) for site, site_scans in unseen.items() if site_scans),
    ]
    curves = {(group, title): froc(group_scans, minimum) for group, group_scans, title, minimum in groups}
    for (group, title), (points, total) in curves.items():
        at = [sensitivity_at(points, r) for r in FP_RATES]
        one = sensitivity_at(points, 1.0)
        low, high = wilson_interval(one.found, total)
        lines.append(
            f"| {group} | {title} | {total} | "
            + " | ".join(f"{p.sensitivity:.2f} ({p.found}/{total})" for p in at)
            + f" | {low:.2f}-{high:.2f} |"
        )
    operating = sensitivity_at(curves["clean", ">= 10 mm"][0], 1.0).threshold
    kinds = found_by_kind(scans, 10.0, operating)
    lines += [
        "",
        f"By kind, lesions >= 10 mm at the 1 FP/scan threshold (score >= {operating:.2f}): "
        + ", ".join(f"{kind} {found}/{total}" for kind, (found, total) in kinds.items())
        + ".",
    ]
    for site in (site for site, site_scans in unseen.items() if site_scans):
        points, total = curves[site, ">= 10 mm"]
        kept = at_threshold(points, operating)
        lines += [
            "",
            f"On the held-out {site} at that same threshold (a site's radiologists get the "
            f"threshold chosen on the training sites): {kept.found}/{total} lesions >= 10 mm found, "
            f"{kept.fp_per_scan:.1f} false positives per scan.",
        ]
    return lines


def _error_tracking_lines(evaluations: list[CaseEvaluation], organs: list[str]) -> list[str]:
    """Whether the uncertainty is high where the segmentation is wrong, over every case and condition:
    the property a review flag relies on, whatever made the case hard."""
    mean_dice = [_nanmean([e.dice[o] for o in organs]) for e in evaluations]
    failed = [d < FAILED_DICE for d in mean_dice]

    def split(scores: list[Any], bad: list[bool]) -> tuple[list[Any], list[Any]]:
        return [v for v, b in zip(scores, bad, strict=True) if b], [
            v for v, b in zip(scores, bad, strict=True) if not b
        ]

    case_scores = {
        "voxel MI": [e.mean_mutual_information_foreground for e in evaluations],
        "structure MI": [e.mean_structure_mutual_information for e in evaluations],
        "1 - sample agreement": [1 - e.mean_sample_agreement for e in evaluations],
    }
    lines = [
        "",
        "## Does the uncertainty track the error?",
        "",
        f"Every evaluated case above, all conditions together ({len(evaluations)} cases; organs: "
        f"{', '.join(organs)}). A case or an organ counts as failed below Dice {FAILED_DICE:.2f}. "
        "AUROC: the chance that a failed one has the higher uncertainty than one that did not fail "
        "(0.5 = no better than chance). A negative Spearman correlation: more uncertainty where the Dice "
        "is lower.",
        "",
        "| level | uncertainty | Spearman with Dice | failed | AUROC for failure |",
        "|---|---|---|---|---|",
    ]
    for what, scores in case_scores.items():
        rho = stats.spearmanr(mean_dice, scores).statistic
        lines.append(
            f"| case (mean organ Dice) | {what} | {rho:.2f} | {sum(failed)}/{len(failed)} | "
            f"{auroc(*split(scores, failed)):.2f} |"
        )
    organ_rows = [
        (e.dice[o], e.structure_mutual_information[o], e.structure_agreement[o], o in e.flagged)
        for e in evaluations
        for o in organs
        if o in e.structure_mutual_information and not math.isnan(e.dice[o])
    ]
    dice = [r[0] for r in organ_rows]
    bad = [d < FAILED_DICE for d in dice]
    for what, scores in (
        ("MI inside", [r[1] for r in organ_rows]),
        ("1 - sample agreement", [1 - r[2] for r in organ_rows]),
    ):
        rho = stats.spearmanr(dice, scores).statistic
        lines.append(
            f"| organ | {what} | {rho:.2f} | {sum(bad)}/{len(bad)} | {auroc(*split(scores, bad)):.2f} |"
        )
    flagged_bad, flagged_good = (sum(group) for group in split([r[3] for r in organ_rows], bad))
    missed = sum(
        1
        for e in evaluations
        for o in organs
        if o not in e.structure_mutual_information and not math.isnan(e.dice[o])
    )
    lines += [
        "",
        f"The review flag (the model's uncertainty thresholds) is set on {flagged_bad} of the {sum(bad)} "
        "failed organs "
        f"and on {flagged_good} of the {len(bad) - sum(bad)} others. Organs present in the truth but not "
        f"predicted at all (no uncertainty to read; counted in neither): {missed}.",
    ]
    return lines


def _training_range_lines(
    evaluations: list[CaseEvaluation], organs: list[str], known: TrainingRange | None
) -> list[str]:
    """Which conditions the model's training range (``medseg.training_range``) calls outside its training
    data, and what the flag adds to the uncertainty's for failed organs."""
    lines = ["", "## Is the scan inside the training data?", ""]
    if known is None:
        return [*lines, "The model records no training range (`training_range.json`): nothing to compare."]
    lines += [
        "Each structure's median HU and spread inside its predicted core, against the range of the same "
        f"two numbers over the model's {known.cases} training cases (`training_range.json`, made by "
        "`medseg train` or `medseg training-range`); outside by more than the spec's margins, the "
        "structure is flagged for review with the value and the range. Dice: mean over the organs "
        "flagged so, and over the others in the same cases.",
        "",
        "| condition | cases | cases with an organ outside | organs outside, per case | which (count) "
        "| Dice outside | Dice inside |",
        "|---|---|---|---|---|---|---|",
    ]
    for condition, rows in _by_condition(evaluations):
        which = Counter(o for e in rows for o in e.outside_training_data)
        outside = [e.dice[o] for e in rows for o in organs if o in e.outside_training_data]
        inside = [e.dice[o] for e in rows for o in organs if o not in e.outside_training_data]
        lines.append(
            f"| {condition} | {len(rows)} | {sum(bool(e.outside_training_data) for e in rows)} | "
            f"{np.mean([len(e.outside_training_data) for e in rows]):.1f} | "
            f"{', '.join(f'{o} ({n})' for o, n in which.most_common()) or '-'} | "
            f"{_nanmean(outside):.3f} | {_nanmean(inside):.3f} |"
        )
    failed = [
        (o in e.flagged, o in e.outside_training_data)
        for e in evaluations
        for o in organs
        if o in e.structure_mutual_information and e.dice[o] < FAILED_DICE
    ]
    lines += [
        "",
        f"Of the {len(failed)} failed organs (Dice < {FAILED_DICE:.2f}, all conditions), the uncertainty "
        f"flags {sum(u for u, _ in failed)}, the training range {sum(r for _, r in failed)}, and one or the "
        f"other {sum(u or r for u, r in failed)}.",
    ]
    return lines


def _real_scan(model: Model, samples: int | None) -> dict[str, Any] | None:
    """The model on TotalSegmentator's example CT against TotalSegmentator's segmentation of it, per
    structure: volumes, Dice and the review flag; None where ../shared/data is not beside the checkout."""
    if not REAL_CT.is_dir():
        return None
    volume = read_volume(REAL_CT / "example_ct_dicom")
    prediction = infer(volume, model, samples=samples)
    reference = read_reference_labels(REAL_CT / "example_seg_dicom.nii.gz", volume)
    dice = reference_dice(prediction.label_map, reference, model.spec)
    by_network = dice  # the label map without the spec's border_intensity rules
    if model.spec.border_rules:
        unruled = argmax_to_source(
            decision_scores(prediction.mean_probabilities, model.spec, prediction.body), prediction.grid
        )
        by_network = reference_dice(unruled, reference, model.spec)
    voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000
    names = {label.value: label.name for label in model.spec.labels}
    structures = [
        {
            "name": names[m.label],
            "volume_ml": m.volume_ml,
            "reference_ml": float(np.isin(reference, TOTALSEGMENTATOR_CLASSES[names[m.label]]).sum())
            * voxel_ml,
            "dice": dice[names[m.label]],
            "dice_borders_by_network": by_network[names[m.label]],
            "needs_review": m.needs_review,
            "review_reasons": list(m.review_reasons),
        }
        for m in prediction.structures
        if names[m.label] in dice
    ]
    print("real scan: " + ", ".join(f"{s['name']} {s['dice']:.3f}" for s in structures), flush=True)
    return {
        "shape": list(volume.array.shape),
        "structures": structures,
        "lesion_findings": len(prediction.lesions),
        "lesion_findings_flagged": sum(f.needs_review for f in prediction.lesions),
        "notes": list(prediction.notes),
    }


def _real_scan_lines(real_scan: dict[str, Any] | None) -> list[str]:
    lines = ["", "## A real scan: TotalSegmentator's example CT", ""]
    if real_scan is None:
        return [*lines, f"Not run: {REAL_CT} is not there (`../shared` beside the checkout)."]
    slices = real_scan["shape"][0]
    lines += [
        f"One real CT ({slices} slices of 2 mm through the upper abdomen, Siemens, contrast-enhanced; "
        "`../shared/data/TotalSegmentator/tests/reference_files/example_ct_dicom`) against "
        "TotalSegmentator's own segmentation of it (`example_seg_dicom.nii.gz`; bone: its vertebrae, "
        "ribs, sternum and limb bones). The reference is another model's output, not a hand's, and this "
        "is one patient: it shows where a model trained only on synthetic studies holds on real anatomy, "
        "and whether its review flags say where it does not.",
        "",
        "| structure | ours (mL) | TotalSegmentator (mL) | Dice | Dice, borders by the network alone "
        "| review |",
        "|---|---|---|---|---|---|",
    ]
    for row in real_scan["structures"]:
        review = "; ".join(row["review_reasons"]) if row["needs_review"] else "-"
        lines.append(
            f"| {row['name']} | {row['volume_ml']:.1f} | {row['reference_ml']:.1f} | {row['dice']:.3f} | "
            f"{row['dice_borders_by_network']:.3f} | {review} |"
        )
    lines += [
        "",
        f"Lesion findings: {real_scan['lesion_findings']} ({real_scan['lesion_findings_flagged']} flagged "
        "for review); TotalSegmentator marks no lesions, so they cannot be scored here. Notes: "
        + "; ".join(real_scan["notes"])
        + ".",
    ]
    return lines


def _ratio(shifted: float, clean: float) -> float:
    """shifted / clean; not a number where the clean case has no mutual information (one sample)."""
    return shifted / clean if clean > 0 else float("nan")


def _paired_shift_lines(evaluations: list[CaseEvaluation]) -> list[str]:
    """Each shifted case against the same case clean: the table above compares shifted cases with the mean
    of all clean cases, where a case-to-case difference (anatomy, how much lung a scan covers) can pass
    for a shift effect or hide one."""
    clean = {e.case_id: e for e in evaluations if e.condition == "clean"}
    pairs = {
        condition: [
            (clean[e.case_id], e) for e in evaluations if e.condition == condition and e.case_id in clean
        ]
        for condition in PAIRED
    }
    lines = [
        "",
        "Paired, each shifted case against the same case clean (ratio shifted / clean; "
        "higher: pairs where the shifted case has the larger value):",
        "",
        "| condition | pairs | voxel MI: higher | voxel MI: median ratio (range) | structure MI: higher "
        "| structure MI: median ratio | sample agreement: lower |",
        "|---|---|---|---|---|---|---|",
    ]
    for condition, both in pairs.items():
        if not both:
            continue
        voxel = [
            _ratio(a.mean_mutual_information_foreground, c.mean_mutual_information_foreground)
            for c, a in both
        ]
        structure = [
            _ratio(a.mean_structure_mutual_information, c.mean_structure_mutual_information) for c, a in both
        ]
        lower_agreement = sum(a.mean_sample_agreement < c.mean_sample_agreement for c, a in both)
        lines.append(
            f"| {condition} | {len(both)} | {sum(r > 1 for r in voxel)}/{len(both)} | "
            f"{np.nanmedian(voxel):.2f} ({np.nanmin(voxel):.2f}-{np.nanmax(voxel):.2f}) | "
            f"{sum(r > 1 for r in structure)}/{len(both)} | {np.nanmedian(structure):.2f} | "
            f"{lower_agreement}/{len(both)} |"
        )
    lines += [
        "",
        "| condition | case | voxel MI clean | voxel MI shifted | ratio "
        "| sample agreement clean -> shifted |",
        "|---|---|---|---|---|---|",
    ]
    for condition, both in pairs.items():
        for base, shifted in both:
            before, after = (
                base.mean_mutual_information_foreground,
                shifted.mean_mutual_information_foreground,
            )
            ratio = _ratio(after, before)
            lines.append(
                f"| {condition} | {shifted.case_id} | {before:.4f} | {after:.4f} | {ratio:.2f} | "
                f"{base.mean_sample_agreement:.3f} -> {shifted.mean_sample_agreement:.3f} |"
            )
    return lines


if __name__ == "__main__":
    main()
