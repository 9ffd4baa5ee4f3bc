"""PNG preview: key slices, segment colours, heat map, file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dicom_io.ai_result import AnalysisResult
from dicom_io.preview import key_slices, render_preview, write_png
from tests.dicom_io import result_factory as rf

synthetic, synthetic_result = rf.synthetic, rf.synthetic_result  # fixtures


def test_key_slices_show_every_structure_smallest_first() -> None:
    labels = np.zeros((8, 4, 4), dtype=np.uint8)
    labels[1:6] = 6  # a large structure fills slices 1-5
    labels[6, 0, 0] = 8  # a one-voxel lesion on a slice of its own
    labels[2, :2] = 1  # a mid-sized structure, fullest on slice 2
    assert key_slices(labels, 2) == [2, 6]  # the lesion and the mid-sized one, not two lung slices
    assert key_slices(labels, 4) == [1, 2, 3, 6]  # + the large one's first fullest slice, then the fullest
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
