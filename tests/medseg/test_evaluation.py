"""Lesion-level FROC and the confidence intervals of the validation report, on hand-checked cases."""

from __future__ import annotations

import math

import pytest

from dicom_io.ai_result import LesionFinding
from medseg.evaluation import (
    ScanFindings,
    at_threshold,
    auroc,
    bootstrap_interval,
    dice_scores,
    found_by_kind,
    froc,
    grid_round_trip,
    sensitivity_at,
    wilson_interval,
)
from medseg.synth.dataset import LesionBox


def _lesion(index: int, lo: tuple[float, float, float], size: float) -> LesionBox:
    hi = (lo[0] + size, lo[1] + size, lo[2] + size)
    centre = tuple(a + size / 2 for a in lo)
    return LesionBox(
        index=index,
        organ="Liver",
        kind="hypodense",
        center_lps=centre,  # type: ignore[arg-type]
        min_corner_lps=lo,
        max_corner_lps=hi,
        diameter_mm=size,
        voxel_count=1,
    )


def _finding(centre: tuple[float, float, float], score: float, half: float = 3.0) -> LesionFinding:
    return LesionFinding(
        index=1,
        centre_lps=centre,
        box_min_lps=(centre[0] - half, centre[1] - half, centre[2] - half),
        box_max_lps=(centre[0] + half, centre[1] + half, centre[2] + half),
        score=score,
        score_spread=0.0,
        detection_rate=1.0,
        box_spread_mm=0.0,
        needs_review=False,
    )


def test_froc_counts_hits_false_positives_and_ignores_small_lesions() -> None:
    big, small = _lesion(1, (0, 0, 0), 20.0), _lesion(2, (100, 0, 0), 6.0)
    scan_a = ScanFindings.of(
        "a",
        [
            _finding((10, 10, 10), 0.9),  # hits the big lesion
            _finding((11, 10, 10), 0.8),  # second finding on it: neither hit nor false positive
            _finding((103, 3, 3), 0.7),  # hits only the small lesion
            _finding((300, 0, 0), 0.6),  # false positive
        ],
        [big, small],
    )
    scan_b = ScanFindings.of("b", [_finding((-50, 0, 0), 0.95)], [_lesion(1, (0, 0, 0), 12.0)])
    points, total = froc([scan_a, scan_b], 10.0)
    assert total == 2
    assert found_by_kind([scan_a, scan_b], 10.0, threshold=0.9) == {"liver hypodense": (1, 2)}
    assert found_by_kind([scan_a, scan_b], 0.0, threshold=0.7) == {"liver hypodense": (2, 3)}
    assert found_by_kind([scan_a, scan_b], 0.0, threshold=math.inf) == {"liver hypodense": (0, 3)}
    # thresholds: 0.95 -> 1 FP in 2 scans; 0.9 -> +hit; 0.8 duplicate; 0.6 -> 2nd FP (0.7 ignored)
    assert [(p.fp_per_scan, p.found) for p in points] == [(0, 0), (0.5, 0), (0.5, 1), (0.5, 1), (1.0, 1)]
    best = sensitivity_at(points, 1.0)
    assert best.sensitivity == 0.5 and best.threshold == pytest.approx(0.9)
    assert sensitivity_at(points, 0.25).sensitivity == 0.0
    # a threshold chosen elsewhere keeps the findings scoring at least it
    assert at_threshold(points, 0.85).threshold == pytest.approx(0.9)
    assert (at_threshold(points, 0.7).fp_per_scan, at_threshold(points, 0.7).found) == (0.5, 1)
    assert (at_threshold(points, 0.5).fp_per_scan, at_threshold(points, 2.0).found) == (1.0, 0)
    points_all, total_all = froc([scan_a, scan_b], 0.0)
    assert total_all == 3 and sensitivity_at(points_all, 1.0).found == 2


def test_wilson_and_bootstrap_intervals() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    low, high = bootstrap_interval([0.9, 0.92, 0.88, 0.91, float("nan")])
    assert 0.88 <= low < 0.9025 < high <= 0.92
    assert bootstrap_interval([0.5, 0.5, 0.5]) == (0.5, 0.5)


def test_auroc_counts_ordered_pairs_and_ties_half() -> None:
    assert auroc([0.9, 0.8], [0.1, 0.2, 0.3]) == 1.0  # every failure more uncertain than every success
    assert auroc([0.1], [0.5, 0.9]) == 0.0
    assert auroc([0.5, 0.2], [0.5, 0.1]) == pytest.approx((0.5 + 1 + 0 + 1) / 4)  # one tie of four pairs
    assert math.isnan(auroc([], [0.1]))


def test_grid_round_trip_is_exact_on_the_model_grid_and_loses_small_structures_on_a_coarser_one() -> None:
    """The truth through the grid: identical when the source is the model grid, lossy when it is finer."""
    import numpy as np

    from medseg.model_spec import parse_spec
    from tests.medseg.tiny_model import tiny_spec_data

    spec = parse_spec(tiny_spec_data(spacing_mm=6.0), "t")
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    labels[2:8, 3:9, 4:10] = 1
    labels[9, 9, 9] = 2
    same = grid_round_trip(labels, np.diag([6.0, 6.0, 6.0, 1.0]), spec)
    np.testing.assert_array_equal(same, labels)
    fine = np.zeros((36, 36, 36), dtype=np.uint8)
    fine[4:22, 5:23, 6:24] = 1  # 18 voxels of 2 mm: 6 model voxels, edges off the 6 mm lattice
    fine[31, 31, 31] = 2  # one 2 mm voxel between model voxel centres (source indices 30 and 33)
    scores = dice_scores(grid_round_trip(fine, np.diag([2.0, 2.0, 2.0, 1.0]), spec), fine, spec)
    first, second = (label.name for label in spec.labels[:2])
    assert 0.8 < scores[first] < 1.0
    assert scores[second] == 0.0
