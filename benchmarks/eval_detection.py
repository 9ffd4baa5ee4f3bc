"""Lesion-level FROC of a trained detector on a dataset split (issue target: sensitivity >= 0.8 at 1 FP/scan
for lesions >= 10 mm).

Each case is read with ``dicom_io``, brought onto the model grid with the preprocessing recorded with
the detector (grid and CT window of its training cases, even if the model spec has changed since) and
run through ``medseg.detection.detect`` (Monte-Carlo samples, seeded). A finding hits a ground-truth
lesion when its centre lies in the lesion's box or their boxes overlap with IoU >= 0.1 (LPS mm).
Sweeping the finding score gives sensitivity against false positives per scan; for the ">= 10 mm" row,
findings that hit only smaller lesions are ignored (neither hit nor false positive).

    .venv/bin/python benchmarks/eval_detection.py DATASET DETECTOR_DIR [--split test] [--samples 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from medseg.evaluation import ScanFindings, froc, sensitivity_at

log = logging.getLogger("eval_detection")

FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def evaluate(
    dataset_path: Path, detector_dir: Path, split: str, samples: int, seed: int
) -> list[ScanFindings]:
    from dicom_io.reader import read_volume
    from medseg.detection import DetectionError, detect, load_detector
    from medseg.model_spec import MODELS_DIR, load_spec
    from medseg.preprocess import to_model
    from medseg.synth.dataset import load_dataset, load_lesions

    trained = load_detector(detector_dir)
    name = trained.provenance.preprocessing_model or "default_ct"
    model_spec = trained.input_spec(load_spec(MODELS_DIR / f"{name}.yaml"))
    dataset = load_dataset(dataset_path)
    entries = dataset.manifest.select(split=split)
    if not entries:
        raise DetectionError(f"dataset {dataset.manifest_path}: no {split} cases")
    log.info("%r; %d %s cases, %d samples, seed %d", trained, len(entries), split, samples, seed)
    results = []
    for entry in entries:
        started = time.perf_counter()
        model_input = to_model(read_volume(dataset.image_dir(entry)), model_spec)
        findings = detect(trained.detector, model_input, trained.spec, samples, seed)
        lesions = load_lesions(dataset.lesions(entry)).lesions
        results.append(ScanFindings.of(entry.case_id, findings, lesions))
        log.info(
            "%s: %d findings, %d lesions, %.1f s",
            entry.case_id,
            len(findings),
            len(lesions),
            time.perf_counter() - started,
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="dataset folder or manifest.json")
    parser.add_argument("detector", type=Path, help="folder with detector.pt and detector.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=None, help="Monte-Carlo samples (default: the spec's)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the spec's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    import torch

    from medseg.detection import DetectionError, load_detector

    torch.set_num_threads(args.threads)
    try:
        spec = load_detector(args.detector).spec
        samples = args.samples or spec.samples
        seed = spec.seed if args.seed is None else args.seed
        results = evaluate(args.dataset, args.detector, args.split, samples, seed)
    except (DetectionError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    rows: list[dict[str, Any]] = []
    header = ["lesions", "n", *(f"sens@{r:g}FP" for r in FP_RATES), "thr@1FP"]
    for label, min_mm in ((">= 10 mm", 10.0), ("all", 0.0)):
        points, total = froc(results, min_mm)
        sens = [sensitivity_at(points, r) for r in FP_RATES]
        rows.append(
            {
                "lesions": label,
                "count": total,
                "sensitivity": {f"{r:g}": p.sensitivity for r, p in zip(FP_RATES, sens, strict=True)},
                "threshold_at_1fp": sensitivity_at(points, 1.0).threshold,
            }
        )
    print(f"split {args.split}: {len(results)} scans, {samples} samples, seed {seed}")
    print("  ".join(f"{h:>10}" for h in header))
    for row in rows:
        cells = [row["lesions"], str(row["count"]), *(f"{v:.3f}" for v in row["sensitivity"].values())]
        cells.append(f"{row['threshold_at_1fp']:.3f}")
        print("  ".join(f"{c:>10}" for c in cells))
    if args.json:
        args.json.write_text(
            json.dumps({"split": args.split, "samples": samples, "seed": seed, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
