"""Inference speed: Monte-Carlo vs one deterministic pass, and medseg vs the naive MONAI recipe.

Writes one synthetic 512x512xN CT series, then runs each variant in a fresh subprocess (so peak memory is
each variant's own) in the same run on the same machine:

- ``det``: medseg, read + one deterministic pass (samples=1);
- ``mc``: medseg, read + Monte-Carlo with ``--samples`` samples;
- ``naive``: the recipe people write from MONAI's tutorials with the same weights: LoadImage (PydicomReader),
  EnsureChannelFirst, Orientation, ScaleIntensityRange, for a spec with ``smooth_before_shrinking``
  GaussianSmooth (edge-padded by BorderPad: GaussianSmooth pads with zeros, in a CT window soft tissue),
  Spacing, ``model.train()``, ``--samples`` separate
  ``sliding_window_inference`` calls, mean softmax, the spec's decision step (``decision_scores``: body
  mask, decision weights and one-piece organs, which medseg applies too), SpatialResample back, argmax.

Prints the two ratios the issue asks for (MC / deterministic inference, naive / medseg whole stage), the
agreement between the naive and medseg label maps (per structure, their mean, and the voxel-weighted Dice
over all foreground labels), and peak RSS per variant. Both are Monte-Carlo estimates, so they cannot agree
better than medseg agrees with itself under another sampling seed: a fourth run (``mc_reseeded``, seed + 1)
measures that floor. A fifth (``naive_det``: the naive recipe with ``model.eval()`` and one pass) against
``det`` has no Monte-Carlo noise at all: what is left is the difference between the two pipelines' grids
and resampling.

    .venv/bin/python benchmarks/bench_inference.py --slices 300 --samples 10
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("det", "mc", "naive", "mc_reseeded", "naive_det")


def _write_series(folder: Path, slices: int) -> Path:
    from medseg.synth import Split, load_site, synthesize_case, write_case

    case = synthesize_case(load_site("site_a"), 5, 0, slices=slices)
    entry = write_case(case, folder / "case", manifest_root=folder, split=Split.TEST)
    return folder / entry.image_dir


def _variant_medseg(
    series: Path, model_name: str, samples: int, out: Path, seed_offset: int = 0
) -> dict[str, float]:
    import torch

    from dicom_io.reader import read_volume
    from medseg.inference import infer
    from medseg.model import load_model

    model = load_model(model_name)
    t0 = time.perf_counter()
    volume = read_volume(series)
    t1 = time.perf_counter()
    prediction = infer(volume, model, samples=samples, seed=model.spec.uncertainty.seed + seed_offset)
    t2 = time.perf_counter()
    np.save(out / "labels.npy", prediction.label_map)
    np.save(out / "affine.npy", volume.affine)
    del torch
    return {"read": t1 - t0, "inference": t2 - t1, "total": t2 - t0, **prediction.seconds}


def _variant_naive(series: Path, model_name: str, samples: int, out: Path) -> dict[str, float]:
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        BorderPad,
        EnsureChannelFirst,
        GaussianSmooth,
        LoadImage,
        Orientation,
        ScaleIntensityRange,
        Spacing,
        SpatialResample,
    )

    from medseg.inference import borders_by_intensity, decision_scores
    from medseg.model import load_model
    from medseg.preprocess import RuledScores, enclosed_body

    model = load_model(model_name)
    spec = model.spec
    windows = spec.preprocessing.intensity[spec.modalities[0]]
    t0 = time.perf_counter()
    image = EnsureChannelFirst()(LoadImage(image_only=True, reader="PydicomReader")(str(series)))
    t1 = time.perf_counter()
    loaded = Orientation(axcodes="LPS")(image)
    scaled = torch.cat(  # one input channel per window of the spec
        [
            ScaleIntensityRange(a_min=w.low, a_max=w.high, b_min=-1.0, b_max=1.0, clip=True)(loaded)
            for w in windows
        ]
    )
    if spec.preprocessing.smooth_before_shrinking:  # as the model was trained: smoothed, then shrunk
        step = np.asarray(spec.preprocessing.spacing_mm) / np.asarray(scaled.pixdim)
        sigma = [max((s - 1) / 2, 0.0) for s in step]
        border = [int(4 * s + 0.5) for s in sigma]
        padded = BorderPad(spatial_border=border, mode="replicate")(scaled)
        smoothed = torch.as_tensor(GaussianSmooth(sigma=sigma)(padded))
        inner = (slice(None), *(slice(b, b + n) for b, n in zip(border, scaled.shape[1:], strict=True)))
        scaled = MetaTensor(smoothed[inner], affine=scaled.affine)
    resampled = Spacing(pixdim=spec.preprocessing.spacing_mm, mode="bilinear")(scaled)
    if samples > 1:  # the usual way to "turn on dropout" (also puts every norm layer in training mode)
        model.network.train()
    else:
        model.network.eval()
    probabilities = None
    with torch.no_grad():
        for _ in range(samples):
            logits = sliding_window_inference(
                resampled[None], spec.inference.roi_size, 1, model.network, overlap=spec.inference.overlap
            )
            softmax = torch.softmax(torch.as_tensor(logits), dim=1)[0]
            probabilities = softmax if probabilities is None else probabilities + softmax
    assert probabilities is not None
    # the spec's decision step (body mask, decision weights, one-piece organs) on the model grid, as
    # medseg takes it: the comparison is of the inference stage, not of post-processing only one side does
    body = None
    if spec.inference.body_threshold_hu is not None:
        tissue = Spacing(pixdim=spec.preprocessing.spacing_mm, mode="bilinear")(
            (loaded > spec.inference.body_threshold_hu).float()
        )
        in_plane = min(spec.preprocessing.spacing_mm[:2])  # LPS: the third axis is S
        body = enclosed_body(np.asarray(tissue[0]) >= 0.5, 2, in_plane)
    mean = decision_scores(torch.as_tensor(probabilities / samples), spec, body)
    mean = MetaTensor(mean, affine=resampled.affine)
    back = SpatialResample(mode="bilinear")(mean, dst_affine=image.affine, spatial_size=image.shape[1:])
    scores = torch.as_tensor(back)
    # borders the spec decides by HU, on the image's own grid as medseg does (the series' 2 mm slices are
    # finer than the model grid, where medseg applies the rules: ``label_map_on_source``)
    if spec.border_rules:
        ruled = RuledScores.of(scores, list(spec.border_rules))
        labels = borders_by_intensity(ruled, np.asarray(image[0], dtype=np.float32), spec)
    else:
        labels = scores.argmax(0).numpy().astype(np.uint8)
    t2 = time.perf_counter()
    np.save(out / "labels.npy", labels)
    np.save(out / "affine.npy", np.asarray(image.affine))  # RAS, MONAI reader axis order
    return {"read": t1 - t0, "inference": t2 - t1, "total": t2 - t0}


def _peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM belongs to the address space, which exec replaces, whereas
    Linux carries ``ru_maxrss`` across exec (every child reported the parent's peak from writing the
    series: 4.3 GB)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace) -> None:
    out = Path(args.out)
    samples = 1 if args.variant in ("det", "naive_det") else args.samples
    if args.variant in ("naive", "naive_det"):
        seconds = _variant_naive(Path(args.series), args.model, samples, out)
    else:
        reseeded = int(args.variant == "mc_reseeded")
        seconds = _variant_medseg(Path(args.series), args.model, samples, out, seed_offset=reseeded)
    peak_mb = _peak_rss_mb()
    (out / "result.json").write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def _to_medseg_order(labels: np.ndarray, ras_affine: np.ndarray, lps_affine: np.ndarray) -> np.ndarray:
    """Reorder the naive (MONAI x, y, z with a RAS affine) label map onto medseg's (slice, row, column)."""
    from nibabel import orientations

    lps_from_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ras_affine
    transform = orientations.ornt_transform(
        orientations.io_orientation(lps_from_ras), orientations.io_orientation(lps_affine)
    )
    return np.asarray(orientations.apply_orientation(labels, transform))


def _agreement(a: np.ndarray, b: np.ndarray, names: list[str]) -> str:
    """Per-structure Dice, their mean, and the voxel-weighted Dice over all foreground labels."""
    from medseg.evaluation import dice_per_class

    per_class = dice_per_class(a, b, len(names) + 1)
    overlap = int(((a == b) & (a > 0)).sum())  # voxels where both give the same structure
    weighted = 2.0 * overlap / max(int((a > 0).sum()) + int((b > 0).sum()), 1)
    detail = ", ".join(f"{n} {d:.3f}" for n, d in zip(names, per_class, strict=True))
    return f"mean {np.nanmean(per_class):.4f}, voxel-weighted {weighted:.4f}  ({detail})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--model", default="default_ct")
    parser.add_argument(
        "--only", choices=VARIANTS, nargs="+", default=list(VARIANTS), help="run these variants (default all)"
    )
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--series", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        _child(args)
        return
    from medseg.model import load_model

    names = [label.name for label in load_model(args.model).spec.labels]
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        root = Path(tmp)
        series = _write_series(root, args.slices)
        results = {}
        for variant in args.only:
            out = root / variant
            out.mkdir()
            cmd = [sys.executable, __file__, "--variant", variant, "--series", str(series), "--out", str(out)]
            cmd += ["--samples", str(args.samples), "--model", args.model]
            subprocess.run(cmd, check=True)
            results[variant] = json.loads((out / "result.json").read_text())
            print(f"{variant:6s} {results[variant]}", flush=True)

        def labels(variant: str) -> np.ndarray:
            found = np.load(root / variant / "labels.npy")
            if not variant.startswith("naive"):
                return found
            lps_affine = np.load(root / next(v for v in results if not v.startswith("naive")) / "affine.npy")
            return _to_medseg_order(found, np.load(root / variant / "affine.npy"), lps_affine)

        print(f"\nCT 512x512x{args.slices}, {args.samples} samples, model {args.model}")
        comparisons = [
            ("agreement naive vs medseg (Dice, target >= 0.99)", "mc", "naive"),
            ("medseg vs medseg, sampling seed + 1 (noise floor)", "mc", "mc_reseeded"),
            ("one deterministic pass each, naive vs medseg (grids only)", "det", "naive_det"),
        ]
        agreements = {
            what: _agreement(labels(a), labels(b), names)
            for what, a, b in comparisons
            if a in results and b in results
        }
    seconds = {v: r["seconds"] for v, r in results.items()}
    if {"mc", "det"} <= set(seconds):
        ratio = seconds["mc"]["inference"] / seconds["det"]["inference"]
        print(f"MC / deterministic inference time:  {ratio:.2f}  (target <= 3.0)")
    if {"mc", "naive"} <= set(seconds):
        ratio = seconds["naive"]["total"] / seconds["mc"]["total"]
        print(f"naive MONAI / medseg whole stage:    {ratio:.2f}  (target >= 3.0)")
    for what, agreement in agreements.items():
        print(f"{what}: {agreement}")
    for v, r in results.items():
        print(f"peak RSS {v:6s} {r['peak_rss_mb']:.0f} MB, total {r['seconds']['total']:.1f} s")


if __name__ == "__main__":
    main()
