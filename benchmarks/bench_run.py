"""Share of ``medseg run`` spent writing the DICOM results, and their sizes, per SEG profile.

Writes a synthetic 512x512xN CT series (site_a), runs the whole pipeline with the shipped default model
once per profile, and prints from each run's summary: total seconds, seconds building and writing SEG +
Parametric Map + SR (the issue's "writing" share, target <= 10 %), seconds in the gate (checking with
dciodvfy, DicomSRValidator, highdicom and dcmqi, reported separately), and file sizes.

    .venv/bin/python benchmarks/bench_run.py --slices 300
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from dicom_io.result_writer import SegProfile
from medseg.model import load_model
from medseg.pipeline import run_pipeline
from medseg.synth import Split, load_site, synthesize_case, write_case

WRITING_STEPS = ("results: build_seg", "results: build_pm", "results: build_sr", "results: write")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--samples", type=int, default=None)
    args = parser.parse_args()
    model = load_model()
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        root = Path(tmp)
        case = synthesize_case(load_site("site_a"), 7, 0, slices=args.slices)
        entry = write_case(case, root / "case", manifest_root=root, split=Split.TEST)
        for profile in SegProfile:
            summary = run_pipeline(
                root / entry.image_dir, root / profile.value, model, samples=args.samples, profile=profile
            )
            series = summary.series[0]
            total = summary.seconds["total"]
            writing = sum(series.seconds[k] for k in WRITING_STEPS)
            gate = series.seconds["results: gate"]
            sizes = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in series.output_bytes.items())
            print(
                f"{profile.value:8s} total {total:.1f} s, inference {series.seconds['inference']:.1f} s, "
                f"writing SEG+PM+SR {writing:.1f} s = {100 * writing / total:.1f} % (target <= 10 %), "
                f"gate {gate:.1f} s = {100 * gate / total:.1f} %; {sizes}",
                flush=True,
            )


if __name__ == "__main__":
    main()
