"""Lesion-level FROC of a model's lesion findings on a dataset split, detector against lesion channel
(issue target: sensitivity >= 0.8 at 1 FP/scan for lesions >= 10 mm).

Each case is read with ``dicom_io`` and run through ``medseg.inference.infer`` (Monte-Carlo samples,
seeded), which gives both the findings of the model's lesion detector (``medseg train-detector``) and
those of its segmentation's lesion channel, from the same samples: both are scored on the same scans.
A finding hits a ground-truth lesion when its centre lies in the lesion's box or their boxes overlap with
IoU >= 0.1 (LPS mm). Sweeping the finding score gives sensitivity against false positives per scan; for
the ">= 10 mm" rows, findings that hit only smaller lesions are ignored (neither hit nor false positive).

    .venv/bin/python benchmarks/eval_detection.py DATASET MODEL [--split test] [--samples 10]
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
SOURCES = ("detector", "lesion channel")


def evaluate(
    dataset_path: Path, model_name: str, split: str, samples: int | None, sites: list[str]
) -> dict[str, list[ScanFindings]]:
    """Per source, one ``ScanFindings`` per case of the split."""
    from dicom_io.reader import read_volume
    from medseg.inference import infer
    from medseg.model import load_model
    from medseg.synth.dataset import Split, load_dataset, load_lesions

    model = load_model(model_name)
    if model.detector is None:
        raise ValueError(f"model {model_name} has no lesion detector; train one with medseg train-detector")
    dataset = load_dataset(dataset_path)
    entries = dataset.split_entries(Split(split), sites)
    log.info("%r; %d %s cases", model, len(entries), split)
    results: dict[str, list[ScanFindings]] = {source: [] for source in SOURCES}
    for entry in entries:
        started = time.perf_counter()
        prediction = infer(read_volume(dataset.image_dir(entry)), model, samples=samples)
        lesions = load_lesions(dataset.lesions(entry)).lesions
        results["detector"].append(ScanFindings.of(entry.case_id, prediction.lesions, lesions))
        results["lesion channel"].append(ScanFindings.of(entry.case_id, prediction.channel_lesions, lesions))
        log.info(
            "%s: %d detector findings, %d channel findings, %d lesions, %.1f s",
            entry.case_id,
            len(prediction.lesions),
            len(prediction.channel_lesions),
            len(lesions),
            time.perf_counter() - started,
        )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path, help="dataset folder or manifest.json")
    parser.add_argument("model", help="model name or folder with a lesion detector")
    parser.add_argument("--split", default="test")
    parser.add_argument("--site", action="append", default=[], help="only these sites (repeatable)")
    parser.add_argument("--samples", type=int, default=None, help="Monte-Carlo samples (default: the spec's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")

    from dicom_io.errors import DicomIOError

    try:
        results = evaluate(args.dataset, args.model, args.split, args.samples, args.site)
    except (DicomIOError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    rows: list[dict[str, Any]] = []
    for source, scans in results.items():
        for label, min_mm in ((">= 10 mm", 10.0), ("all", 0.0)):
            points, total = froc(scans, min_mm)
            sens = [sensitivity_at(points, r) for r in FP_RATES]
            rows.append(
                {
                    "source": source,
                    "lesions": label,
                    "count": total,
                    "sensitivity": {f"{r:g}": p.sensitivity for r, p in zip(FP_RATES, sens, strict=True)},
                    "threshold_at_1fp": sensitivity_at(points, 1.0).threshold,
                }
            )
    count = len(results["detector"])
    print(f"split {args.split}: {count} scans, samples {args.samples or 'as the spec'}")
    header = ["source", "lesions", "n", *(f"sens@{r:g}FP" for r in FP_RATES), "thr@1FP"]
    print("  ".join(f"{h:>14}" for h in header))
    for row in rows:
        cells = [row["source"], row["lesions"], str(row["count"])]
        cells += [f"{v:.3f}" for v in row["sensitivity"].values()]
        cells.append(f"{row['threshold_at_1fp']:.3f}")
        print("  ".join(f"{c:>14}" for c in cells))
    if args.json:
        args.json.write_text(
            json.dumps({"split": args.split, "samples": args.samples, "rows": rows}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
