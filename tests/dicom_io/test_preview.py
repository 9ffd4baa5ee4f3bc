"""PNG preview: key slices, segment colours, heat map, file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dicom_io.ai_result import AnalysisResult
from dicom_io.preview import key_slices, render_preview, write_png
from tests.dicom_io import result_factory as rf

synthetic, synthetic_result = rf.synthetic, rf.synthetic_result  # fixtures


def test_key_slices_are_the_fullest_in_order() -> None:
    labels = np.zeros((6, 4, 4), dtype=np.uint8)
    labels[1, :2] = 1
    labels[4] = 2
    labels[2, 0, 0] = 1
    assert key_slices(labels, 2) == [1, 4]
    assert key_slices(np.zeros((9, 2, 2), np.uint8), 3) == [0, 4, 8]  # nothing found: spread out


def test_montage_shows_segment_colours_and_heat(synthetic_result: AnalysisResult, tmp_path: Path) -> None:
    rgb = render_preview(synthetic_result, count=3)
    _, rows, cols = synthetic_result.source.shape
    assert rgb.dtype == np.uint8 and rgb.shape == (2 * rows + 2, 3 * cols + 2 * 2, 3)
    top, bottom = rgb[:rows], rgb[rows + 2 :]
    reddish = top[..., 0].astype(int) - top[..., 2].astype(int) > 40
    assert reddish.any()  # the liver overlay
    assert (bottom[..., 0] > 200).any()  # hot boundary entropy
    path = write_png(rgb, tmp_path / "preview.png")
    with Image.open(path) as image:
        assert image.size == (rgb.shape[1], rgb.shape[0]) and image.mode == "RGB"
