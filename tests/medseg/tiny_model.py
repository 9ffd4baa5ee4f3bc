"""A tiny variant of the default spec: same labels, codes and settings, a network small enough for tests."""

from __future__ import annotations

from typing import Any

import yaml

from medseg.model_spec import MODELS_DIR


def tiny_spec_data(spacing_mm: float = 6.0) -> dict[str, Any]:
    """The default_ct spec as a mapping, with a 3-level 4-16 channel UNet, 32-voxel ROI and coarse grid."""
    data: dict[str, Any] = yaml.safe_load((MODELS_DIR / "default_ct.yaml").read_text())
    data["network"]["arguments"] = {
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "num_res_units": 0,
        "norm": "instance",
    }
    data["network"]["features"] = 4
    data["inference"]["roi_size"] = [32, 32, 32]
    data["preprocessing"]["spacing_mm"] = [spacing_mm] * 3
    return data
